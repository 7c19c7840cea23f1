// The selection's block scores from the block sums compressed attention kept
// (cmp_attn.wgsl's keep_block_sums, params.kept_tile > 0): each block's importance summed
// over the group's heads directly, without token probabilities (BLOCK_SUMS).

#import block_sums

// cmp_attn's block sums: [B, Tq, Hq, kept_stride], per tile kept_tile / 4 + 2 elements
@group(0) @binding(5) var<storage, read> kept: array<f32>;

const BLOCK_SUMS: bool = true;

// The queries are not needed.
fn load_rows(lid: u32, nh: u32, row: u32) {}

// Token probabilities are not formed (score_blocks instead).
fn score_tokens(lid: u32, bb: u32, h: u32, row: u32, nh: u32, t_lo: u32, t_hi: u32, base: u32) {}

// Adds block j0 + lid's importance (lid < jn) to pbuf[lid] (block_importance).
fn score_blocks(lid: u32, row: u32, nh: u32, j0: u32, jn: u32, nv: u32) {
    workgroupBarrier();  // lse_s of these heads is in
    if lid >= jn {
        return;
    }
    pbuf[lid] += block_importance(j0 + lid, row, nh, nv);
}
