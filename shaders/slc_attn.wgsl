// Selected-block attention, group-centric as in the paper: the query heads of one kv group
// share their selection, so each selected key/value tile is loaded once for all of them.
//
// Groups of fewer than 16 heads take up to QUERIES consecutive queries per workgroup
// (params.q_block), their heads' rows together, and walk the union of those queries'
// selections in ascending order, each block once, every row attending only where its own
// query selected the block (its key range is empty elsewhere). On tensor cores a tile costs
// the same for 4 live rows as for 16, and neighbouring queries share their forced blocks and
// often others, so the union takes no more tiles than the queries' lists one by one.

#import attention

@group(0) @binding(4) var<storage, read> block_indices: array<i32>;  // [B, Tq, Hkv, n]
@group(0) @binding(5) var<storage, read_write> o_slc: array<f32>;    // [B, Tq, Hq, Dv]

const NONE: u32 = 0xffffffffu;
// Queries per workgroup at most (params.q_block <= QUERIES <= 4, Rust's SLC_QUERIES_MAX: one
// list cursor per component of a vec4). At 1 the union walk compiles out: on an H200 its
// registers alone made selected attention in a 64k prefill (16 heads per group) 1.6% slower.
override QUERIES: u32 = 1u;
// Pieces each selected block is walked in (Rust's Plan::slc_parts): 1, or where the adapter
// caps the key tiles one workgroup walks (llvmpipe ends an invocation's loops after 65,535
// iterations) below a block's, enough that a piece of ceil(l' / PARTS) keys stays within the
// cap, so that the pieces of one block can go to different splits. Entry e of the walk is
// then piece e % PARTS of list entry e / PARTS. Only with QUERIES = 1. At 1 the driver
// folds the pieces out but schedules the kernel differently: on an H200, selected
// attention in a 64k prefill took 0.9% longer than before the pieces (44.38-44.39 against
// 43.96-43.97 ms, fifty-eighth session); SPIR-V as before would take a second copy of the
// walk.
override PARTS: u32 = 1u;

// Where the walk over the workgroup's blocks stands: the next entry of each query's list
// (`cursor`), the entries walked so far (`taken`: the union's, or with one query this
// split's), and the entry this split attends now:
// its block (NONE past the end), the queries that selected it (bit a: query a) and which
// of the block's PARTS pieces it is.
// Everything derives from the params and read-only loads at uniform addresses, so the walk,
// held in a function-scope variable, stays uniform.
struct Walk {
    cursor: vec4<u32>,
    taken: u32,
    block: u32,
    who: u32,
    piece: u32,
}

// Where query a's (of the workgroup) list starts.
fn list_at(r: Rows, a: u32) -> u32 {
    return params.off_idx + ((r.bb * params.q_count + r.iq0 + a) * params.hkv + r.h) * params.top_n;
}

// Entry e of query a's list: its block, NONE past the list's blocks (a list holds its blocks
// ascending, then -1s) or the workgroup's queries.
fn list_block(r: Rows, a: u32, e: u32) -> u32 {
    if a >= r.nq || e >= params.top_n {
        return NONE;
    }
    let j = block_indices[list_at(r, a) + e];
    return select(NONE, u32(j), j >= 0);
}

// The walk before its first entry.
fn walk_start() -> Walk {
    return Walk(vec4<u32>(0u), 0u, NONE, 0u, 0u);
}

