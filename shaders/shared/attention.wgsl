// The attention core shared by cmp_attn, slc_attn, win_attn and dense_attn.
//
// One workgroup owns up to ROWS query rows that read the same kv head: `nq` consecutive
// queries times `nh` of the group's query heads. Key/value tiles stream through workgroup
// memory once for all rows; each row keeps an online softmax (running max and sum) and masks
// the keys outside its own range [row_lo, row_hi). The queries sit in workgroup memory, and
// each invocation computes 4 rows x 1 key of the scores and 4 rows x 4 dims of the output
// from vec4 loads, so most work is register-blocked FMAs.

#import qk

@group(0) @binding(3) var<storage, read> v: array<in_t>;  // [B, T, Hkv, Dv]

const KT_MAX: u32 = 64u;       // keys per tile at most
const NEG_BIG: f32 = -3.0e38;

var<workgroup> scores: array<f32, 1024>;       // [ROWS, KT_MAX]
var<workgroup> red: array<f32, WG>;            // per-invocation partial max / sum
var<workgroup> row_max: array<f32, ROWS>;
var<workgroup> row_sum: array<f32, ROWS>;
var<workgroup> row_alpha: array<f32, ROWS>;
var<workgroup> row_lo: array<u32, ROWS>;
var<workgroup> row_hi: array<u32, ROWS>;
var<private> acc: array<vec4<f32>, 8>;          // 2 items x 4 rows, 4 dims each

// Which rows a workgroup owns. Every field derives from the workgroup id and the params
// only, so control flow on them stays uniform (barriers inside it are legal).
struct Rows {
    valid: bool,
    bb: u32,       // batch within the chunk
    iq0: u32,      // first query row within the chunk
    nq: u32,       // queries owned
    h: u32,        // kv head
    hq0: u32,      // first query head
    nh: u32,       // query heads per query owned
    n: u32,        // rows owned: nq * nh
}

fn attn_rows(wid: u32) -> Rows {
    var r: Rows;
    r.valid = wid < params.total_wg;
    let hc = wid % params.head_chunks;
    var rest = wid / params.head_chunks;
    r.h = rest % params.hkv;
    rest = rest / params.hkv;
    let nqb = (params.q_count + params.q_block - 1u) / params.q_block;
    let qb = rest % nqb;
    r.bb = rest / nqb;
    r.iq0 = qb * params.q_block;
    r.nq = min(params.q_block, params.q_count - min(r.iq0, params.q_count));
    r.hq0 = r.h * params.g + hc * ROWS;
    r.nh = min(ROWS, params.g - hc * ROWS);
    r.n = r.nq * r.nh;
    return r;
}

// Flat [B, Tq, Hq] row (relative to the chunk) of owned row `i`.
fn attn_row(r: Rows, i: u32) -> u32 {
    return (r.bb * params.q_count + r.iq0 + i / r.nh) * params.hq + r.hq0 + i % r.nh;
}

// Absolute position of owned row `i`'s query.
fn attn_pos(r: Rows, i: u32) -> u32 {
    return query_position(params.q_start + r.iq0 + i / r.nh);
}

// Loads the queries and resets the softmax state. Call once first; then set row_lo and
// row_hi for every row (empty for i >= n) and barrier before attn_keys.
fn attn_begin(lid: u32, r: Rows) {
    load_queries(lid, r.n, r.nh, (r.bb * params.q_count + r.iq0) * params.hq + r.hq0);
    if lid < ROWS {
        row_max[lid] = NEG_BIG;
        row_sum[lid] = 0.0;
    }
    for (var a = 0u; a < 8u; a++) {
        acc[a] = vec4<f32>(0.0);
    }
}

// The element load behind load_tile: keys or values.
fn fetch_kv(from_k: bool, at: u32) -> f32 {
    if from_k {
        return f32(k[at]);
    }
    return f32(v[at]);
}

