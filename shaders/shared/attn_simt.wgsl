// The attention core's tile loop on plain WGSL: every product on the shader cores, the
// scores 4 rows x 2 keys and the output 8 rows x 4 dims over half the keys (SPLIT_KEYS) or 4
// rows x 4 dims per item, from vec4 loads of the tiles in `smem` (see qk.wgsl).
// attn_mma.wgsl is the tensor-core variant with the same contract.

// Whether each invocation accumulates 8 rows x 4 dims over one part of every tile's keys
// (the first or the later half; attn_finish adds the two), rather than 4 rows x 4 dims over
// all of them: four value loads and eight probability loads then feed 128 fused
// multiply-adds instead of 64. Where the rows' 8-row items fill at most half the
// invocations (Dv <= 128 at 8 invocations per row).
override SPLIT_KEYS: bool = (ROWS / 8u) * ((DV + 3u) / 4u) * 2u <= WG;

// The queries and the staged output live in `smem` (qk.wgsl), before and after the tiles.
fn core_queries(lid: u32, n: u32, nh: u32, base: u32) {
    load_queries(lid, n, nh, base);
}

fn stage_put(at: u32, x: vec4<f32>) {
    smem[at] = x;
}

fn stage_get(at: u32) -> vec4<f32> {
    return smem[at];
}

fn staged(at: u32, c: u32) -> f32 {
    return smem[at][c];
}

// One tile's scores, then probabilities: [ROWS, KT4], four keys per vec4, so that the
// accumulation reads four probabilities of a row with one load. Sized by the tile (Rust's
// `fixed_workgroup_bytes`): on adapters with little workgroup memory shorter rows leave more
// of it to the key tile.
var<workgroup> scores: array<vec4<f32>, SCORES4>;
override KT4: u32 = (KT + 3u) / 4u;
override SCORES4: u32 = ROWS * KT4;

// Nothing pending: the loop adds each tile's values itself.
fn core_flush(lid: u32, r: Rows) {}

// Value tiles are fetched within the tile loop here (attn_mma.wgsl may fetch the first
// with the first key tile).
fn core_first_values(lid: u32, r: Rows, stride: u32, first: vec2<u32>) {}

// Attends every owned row to keys [start, end) of the bound k, v (`stride` rows per sequence),
// each row only to those inside its [row_lo, row_hi). `start`, `end` must be uniform, and
// the range's first key tile already fetched into `pre`: by attn_begin (its `first`) for a
// workgroup's first call, else by the previous call, whose `next` this range was. `next` is
// the range of the next call (empty when none follows), whose first tile is fetched during
// this range's last.
//
// Per tile, four or five barriers: the key tile is stored; scores are stored; (without
// subgroup operations) the rows' partial maxima are in; probabilities and rescale factors
// are in; the values are used. The value tile is fetched while the scores are computed and
// the next key tile while the values are accumulated, so neither load stalls the workgroup
// on its own.
fn attn_keys(lid: u32, r: Rows, stride: u32, start: u32, end: u32, next: vec2<u32>) {
    let dv4 = (DV + 3u) / 4u;
    let kt = KT;
    let nrg = (r.n + 3u) / 4u;
    let i = lid / 8u;      // the row this invocation helps reduce, with 7 others
    let part = lid % 8u;
    for (var t0 = start; t0 < end; t0 += kt) {
        let nk = min(kt, end - t0);
        store_tile(lid, nk, DK);
        workgroupBarrier();
        fetch_tile(lid, attn_kv(r, stride, t0, false), nk, DV, false);
        // Scores: 4 rows x 2 keys per item (score_item), or 1 row x 2 keys (row_item) when
        // there are 4 rows at most.
        let half = (nk + 1u) / 2u;
        if FEW_ROWS != 0u && nrg == 1u {
            for (var x = lid; x < r.n * half; x += WG) {
                let it = row_item(x, half, nk);
                store_score(it.i, t0, it.j, it.s.x * params.scale, r.n);
                if it.j1 < nk {
                    store_score(it.i, t0, it.j1, it.s.y * params.scale, r.n);
                }
            }
        } else {
            for (var x = lid; x < nrg * half; x += WG) {
                let it = score_item(x, half, nk);
                store_scores(it, t0, nk, r.n);
            }
        }
        workgroupBarrier();
        // The value tile replaces the key tile; each row's new maximum from 8 invocations.
        store_tile(lid, nk, DV);
        // Each invocation takes two vec4s of its row (KT_MAX = 64 keys: columns 4 * part ..
        // and 32 further; those past the row's KT4 are none), loaded once; keys past nk
        // count as masked (their stale scores are skipped).
        let n4 = (nk + 3u) / 4u;
        let s0 = tile_scores(i, part, nk);
        let s1 = tile_scores(i, part + 8u, nk);
        if part < n4 {
            keep4(r, i, t0 + 4u * part, s0, 4u * part + 3u < nk);
        }
        if part + 8u < n4 {
            keep4(r, i, t0 + 4u * part + 32u, s1, 4u * part + 35u < nk);
        }
        let m = max(max(max(s0.x, s0.y), max(s0.z, s0.w)), max(max(s1.x, s1.y), max(s1.z, s1.w)));
        let m_new = max(run_max, row_max8(lid, m));
        let p0 = select(exp(s0 - m_new), vec4<f32>(0.0), s0 == vec4<f32>(NEG_BIG));
        let p1 = select(exp(s1 - m_new), vec4<f32>(0.0), s1 == vec4<f32>(NEG_BIG));
        if part < KT4 {
            scores[i * KT4 + part] = p0;
        }
        if part + 8u < KT4 {
            scores[i * KT4 + part + 8u] = p1;
        }
        let sum = (p0.x + p0.y) + (p0.z + p0.w) + (p1.x + p1.y) + (p1.z + p1.w);
        tile_stats(lid, sum, m_new);
        fetch_following(lid, r, stride, t0, end, next);
        // Kept block sums (keep_sums.wgsl), off the softmax's path to its barrier.
        if KEEP_SUMS {
            keep_probs(r, lid, t0, m_new, p0, p1);
        }
        // Every item rescales and accumulates: 8 rows x 4 dims over half the keys per item
        // (SPLIT_KEYS), or else 4 rows x 4 dims over all, at most 2 items per invocation.
        let items = nrg * dv4;
        if SPLIT_KEYS {
            let it = split_item(lid);
            // The first part ends on a whole vec4 of scores, so that the later starts on one.
            let mid = min(nk, (KT + 7u) / 8u * 4u);
            if it.rg8 * 8u < r.n {
                let keys = select(vec2<u32>(0u, mid), vec2<u32>(mid, nk), it.later);
                let both = accumulate8(Acc2(acc0, acc1), it.rg8, it.e, keys);
                acc0 = both.a;
                acc1 = both.b;
            }
        } else if lid < items {
            acc0 = accumulate(acc0, lid / dv4, lid % dv4, nk);
        }
        if TWO_ITEMS && lid + WG < items {
            acc1 = accumulate(acc1, (lid + WG) / dv4, (lid + WG) % dv4, nk);
        }
        workgroupBarrier();
    }
}

