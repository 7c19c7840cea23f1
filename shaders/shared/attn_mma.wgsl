// The attention core's tile loop on tensor cores (wgpu's cooperative matrices, 16x16x16 with
// f16 operands and f32 accumulators): used for f16-stored inputs on adapters that have them,
// with the same contract as attn_simt.wgsl. Queries, key and value tiles and probabilities
// sit in workgroup memory as f16 (the inputs are f16 already; probabilities round to f16,
// as in FlashAttention); scores, the softmax and the output accumulate in f32.
//
// Each subgroup multiplies whole 16x16 blocks: the scores of 16 rows against 16 keys, then
// 16 rows x 16 output dims; the results go through workgroup memory (`spv`), where the online
// softmax and the rescaling run as in the plain core. 16 or 32 rows (Rust's ROWS for
// selected attention, WIDE_ROWS for the wide steps): one or two row blocks, whose blocks
// are handed out to the subgroups (tile_scores, attn_keys). Subgroups are numbered
// lid / size, so this takes subgroup lanes to follow local_invocation_index (as
// reduce_subgroup.wgsl does).

const MM: u32 = 16u;  // cooperative matrix rows, columns and depth

// The subgroup size where the adapter has only one (Rust's
// `GpuContext::fixed_subgroup_size`: 32 on NVIDIA), so that the loops handing out matrix
// blocks to subgroups step by constants and unroll; 0 where it varies, read at run time
// (attn_keys). On an H200 a 64k prefill took 138.1 ms with it instead of 156.8.
override SUBGROUP_SIZE: u32 = 0u;

// Dk, Dv rounded up to whole matrices (zero-padded), and row strides in f16 padded by 8 so
// that neighbouring rows start in different banks (rows stay 16-byte aligned).
override DKP: u32 = (DK + 15u) / 16u * 16u;
override DVP: u32 = (DV + 15u) / 16u * 16u;
override QS: u32 = DKP + 8u;
override TS: u32 = select(DVP, DKP, DKP > DVP) + 8u;
override QH_LEN: u32 = ROWS * QS;
override KVH_LEN: u32 = KT * TS;
// Row strides of the scores (f32), the probabilities (f16) and the products (f32), padded
// so that the four rows a subgroup's softmax reads or writes at once (8 invocations each,
// one tile column apart; four with tile_key's quads), and the rows of a matrix a subgroup
// stores, start in different banks: 72 floats, 72 halves, Dv + 8 floats (Rust's `mma_workgroup_bytes`).
const SS: u32 = KT_MAX + 8u;
const PS: u32 = KT_MAX + 8u;
override VS: u32 = DVP + 8u;
override PH_LEN: u32 = ROWS * PS;
override SPV_LEN: u32 = ROWS * select(SS, VS, VS > SS);

var<workgroup> qh: array<f16, QH_LEN>;    // [ROWS, QS] queries
var<workgroup> kvh: array<f16, KVH_LEN>;  // [KT, TS] the key tile, then the value tile
var<workgroup> ph: array<f16, PH_LEN>;    // [ROWS, PS] probabilities
// One tile's scores ([ROWS, SS]) until its probabilities are out, then its
// probabilities x values ([ROWS, VS]); after the last tile the staged output ([ROWS,
// dv4()] vec4s). `smem` (qk.wgsl) goes unused: its SMEM4 is 1.
var<workgroup> spv: array<f32, SPV_LEN>;

// The queries straight into qh as f16 (exact: the inputs are f16), zero past Dk.
fn core_queries(lid: u32, n: u32, nh: u32, base: u32) {
    pending = false;
    let w4 = DKP / 4u;
    for (var x = lid; x < ROWS * w4; x += WG) {
        let i = x / w4;
        let e = (x % w4) * 4u;
        let val = query_vec4(i, e, n, nh, base);
        for (var c = 0u; c < 4u; c++) {
            qh[i * QS + e + c] = f16(val[c]);
        }
    }
}