// Attends every owned row to keys [start, end) of the bound k, v (`stride` rows per sequence),
// each row only to those inside its [row_lo, row_hi). `start`, `end` must be uniform.
fn attn_keys(lid: u32, r: Rows, stride: u32, start: u32, end: u32) {
    let dv4 = (DV + 3u) / 4u;
    let ts = tile_stride();
    let kt = KT;
    let nrg = (r.n + 3u) / 4u;
    for (var t0 = start; t0 < end; t0 += kt) {
        let nk = min(kt, end - t0);
        load_tile(lid, params.off_k + ((r.bb * stride + t0) * params.hkv + r.h) * DK, nk, DK, true);
        workgroupBarrier();
        // Scores: 4 rows x 1 key per item.
        for (var x = lid; x < nrg * nk; x += WG) {
            let rg = x / nk;
            let j = x % nk;
            let s = score4(rg, j);
            for (var c = 0u; c < 4u; c++) {
                let i = rg * 4u + c;
                let t = t0 + j;
                let inside = i < r.n && t >= row_lo[i] && t < row_hi[i];
                scores[i * KT_MAX + j] = select(NEG_BIG, s[c] * params.scale, inside);
            }
        }
        workgroupBarrier();
        // The value tile replaces the key tile; meanwhile each row's new maximum, from 8
        // invocations per row.
        load_tile(lid, params.off_v + ((r.bb * stride + t0) * params.hkv + r.h) * DV, nk, DV, false);
        let i = lid / 8u;
        let part = lid % 8u;
        var m = NEG_BIG;
        for (var j = part; j < nk; j += 8u) {
            m = max(m, scores[i * KT_MAX + j]);
        }
        red[lid] = m;
        workgroupBarrier();
        var m_new = row_max[i];
        for (var c = 0u; c < 8u; c++) {
            m_new = max(m_new, red[i * 8u + c]);
        }
        var sum = 0.0;
        for (var j = part; j < nk; j += 8u) {
            let s = scores[i * KT_MAX + j];
            let p = select(exp(s - m_new), 0.0, s == NEG_BIG);
            scores[i * KT_MAX + j] = p;
            sum += p;
        }
        workgroupBarrier();
        red[lid] = sum;
        workgroupBarrier();
        if part == 0u {
            var total = 0.0;
            for (var c = 0u; c < 8u; c++) {
                total += red[i * 8u + c];
            }
            let alpha = exp(row_max[i] - m_new);
            row_alpha[i] = alpha;
            row_sum[i] = row_sum[i] * alpha + total;
            row_max[i] = m_new;
        }
        workgroupBarrier();
        // Output: 4 rows x 4 dims per item, at most 2 items per invocation.
        for (var it = 0u; it < 2u; it++) {
            let x = lid + it * WG;
            if x < nrg * dv4 {
                let rg = x / dv4;
                let e = x % dv4;
                var o0 = acc[it * 4u] * row_alpha[rg * 4u];
                var o1 = acc[it * 4u + 1u] * row_alpha[rg * 4u + 1u];
                var o2 = acc[it * 4u + 2u] * row_alpha[rg * 4u + 2u];
                var o3 = acc[it * 4u + 3u] * row_alpha[rg * 4u + 3u];
                for (var j = 0u; j < nk; j++) {
                    let vv = tile[j * ts + e];
                    o0 += scores[(rg * 4u) * KT_MAX + j] * vv;
                    o1 += scores[(rg * 4u + 1u) * KT_MAX + j] * vv;
                    o2 += scores[(rg * 4u + 2u) * KT_MAX + j] * vv;
                    o3 += scores[(rg * 4u + 3u) * KT_MAX + j] * vv;
                }
                acc[it * 4u] = o0;
                acc[it * 4u + 1u] = o1;
                acc[it * 4u + 2u] = o2;
                acc[it * 4u + 3u] = o3;
            }
        }
        workgroupBarrier();
    }
}

// One output element: flat [.., Dv] index `row * Dv + e` (relative to the chunk) and value.
struct AttnOut {
    valid: bool,
    row: u32,
    e: u32,
    value: f32,
}

// Output slot `slot` (0 .. 32) of invocation `lid`: item `slot / 16` (4 rows x 4 dims),
// row `slot / 4 % 4` of its group, component `slot % 4`. A row that saw no key gives 0.
fn attn_result(lid: u32, slot: u32, r: Rows) -> AttnOut {
    var o: AttnOut;
    let dv4 = (DV + 3u) / 4u;
    let it = slot / 16u;
    let c = (slot / 4u) % 4u;
    let comp = slot % 4u;
    let x = lid + it * WG;
    let rg = x / dv4;
    let i = rg * 4u + c;
    o.e = (x % dv4) * 4u + comp;
    o.valid = x < ((r.n + 3u) / 4u) * dv4 && i < r.n && o.e < DV;
    if o.valid {
        let l = row_sum[i];
        o.value = select(0.0, acc[it * 4u + c][comp] / l, l > 0.0);
        o.row = attn_row(r, i);
    }
    return o;
}
