// Split attention's partials, [rows, splits, Dv + 2] (per split: Dv unnormalised output sums,
// then its running max and sum; see part_index in attention.wgsl): how merge.wgsl and
// select.wgsl combine the rows' softmax statistics.

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

// The statistics of two disjoint sets of splits together.
fn merge_stats(a: SplitStats, b: SplitStats) -> SplitStats {
    let m = max(a.m, b.m);
    return SplitStats(m, a.l * exp(a.m - m) + b.l * exp(b.m - m));
}

// The row's log-sum-exp (0 for a row that saw no key, as cmp_attn stores it).
fn split_lse(st: SplitStats) -> f32 {
    return select(0.0, st.m + log(st.l), st.l > 0.0);
}