fn stage_put(at: u32, x: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        spv[at * 4u + c] = x[c];
    }
}

fn stage_get(at: u32) -> vec4<f32> {
    return spv4(at * 4u);
}

// spv[at .. at + 3].
fn spv4(at: u32) -> vec4<f32> {
    return vec4<f32>(spv[at], spv[at + 1u], spv[at + 2u], spv[at + 3u]);
}

fn staged(at: u32, c: u32) -> f32 {
    return spv[at * 4u + c];
}

// Stores what fetch_tile fetched (`nk` rows of width `d`) into kvh as f16, and zeros the
// rest of the tile (columns d .. dp, rows nk .. KT): padding must be finite, as a product
// with NaN would poison whole output blocks.
fn store_tile_h(src: ptr<private, array<in_raw, LOADS>>, lid: u32, nk: u32, d: u32, dp: u32) {
    let d4 = (d + 3u) / 4u;
    if rows_whole(d) {
        // Vec4 i at row lid / d4 + i * WG / d4: one constant step per store (fetch_into),
        // tested against the rows left.
        let at0 = (lid / d4) * TS + (lid % d4) * 4u;
        let left = nk - min(lid / d4, nk);
        for (var i = 0u; i < tile_loads(d); i++) {
            if i * (WG / d4) < left {
                let val = unraw4((*src)[i], d);
                for (var c = 0u; c < 4u; c++) {
                    kvh[at0 + i * (WG / d4) * TS + c] = f16(val[c]);
                }
            }
        }
    } else {
        store_vec4s_h(src, lid, nk, d);
    }
    if d < dp {
        let w = dp - d;
        for (var x = lid; x < nk * w; x += WG) {
            kvh[(x / w) * TS + d + x % w] = f16(0.0);
        }
    }
    for (var x = nk * dp + lid; x < KT * dp; x += WG) {
        kvh[(x / dp) * TS + x % dp] = f16(0.0);
    }
}

// store_tile_h's vec4s for any row width: vec4 x = lid + i * WG at row x / d4.
fn store_vec4s_h(src: ptr<private, array<in_raw, LOADS>>, lid: u32, nk: u32, d: u32) {
    let d4 = (d + 3u) / 4u;
    for (var i = 0u; i < tile_loads(d); i++) {
        let x = lid + i * WG;
        if x < nk * d4 {
            let at = (x / d4) * TS + (x % d4) * 4u;
            let val = tile_vec4_in(src, i, x, d);
            // Whole vec4s (every one where d is a multiple of 4) without a test per element.
            let whole = whole_vec4(x, d);
            for (var c = 0u; c < 4u; c++) {
                if whole || (x % d4) * 4u + c < d {
                    kvh[at + c] = f16(val[c]);
                }
            }
        }
    }
}

// With AHEAD_V, the value tiles' prefetch: each value tile is fetched a tile ahead, as the
// key tiles are (into `pre`), so that both are in flight through a whole tile rather than
// one phase each. 16-row kernels only: on an H200 (f16, thirty-second session, two runs
// each) a 16-sequence decode step at 64k took 0.165 / 0.165 ms against 0.172 / 0.171
// (compressed attention 0.081 against 0.087 ms) and selected attention in a 64k prefill
// 56.1 / 56.5 against 56.8 / 56.8 ms; in the wide kernels too, compressed attention in the
// prefill took 81.8 against 80.9 ms (likely the registers: the wide kernels take 110-113,
// and 16 more would pass the 128 that two of their 256-invocation workgroups per
// multiprocessor allow; the 16-row ones went to 116-124, under the 128 of four).
var<private> pre_v: array<in_raw, LOADS>;
override AHEAD_V: bool = ROWS < 32u;

// The first value tile, with the first key tile (attn_begin), where AHEAD_V.
fn core_first_values(lid: u32, r: Rows, stride: u32, first: vec2<u32>) {
    if AHEAD_V {
        let nk = min(KT, first.y - first.x);
        fetch_into(&pre_v, lid, attn_kv(r, stride, first.x, false), nk, DV, false);
    }
}