// Rescales item (rows 4*rg .. 4*rg+3, dims 4*e .. 4*e+3) by the rows' alpha and adds the
// tile's probabilities times its values.
fn accumulate(a: Acc, rg: u32, e: u32, nk: u32) -> Acc {
    var o = rescaled(a, rg);
    let at = rg * 4u * KT4;
    // Four keys per step: four value loads and one probability load per row feed 64 FMAs.
    let n4 = nk / 4u;
    for (var j4 = 0u; j4 < n4; j4++) {
        let v = values4(j4 * 4u, e);
        o = weigh_rows(o, at + j4, v);
    }
    for (var j = n4 * 4u; j < nk; j++) {
        o = weigh_key(o, at, j, smem[tile_at(j, e)]);
    }
    return o;
}

// Two items that share their values: rows 8*rg8 .. 8*rg8+7 (`a` the first four, `b` the
// rest), dims 4*e .. 4*e+3.
struct Acc2 {
    a: Acc,
    b: Acc,
}

// As accumulate for the 8 rows of `x` and the tile's keys [keys.x, keys.y) (keys.x a
// multiple of 4): four value loads and eight probability loads feed 128 FMAs.
fn accumulate8(x: Acc2, rg8: u32, e: u32, keys: vec2<u32>) -> Acc2 {
    var o = rescaled(x.a, rg8 * 2u);
    var u = rescaled(x.b, rg8 * 2u + 1u);
    let at = rg8 * 8u * KT4;
    let n4 = keys.y / 4u;
    for (var j4 = keys.x / 4u; j4 < n4; j4++) {
        let v = values4(j4 * 4u, e);
        o = weigh_rows(o, at + j4, v);
        u = weigh_rows(u, at + 4u * KT4 + j4, v);
    }
    for (var j = max(n4 * 4u, keys.x); j < keys.y; j++) {
        let vv = smem[tile_at(j, e)];
        o = weigh_key(o, at, j, vv);
        u = weigh_key(u, at + 4u * KT4, j, vv);
    }
    return Acc2(o, u);
}

