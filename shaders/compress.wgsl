// Blockwise compression: compressed token i of kv head h summarises rows [i*d, i*d + l) of
// `src`, by their mean or by sum_j W[h][j]^T (x_j + pe[h][j]). One workgroup per (batch,
// head) and TOKENS consecutive tokens (`params.q_block`), each invocation owning two output
// columns of every token. Mean loads row j of the four tokens together. For Linear, those
// rows are staged in workgroup memory and shared by every column, and each weight
// W[h][j][din][e] is loaded once for all four; each column's sum over a row's D inputs takes
// eight of them per loop iteration, in the same order as one at a time. On an H200 (f16,
// D = 128, 64k) one token per workgroup took 5.5 ms to compress with Linear, reading the
// whole W slice of its head from L2 for every token; four tokens per workgroup take 2.7 ms.
//
// Why so few loop iterations per invocation: software Vulkan (Mesa's llvmpipe) ends every
// loop of an invocation once they have taken 65,535 iterations together, silently. With 4
// columns per invocation and one input per iteration, Linear at l = 64, D = 256 needed
// 65,536 and returned partial sums there; with 2 columns and 4 inputs per iteration l = 512
// at D = 256 still did (l * (5 + D / 2)). Now the tokens share every loop iteration, and an
// invocation takes at most 12 + l * (3 + ceil(TOKENS * D / 128) + 2 * (D / 8 + D % 8))
// (`Plan::compress_iterations`; l up to 873 at D = 256); plans for an adapter with
// `DeviceLimits::loop_iterations` refuse larger l. 128 invocations: what every adapter the
// pipeline accepts has.

#import input
#import params

@group(0) @binding(1) var<storage, read> src: array<in_t>;        // [B, Tk, Hkv, D]
@group(0) @binding(2) var<storage, read_write> dst: array<in_t>;   // [B, C, Hkv, D]
@group(0) @binding(3) var<storage, read> w: array<f32>;           // [Hkv, l, D, D] (Linear)
@group(0) @binding(4) var<storage, read> pe: array<f32>;          // [Hkv, l, D] (Linear)

const WG: u32 = 128u;
const PER: u32 = 2u;       // columns per invocation: WG * PER = 256, the largest D
const RS: u32 = WG * PER;  // staged row stride
// Tokens per workgroup (Rust's `COMPRESS_TOKENS`; `Sums` has a field for each; tests/shaders.rs
// holds all three equal): Linear's rows at one block position share each weight load.
const TOKENS: u32 = 4u;

// The workgroup's staged rows at one block position: token t at t * RS.
var<workgroup> xrow: array<f32, TOKENS * RS>;