// The tensor cores' output items are 4 rows x 4 dims, one or two per invocation, over all
// of a tile's keys (see attn_simt.wgsl).
const SPLIT_KEYS: bool = false;

// A tile's products are added into the output items (add_tiles) only once the next key
// tile is stored and its value tile's loads issued, so that those loads are in flight
// during the additions, rather than right after the products' barrier; a call's last tile
// waits for the next call's first (selected attention's next block), or for attn_finish
// (core_flush). On an H200 (f16, 64k) it took selected attention in a prefill from 59.1 to
// 56.6 ms, a B=16 decode step from 0.172-0.174 to 0.169-0.171 ms and compressed attention
// (wide, keeping scores) from 81.8 / 82.4 to 80.8 / 80.8 (twenty-ninth session); the wide
// kernels that keep nothing deferred from the fifty-fifth session on, when it took the
// window's wide kernel from 129 registers per invocation to 127, the window in a 64k
// prefill from 23.12 / 23.13 to 22.95 / 22.82 ms and our dense attention from 923.6 /
// 923.6 to 916.9 / 916.8 (where it had once made dense attention 3% slower, 1078 against
// 1047 ms). `pending`: whether the last tile's products still wait in `spv` for add_tiles
// (at the next tile's start, in this call or the next, or in core_flush); the same in
// every invocation.
var<private> pending: bool;

// Output item (rows 4*rg .. 4*rg+3, dims 4*e .. 4*e+3): rescaled by the rows' alpha, plus
// this tile's products from `spv`.
fn add_tile(a: Acc, rg: u32, e: u32) -> Acc {
    let i = rg * 4u;
    return Acc(
        a.r0 * row_alpha[i] + spv4(i * VS + e * 4u),
        a.r1 * row_alpha[i + 1u] + spv4((i + 1u) * VS + e * 4u),
        a.r2 * row_alpha[i + 2u] + spv4((i + 2u) * VS + e * 4u),
        a.r3 * row_alpha[i + 3u] + spv4((i + 3u) * VS + e * 4u),
    );
}

// The softmax's key c (of KT / 8) for invocation `part` of its row's 8: part + 8 * c, or
// with `quads` (compressed attention keeping its scores, tiles of 32 or 64 keys: never 48,
// which mma_specialization leaves out as this would skip 16 of its keys) four
// neighbours at a time, 32 * (c / 4) + 4 * part + c % 4, whose scores keep4 then stores as
// one vec4. On an H200 with f16 inputs at 64k, compressed attention took 90.7 ms with one
// store per score, 85.2 with keep_tile and 81.5 with quads; selected and window attention,
// which keep nothing, were 0.5-5% slower with quads.
fn tile_key(part: u32, c: u32, quads: bool) -> u32 {
    return select(part + 8u * c, 32u * (c / 4u) + 4u * part + c % 4u, quads);
}

// Hands row i's scaled scores of this tile (still in `spv`) to keep4, four neighbouring keys
// per invocation (keys 4 * part .. 4 * part + 3, then 32 further), for tiles the softmax
// does not take in quads (tile_key): 16-byte stores there too. Where keep4 keeps nothing
// (keep_off.wgsl), the loads feed nothing and compile out.
fn keep_tile(r: Rows, i: u32, part: u32, t0: u32, nk: u32) {
    for (var j = 4u * part; j < nk; j += 32u) {
        let ts = vec4<u32>(t0 + j) + vec4<u32>(0u, 1u, 2u, 3u);
        let inside = (ts < vec4<u32>(t0 + nk)) & (ts >= vec4<u32>(row_lo[i]))
            & (ts < vec4<u32>(row_hi[i]));
        let s = select(vec4<f32>(NEG_BIG), spv4(i * SS + j) * params.scale, inside);
        keep4(r, i, t0 + j, s, j + 3u < nk);
    }
}

