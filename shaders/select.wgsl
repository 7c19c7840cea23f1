// Block importance, group sum and top-n selection, streamed: one workgroup per
// (batch, query, kv head) walks its visible blocks in chunks, forms the group's
// compressed-attention probabilities for just the compressed tokens a chunk overlaps, with
// the log-sum-exp that cmp_attn stored (`#import select_scores`: from the scores cmp_attn
// kept, select_kept.wgsl, or from q.k over the compressed keys, select_qk.wgsl), turns them
// into block scores with SPEC's overlap weights (or, with select_sums.wgsl, sums the block
// sums cmp_attn kept straight into block scores: BLOCK_SUMS), and merges the chunk into a
// running top list in workgroup memory. No [T, blocks] matrix ever reaches device memory.

// Bindings 1 and 2 (q, and the compressed keys as `k`: [B, C, Hkv, Dk]) come from qk.
#import qk
#import topn
#import select_lse
#import select_scores

// [B, Tq, Hq]; or cmp_attn's partials when params.cmp_splits > 0 (see load_lse)
@group(0) @binding(3) var<storage, read> lse: array<f32>;

// [B, Tq, Hkv, n]; when split, each split's candidates instead (see store_candidates)
@group(0) @binding(4) var<storage, read_write> block_indices: array<i32>;

const KT_MAX: u32 = 64u;   // tokens per tile at most
const PBUF: u32 = 512u;    // compressed tokens one chunk may overlap
const BCHUNK: u32 = 128u;  // blocks per chunk at most (<= WG)

// [ROWS / 4, KT_MAX]: p summed over 4 heads; also two f32 per invocation (load_lse), and the
// blocks entering the list (see main)
var<workgroup> partial: array<f32, PARTIAL_LEN>;
override PARTIAL_LEN: u32 = max(ROWS / 4u * KT_MAX, 2u * BCHUNK);
var<workgroup> pbuf: array<f32, PBUF>;          // group-summed p_cmp of the chunk's tokens
var<workgroup> bscore: array<f32, BCHUNK>;      // chunk block scores, -1 for forced blocks
var<workgroup> top_score: array<f32, NMAX>;
var<workgroup> new_score: array<f32, NMAX>;
var<workgroup> new_idx: array<u32, NMAX>;
var<workgroup> entering: atomic<u32>;           // chunk blocks that can enter the top list

// The element loads behind fetch_tile: compressed keys only.
fn fetch_kv(from_k: bool, at: u32) -> f32 {
    return load_k1(at);
}

