// Storage type of the inputs (q, k, v and the compressed keys/values): f16, on adapters
// with shader-f16. Arithmetic stays f32: every load converts. The attention kernels read
// q, k, v as words of two f16 (`in_s`, unpacked by load_f16.wgsl).
enable f16;
alias in_t = f16;
alias in_s = u32;
