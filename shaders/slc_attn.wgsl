// Selected-block attention, group-centric as in the paper: the query heads of one kv group
// share their selection, so each selected key/value tile is loaded once for all of them.

#import attention

@group(0) @binding(4) var<storage, read> block_indices: array<i32>;  // [B, Tq, Hkv, n]
@group(0) @binding(5) var<storage, read_write> o_slc: array<f32>;    // [B, Tq, Hq, Dv]

@compute @workgroup_size(128)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    // One query per workgroup (q_block = 1): its heads share one selection.
    let r = attn_rows(linear_workgroup(wg, nwg));
    if !r.valid {
        return;
    }
    attn_begin(lid, r);
    let pos = attn_pos(r, 0u);
    if lid < ROWS {
        row_lo[lid] = 0u;
        row_hi[lid] = select(0u, pos + 1u, lid < r.n);
    }
    workgroupBarrier();
    let ib = params.off_idx + ((r.bb * params.q_count + r.iq0) * params.hkv + r.h) * params.top_n;
    for (var s = r.split; s < params.top_n; s += params.splits) {
        let j = block_indices[ib + s];
        if j < 0 {
            break;
        }
        let lo = u32(j) * params.sel_block;
        attn_keys(lid, r, params.k_stride, lo, min(lo + params.sel_block, pos + 1u));
    }
    attn_finish(lid, r);
    if params.partials != 0u {
        for (var x = lid; x < part_count(r); x += WG) {
            o_slc[params.off_oslc + part_index(r, x)] = part_value(x);
        }
        return;
    }
    for (var x = lid; x < r.n * DV; x += WG) {
        o_slc[params.off_oslc + attn_row(r, x / DV) * DV + x % DV] = attn_out(x / DV, x % DV);
    }
}
