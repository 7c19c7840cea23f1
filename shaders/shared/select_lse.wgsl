// The selection's compressed-attention log-sum-exps (select.wgsl, select_top.wgsl): as
// cmp_attn stored them, or combined from its split partials (a decode step). The including
// kernel binds them as `lse` ([B, Tq, Hq], or cmp_attn's partials when params.cmp_splits >
// 0) and defines `WG` (at least 8 * ROWS) and `partial` (at least 16 * ROWS f32s).

#import partials

var<workgroup> lse_s: array<f32, ROWS>;

// The statistics of cmp_attn's splits first, first + step, ... < splits (its partials) of
// the row whose first split starts at `base` (invocations share a row's splits this way,
// then merge_stats). Four splits' statistics are loaded before any is used, so that they
// cost one round trip.
fn split_stats(base: u32, splits: u32, first: u32, step: u32) -> SplitStats {
    let w = params.dv + 2u;
    var st = no_keys();
    for (var s0 = first; s0 < splits; s0 += 4u * step) {
        var m: array<f32, 4>;
        var l: array<f32, 4>;
        for (var c = 0u; c < 4u; c++) {
            let at = base + min(s0 + c * step, splits - 1u) * w + params.dv;
            m[c] = lse[at];
            l[c] = lse[at + 1u];
        }
        for (var c = 0u; c < 4u; c++) {
            if s0 + c * step < splits && l[c] > 0.0 {
                st = merge_stats(st, SplitStats(m[c], l[c]));
            }
        }
    }
    return st;
}

// Stores the compressed-attention log-sum-exp of rows row0 .. row0 + nh into lse_s: as
// cmp_attn stored it, or combined from its split partials when cmp_attn wrote those (a
// decode step): 8 invocations per row take every 8th split, then one merges their shares.
// Uses `partial` as scratch; the caller barriers before reading lse_s or writing `partial`.
fn load_lse(lid: u32, row0: u32, nh: u32) {
    if params.cmp_splits == 0u {
        if lid < ROWS {
            lse_s[lid] = select(0.0, lse[params.off_lse + row0 + lid], lid < nh);
        }
        return;
    }
    let i = lid / 8u;
    var st = no_keys();
    if i < nh {
        let base = params.off_lse + (row0 + i) * params.cmp_splits * (params.dv + 2u);
        st = split_stats(base, params.cmp_splits, lid % 8u, 8u);
    }
    if i < ROWS {
        partial[2u * lid] = st.m;
        partial[2u * lid + 1u] = st.l;
    }
    workgroupBarrier();
    if lid < ROWS {
        var t = no_keys();
        for (var c = 0u; c < 8u; c++) {
            let at = 2u * (8u * lid + c);
            t = merge_stats(t, SplitStats(partial[at], partial[at + 1u]));
        }
        lse_s[lid] = split_lse(t);
    }
}
