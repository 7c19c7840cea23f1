// Combines the partial results of split attention (params.splits workgroups per row group,
// each over its own part of the keys; see part_index in shared/attention.wgsl) into one row:
// o = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, M = max_s m_s over splits that saw a
// key. Then what the unsplit kernel would have written for params.branch: 0 compressed
// (o_cmp and its log-sum-exp), 1 selected (o_slc), 2 window (o_win and the gated sum into
// out), 3 dense (out). One workgroup per [B, Tq, Hq] row of the chunk.

#import params

@group(0) @binding(1) var<storage, read> part: array<f32>;        // [rows, splits, Dv + 2]
@group(0) @binding(2) var<storage, read> gates: array<f32>;       // [B, Tq, Hq, 3]
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;   // [B, Tq, Hq]
@group(0) @binding(4) var<storage, read_write> o_cmp: array<f32>; // [B, Tq, Hq, Dv]
@group(0) @binding(5) var<storage, read_write> o_slc: array<f32>; // [B, Tq, Hq, Dv]
@group(0) @binding(6) var<storage, read_write> o_win: array<f32>; // [B, Tq, Hq, Dv]
@group(0) @binding(7) var<storage, read_write> out: array<f32>;   // [B, Tq, Hq, Dv]

const WG: u32 = 64u;
const SPLITS_MAX: u32 = 64u;

var<workgroup> weight: array<f32, SPLITS_MAX>;  // e^(m_s - M) / L, 0 for empty splits

@compute @workgroup_size(64)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = linear_workgroup(wg, nwg);
    if row >= params.total_wg {
        return;
    }
    let dv = params.dv;
    let w = dv + 2u;
    let base = params.off_k + row * params.splits * w;  // off_k: the partials' offset
    // Every invocation finds M and L itself (splits are few), then weighs one split.
    var m = -3.0e38;
    for (var s = 0u; s < params.splits; s++) {
        if part[base + s * w + dv + 1u] > 0.0 {
            m = max(m, part[base + s * w + dv]);
        }
    }
    var l = 0.0;
    for (var s = 0u; s < params.splits; s++) {
        let ls = part[base + s * w + dv + 1u];
        if ls > 0.0 {
            l += exp(part[base + s * w + dv] - m) * ls;
        }
    }
    if lid < params.splits {
        let ls = part[base + lid * w + dv + 1u];
        weight[lid] = select(0.0, exp(part[base + lid * w + dv] - m) / l, ls > 0.0);
    }
    workgroupBarrier();
    for (var e = lid; e < dv; e += WG) {
        var o = 0.0;
        for (var s = 0u; s < params.splits; s++) {
            let ws = weight[s];
            if ws > 0.0 {
                o += ws * part[base + s * w + e];
            }
        }
        let flat = row * dv + e;
        switch params.branch {
            case 0u: {
                o_cmp[params.off_ocmp + flat] = o;
            }
            case 1u: {
                o_slc[params.off_oslc + flat] = o;
            }
            case 2u: {
                let gb = params.off_gates + row * 3u;
                o_win[params.off_owin + flat] = o;
                out[params.off_out + flat] = gates[gb] * o_cmp[params.off_ocmp + flat]
                    + gates[gb + 1u] * o_slc[params.off_oslc + flat]
                    + gates[gb + 2u] * o;
            }
            default: {
                out[params.off_out + flat] = o;
            }
        }
    }
    if lid == 0u && params.branch == 0u {
        lse[params.off_lse + row] = select(0.0, m + log(l), l > 0.0);
    }
}
