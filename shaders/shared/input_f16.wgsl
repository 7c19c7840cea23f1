// Storage type of the inputs (q, k, v and the compressed keys/values): f16, on adapters
// with shader-f16. Arithmetic stays f32: every load converts.
enable f16;
alias in_t = f16;