// The walk at this split's next entry: with one query, entry `split` of its list and every
// splits-th after (entries of pieces where PARTS > 1); with several, every splits-th block
// of the union from the split-th on, the least block the queries' next entries hold at each
// step (those holding it move on).
fn walk_next(r: Rows, w0: Walk) -> Walk {
    var w = w0;
    if QUERIES == 1u || r.nq == 1u {
        let e = r.split + w.taken * params.splits;
        w.block = list_block(r, 0u, e / PARTS);
        w.piece = e % PARTS;
        w.who = 1u;
        w.taken += 1u;
        return w;
    }
    // Each step moves a cursor on or ends the union: nq * n + 1 steps at most.
    for (var step = 0u; step <= QUERIES * params.top_n; step++) {
        let heads = vec4<u32>(
            list_block(r, 0u, w.cursor.x),
            list_block(r, 1u, w.cursor.y),
            list_block(r, 2u, w.cursor.z),
            list_block(r, 3u, w.cursor.w),
        );
        let least = min(min(heads.x, heads.y), min(heads.z, heads.w));
        let hit = (heads == vec4<u32>(least)) & vec4<bool>(least != NONE);
        w.cursor += select(vec4<u32>(0u), vec4<u32>(1u), hit);
        let mine = w.taken % params.splits == r.split;
        w.taken += 1u;
        if least == NONE || mine {
            w.block = least;
            let bits = select(vec4<u32>(0u), vec4<u32>(1u, 2u, 4u, 8u), hit);
            w.who = (bits.x | bits.y) | (bits.z | bits.w);
            return w;
        }
    }
    w.block = NONE;
    return w;
}

// The keys of the walk's block (or its piece) up to position `last`: NONE (and an empty
// range) past the end. A piece past `last` ends the walk too: only the block that holds
// `last` has such pieces, and the list's later entries are empty (blocks ascending, none
// past the query).
fn walk_keys(w: Walk, last: u32) -> vec2<u32> {
    if w.block == NONE {
        return vec2<u32>(NONE, 0u);
    }
    let lo = w.block * params.sel_block;
    let hi = min(lo + params.sel_block, last + 1u);
    if PARTS == 1u {
        return vec2<u32>(lo, hi);
    }
    let size = (params.sel_block + PARTS - 1u) / PARTS;
    let start = lo + min(w.piece * size, params.sel_block);
    if start >= hi {
        return vec2<u32>(NONE, 0u);
    }
    return vec2<u32>(start, min(start + size, hi));
}

// Each row's keys for the walk's block: up to its query, where that query selected it.
fn walk_rows(lid: u32, r: Rows, w: Walk) {
    if lid < ROWS {
        let mine = lid < r.n && (QUERIES == 1u || ((w.who >> (lid / r.nh)) & 1u) != 0u);
        row_lo[lid] = 0u;
        row_hi[lid] = select(0u, attn_pos(r, lid) + 1u, mine);
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = attn_rows(linear_workgroup(wg, nwg));
    if !r.valid {
        return;
    }
    // Rows are ordered by position, so the last one's query is the latest.
    let last = attn_pos(r, r.n - 1u);
    // Each block's first tile is fetched while the block before it finishes (the first
    // block's while the queries load; none when the walk is empty, whose range is empty).
    var w = walk_next(r, walk_start());
    var keys = walk_keys(w, last);
    attn_begin(lid, r, params.k_stride, keys);
    walk_rows(lid, r, w);
    workgroupBarrier();
    for (var s = 0u; s < params.top_n * QUERIES * PARTS; s++) {
        if keys.x == NONE {
            break;
        }
        let nw = walk_next(r, w);
        let next = walk_keys(nw, last);
        attn_keys(lid, r, params.k_stride, keys.x, keys.y, next);
        keys = next;
        w = nw;
        // The rows' ranges for the next block: attn_keys' last barrier ended every read of
        // the last ones.
        if QUERIES > 1u && r.nq > 1u {
            walk_rows(lid, r, w);
        }
    }
    attn_finish(lid, r);
    if params.partials != 0u {
        for (var x = lid; x < part_count(r); x += WG) {
            o_slc[params.off_oslc + part_index(r, x)] = part_value(x);
        }
        return;
    }
    for (var x = lid; x < r.n * DV; x += WG) {
        o_slc[params.off_oslc + attn_row(x / DV) * DV + x % DV] = attn_out(x / DV, x % DV);
    }
}
