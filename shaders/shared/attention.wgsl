// The attention core shared by cmp_attn, slc_attn, win_attn and dense_attn.
//
// One workgroup owns up to ROWS query rows that read the same kv head: `nq` consecutive
// queries times `nh` of the group's query heads. Key/value tiles stream through workgroup
// memory once for all rows; each row keeps an online softmax (running max and sum) and masks
// the keys outside its own range [row_lo, row_hi). The queries sit in workgroup memory, and
// each invocation computes 4 rows x 2 keys of the scores and 4 or 8 rows x 4 dims of the
// output (attn_simt.wgsl) from vec4 loads, so most work is register-blocked fused
// multiply-adds; or subgroups multiply 16x16 blocks on tensor cores (attn_mma.wgsl).
//
// The tile loop (`#import attn_tiles`) defines attn_keys, SPLIT_KEYS, core_queries (loads
// the queries as load_queries numbers them) and stage_put / stage_get / staged (the
// output's staging after the last tile, [ROWS, dv4()] vec4s: a vec4 in and out, or one
// element out).

#import qk
#import reduce
#import attn_tiles

#import load_v

// The tile loops hand each row's scaled scores, four neighbouring keys at a time, to keep4
// (`#import keep`) before its softmax, and where KEEP_SUMS its probabilities to keep_probs
// after it: keep_off.wgsl ignores both; keep_on.wgsl and keep_sums.wgsl, which only
// compressed attention imports and only where its plan keeps scores, pass the scores to
// cmp_attn.wgsl's keep_scores or the probabilities to its keep_block_sums.
#import keep

// Read through load_v1, raw_v4 (load_v_f32.wgsl / load_v_f16.wgsl), by element index.
@group(0) @binding(3) var<storage, read> v: array<in_s>;  // [B, T, Hkv, Dv]

const KT_MAX: u32 = 64u;       // keys per tile at most
const NEG_BIG: f32 = -3.0e38;

var<workgroup> row_max: array<f32, ROWS>;
var<workgroup> row_sum: array<f32, ROWS>;
var<workgroup> row_alpha: array<f32, ROWS>;
var<workgroup> row_lo: array<u32, ROWS>;
var<workgroup> row_hi: array<u32, ROWS>;
// Each owned row's flat [B, Tq, Hq] row (relative to the chunk), set by attn_begin: a
// division by the uniform r.nh per row, once, rather than per output element.
var<workgroup> row_flat: array<u32, ROWS>;
// The output accumulators of an invocation's two items (4 rows x 4 dims each), as plain
// private variables rather than an indexed array, so that they stay in registers. With
// SPLIT_KEYS (attn_simt.wgsl) the two are one item of 8 rows: acc0 its rows 0-3, acc1 its
// rows 4-7.
struct Acc {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
}
var<private> acc0: Acc;
var<private> acc1: Acc;
// Whether an invocation can own two output items: only where the rows' items (4 rows x 4
// dims each) outnumber the invocations (Dv > 128). Otherwise, and without SPLIT_KEYS,
// acc1 is compiled out, which takes 16 registers per invocation (108 -> 92 on the H200, in an earlier build).
override TWO_ITEMS: bool = (ROWS / 4u) * ((DV + 3u) / 4u) > WG;
// The running max and sum of row lid / 8, held alike by its 8 invocations (published to
// row_max, row_sum by attn_finish).
var<private> run_max: f32;
var<private> run_sum: f32;

// Which rows a workgroup owns. Every field derives from the workgroup id and the params
// only, so control flow on them stays uniform (barriers inside it are legal).
struct Rows {
    valid: bool,
    split: u32,    // which of params.splits workgroups sharing these rows' keys
    bb: u32,       // batch within the chunk
    iq0: u32,      // first query row within the chunk
    nq: u32,       // queries owned
    h: u32,        // kv head
    hq0: u32,      // first query head
    nh: u32,       // query heads per query owned
    n: u32,        // rows owned: nq * nh
}

// Workgroups run split fastest, then head chunk, query block, kv head and batch: the
// workgroups in flight at a time share one kv head's keys and values (a quarter of the
// paper's shape's, 33.5 MB of f16 at 64k). Selected attention took 0.4% (f16) to 2% (f32)
// less time on an H200 than with the kv head varying before the query block.
fn attn_rows(wid: u32) -> Rows {
    var r: Rows;
    r.valid = wid < params.total_wg;
    r.split = wid % params.splits;
    let hc = (wid / params.splits) % params.head_chunks;
    var rest = wid / params.splits / params.head_chunks;
    let nqb = (params.q_count + params.q_block - 1u) / params.q_block;
    let qb = rest % nqb;
    rest = rest / nqb;
    r.h = rest % params.hkv;
    r.bb = rest / params.hkv;
    r.iq0 = qb * params.q_block;
    r.nq = min(params.q_block, params.q_count - min(r.iq0, params.q_count));
    r.hq0 = r.h * params.g + hc * ROWS;
    r.nh = min(ROWS, params.g - hc * ROWS);
    r.n = r.nq * r.nh;
    return r;
}