// Per column (of PER), the running sums of the workgroup's TOKENS tokens.
struct Sums {
    t0: f32,
    t1: f32,
    t2: f32,
    t3: f32,
}

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
    let per_wg = params.q_block;
    let groups = (params.c_count + per_wg - 1u) / per_wg;
    let h = wid % params.hkv;
    let rest = wid / params.hkv;
    let i0 = params.c_start + (rest % groups) * per_wg;
    let bb = rest / groups;
    // Tokens of this workgroup: i0 .. i0 + nt.
    let nt = min(per_wg, params.c_start + params.c_count - i0);
    let row0 = (bb * params.k_stride + i0 * params.cmp_stride) * params.hkv + h;
    var sums: array<Sums, PER>;
    for (var a = 0u; a < PER; a++) {
        sums[a] = Sums(0.0, 0.0, 0.0, 0.0);
    }
    for (var j = 0u; j < l; j++) {
        if params.linear == 0u {
            // Row j of each token, all four loads issued before any sum.
            let sb = params.off_k + (row0 + j * params.hkv) * dim;
            let next = params.cmp_stride * params.hkv * dim;
            for (var a = 0u; a < PER; a++) {
                let e = lid + a * WG;
                if e < dim {
                    let x = sb + e;
                    let last = x + (nt - 1u) * next;
                    let r = vec4<f32>(
                        f32(src[x]),
                        f32(src[min(x + next, last)]),
                        f32(src[min(x + 2u * next, last)]),
                        f32(src[min(x + 3u * next, last)]),
                    );
                    sums[a] = Sums(sums[a].t0 + r.x, sums[a].t1 + r.y, sums[a].t2 + r.z, sums[a].t3 + r.w);
                }
            }
        } else {
            // Row j of each token (zeros past the workgroup's tokens), plus pe.
            let pb = (h * l + j) * dim;
            for (var x = lid; x < TOKENS * dim; x += WG) {
                let t = x / dim;
                let e = x % dim;
                let row = row0 + (t * params.cmp_stride + j) * params.hkv;
                var v = 0.0;
                if t < nt {
                    v = f32(src[params.off_k + row * dim + e]) + pe[pb + e];
                }
                xrow[t * RS + e] = v;
            }
            workgroupBarrier();
            for (var a = 0u; a < PER; a++) {
                let e = lid + a * WG;
                if e < dim {
                    sums[a] = linear_columns(sums[a], pb, dim, e);
                }
            }
            workgroupBarrier();
        }
    }
    // Each token's sums by name (not a loop indexing them).
    for (var a = 0u; a < PER; a++) {
        let e = lid + a * WG;
        if e < dim {
            let s = sums[a];
            let db = params.off_kc + ((bb * params.c_stride + i0) * params.hkv + h) * dim + e;
            let next = params.hkv * dim;
            dst[db] = in_t(finished(s.t0, l));
            if nt > 1u {
                dst[db + next] = in_t(finished(s.t1, l));
            }
            if nt > 2u {
                dst[db + 2u * next] = in_t(finished(s.t2, l));
            }
            if nt > 3u {
                dst[db + 3u * next] = in_t(finished(s.t3, l));
            }
        }
    }
}

// A token's sum as stored: Mean divides by the block's rows.
fn finished(s: f32, l: u32) -> f32 {
    return select(s, s / f32(l), params.linear == 0u);
}

// `s` plus, for each token, its staged row times column e of W's rows pb .. pb + dim (one
// block position's [D, D] slice), the inputs in order, eight per iteration; each weight is
// loaded once for the four tokens.
fn linear_columns(s0: Sums, pb: u32, dim: u32, e: u32) -> Sums {
    var s = s0;
    let whole = dim / 8u * 8u;
    for (var din = 0u; din < whole; din += 8u) {
        let at = (pb + din) * dim + e;
        let wv = array<f32, 8>(
            w[at], w[at + dim], w[at + 2u * dim], w[at + 3u * dim],
            w[at + 4u * dim], w[at + 5u * dim], w[at + 6u * dim], w[at + 7u * dim],
        );
        s.t0 = step8(s.t0, 0u, din, wv);
        s.t1 = step8(s.t1, RS, din, wv);
        s.t2 = step8(s.t2, 2u * RS, din, wv);
        s.t3 = step8(s.t3, 3u * RS, din, wv);
    }
    for (var din = whole; din < dim; din++) {
        let wd = w[(pb + din) * dim + e];
        s.t0 += wd * xrow[din];
        s.t1 += wd * xrow[RS + din];
        s.t2 += wd * xrow[2u * RS + din];
        s.t3 += wd * xrow[3u * RS + din];
    }
    return s;
}

// `s` plus the staged inputs din .. din + 7 at `base` times `wv`, one at a time in order.
fn step8(s0: f32, base: u32, din: u32, wv: array<f32, 8>) -> f32 {
    let x = base + din;
    var s = s0;
    s += wv[0] * xrow[x];
    s += wv[1] * xrow[x + 1u];
    s += wv[2] * xrow[x + 2u];
    s += wv[3] * xrow[x + 3u];
    s += wv[4] * xrow[x + 4u];
    s += wv[5] * xrow[x + 5u];
    s += wv[6] * xrow[x + 6u];
    s += wv[7] * xrow[x + 7u];
    return s;
}
