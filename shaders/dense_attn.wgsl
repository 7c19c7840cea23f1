// Dense causal attention (flash-attention style: tiled, online softmax, GQA): every key
// 0 ..= p. The honest baseline for NSA's speed ratios, and an op in its own right.

#import attention

@group(0) @binding(4) var<storage, read_write> out: array<f32>;  // [B, Tq, Hq, Dv]

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = attn_rows(linear_workgroup(wg, nwg));
    if !r.valid {
        return;
    }
    let keys = split_range(r, 0u, attn_pos(r, r.n - 1u) + 1u);
    attn_begin(lid, r, params.k_stride, keys);
    if lid < ROWS {
        row_lo[lid] = 0u;
        row_hi[lid] = select(0u, attn_pos(r, min(lid, r.n - 1u)) + 1u, lid < r.n);
    }
    workgroupBarrier();
    attn_keys(lid, r, params.k_stride, keys.x, keys.y, vec2<u32>(0u));
    attn_finish(lid, r);
    if params.partials != 0u {
        for (var x = lid; x < part_count(r); x += WG) {
            out[params.off_out + part_index(r, x)] = part_value(x);
        }
        return;
    }
    for (var x = lid; x < r.n * DV; x += WG) {
        out[params.off_out + attn_row(x / DV) * DV + x % DV] = attn_out(x / DV, x % DV);
    }
}