fn fetch4(from_k: bool, at: u32) -> in_raw {
    return raw_k4(at);
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
    let split = wid % params.splits;
    let h = (wid / params.splits) % params.hkv;
    let rest = wid / params.splits / params.hkv;
    let iq = rest % params.q_count;
    let bb = rest / params.q_count;
    let p = query_position(bb, params.q_start + iq);
    let nv = visible_compressed(p);
    let m = params.sel_block / params.cmp_stride;   // pieces per selection block
    let u = params.cmp_block / params.cmp_stride;   // pieces per compressed token
    let bc = params.sel_chunk;  // <= min(BCHUNK, (PBUF - (u - 1)) / m), or 1 for long blocks
    // A block whose tokens overflow pbuf (m + u - 1 > PBUF; one block per chunk then) takes
    // them in windows of PBUF: each invocation weighs its tokens of a window by the pieces of
    // the block they overlap (SPEC's overlap sum, counted per token), and the shares are added
    // up once the block's windows are done.
    let long = m + (u - 1u) > PBUF;
    let f = forced_blocks(p);
    let c = f.c;
    let fa = f.fa;
    let fl = f.fl;
    let slots = params.top_n - f.nf;
    let row0 = (bb * params.q_count + iq) * params.hq + h * params.g;  // first head of the group
    var cnt = 0u;
    // A group of ROWS heads at most loads its queries and log-sum-exps once for all chunks.
    let once = params.g <= ROWS;
    if once {
        load_rows(lid, params.g, row0);
        load_lse(lid, row0, params.g);
    }
    // Split s takes chunks s, s + splits, ...
    for (var j0 = split * bc; j0 <= c; j0 += params.splits * bc) {
        let jn = min(bc, c + 1u - j0);
        // Token g of the chunk's ntok (its blocks' pieces and the u - 1 before the first:
        // at most 2^32 - 1, which Config::validate bounds, as one block to a chunk where
        // they are long) is compressed token s0 + g - back. Only the visible ones,
        // [v_lo, v_end), have probabilities; all in 32 bits, no sum past them.
        let back = u - 1u;
        let s0 = m * j0;
        let ntok = m * jn + back;
        let v_end = select(nv, s0 + m * jn, s0 < nv && m * jn < nv - s0);
        let v_lo = select(s0 - back, 0u, s0 < back);
        let g_vis = select(0u, back - s0, s0 < back);  // token v_lo's g
        let n_vis = select(0u, v_end - v_lo, v_end > v_lo);
        // A short chunk takes all its tokens in one window (pbuf: zeros where invisible,
        // as sum_grouped reads them all); a long block only the windows of its visible
        // tokens, as the shares of the others are 0 (walking them all took 18 s on
        // lavapipe with l / d in the hundreds of millions). Block sums (never long: the
        // plan keeps them for blocks of at most 64 pieces) fill pbuf in every window.
        let visible_only = long && !BLOCK_SUMS;
        let g_lo = select(0u, g_vis, visible_only);
        let g_n = select(ntok, n_vis, visible_only);
        let windows = g_n / PBUF + select(0u, 1u, g_n % PBUF != 0u);
        var share = 0.0;
        for (var wi = 0u; wi < windows; wi++) {
            let w0 = g_lo + wi * PBUF;
            let wn = min(PBUF, g_lo + g_n - w0);
            if wi > 0u {
                workgroupBarrier();  // the last window's shares are taken
            }
            // pbuf[x] holds token g = w0 + x; tokens outside [v_lo, v_end) stay 0.
            for (var x = lid; x < wn; x += WG) {
                pbuf[x] = 0.0;
            }
            let a = max(w0, g_vis);
            let b = min(w0 + wn, g_vis + n_vis);
            let t_lo = v_lo + (a - g_vis);
            let t_hi = select(t_lo, v_lo + (b - g_vis), b > a);
            for (var h0 = 0u; h0 < params.g; h0 += ROWS) {
                let nh = min(ROWS, params.g - h0);
                workgroupBarrier();
                if !once {
                    load_rows(lid, nh, row0 + h0);
                    load_lse(lid, row0 + h0, nh);
                }
                if BLOCK_SUMS {
                    score_blocks(lid, row0 + h0, nh, j0, jn, nv);
                } else {
                    score_tokens(lid, bb, h, row0 + h0, nh, t_lo, t_hi, back - s0 - w0);
                }
            }
            if long {
                workgroupBarrier();  // the window's token sums are in
                for (var x = lid; x < wn; x += WG) {
                    share += f32(overlap(w0 + x, m, u)) * pbuf[x];
                }
            }
        }
        if long {
            partial[lid] = share;
        }
        workgroupBarrier();
        if lid == 0u {
            atomicStore(&entering, 0u);
        }
        if lid < jn {
            let j = j0 + lid;
            var s = -1.0;
            if j >= fa && j < fl {
                if BLOCK_SUMS {
                    s = pbuf[lid];
                } else if long {
                    s = sum_grouped(0u, 0u, WG, 0u, 0u);
                } else {
                    // Token g of the block's m + u - 1 (from the u - 1 before it) sits at
                    // pbuf[m*lid + g]; its first token past the sequence's start at g0.
                    let g0 = select(0u, back - m * j, m * j < back);
                    s = sum_grouped(m * lid, g0, m + u - 1u, m, u);
                }
            }
            bscore[lid] = s;
        }
        workgroupBarrier();
        // Only the chunk's blocks that beat the list's last entry (any, while the list is not
        // full) can enter it; they gather in `partial` ([score; block as bits], in no order).
        // Whatever the list beats ranks below every entry, so leaving it out changes no rank.
        if lid < jn && bscore[lid] >= 0.0 {
            let sa = bscore[lid];
            let ja = j0 + lid;
            if cnt < slots || (cnt > 0u && beats(sa, ja, top_score[cnt - 1u], top_idx[cnt - 1u])) {
                let k = atomicAdd(&entering, 1u);
                partial[k] = sa;
                partial[BCHUNK + k] = bitcast<f32>(ja);
            }
        }
        workgroupBarrier();
        // The new rank of every entry of the list and every entering block. The entering
        // blocks are first put in order among themselves (each counts those that beat it);
        // then an entry of either ordered run moves down by the entries of the other that
        // beat it, found by bisection: about ne + (cnt + ne) / WG * log2(max(cnt, ne))
        // steps per invocation and chunk. Counting the entering blocks for every entry took
        // (cnt + ne) / WG * ne, which with n = 1700 of 8192 blocks (64k tokens) passed the
        // 65,535 loop iterations after which llvmpipe ends an invocation's loops.
        let ne = atomicLoad(&entering);
        // In order, the entering blocks go to bscore (scores) and pbuf (blocks as bits),
        // both done with for this chunk, so that no barrier separates the counts' reads of
        // `partial` from these writes.
        if lid < ne {
            let se = partial[lid];
            let je = bitcast<u32>(partial[BCHUNK + lid]);
            var re = 0u;
            for (var y = 0u; y < ne; y++) {
                re += u32(beats(partial[y], bitcast<u32>(partial[BCHUNK + y]), se, je));
            }
            bscore[re] = se;
            pbuf[re] = bitcast<f32>(je);
        }
        workgroupBarrier();
        for (var x = lid; x < cnt + ne; x += WG) {
            let listed = x < cnt;
            let i = select(x - cnt, x, listed);  // its place in its own run
            var sa: f32;
            var ja: u32;
            if listed {
                sa = top_score[i];
                ja = top_idx[i];
            } else {
                sa = bscore[i];
                ja = bitcast<u32>(pbuf[i]);
            }
            let rank = i + beaten_by(!listed, select(cnt, ne, listed), sa, ja);
            if rank < slots {
                new_score[rank] = sa;
                new_idx[rank] = ja;
            }
        }
        cnt = min(slots, cnt + ne);
        workgroupBarrier();
        for (var x = lid; x < cnt; x += WG) {
            top_score[x] = new_score[x];
            top_idx[x] = new_idx[x];
        }
        workgroupBarrier();
    }
    let row = (bb * params.q_count + iq) * params.hkv + h;
    if params.splits > 1u {
        store_candidates(lid, row, split, cnt);
        return;
    }
    if SORT_CHOSEN {
        sort_chosen(lid, cnt);
    }
    write_selection(lid, params.off_idx + row * params.top_n, f, cnt, SORT_CHOSEN);
}

