// Split attention's partials, [rows, splits, Dv + 2] (per split: Dv unnormalised output sums,
// then its running max and sum; see part_index in attention.wgsl): the row statistics that
// merge.wgsl and select.wgsl derive from them. The including kernel defines
// `fn part_at(i: u32) -> f32`, the element load.

#import params

// A row's softmax statistics over all its splits: the largest running max among the splits
// that saw a key, and the sum of their sums rescaled to it (0 when none did).
struct SplitStats {
    m: f32,
    l: f32,
}

// The statistics of no split at all.
fn no_keys() -> SplitStats {
    return SplitStats(-3.0e38, 0.0);
}

// The statistics of splits first, first + step, ... < splits of the row whose first split
// starts at `base` (invocations share a row's splits this way, then merge_stats).
fn split_stats(base: u32, splits: u32, first: u32, step: u32) -> SplitStats {
    let w = params.dv + 2u;
    var st = no_keys();
    for (var s = first; s < splits; s += step) {
        let at = base + s * w + params.dv;
        if part_at(at + 1u) > 0.0 {
            st = merge_stats(st, SplitStats(part_at(at), part_at(at + 1u)));
        }
    }
    return st;
}

// The statistics of two disjoint sets of splits together.
fn merge_stats(a: SplitStats, b: SplitStats) -> SplitStats {
    let m = max(a.m, b.m);
    return SplitStats(m, a.l * exp(a.m - m) + b.l * exp(b.m - m));
}

// Split s's weight in the merged row: e^(m_s - M) / L, 0 for a split that saw no key.
fn split_weight(base: u32, s: u32, st: SplitStats) -> f32 {
    let at = base + s * (params.dv + 2u) + params.dv;
    return select(0.0, exp(part_at(at) - st.m) / st.l, part_at(at + 1u) > 0.0);
}

// The row's log-sum-exp (0 for a row that saw no key, as cmp_attn stores it).
fn split_lse(st: SplitStats) -> f32 {
    return select(0.0, st.m + log(st.l), st.l > 0.0);
}
