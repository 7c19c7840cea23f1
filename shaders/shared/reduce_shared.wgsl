// Reductions over the 8 invocations that share one attention row (lid / 8), through
// workgroup memory: the fallback where the adapter has no subgroup operations. The same
// functions, with the same contract, live in reduce_subgroup.wgsl.

var<workgroup> red_max: array<f32, WG>;   // per-invocation partial max
var<workgroup> red_sum: array<f32, WG>;   // per-invocation partial sum

// The largest `v` among the row's 8 invocations. Contains a barrier: call it from uniform
// control flow.
fn row_max8(lid: u32, v: f32) -> f32 {
    red_max[lid] = v;
    workgroupBarrier();
    var m = v;
    for (var c = lid & ~7u; c < (lid & ~7u) + 8u; c++) {
        m = max(m, red_max[c]);
    }
    return m;
}

// Publishes this invocation's part of a row sum; row_sum8 reads them after a barrier.
fn publish_sum(lid: u32, v: f32) {
    red_sum[lid] = v;
}

// The sum of the row's 8 published parts (after publish_sum and a barrier).
fn row_sum8(lid: u32, v: f32) -> f32 {
    var s = 0.0;
    for (var c = lid & ~7u; c < (lid & ~7u) + 8u; c++) {
        s += red_sum[c];
    }
    return s;
}

// The `v` of the row's previous invocation (part - 1; part 7's for part 0). Contains
// barriers: call it from uniform control flow.
fn row_prev8(lid: u32, v: f32) -> f32 {
    workgroupBarrier();  // every read of red_max before this call is done
    red_max[lid] = v;
    workgroupBarrier();
    return red_max[(lid & ~7u) | ((lid + 7u) & 7u)];
}
