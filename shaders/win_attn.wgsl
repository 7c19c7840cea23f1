// Sliding-window attention over keys max(0, p - w + 1) ..= p, fused with the gated
// combination out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (it runs last). o_win is
// stored only where the plan asks for the branch outputs (params.branch 2).

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
    // COMBINE elements per invocation at a time (x, x + WG, ...), all their loads issued
    // before any is used: one round trip to device memory per COMBINE elements rather than
    // one per element. On an H200 (f16, D = 128) this took the window and combination of a
    // 64k prefill from 32.7 to 27.2 ms (16 at a time: 26.9; BENCHMARKS.md, twentieth
    // session).
    let n = r.n * DV;
    for (var x0 = lid; x0 < n; x0 += COMBINE * WG) {
        var g: array<vec3<f32>, COMBINE>;
        var oc: array<f32, COMBINE>;
        var os: array<f32, COMBINE>;
        for (var c = 0u; c < COMBINE; c++) {
            let flat = combined_flat(min(x0 + c * WG, n - 1u));
            let gb = params.off_gates + flat / DV * 3u;
            g[c] = vec3<f32>(gates[gb], gates[gb + 1u], gates[gb + 2u]);
            oc[c] = o_cmp[params.off_ocmp + flat];
            os[c] = o_slc[params.off_oslc + flat];
        }
        for (var c = 0u; c < COMBINE; c++) {
            let x = x0 + c * WG;
            if x < n {
                let flat = combined_flat(x);
                let value = attn_out(x / DV, x % DV);
                if params.branch == 2u {
                    o_win[params.off_owin + flat] = value;
                }
                out[params.off_out + flat] = g[c].x * oc[c] + g[c].y * os[c] + g[c].z * value;
            }
        }
    }
}

const COMBINE: u32 = 8u;  // elements per invocation whose combination loads go together

// The flat [B, Tq, Hq, Dv] element (relative to the chunk) of element x of the owned rows.
fn combined_flat(x: u32) -> u32 {
    return attn_row(x / DV) * DV + x % DV;
}
