// Block importance, group sum and top-n selection, streamed: one workgroup per
// (batch, query, kv head) walks its visible blocks in chunks, recomputes the group's
// compressed-attention probabilities for just the compressed tokens a chunk overlaps
// (from the log-sum-exp that cmp_attn stored), turns them into block scores with SPEC's
// overlap weights, and merges the chunk into a running top list in workgroup memory.
// No [T, C] or [T, blocks] matrix ever reaches device memory.

#import params

@group(0) @binding(1) var<storage, read> q: array<f32>;                     // [B, Tq, Hq, Dk]
@group(0) @binding(2) var<storage, read> kc: array<f32>;                    // [B, C, Hkv, Dk]
@group(0) @binding(3) var<storage, read> lse: array<f32>;                   // [B, Tq, Hq]
@group(0) @binding(4) var<storage, read_write> block_indices: array<i32>;   // [B, Tq, Hkv, n]

const WG: u32 = 128u;
const PBUF: u32 = 2048u;   // compressed tokens one chunk may overlap
const BCHUNK: u32 = 128u;  // blocks per chunk at most (== WG)
const NMAX: u32 = 256u;    // top_n at most

var<workgroup> pbuf: array<f32, PBUF>;          // group-summed p_cmp of the chunk's tokens
var<workgroup> bscore: array<f32, BCHUNK>;      // chunk block scores, -1 for forced blocks
var<workgroup> top_score: array<f32, NMAX>;
var<workgroup> top_idx: array<u32, NMAX>;
var<workgroup> new_score: array<f32, NMAX>;
var<workgroup> new_idx: array<u32, NMAX>;

// True when (sa, ja) ranks before (sb, jb): higher score first, ties to the lower block.
fn beats(sa: f32, ja: u32, sb: f32, jb: u32) -> bool {
    return sa > sb || (sa == sb && ja < jb);
}

@compute @workgroup_size(128)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let wid = linear_workgroup(wg, nwg);
    if wid >= params.total_wg {
        return;
    }
    let h = wid % params.hkv;
    let rest = wid / params.hkv;
    let iq = rest % params.q_count;
    let bb = rest / params.q_count;
    let p = query_position(params.q_start + iq);
    let c = p / params.sel_block;
    let nv = visible_compressed(p);
    let m = params.sel_block / params.cmp_stride;   // pieces per selection block
    let u = params.cmp_block / params.cmp_stride;   // pieces per compressed token
    let bc = min(BCHUNK, (PBUF - (u - 1u)) / m);
    // Forced blocks are [0, fa) and [fl, c]: disjoint, nf of them.
    let fa = min(params.init_blocks, c + 1u);
    let fl = max(c + 1u - min(params.local_blocks, c + 1u), fa);
    let nf = fa + (c + 1u - fl);
    let slots = params.top_n - nf;
    let row0 = (bb * params.q_count + iq) * params.hq + h * params.g;  // first head of the group
    var cnt = 0u;
    for (var j0 = 0u; j0 <= c; j0 += bc) {
        let jn = min(bc, c + 1u - j0);
        let ntok = m * jn + u - 1u;
        for (var x = lid; x < ntok; x += WG) {
            let t = i32(m * j0 + x) - i32(u - 1u);
            var acc = 0.0;
            if t >= 0 && u32(t) < nv {
                let kb = params.off_kc + ((bb * params.n_cmp + u32(t)) * params.hkv + h) * params.dk;
                for (var gi = 0u; gi < params.g; gi++) {
                    let qb = params.off_q + (row0 + gi) * params.dk;
                    var s = 0.0;
                    for (var e = 0u; e < params.dk; e++) {
                        s += q[qb + e] * kc[kb + e];
                    }
                    acc += exp(s * params.scale - lse[params.off_lse + row0 + gi]);
                }
            }
            pbuf[x] = acc;
        }
        workgroupBarrier();
        if lid < jn {
            let j = j0 + lid;
            var s = -1.0;
            if j >= fa && j < fl {
                s = 0.0;
                for (var mm = 0u; mm < m; mm++) {
                    for (var uu = 0u; uu < u; uu++) {
                        // token m*j + mm - uu sits at pbuf[m*lid + mm - uu + u - 1]
                        s += pbuf[m * lid + mm + u - 1u - uu];
                    }
                }
            }
            bscore[lid] = s;
        }
        workgroupBarrier();
        // Rank every candidate (running list and this chunk) against all others.
        if lid < cnt {
            let sa = top_score[lid];
            let ja = top_idx[lid];
            var rank = 0u;
            for (var y = 0u; y < cnt; y++) {
                rank += u32(beats(top_score[y], top_idx[y], sa, ja));
            }
            for (var y = 0u; y < jn; y++) {
                rank += u32(bscore[y] >= 0.0 && beats(bscore[y], j0 + y, sa, ja));
            }
            if rank < slots {
                new_score[rank] = sa;
                new_idx[rank] = ja;
            }
        }
        if lid < jn && bscore[lid] >= 0.0 {
            let sa = bscore[lid];
            let ja = j0 + lid;
            var rank = 0u;
            for (var y = 0u; y < cnt; y++) {
                rank += u32(beats(top_score[y], top_idx[y], sa, ja));
            }
            for (var y = 0u; y < jn; y++) {
                rank += u32(bscore[y] >= 0.0 && beats(bscore[y], j0 + y, sa, ja));
            }
            if rank < slots {
                new_score[rank] = sa;
                new_idx[rank] = ja;
            }
        }
        // Candidates in this chunk: its blocks minus the forced ones among them.
        let lo = max(j0, fa);
        let hi = min(j0 + jn, fl);
        let fresh = select(0u, hi - lo, hi > lo);
        cnt = min(slots, cnt + fresh);
        workgroupBarrier();
        for (var x = lid; x < cnt; x += WG) {
            top_score[x] = new_score[x];
            top_idx[x] = new_idx[x];
        }
        workgroupBarrier();
    }
    // Write forced and chosen blocks in ascending order, then pad with -1.
    let ob = params.off_idx + ((bb * params.q_count + iq) * params.hkv + h) * params.top_n;
    for (var x = lid; x < nf + cnt; x += WG) {
        var j: u32;
        if x < nf {
            j = select(fl + (x - fa), x, x < fa);
        } else {
            j = top_idx[x - nf];
        }
        var pos = min(j, fa) + select(0u, min(j, c + 1u) - fl, j > fl);
        for (var y = 0u; y < cnt; y++) {
            pos += u32(top_idx[y] < j);
        }
        block_indices[ob + pos] = i32(j);
    }
    for (var x = nf + cnt + lid; x < params.top_n; x += WG) {
        block_indices[ob + x] = -1;
    }
}
