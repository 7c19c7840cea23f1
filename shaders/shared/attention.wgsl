// The attention core shared by cmp_attn, slc_attn and win_attn: one workgroup owns the query
// heads of one kv group at one query position (up to ROWS of them), streams key/value tiles
// through workgroup memory once for all those heads, and keeps an online softmax per head.

#import params

@group(0) @binding(1) var<storage, read> q: array<f32>;  // [B, Tq, Hq, Dk]
@group(0) @binding(2) var<storage, read> k: array<f32>;  // [B, T, Hkv, Dk] (T = Tk, or C for compressed keys)
@group(0) @binding(3) var<storage, read> v: array<f32>;  // [B, T, Hkv, Dv]

const WG: u32 = 128u;          // invocations per workgroup
const ROWS: u32 = 16u;         // query heads per workgroup
const TILE: u32 = 4096u;       // floats of one key (or value) tile; kv_tile * max(Dk, Dv) <= TILE
const KT_MAX: u32 = 64u;       // keys per tile at most
const ACC: u32 = 32u;          // ROWS * 256 / WG: output elements each invocation accumulates
const NEG_BIG: f32 = -3.0e38;

var<workgroup> tile: array<f32, TILE>;
var<workgroup> scores: array<f32, 1024>;   // [ROWS, KT_MAX]
var<workgroup> row_max: array<f32, ROWS>;
var<workgroup> row_sum: array<f32, ROWS>;
var<workgroup> row_alpha: array<f32, ROWS>;
var<private> acc: array<f32, ACC>;

// Which rows a workgroup owns. Every field derives from the workgroup id and the params
// only, so control flow on them stays uniform (barriers inside it are legal).
struct Rows {
    valid: bool,
    bb: u32,       // batch within the chunk
    iq: u32,       // query row within the chunk
    h: u32,        // kv head
    hq0: u32,      // first query head
    n: u32,        // query heads owned (<= ROWS)
    row0: u32,     // flat [B, Tq, Hq] row of the first head, relative to the chunk
    pos: u32,      // absolute position of the query
}

fn attn_rows(wid: u32) -> Rows {
    var r: Rows;
    r.valid = wid < params.total_wg;
    let hc = wid % params.head_chunks;
    var rest = wid / params.head_chunks;
    r.h = rest % params.hkv;
    rest = rest / params.hkv;
    r.iq = rest % params.q_count;
    r.bb = rest / params.q_count;
    r.hq0 = r.h * params.g + hc * ROWS;
    r.n = min(ROWS, params.g - hc * ROWS);
    r.row0 = (r.bb * params.q_count + r.iq) * params.hq + r.hq0;
    r.pos = query_position(params.q_start + r.iq);
    return r;
}

// Resets the softmax state. Call once before the first attn_keys.
fn attn_begin(lid: u32) {
    if lid < ROWS {
        row_max[lid] = NEG_BIG;
        row_sum[lid] = 0.0;
    }
    for (var a = 0u; a < ACC; a++) {
        acc[a] = 0.0;
    }
    workgroupBarrier();
}

// Attends every owned row to keys [start, end) of the bound k, v (sequence length `tlen`).
fn attn_keys(lid: u32, r: Rows, tlen: u32, start: u32, end: u32) {
    let dk = params.dk;
    let dv = params.dv;
    let kt = params.kv_tile;
    for (var t0 = start; t0 < end; t0 += kt) {
        let nk = min(kt, end - t0);
        let kbase = params.off_k + ((r.bb * tlen + t0) * params.hkv + r.h) * dk;
        for (var x = lid; x < nk * dk; x += WG) {
            let j = x / dk;
            tile[x] = k[kbase + j * params.hkv * dk + x % dk];
        }
        workgroupBarrier();
        for (var x = lid; x < r.n * nk; x += WG) {
            let row = x / nk;
            let j = x % nk;
            let qb = params.off_q + (r.row0 + row) * dk;
            var s = 0.0;
            for (var e = 0u; e < dk; e++) {
                s += q[qb + e] * tile[j * dk + e];
            }
            scores[row * KT_MAX + j] = s * params.scale;
        }
        workgroupBarrier();
        if lid < r.n {
            let m_old = row_max[lid];
            var m_new = m_old;
            for (var j = 0u; j < nk; j++) {
                m_new = max(m_new, scores[lid * KT_MAX + j]);
            }
            let alpha = exp(m_old - m_new);
            var sum = row_sum[lid] * alpha;
            for (var j = 0u; j < nk; j++) {
                let p = exp(scores[lid * KT_MAX + j] - m_new);
                scores[lid * KT_MAX + j] = p;
                sum += p;
            }
            row_max[lid] = m_new;
            row_sum[lid] = sum;
            row_alpha[lid] = alpha;
        }
        let vbase = params.off_v + ((r.bb * tlen + t0) * params.hkv + r.h) * dv;
        for (var x = lid; x < nk * dv; x += WG) {
            let j = x / dv;
            tile[x] = v[vbase + j * params.hkv * dv + x % dv];
        }
        workgroupBarrier();
        for (var a = 0u; a < ACC; a++) {
            let o = lid + a * WG;
            if o >= r.n * dv {
                break;
            }
            let row = o / dv;
            let e = o % dv;
            var sum = acc[a] * row_alpha[row];
            for (var j = 0u; j < nk; j++) {
                sum += scores[row * KT_MAX + j] * tile[j * dv + e];
            }
            acc[a] = sum;
        }
        workgroupBarrier();
    }
}

// The normalised value of accumulator slot `a`, which belongs to owned row `row`
// (0 for a row that saw no key). Slot `a` of invocation `lid` is output element
// `lid + a * WG` of the owned rows, i.e. flat element `r.row0 * Dv + lid + a * WG`.
fn attn_value(a: u32, row: u32) -> f32 {
    let l = row_sum[row];
    return select(0.0, acc[a] / l, l > 0.0);
}
