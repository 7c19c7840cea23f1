// Blockwise compression: compressed token i of kv head h summarises rows [i*d, i*d + l) of
// `src`, by their mean or by sum_j W[h][j]^T (x_j + pe[h][j]). One workgroup per
// (batch, token, head); for Linear, each input row is staged once in workgroup memory and
// shared by every output column.

#import input
#import params

@group(0) @binding(1) var<storage, read> src: array<in_t>;        // [B, Tk, Hkv, D]
@group(0) @binding(2) var<storage, read_write> dst: array<in_t>;   // [B, C, Hkv, D]
@group(0) @binding(3) var<storage, read> w: array<f32>;           // [Hkv, l, D, D] (Linear)
@group(0) @binding(4) var<storage, read> pe: array<f32>;          // [Hkv, l, D] (Linear)

const WG: u32 = 64u;
const PER: u32 = 4u;  // 256 / WG output columns per invocation

var<workgroup> xrow: array<f32, 256>;

@compute @workgroup_size(64)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let wid = linear_workgroup(wg, nwg);
    if wid >= params.total_wg {
        return;
    }
    let dim = params.dim;
    let l = params.cmp_block;
    let h = wid % params.hkv;
    let rest = wid / params.hkv;
    let i = params.c_start + rest % params.c_count;
    let bb = rest / params.c_count;
    var accum: array<f32, PER>;
    for (var a = 0u; a < PER; a++) {
        accum[a] = 0.0;
    }
    for (var j = 0u; j < l; j++) {
        let sb = params.off_k + ((bb * params.k_stride + i * params.cmp_stride + j) * params.hkv + h) * dim;
        if params.linear == 0u {
            for (var a = 0u; a < PER; a++) {
                let e = lid + a * WG;
                if e < dim {
                    accum[a] += f32(src[sb + e]);
                }
            }
        } else {
            let pb = (h * l + j) * dim;
            for (var e = lid; e < dim; e += WG) {
                xrow[e] = f32(src[sb + e]) + pe[pb + e];
            }
            workgroupBarrier();
            for (var a = 0u; a < PER; a++) {
                let e = lid + a * WG;
                if e < dim {
                    var s = accum[a];
                    for (var din = 0u; din < dim; din++) {
                        s += w[(pb + din) * dim + e] * xrow[din];
                    }
                    accum[a] = s;
                }
            }
            workgroupBarrier();
        }
    }
    let db = params.off_kc + ((bb * params.c_stride + i) * params.hkv + h) * dim;
    for (var a = 0u; a < PER; a++) {
        let e = lid + a * WG;
        if e < dim {
            dst[db + e] = in_t(select(accum[a], accum[a] / f32(l), params.linear == 0u));
        }
    }
}
