// Compressed attention: each query head attends to the compressed tokens whose whole block
// lies at or before its position (online softmax over tiles), and records its log-sum-exp
// for the selection kernel. Where the plan keeps scores (params.kept_stride > 0: every chunk
// whose scores fit the budget), it also stores what the selection needs, so that the
// selection does not multiply the queries with the compressed keys a second time:
// - with keep_on.wgsl, every scaled score it computes (select_kept.wgsl reads them);
// - with keep_sums.wgsl (params.kept_tile > 0), per tile its block sums (keep_block_sums;
//   select_sums.wgsl reads them): about a quarter of the bytes.

#import attention

@group(0) @binding(4) var<storage, read_write> o_cmp: array<f32>;  // [B, Tq, Hq, Dv], or partials when split
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;    // [B, Tq, Hq]
// [B, Tq, Hq, kept_stride] as vec4s (the stride a multiple of 4): row r's score of
// compressed token t at element r * kept_stride + t, for the tokens the row sees (NEG_BIG or
// unwritten past them)
@group(0) @binding(6) var<storage, read_write> kept: array<vec4<f32>>;

// Called through keep_on.wgsl: row i's scores of keys t .. t + 3, all four in this tile when
// `whole`. Rows past r.n may hold stale scores in the tile; they are not this workgroup's to
// write.
fn keep_scores(r: Rows, i: u32, t: u32, s: vec4<f32>, whole: bool) {
    if i >= r.n {
        return;
    }
    let at = kept_at(i, t);
    // One 16-byte store where the four are a whole, aligned vec4 of the row; its masked
    // scores (NEG_BIG) are past the row's tokens, which the selection never reads.
    if whole && (at & 3u) == 0u {
        kept[at >> 2u] = s;
        return;
    }
    for (var c = 0u; c < 4u; c++) {
        keep_score(r, i, t + c, s[c]);
    }
}

// Row i's score of key t, where it sees it.
fn keep_score(r: Rows, i: u32, t: u32, s: f32) {
    if i < r.n && s != NEG_BIG {
        kept_put(kept_at(i, t), s);
    }
}

// Kept block sums (keep_sums.wgsl), for a selection block of M = l' / d pieces, M a multiple
// of 4, and compressed tokens spanning U = l / d <= 5 pieces, with tiles of params.kept_tile
// keys (a multiple of M, starting at multiples of it; Plan::kept_sums_tile). SPEC's block
// importance gives the token at piece k = t % M of block t / M the weight min(M - k, U) in
// its own block and max(U + k - M, 0) in the next (block_sums). Per row and tile,
// kept_tile / 4 + 2 elements: for each 4 tokens of the tile, sum w * exp(s - m) over their
// own block's weights plus, for the first 4 of a block, the weighted probabilities of the
// tokens before them in this tile that reach into it (which all lie in the 4 just before, as
// U - 1 <= 4); then the tile's last 4 tokens' weighted probabilities for the next block (in
// the next tile); then the row's running max m. The selection weighs them with
// exp(m - lse) (select_sums.wgsl).
fn keep_block_sums(r: Rows, lid: u32, t0: u32, m: f32, p0: vec4<f32>, p1: vec4<f32>) {
    let i = lid / 8u;
    let part = lid % 8u;
    let s0 = block_sums(part, p0);
    let s1 = block_sums(part + 8u, p1);
    // Part 0's 4 tokens follow part 7's of the quads before (p1 follows p0); its p0 follows
    // the previous tile's, whose share the tile's `next` element holds. Tiles of 32 keys or
    // fewer have no p1.
    let in0 = row_prev8(lid, s0.y);
    var in1 = 0.0;
    if KT > 32u {
        in1 = row_prev8(lid, s1.y);
    }
    let q0 = s0.x + select(in0, 0.0, part == 0u);
    let q1 = s1.x + select(in1, in0, part == 0u);
    if i >= r.n {
        return;
    }
    let nq = params.kept_tile / 4u;
    let at = params.off_kept + attn_row(i) * params.kept_stride + t0 / 4u / nq * (nq + 2u);
    if part < nq {
        kept_put(at + part, q0);
    }
    if part + 8u < nq {
        kept_put(at + part + 8u, q1);
    }
    if part == (nq - 1u) % 8u {
        kept_put(at + nq, select(s0.y, s1.y, nq > 8u));
    }
    if part == 0u {
        kept_put(at + nq + 1u, m);
    }
}

// Probabilities p of the tile's quad `a` (tokens 4 a .. 4 a + 3 of a tile, which starts a
// block) weighted for their own block (x) and for the next (y). As U <= 5, only a block's
// last quad has weights other than U in its own block (min(4 - c, U) for its token c) or
// any in the next (max(U - 4 + c, 0)). In f32, whose quotient of small integers is exact
// where it is whole: an integer remainder by a divisor known only at run time took a
// tenth of compressed attention's time at 64k on an H200.
fn block_sums(a: u32, p: vec4<f32>) -> vec2<f32> {
    let u = f32(params.cmp_block / params.cmp_stride);
    let quads = f32(params.sel_block / params.cmp_stride / 4u);
    let last = fract(f32(a + 1u) / quads) == 0.0;
    let tail = vec4<f32>(4.0, 3.0, 2.0, 1.0);
    let own = select(vec4<f32>(u), min(tail, vec4<f32>(u)), last);
    let next = select(vec4<f32>(0.0), max(vec4<f32>(u) - tail, vec4<f32>(0.0)), last);
    return vec2<f32>(dot(p, own), dot(p, next));
}

fn kept_put(at: u32, x: f32) {
    kept[at >> 2u][at & 3u] = x;
}

// The element of `kept` that holds row i's score of key t (only steps with
// params.kept_stride > 0 compile keep_on.wgsl, which calls keep_scores and keep_score).
fn kept_at(i: u32, t: u32) -> u32 {
    return params.off_kept + attn_row(i) * params.kept_stride + t;
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
    // Rows are ordered by position, so the last one sees the most tokens.
    let keys = split_range(r, 0u, visible_compressed(attn_pos(r, r.n - 1u)));
    attn_begin(lid, r, params.c_stride, keys);
    if lid < ROWS {
        row_lo[lid] = 0u;
        row_hi[lid] = select(0u, visible_compressed(attn_pos(r, lid)), lid < r.n);
    }
    workgroupBarrier();
    attn_keys(lid, r, params.c_stride, keys.x, keys.y, vec2<u32>(0u));
    attn_finish(lid, r);
    if params.partials != 0u {
        for (var x = lid; x < part_count(r); x += WG) {
            o_cmp[params.off_ocmp + part_index(r, x)] = part_value(x);
        }
        return;
    }
    for (var x = lid; x < r.n * DV; x += WG) {
        o_cmp[params.off_ocmp + attn_row(x / DV) * DV + x % DV] = attn_out(x / DV, x % DV);
    }
    if lid < r.n {
        let l = row_sum[lid];
        lse[params.off_lse + attn_row(lid)] = select(0.0, row_max[lid] + log(l), l > 0.0);
    }
}
