// Reductions over the 8 invocations that share one attention row (lid / 8), by subgroup
// shuffles: used where the adapter has subgroup operations with subgroups of at least 8, so
// that the 8 consecutive invocations of a row share one (this takes subgroup lanes to follow
// local_invocation_index in a one-dimensional workgroup, as on every driver we know; the
// GPU tests check it on lavapipe, whose subgroups are 8 wide). reduce_shared.wgsl is the
// fallback with the same contract.

// The largest `v` among the row's 8 invocations.
fn row_max8(lid: u32, v: f32) -> f32 {
    var m = max(v, subgroupShuffleXor(v, 1u));
    m = max(m, subgroupShuffleXor(m, 2u));
    return max(m, subgroupShuffleXor(m, 4u));
}

// Nothing to publish: row_sum8 shuffles the parts directly.
fn publish_sum(lid: u32, v: f32) {}

// The sum of the row's 8 parts `v`.
fn row_sum8(lid: u32, v: f32) -> f32 {
    var s = v + subgroupShuffleXor(v, 1u);
    s += subgroupShuffleXor(s, 2u);
    return s + subgroupShuffleXor(s, 4u);
}

// The `v` of the row's previous invocation (part - 1; part 7's for part 0).
fn row_prev8(lid: u32, v: f32) -> f32 {
    let up = subgroupShuffleUp(v, 1u);
    let down = subgroupShuffleDown(v, 7u);
    return select(up, down, lid % 8u == 0u);
}