// Lists longer than 512 entries are put in block order by a sorting network before they
// are written (a fixed number of barriers: 55 for 1024 entries); shorter ones count each
// entry's place among the others (cnt steps per entry, about 2,500 per invocation at most,
// where n = 1700 took 24,000 against llvmpipe's 65,535 loop iterations per invocation). On
// an H200 sorting lists of 256 made the selection of a 16k prefill with n = 300 slower.
override SORT_CHOSEN: bool = NMAX > 512u;

// Puts top_idx[0 .. cnt) in ascending order: a bitonic network over the next power of two
// of NMAX entries (a bound the whole workgroup shares), whose every exchange puts the
// smaller block first, so that the entries past cnt (taken as larger than any block) never
// move and need not exist.
fn sort_chosen(lid: u32, cnt: u32) {
    let n = 1u << firstLeadingBit(2u * NMAX - 1u);
    for (var k = 2u; k <= n; k *= 2u) {
        for (var j = k / 2u; j > 0u; j /= 2u) {
            for (var t = lid; t < n / 2u; t += WG) {
                let a = t / j * 2u * j + t % j;  // bit j of a is clear
                // The first stage of each k pairs mirrored entries, the rest halves.
                let b = select(a | j, a ^ (k - 1u), j == k / 2u);
                if b < cnt && top_idx[b] < top_idx[a] {
                    let x = top_idx[a];
                    top_idx[a] = top_idx[b];
                    top_idx[b] = x;
                }
            }
            workgroupBarrier();
        }
    }
}