// Item `a` (rows 4*rg .. 4*rg+3) times its rows' rescale factors.
fn rescaled(a: Acc, rg: u32) -> Acc {
    return Acc(
        a.r0 * row_alpha[rg * 4u],
        a.r1 * row_alpha[rg * 4u + 1u],
        a.r2 * row_alpha[rg * 4u + 2u],
        a.r3 * row_alpha[rg * 4u + 3u],
    );
}

// Vec4 e of tile rows j .. j + 3.
struct Values4 {
    v0: vec4<f32>,
    v1: vec4<f32>,
    v2: vec4<f32>,
    v3: vec4<f32>,
}

fn values4(j: u32, e: u32) -> Values4 {
    return Values4(
        smem[tile_at(j, e)],
        smem[tile_at(j + 1u, e)],
        smem[tile_at(j + 2u, e)],
        smem[tile_at(j + 3u, e)],
    );
}

// o plus four keys' values weighed by the probabilities of o's four rows, whose vec4s of
// those keys sit at scores[at], scores[at + KT4], ...
fn weigh_rows(o: Acc, at: u32, v: Values4) -> Acc {
    return Acc(
        weigh4(o.r0, scores[at], v.v0, v.v1, v.v2, v.v3),
        weigh4(o.r1, scores[at + KT4], v.v0, v.v1, v.v2, v.v3),
        weigh4(o.r2, scores[at + 2u * KT4], v.v0, v.v1, v.v2, v.v3),
        weigh4(o.r3, scores[at + 3u * KT4], v.v0, v.v1, v.v2, v.v3),
    );
}

// o plus one key j's values `vv`, weighed by the probabilities of o's four rows (row 0's
// scores starting at scores[at]).
fn weigh_key(o: Acc, at: u32, j: u32, vv: vec4<f32>) -> Acc {
    let c = j % 4u;
    let a = at + j / 4u;
    return Acc(
        o.r0 + scores[a][c] * vv,
        o.r1 + scores[a + KT4][c] * vv,
        o.r2 + scores[a + 2u * KT4][c] * vv,
        o.r3 + scores[a + 3u * KT4][c] * vv,
    );
}

// o + p.x * v0 + p.y * v1 + p.z * v2 + p.w * v3, as four fused multiply-adds into o (a
// weighted sum added afterwards takes five instructions per four products).
fn weigh4(
    o: vec4<f32>,
    p: vec4<f32>,
    v0: vec4<f32>,
    v1: vec4<f32>,
    v2: vec4<f32>,
    v3: vec4<f32>,
) -> vec4<f32> {
    let o1 = fma(vec4<f32>(p.x), v0, o);
    let o2 = fma(vec4<f32>(p.y), v1, o1);
    let o3 = fma(vec4<f32>(p.z), v2, o2);
    return fma(vec4<f32>(p.w), v3, o3);
}

// Item `it`'s scaled scores (rows 4*rg .. 4*rg+3, tile columns j and, where j1 < nk, j1),
// NEG_BIG outside each row's range, which is read once for both columns.
fn store_scores(it: ScoreItem, t0: u32, nk: u32, n: u32) {
    for (var c = 0u; c < 4u; c++) {
        let i = it.rg * 4u + c;
        let range = vec2<u32>(row_lo[i], row_hi[i]);
        put_score(i, it.j, it.s.a[c] * params.scale, i < n && in_range(t0 + it.j, range));
        if it.j1 < nk {
            put_score(i, it.j1, it.s.b[c] * params.scale, i < n && in_range(t0 + it.j1, range));
        }
    }
}

// Row i's scaled score `s` of tile column j (key t0 + j), NEG_BIG outside its range.
fn store_score(i: u32, t0: u32, j: u32, s: f32, n: u32) {
    put_score(i, j, s, i < n && in_range(t0 + j, vec2<u32>(row_lo[i], row_hi[i])));
}

// Whether key t lies in [range.x, range.y).
fn in_range(t: u32, range: vec2<u32>) -> bool {
    return t >= range.x && t < range.y;
}

// Stores row i's score `s` of tile column j, or NEG_BIG where the row does not see the key.
fn put_score(i: u32, j: u32, s: f32, sees: bool) {
    scores[i * KT4 + j / 4u][j % 4u] = select(NEG_BIG, s, sees);
}

// Row i's scores of tile columns 4 * j4 .. 4 * j4 + 3, NEG_BIG for columns past nk (and,
// unread, past the row's KT4 vec4s: a constant test, none where KT = 64).
fn tile_scores(i: u32, j4: u32, nk: u32) -> vec4<f32> {
    if j4 >= KT4 {
        return vec4<f32>(NEG_BIG);
    }
    let j = vec4<u32>(4u * j4) + vec4<u32>(0u, 1u, 2u, 3u);
    return select(vec4<f32>(NEG_BIG), scores[i * KT4 + j4], j < vec4<u32>(nk));
}
