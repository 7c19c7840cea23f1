// Storage type of the inputs (q, k, v and the compressed keys/values): f32.
// Import as `#import input`, first in a kernel; the f16 build imports input_f16 instead.
// `in_t` is one element; `in_s` what the attention kernels' q, k, v arrays hold (see
// load_f32.wgsl).
alias in_t = f32;
alias in_s = f32;
// Four elements as a tile fetch holds them until it stores them (load_f32.wgsl's raw_k4):
// the elements themselves.
alias in_raw = vec4<f32>;
