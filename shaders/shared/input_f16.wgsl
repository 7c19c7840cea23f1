// Storage type of the inputs (q, k, v and the compressed keys/values): f16, on adapters
// with shader-f16. Arithmetic stays f32: every load converts. The attention kernels read
// q, k, v as words of two f16 (`in_s`, unpacked by load_f16.wgsl).
enable f16;
alias in_t = f16;
alias in_s = u32;
// Four elements as a tile fetch holds them until it stores them (load_f16.wgsl's raw_k4):
// two packed words, or the elements' bits where they do not start a word.
alias in_raw = vec4<u32>;
