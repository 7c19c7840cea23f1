// Blockwise compression: compressed token i of kv head h summarises rows [i*d, i*d + l) of
// `src`, by their mean or by sum_j W[h][j]^T (x_j + pe[h][j]). One workgroup per
// (batch, token, head), each invocation owning two output columns; for Linear, each input
// row is staged once in workgroup memory and shared by every column, and each column's sum
// over the row's D inputs takes eight of them per loop iteration (in the same order as one
// at a time).
//
// Why so few loop iterations per invocation: software Vulkan (Mesa's llvmpipe) ends every
// loop of an invocation once they have taken 65,535 iterations together, silently. With 4
// columns per invocation and one input per iteration, Linear at l = 64, D = 256 needed
// 65,536 and returned partial sums there; with 2 columns and 4 inputs per iteration l = 512
// at D = 256 still did (l * (5 + D / 2)). Now it is at most 4 + l * (5 + 2 * (D / 8 + D %
// 8)) (`Plan::compress_iterations`; l up to 949 at D = 256), and plans for an adapter with
// `DeviceLimits::loop_iterations` refuse larger l. 128 invocations: what every adapter the
// pipeline accepts has.

#import input
#import params

@group(0) @binding(1) var<storage, read> src: array<in_t>;        // [B, Tk, Hkv, D]
@group(0) @binding(2) var<storage, read_write> dst: array<in_t>;   // [B, C, Hkv, D]
@group(0) @binding(3) var<storage, read> w: array<f32>;           // [Hkv, l, D, D] (Linear)
@group(0) @binding(4) var<storage, read> pe: array<f32>;          // [Hkv, l, D] (Linear)

const WG: u32 = 128u;
const PER: u32 = 2u;  // columns per invocation: WG * PER = 256, the largest D

var<workgroup> xrow: array<f32, WG * PER>;

@compute @workgroup_size(WG)
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
            for (var a = 0u; a < PER; a++) {
                let e = lid + a * WG;
                if e < dim {
                    xrow[e] = f32(src[sb + e]) + pe[pb + e];
                }
            }
            workgroupBarrier();
            for (var a = 0u; a < PER; a++) {
                let e = lid + a * WG;
                if e < dim {
                    accum[a] = linear_column(accum[a], pb, dim, e);
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

// `s` plus column e of the staged row times W's rows pb .. pb + dim (one block position's
// [D, D] slice), the inputs in order, eight per iteration.
fn linear_column(s0: f32, pb: u32, dim: u32, e: u32) -> f32 {
    var s = s0;
    let whole = dim / 8u * 8u;
    for (var din = 0u; din < whole; din += 8u) {
        let at = (pb + din) * dim + e;
        s += w[at] * xrow[din];
        s += w[at + dim] * xrow[din + 1u];
        s += w[at + 2u * dim] * xrow[din + 2u];
        s += w[at + 3u * dim] * xrow[din + 3u];
        s += w[at + 4u * dim] * xrow[din + 4u];
        s += w[at + 5u * dim] * xrow[din + 5u];
        s += w[at + 6u * dim] * xrow[din + 6u];
        s += w[at + 7u * dim] * xrow[din + 7u];
    }
    for (var din = whole; din < dim; din++) {
        s += w[(pb + din) * dim + e] * xrow[din];
    }
    return s;
}
