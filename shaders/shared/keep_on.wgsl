// The attention core's score hooks (see attention.wgsl) for compressed attention keeping
// its scores: row i's scores of keys t .. t + 3 (`whole` when all four are keys of this
// tile) go to cmp_attn.wgsl.

const KEEPS: bool = true;
const KEEP_SUMS: bool = false;

fn keep4(r: Rows, i: u32, t: u32, s: vec4<f32>, whole: bool) {
    keep_scores(r, i, t, s, whole);
}

fn keep_probs(r: Rows, lid: u32, t0: u32, m: f32, p0: vec4<f32>, p1: vec4<f32>) {}
