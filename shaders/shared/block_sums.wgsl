// A selection block's importance from the block sums compressed attention kept
// (cmp_attn.wgsl's keep_block_sums, params.kept_tile > 0), summed over a group's heads
// (select_sums.wgsl, select_top.wgsl). The including kernel binds them as `kept` (cmp_attn's
// block sums: [B, Tq, Hq, kept_stride], per tile kept_tile / 4 + 2 elements) and holds the
// heads' log-sum-exps in `lse_s` (select_lse.wgsl).

// Heads whose kept sums load together: one round trip per 8 heads.
const HEADS: u32 = 8u;

// Block j's importance, summed over the nh heads from row on whose log-sum-exps are in
// lse_s, for a query that sees nv compressed tokens. The block's tokens from piece M j on
// lie in one tile, whose sums for them (M / 4 elements) weigh exp(m - lse); where the block
// starts a tile, the tokens before it reach in from the tile before, with that tile's max.
fn block_importance(j: u32, row: u32, nh: u32, nv: u32) -> f32 {
    let kt = params.kept_tile;
    let nq = kt / 4u;
    let quads = params.sel_block / params.cmp_stride / 4u;
    let first = j * quads * 4u;
    let tile = first / kt;
    // Tiles past a row's last visible token hold nothing it wrote (or zeros): their loads
    // read the row's first elements instead, and count for nothing.
    let own = tile * kt < nv;
    let before = first % kt == 0u && tile > 0u && (tile - 1u) * kt < nv
        && params.cmp_block > params.cmp_stride;
    let row0 = params.off_kept + row * params.kept_stride;
    let at = row0 + tile * (nq + 2u);
    let at_own = select(row0, at + (first % kt) / 4u, own);
    let at_max = select(row0, at + nq + 1u, own);
    // The tile before's `next` and max.
    let at_before = select(row0, at - 2u, before);
    var acc = 0.0;
    for (var i0 = 0u; i0 < nh; i0 += HEADS) {
        var q: array<f32, HEADS>;
        var m: array<f32, HEADS>;
        var b: array<f32, HEADS>;
        var bm: array<f32, HEADS>;
        for (var e = 0u; e < HEADS; e++) {
            let o = min(i0 + e, nh - 1u) * params.kept_stride;
            q[e] = kept[at_own + o];
            m[e] = kept[at_max + o];
            b[e] = kept[at_before + o];
            bm[e] = kept[at_before + 1u + o];
        }
        // Blocks of more than 4 pieces: their other sums.
        for (var a = 1u; a < quads; a++) {
            for (var e = 0u; e < HEADS; e++) {
                q[e] += kept[at_own + a + min(i0 + e, nh - 1u) * params.kept_stride];
            }
        }
        for (var e = 0u; e < HEADS; e++) {
            let lse = lse_s[min(i0 + e, nh - 1u)];
            let x = select(0.0, q[e] * exp(m[e] - lse), own)
                + select(0.0, b[e] * exp(bm[e] - lse), before);
            acc += select(0.0, x, i0 + e < nh);
        }
    }
    return acc;
}
