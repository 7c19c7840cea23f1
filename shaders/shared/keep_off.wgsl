// The attention core's score hooks (see attention.wgsl), for kernels that keep no scores:
// nothing.

const KEEPS: bool = false;

fn keep4(r: Rows, i: u32, t: u32, s: vec4<f32>, whole: bool) {}
