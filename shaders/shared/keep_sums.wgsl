// The attention core's score hooks (see attention.wgsl) for compressed attention keeping
// block sums instead of scores (params.kept_tile > 0): after each tile's softmax, the
// probabilities of the 8 invocations of row lid / 8 (keys 4 * part .. 4 * part + 3 in p0,
// 32 further in p1, relative to the tile's first key t0, as exp(s - m) with the row's
// running max m) go to cmp_attn.wgsl's keep_block_sums. Every invocation calls it, from
// uniform control flow (it shuffles between a row's invocations).

const KEEPS: bool = true;
const KEEP_SUMS: bool = true;

fn keep4(r: Rows, i: u32, t: u32, s: vec4<f32>, whole: bool) {}

fn keep_probs(r: Rows, lid: u32, t0: u32, m: f32, p0: vec4<f32>, p1: vec4<f32>) {
    keep_block_sums(r, lid, t0, m, p0, p1);
}
