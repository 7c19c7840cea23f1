// Storage type of the inputs (q, k, v and the compressed keys/values): f16, on adapters
// with shader-f16. Arithmetic stays f32: every load converts. The attention kernels read
// q, k, v as pairs of words, four f16 each (`in_s`, unpacked by load_f16.wgsl), so that a
// tile fetch loads four elements at once.
enable f16;
alias in_t = f16;
alias in_s = vec2<u32>;
// Four elements as a tile fetch holds them until it stores them (load_f16.wgsl's raw_k4):
// two packed words, or the elements' bits where they do not start a word.
alias in_raw = vec4<u32>;