// How many entries of an ordered run beat (sa, ja), by bisection: of the top list's first
// `n` (in_list) or of the `n` entering blocks in bscore and pbuf, put in order above. Both
// reads stay inside their arrays (select() evaluates both).
fn beaten_by(in_list: bool, n: u32, sa: f32, ja: u32) -> u32 {
    var lo = 0u;
    var hi = n;
    while lo < hi {
        let mid = (lo + hi) / 2u;
        let e = min(mid, BCHUNK - 1u);
        let l = min(mid, NMAX - 1u);
        let sb = select(bscore[e], top_score[l], in_list);
        let jb = select(bitcast<u32>(pbuf[e]), top_idx[l], in_list);
        if beats(sb, jb, sa, ja) {
            lo = mid + 1u;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// How many of a selection block's m pieces overlap token g of the m + u - 1 that reach into
// it (the u - 1 before its first piece first): SPEC's overlap sum counted per token, a
// block's score being sum over g of overlap(g) * P[m j - (u - 1) + g].
fn overlap(g: u32, m: u32, u: u32) -> u32 {
    return min(m, g + 1u) - (max(g + 1u, u) - u);
}

// Sum over g0 <= g < n of overlap(g, m, u) * pbuf[at + g] (m = 0: the plain sum of
// `partial[at + g0 .. at + n]`, the shares of a long block), 16 terms at a time: f32's
// rounding then grows with the groups rather than the terms, which matters for blocks of
// hundreds of pieces (summed one term at a time, m u of them, blocks of 200 pieces beside
// tokens of 300 ranked two blocks whose scores differ by 2.6e-5 the wrong way, past SPEC's
// 1e-6 near-tie rule). The groups start at the block's first token past the sequence's
// start (g0), as a long block's windows do: blocks that the same tokens overlap alike (all
// of them whole, where a compressed token spans several blocks) then add the same terms in
// the same groups, and tie bit for bit, so that the lower block wins as SPEC asks, rather
// than whichever rounding favours (groups at multiples of 16 of g split their terms
// differently from block to block).
fn sum_grouped(at: u32, g0: u32, n: u32, m: u32, u: u32) -> f32 {
    var s = 0.0;
    for (var a = g0; a < n; a += 16u) {
        var part = 0.0;
        for (var g = a; g < min(a + 16u, n); g++) {
            if m == 0u {
                part += partial[at + g];
            } else {
                part += f32(overlap(g, m, u)) * pbuf[at + g];
            }
        }
        s += part;
    }
    return s;
}

// Split mode: this split's `cnt` best (score, block) pairs, padded with (-1, -1) to n, at
// [rows, splits, n, 2] (scores as i32 bits); select_merge.wgsl picks the overall best.
fn store_candidates(lid: u32, row: u32, split: u32, cnt: u32) {
    let base = params.off_idx + (row * params.splits + split) * params.top_n * 2u;
    for (var x = lid; x < params.top_n; x += WG) {
        let valid = x < cnt;
        // n may exceed the lists (NMAX: n or the blocks there are): read inside them always,
        // as select() evaluates both operands.
        let at = min(x, NMAX - 1u);
        block_indices[base + 2u * x] = bitcast<i32>(select(-1.0, top_score[at], valid));
        block_indices[base + 2u * x + 1u] = select(-1, i32(top_idx[at]), valid);
    }
}
