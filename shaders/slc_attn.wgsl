// Selected-block attention, group-centric as in the paper: the query heads of one kv group
// share their selection, so each selected key/value tile is loaded once for all of them.

#import attention

@group(0) @binding(4) var<storage, read> block_indices: array<i32>;  // [B, Tq, Hkv, n]
@group(0) @binding(5) var<storage, read_write> o_slc: array<f32>;    // [B, Tq, Hq, Dv]

const NONE: u32 = 0xffffffffu;

// The keys of entry `s` of the selection at `ib` for the query at `pos`: its block up to the
// query; NONE (and an empty range) past the list's end.
fn selected_keys(ib: u32, s: u32, pos: u32) -> vec2<u32> {
    if s >= params.top_n {
        return vec2<u32>(NONE, 0u);
    }
    let j = block_indices[ib + s];
    if j < 0 {
        return vec2<u32>(NONE, 0u);
    }
    let lo = u32(j) * params.sel_block;
    return vec2<u32>(lo, min(lo + params.sel_block, pos + 1u));
}

@compute @workgroup_size(WG)
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
    let pos = attn_pos(r, 0u);
    let ib = params.off_idx + ((r.bb * params.q_count + r.iq0) * params.hkv + r.h) * params.top_n;
    // Each block's first tile is fetched while the block before it finishes (the first
    // block's while the queries load; none when the list is empty, whose range is empty).
    var keys = selected_keys(ib, r.split, pos);
    attn_begin(lid, r, params.k_stride, keys);
    if lid < ROWS {
        row_lo[lid] = 0u;
        row_hi[lid] = select(0u, pos + 1u, lid < r.n);
    }
    workgroupBarrier();
    for (var s = r.split; s < params.top_n; s += params.splits) {
        if keys.x == NONE {
            break;
        }
        let next = selected_keys(ib, s + params.splits, pos);
        attn_keys(lid, r, params.k_stride, keys.x, keys.y, next);
        keys = next;
    }
    attn_finish(lid, r);
    if params.partials != 0u {
        for (var x = lid; x < part_count(r); x += WG) {
            o_slc[params.off_oslc + part_index(r, x)] = part_value(x);
        }
        return;
    }
    for (var x = lid; x < r.n * DV; x += WG) {
        o_slc[params.off_oslc + attn_row(x / DV) * DV + x % DV] = attn_out(x / DV, x % DV);
    }
}