// Flat [B, Tq, Hq] row (relative to the chunk) of owned row `i`, after attn_begin and a
// barrier.
fn attn_row(i: u32) -> u32 {
    return row_flat[i];
}

// Absolute position of owned row `i`'s query.
fn attn_pos(r: Rows, i: u32) -> u32 {
    return query_position(r.bb, params.q_start + r.iq0 + i / r.nh);
}

// Loads the queries and resets the softmax state, after issuing the loads of the first key
// tile of `first` (the range the first attn_keys call attends, `stride` rows per sequence;
// uniform, possibly empty), so that they are in flight together with the queries' (and
// attn_keys finds that tile in `pre`). Call once first; then set row_lo and row_hi for
// every row (empty for i >= n) and barrier before attn_keys.
fn attn_begin(lid: u32, r: Rows, stride: u32, first: vec2<u32>) {
    if first.x < first.y {
        fetch_tile(lid, attn_kv(r, stride, first.x, true), min(KT, first.y - first.x), DK, true);
        core_first_values(lid, r, stride, first);
    }
    core_queries(lid, r.n, r.nh, (r.bb * params.q_count + r.iq0) * params.hq + r.hq0);
    if lid < ROWS {
        let query = r.bb * params.q_count + r.iq0 + lid / r.nh;
        row_flat[lid] = query * params.hq + r.hq0 + lid % r.nh;
    }
    run_max = NEG_BIG;
    run_sum = 0.0;
    acc0 = Acc(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    acc1 = acc0;
}

// The element loads behind fetch_tile: keys or values.
fn fetch_kv(from_k: bool, at: u32) -> f32 {
    if from_k {
        return load_k1(at);
    }
    return load_v1(at);
}

fn fetch4(from_k: bool, at: u32) -> in_raw {
    if from_k {
        return raw_k4(at);
    }
    return raw_v4(at);
}

// Fetches the key tile after tile t0 of [start, end): the range's next tile, or else the
// first of `next`, the range of the following attn_keys call (selected attention's next
// block; empty for none), so that no block starts with a stall on its first load.
fn fetch_following(lid: u32, r: Rows, stride: u32, t0: u32, end: u32, next: vec2<u32>) {
    fetch_following_into(&pre, lid, r, stride, t0, end, next, true);
}

// fetch_following for the key tile (`key`) or the value tile, into `dst`.
fn fetch_following_into(
    dst: ptr<private, array<in_raw, LOADS>>,
    lid: u32,
    r: Rows,
    stride: u32,
    t0: u32,
    end: u32,
    next: vec2<u32>,
    key: bool,
) {
    let d = select(DV, DK, key);
    if t0 + KT < end {
        fetch_into(dst, lid, attn_kv(r, stride, t0 + KT, key), min(KT, end - t0 - KT), d, key);
    } else if next.x < next.y {
        fetch_into(dst, lid, attn_kv(r, stride, next.x, key), min(KT, next.y - next.x), d, key);
    }
}

// After a tile's probabilities: publishes this invocation's part `sum` of its row's sum and
// the row's rescale factor (row_alpha), barriers, and moves the row's running max and sum on
// to `m_new` (the tile's new maximum). Both tile loops (attn_simt.wgsl, attn_mma.wgsl) end
// their softmax with it.
fn tile_stats(lid: u32, sum: f32, m_new: f32) {
    publish_sum(lid, sum);
    let alpha = exp(run_max - m_new);
    if lid % 8u == 0u {
        row_alpha[lid / 8u] = alpha;
    }
    workgroupBarrier();
    run_sum = run_sum * alpha + row_sum8(lid, sum);
    run_max = m_new;
}

// The part of keys [start, end) that this workgroup's split attends: whole tiles, in order.
fn split_range(r: Rows, start: u32, end: u32) -> vec2<u32> {
    let n = select(0u, end - start, end > start);
    let per = ((n + params.splits - 1u) / params.splits + KT - 1u) / KT * KT;
    let lo = min(start + r.split * per, max(start, end));
    return vec2<u32>(lo, min(lo + per, max(start, end)));
}

// Where the key (or value) row of position t0 of this workgroup's kv head starts.
fn attn_kv(r: Rows, stride: u32, t0: u32, key: bool) -> u32 {
    let row = (r.bb * stride + t0) * params.hkv + r.h;
    if key {
        return params.off_k + row * DK;
    }
    return params.off_v + row * DV;
}

// Normalises every owned row (a row that saw no key gives 0; partial sums stay as they are
// when params.partials != 0) and stages it through the tile loop's stage_put (workgroup
// memory whose contents are no longer needed) as [ROWS, dv4()] vec4s, so that kernels write
// their outputs with coalesced stores through attn_out.
fn attn_finish(lid: u32, r: Rows) {
    core_flush(lid, r);
    let dv4 = (DV + 3u) / 4u;
    let items = ((r.n + 3u) / 4u) * dv4;
    if lid % 8u == 0u {
        row_max[lid / 8u] = run_max;
        row_sum[lid / 8u] = run_sum;
    }
    workgroupBarrier();
    if SPLIT_KEYS {
        // The second half's sums of its keys join the first half's, which stages the rows.
        let it = split_item(lid);
        if it.later && it.rg8 * 8u < r.n {
            raw_rows(acc0, it.rg8 * 2u, it.e);
            raw_rows(acc1, it.rg8 * 2u + 1u, it.e);
        }
        workgroupBarrier();
        if !it.later && it.rg8 * 8u < r.n {
            stage_rows(add_raw(acc0, it.rg8 * 2u, it.e), it.rg8 * 2u, it.e);
            stage_rows(add_raw(acc1, it.rg8 * 2u + 1u, it.e), it.rg8 * 2u + 1u, it.e);
        }
    } else {
        if lid < items {
            stage_rows(acc0, lid / dv4, lid % dv4);
        }
        if TWO_ITEMS && lid + WG < items {
            stage_rows(acc1, (lid + WG) / dv4, (lid + WG) % dv4);
        }
    }
    workgroupBarrier();
}

// With SPLIT_KEYS: invocation lid's output item (rows 8 * rg8 .. 8 * rg8 + 7, dims 4 * e ..
// 4 * e + 3) and whether it sums the later part of every tile's keys.
struct SplitItem {
    rg8: u32,
    e: u32,
    later: bool,
}

fn split_item(lid: u32) -> SplitItem {
    let it = lid % (WG / 2u);
    return SplitItem(it / dv4(), it % dv4(), lid >= WG / 2u);
}

// Stores item (rows 4*rg .. 4*rg+3, dims 4*e .. 4*e+3) as it is, as [ROWS, dv4()] vec4s
// (stage_rows stores it normalised).
fn raw_rows(a: Acc, rg: u32, e: u32) {
    let at = rg * 4u * dv4() + e;
    stage_put(at, a.r0);
    stage_put(at + dv4(), a.r1);
    stage_put(at + 2u * dv4(), a.r2);
    stage_put(at + 3u * dv4(), a.r3);
}

// `a` plus what raw_rows stored for the same item.
fn add_raw(a: Acc, rg: u32, e: u32) -> Acc {
    let at = rg * 4u * dv4() + e;
    return Acc(
        a.r0 + stage_get(at),
        a.r1 + stage_get(at + dv4()),
        a.r2 + stage_get(at + 2u * dv4()),
        a.r3 + stage_get(at + 3u * dv4()),
    );
}

fn stage_rows(a: Acc, rg: u32, e: u32) {
    raw_rows(
        Acc(
            normalized(a.r0, rg * 4u),
            normalized(a.r1, rg * 4u + 1u),
            normalized(a.r2, rg * 4u + 2u),
            normalized(a.r3, rg * 4u + 3u),
        ),
        rg,
        e,
    );
}

fn normalized(o: vec4<f32>, i: u32) -> vec4<f32> {
    if params.partials != 0u {
        return o;  // partial: the merge kernel normalises
    }
    let l = row_sum[i];
    return select(vec4<f32>(0.0), o / l, l > 0.0);
}

// Element e of owned row i's output, after attn_finish.
fn attn_out(i: u32, e: u32) -> f32 {
    return staged(i * dv4() + e / 4u, e % 4u);
}

// Partials mode (params.partials != 0; always when params.splits > 1): each workgroup stores, per owned row, its DV unnormalised
// output sums, then the row's running max and sum, at [rows of the chunk, splits, DV + 2];
// merge.wgsl combines the splits. Element `x` of the owned rows' partials goes to
// part_index(r, x) with value part_value(x), after attn_finish.
fn part_count(r: Rows) -> u32 {
    return r.n * (DV + 2u);
}

fn part_index(r: Rows, x: u32) -> u32 {
    let w = DV + 2u;
    return (attn_row(x / w) * params.splits + r.split) * w + x % w;
}

fn part_value(x: u32) -> f32 {
    let i = x / (DV + 2u);
    let e = x % (DV + 2u);
    if e < DV {
        return attn_out(i, e);
    }
    return select(row_sum[i], row_max[i], e == DV);
}