// exp(s - m), 0 for masked keys.
fn probs4(s: vec4<f32>, m: f32) -> vec4<f32> {
    return select(exp(s - m), vec4<f32>(0.0), s == vec4<f32>(NEG_BIG));
}

// The probabilities of row block rb and key block kb.
fn prob_block(rb: u32, kb: u32) -> coop_mat16x16<f16, A> {
    return coopLoadT<coop_mat16x16<f16, A>>(&ph[rb * MM * PS + kb * MM], PS);
}

// The values of key block kb and output block cb.
fn value_block(kb: u32, cb: u32) -> coop_mat16x16<f16, B> {
    return coopLoadT<coop_mat16x16<f16, B>>(&kvh[kb * MM * TS + cb * MM], TS);
}

// Whether the wide kernels' products load each key or value block once for both row
// blocks: the scores of a key block by one subgroup for both (tile_scores), and the
// products of two output blocks by one subgroup for both (attn_keys: four products from
// four loads). On an H200 (f16, 64k, thirty-eighth session) compressed attention took
// 75.4 ms instead of 80.2 with the first, 74.3 with both; the window 24.3 and 23.8 instead
// of 25.0; dense attention 992 instead of 1036 with the first. 16-row kernels compile
// without either test (present but not taken, the tests made selected attention 2-4%
// slower); their two output blocks share the probabilities instead (54.7 against 55.5 ms).
override SHARE_BLOCKS: bool = ROWS > MM;

// The tile's scores into `spv`, 16 rows x 16 keys per block: Q [ROWS, DKP] x K^T (the tile
// read column-major), for every key block of the tile (a constant count: past the tile's
// keys the key rows are zero and their scores masked after). With two row blocks
// (SHARE_BLOCKS) a subgroup per key block takes both, while the other subgroups wait; else
// the blocks are handed out to the subgroups in turn.
fn tile_scores(sg: u32, nsg: u32, nrb: u32) {
    if SHARE_BLOCKS && nrb == 2u && nsg >= KT / MM {
        if sg < KT / MM {
            var s0 = coop_mat16x16<f32, C>();
            var s1 = coop_mat16x16<f32, C>();
            for (var d0 = 0u; d0 < DKP; d0 += MM) {
                let b = coopLoad<coop_mat16x16<f16, B>>(&kvh[sg * MM * TS + d0], TS);
                let a0 = coopLoadT<coop_mat16x16<f16, A>>(&qh[d0], QS);
                let a1 = coopLoadT<coop_mat16x16<f16, A>>(&qh[MM * QS + d0], QS);
                s0 = coopMultiplyAdd(a0, b, s0);
                s1 = coopMultiplyAdd(a1, b, s1);
            }
            coopStoreT(s0, &spv[sg * MM], SS);
            coopStoreT(s1, &spv[MM * SS + sg * MM], SS);
        }
        return;
    }
    for (var x = sg; x < nrb * (KT / MM); x += nsg) {
        let rb = x / (KT / MM);
        let kb = x % (KT / MM);
        var s = coop_mat16x16<f32, C>();
        for (var d0 = 0u; d0 < DKP; d0 += MM) {
            let a = coopLoadT<coop_mat16x16<f16, A>>(&qh[rb * MM * QS + d0], QS);
            let b = coopLoad<coop_mat16x16<f16, B>>(&kvh[kb * MM * TS + d0], TS);
            s = coopMultiplyAdd(a, b, s);
        }
        coopStoreT(s, &spv[rb * MM * SS + kb * MM], SS);
    }
}

