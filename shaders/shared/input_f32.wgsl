// Storage type of the inputs (q, k, v and the compressed keys/values): f32.
// Import as `#import input`, first in a kernel; the f16 build imports input_f16 instead.
alias in_t = f32;
