// The attention core's score hooks (see attention.wgsl), for kernels that keep no scores:
// nothing.

const KEEPS: bool = false;
const KEEP_SUMS: bool = false;

fn keep4(r: Rows, i: u32, t: u32, s: vec4<f32>, whole: bool) {}

fn keep_probs(r: Rows, lid: u32, t0: u32, m: f32, p0: vec4<f32>, p1: vec4<f32>) {}