// Attends every owned row to keys [start, end) of the bound k, v (`stride` rows per sequence),
// each row only to those inside its [row_lo, row_hi). `start`, `end` must be uniform, and
// the range's first key tile already fetched into `pre`: by attn_begin (its `first`) for a
// workgroup's first call, else by the previous call, whose `next` this range was. `next` is
// the range of the next call (empty when none follows), whose first tile is fetched during
// this range's last.
//
// Per tile, four barriers: the key tile is stored (and the value tile's loads issued); the
// scores are stored; the probabilities and the value tile are stored; the products are
// stored. The value tile is fetched while the scores are computed, and the next key tile
// as soon as the value tile is stored, so that its loads are in flight through the softmax
// as well as the products (on an H200 an f16 prefill at 64k took 173.0 ms so against
// 174.8 with the fetch after the softmax's barrier, and a decode step of 16 sequences at
// 64k 0.172 against 0.179 ms). With AHEAD_V the next key tile is fetched as soon as this
// one is stored, and the next value tile as soon as this one is. The products reach the
// output items at the next tile's start, which may be the next call's, or in core_flush
// (`pending`).
fn attn_keys(lid: u32, r: Rows, stride: u32, start: u32, end: u32, next: vec2<u32>) {
    let dv4 = (DV + 3u) / 4u;
    let kt = KT;
    let nrg = (r.n + 3u) / 4u;
    let nrb = (r.n + MM - 1u) / MM;
    let i = lid / 8u;
    let part = lid % 8u;
    var size = SUBGROUP_SIZE;
    if SUBGROUP_SIZE == 0u {
        size = subgroupAdd(1u);
    }
    let sg = lid / size;
    let nsg = WG / size;
    for (var t0 = start; t0 < end; t0 += kt) {
        let nk = min(kt, end - t0);
        store_tile_h(&pre, lid, nk, DK, DKP);
        if AHEAD_V {
            fetch_following(lid, r, stride, t0, end, next);
        } else {
            fetch_tile(lid, attn_kv(r, stride, t0, false), nk, DV, false);
        }
        if pending {
            add_tiles(lid, nrg * dv4, dv4);
        }
        workgroupBarrier();
        tile_scores(sg, nsg, nrb);
        workgroupBarrier();
        // The value tile replaces the key tile; each row's probabilities (f16) from 8
        // invocations, zero for masked keys and past the tile.
        if AHEAD_V {
            store_tile_h(&pre_v, lid, nk, DV, DVP);
            fetch_following_into(&pre_v, lid, r, stride, t0, end, next, false);
        } else {
            store_tile_h(&pre, lid, nk, DV, DVP);
            fetch_following(lid, r, stride, t0, end, next);
        }
        // The invocation's keys (tile_key) stay in registers between the two passes.
        let quads = KEEPS && kt >= 32u;
        var sc: array<f32, KT_MAX / 8u>;
        var m = NEG_BIG;
        let lo = row_lo[i];
        let hi = row_hi[i];
        for (var c = 0u; c < kt / 8u; c++) {
            let j = tile_key(part, c, quads);
            let t = t0 + j;
            let inside = j < nk && i < r.n && t >= lo && t < hi;
            sc[c] = select(NEG_BIG, spv[i * SS + j] * params.scale, inside);
            m = max(m, sc[c]);
        }
        if quads {
            for (var g = 0u; g < kt / 32u; g++) {
                let j = 32u * g + 4u * part;
                let s = vec4<f32>(sc[4u * g], sc[4u * g + 1u], sc[4u * g + 2u], sc[4u * g + 3u]);
                keep4(r, i, t0 + j, s, j + 3u < nk);
            }
        } else {
            keep_tile(r, i, part, t0, nk);
        }
        let m_new = max(run_max, row_max8(lid, m));
        var sum = 0.0;
        for (var c = 0u; c < kt / 8u; c++) {
            let p = f16(select(exp(sc[c] - m_new), 0.0, sc[c] == NEG_BIG));
            ph[i * PS + tile_key(part, c, quads)] = p;
            sum += f32(p);
        }
        // Its barrier also ends every read of the scores, which the products replace.
        tile_stats(lid, sum, m_new);
        // Kept block sums (keep_sums.wgsl) take the probabilities in f32, in quads (tiles
        // of 32 keys or more): here, off the softmax's path to its barrier (on an H200 at
        // 64k compressed attention took 85.4 ms so, 92.0 before the softmax's loop).
        if KEEP_SUMS && quads {
            let s0 = vec4<f32>(sc[0], sc[1], sc[2], sc[3]);
            let s1 = vec4<f32>(sc[4], sc[5], sc[6], sc[7]);
            let p1 = select(vec4<f32>(0.0), probs4(s1, m_new), kt >= 64u);
            keep_probs(r, lid, t0, m_new, probs4(s0, m_new), p1);
        }
        // This tile's output, 16 rows x 16 dims per block: P [ROWS, KT] x V, over every key
        // block of the tile (a constant count: past the tile's keys the probabilities and
        // values are zero), each operand that two of a subgroup's blocks share loaded once.
        let ncb = DVP / MM;
        if SHARE_BLOCKS && nrb == 2u {
            // Both row blocks times two output blocks (c0, c1) per subgroup: four products
            // from four loads. A subgroup left with one output block takes it twice.
            for (var c0 = 2u * sg; c0 < ncb; c0 += 2u * nsg) {
                let c1 = min(c0 + 1u, ncb - 1u);
                var o00 = coop_mat16x16<f32, C>();
                var o01 = coop_mat16x16<f32, C>();
                var o10 = coop_mat16x16<f32, C>();
                var o11 = coop_mat16x16<f32, C>();
                for (var kb = 0u; kb < KT / MM; kb++) {
                    let a0 = prob_block(0u, kb);
                    let a1 = prob_block(1u, kb);
                    let b0 = value_block(kb, c0);
                    let b1 = value_block(kb, c1);
                    o00 = coopMultiplyAdd(a0, b0, o00);
                    o01 = coopMultiplyAdd(a0, b1, o01);
                    o10 = coopMultiplyAdd(a1, b0, o10);
                    o11 = coopMultiplyAdd(a1, b1, o11);
                }
                coopStoreT(o00, &spv[c0 * MM], VS);
                coopStoreT(o01, &spv[c1 * MM], VS);
                coopStoreT(o10, &spv[MM * VS + c0 * MM], VS);
                coopStoreT(o11, &spv[MM * VS + c1 * MM], VS);
            }
        } else {
            // One row block here (16-row kernels, or a wide one's last 16 rows or fewer):
            // two output blocks at a time per subgroup (x and y = x + nsg), sharing its
            // probabilities; a subgroup left with one block takes it twice (y = x).
            for (var x = sg; x < ncb; x += 2u * nsg) {
                let y = select(x, x + nsg, x + nsg < ncb);
                var o = coop_mat16x16<f32, C>();
                var o2 = coop_mat16x16<f32, C>();
                for (var kb = 0u; kb < KT / MM; kb++) {
                    let a = prob_block(0u, kb);
                    o = coopMultiplyAdd(a, value_block(kb, x), o);
                    o2 = coopMultiplyAdd(a, value_block(kb, y), o2);
                }
                coopStoreT(o, &spv[x * MM], VS);
                coopStoreT(o2, &spv[y * MM], VS);
            }
        }
        workgroupBarrier();
        pending = true;
    }
}

// Adds the products still pending before attn_finish stages the outputs.
fn core_flush(lid: u32, r: Rows) {
    if pending {
        let dv4 = (DV + 3u) / 4u;
        add_tiles(lid, ((r.n + 3u) / 4u) * dv4, dv4);
    }
}

// The invocation's output items (of `items`, dv4 per row group), rescaled, plus the last
// tile's products (add_tile).
fn add_tiles(lid: u32, items: u32, dv4: u32) {
    if lid < items {
        acc0 = add_tile(acc0, lid / dv4, lid % dv4);
    }
    if TWO_ITEMS && lid + WG < items {
        acc1 = add_tile(acc1, (lid + WG) / dv4, (lid + WG) % dv4);
    }
}
