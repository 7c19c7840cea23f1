// Storage type of the inputs (q, k, v and the compressed keys/values): f16, on adapters
// with shader-f16. Arithmetic stays f32: every load converts. The attention kernels read
// q, k, v as pairs (`in_s`), one 4-byte load for two elements (see load_f16.wgsl).
enable f16;
alias in_t = f16;
alias in_s = vec2<f16>;
// Four loaded elements as they wait in registers for the workgroup tile (qk.wgsl's `pre`):
// still f16, converted only when stored, so that no instruction waits on a load before the
// tile is needed (a conversion right after each load made the prefetch a stall).
alias pre_t = vec4<f16>;
