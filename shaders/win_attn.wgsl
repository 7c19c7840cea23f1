// Sliding-window attention over keys max(0, p - w + 1) ..= p, fused with the gated
// combination out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (it runs last).

#import attention

@group(0) @binding(4) var<storage, read> gates: array<f32>;        // [B, Tq, Hq, 3]
@group(0) @binding(5) var<storage, read> o_cmp: array<f32>;        // [B, Tq, Hq, Dv]
@group(0) @binding(6) var<storage, read> o_slc: array<f32>;        // [B, Tq, Hq, Dv]
@group(0) @binding(7) var<storage, read_write> o_win: array<f32>;  // [B, Tq, Hq, Dv]
@group(0) @binding(8) var<storage, read_write> out: array<f32>;    // [B, Tq, Hq, Dv]

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
    let last = attn_pos(r, r.n - 1u);
    let keys = split_range(r, window_start(attn_pos(r, 0u)), last + 1u);
    attn_begin(lid, r, params.k_stride, keys);
    if lid < ROWS {
        let p = attn_pos(r, min(lid, r.n - 1u));
        row_lo[lid] = window_start(p);
        row_hi[lid] = select(0u, p + 1u, lid < r.n);
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
        let row = attn_row(x / DV);
        let flat = row * DV + x % DV;
        let gb = params.off_gates + row * 3u;
        let value = attn_out(x / DV, x % DV);
        o_win[params.off_owin + flat] = value;
        out[params.off_out + flat] = gates[gb] * o_cmp[params.off_ocmp + flat]
            + gates[gb + 1u] * o_slc[params.off_oslc + flat]
            + gates[gb + 2u] * value;
    }
}
