// Sliding-window attention over keys max(0, p - w + 1) ..= p, fused with the gated
// combination out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (it runs last).

#import attention

@group(0) @binding(4) var<storage, read> gates: array<f32>;        // [B, Tq, Hq, 3]
@group(0) @binding(5) var<storage, read> o_cmp: array<f32>;        // [B, Tq, Hq, Dv]
@group(0) @binding(6) var<storage, read> o_slc: array<f32>;        // [B, Tq, Hq, Dv]
@group(0) @binding(7) var<storage, read_write> o_win: array<f32>;  // [B, Tq, Hq, Dv]
@group(0) @binding(8) var<storage, read_write> out: array<f32>;    // [B, Tq, Hq, Dv]

@compute @workgroup_size(128)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = attn_rows(linear_workgroup(wg, nwg));
    if !r.valid {
        return;
    }
    attn_begin(lid);
    let lo = select(0u, r.pos + 1u - params.window, r.pos + 1u > params.window);
    attn_keys(lid, r, params.tk, lo, r.pos + 1u);
    let dv = params.dv;
    for (var a = 0u; a < ACC; a++) {
        let o = lid + a * WG;
        if o >= r.n * dv {
            break;
        }
        let row = o / dv;
        let flat = r.row0 * dv + o;
        let w = attn_value(a, row);
        let gb = params.off_gates + (r.row0 + row) * 3u;
        o_win[params.off_owin + flat] = w;
        out[params.off_out + flat] = gates[gb] * o_cmp[params.off_ocmp + flat]
            + gates[gb + 1u] * o_slc[params.off_oslc + flat]
            + gates[gb + 2u] * w;
    }
}
