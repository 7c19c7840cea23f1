// Queries and key tiles in workgroup memory, and the register-blocked score they feed:
// shared by the attention core and the selection kernel. The including kernel defines
// `fn fetch_kv(from_k: bool, at: u32) -> f32` and `fn fetch4(from_k: bool, at: u32) ->
// in_raw`, the element and four-element (raw, see raw_k4) loads behind `fetch_tile`.

#import input
#import params
#import load

// Read through load_q1, load_k1, raw_k4 (load_f32.wgsl / load_f16.wgsl), by element index.
@group(0) @binding(1) var<storage, read> q: array<in_s>;  // [B, Tq, Hq, Dk]
@group(0) @binding(2) var<storage, read> k: array<in_s>;  // [B, T, Hkv, Dk] (T = Tk, or C for compressed keys)

// Query rows per workgroup, and 8 invocations per row: 16 rows (128 invocations), or 32
// (256) for the wide attention steps of long prefills, whose key tiles then serve twice the
// rows (Rust's `Specialization::rows`).
override ROWS: u32;
override WG: u32 = 8u * ROWS;

// Head sizes, keys per tile and the vec4s of `smem`, set per shape and adapter when the
// pipeline is created (Rust's `Specialization`), so that the loops over head dimensions and
// tile keys have constant bounds the driver can unroll. DK, DV and KT equal params.dk,
// params.dv and params.kv_tile; SMEM4 is as large as the adapter's workgroup memory allows
// (at most SMEM4_MAX), and KT as many keys as fit it after the queries.
override DK: u32;
override DV: u32;
override KT: u32;
override SMEM4: u32;
// 1 where some workgroups own 4 rows or fewer (groups of at most 4 heads): their scores then
// take one row per item (row_item); 0 compiles that path out.
override FEW_ROWS: u32;

// The queries, [ROWS, dk4()] (zero past Dk and past the owned rows), then one key or value
// tile, [KT, tile_stride()] (zero past D). The smaller the heads, the more keys per tile.
var<workgroup> smem: array<vec4<f32>, SMEM4>;

fn dk4() -> u32 {
    return (DK + 3u) / 4u;
}

fn dv4() -> u32 {
    return (DV + 3u) / 4u;
}

// vec4s per tile row: the wider of Dk, Dv. When that is a multiple of 8, rows are swizzled
// (vec4 e of row j sits at e ^ (j % 8)); otherwise the stride is rounded up to odd. Either
// way the keys that neighbouring invocations score sit in different banks.
fn tile_stride() -> u32 {
    let d4 = max(dk4(), dv4());
    return select(d4 | 1u, d4, d4 % 8u == 0u);
}

// Where vec4 `e` of tile row `j` sits in `smem`.
fn tile_at(j: u32, e: u32) -> u32 {
    let ts = tile_stride();
    return ROWS * dk4() + j * ts + select(e, e ^ (j & 7u), ts % 8u == 0u);
}

// Loads `n` query rows: row i is flat [.., Hq] row `base + (i / nh) * Hq + i % nh` (nh heads
// of consecutive queries). Each invocation's vec4s x = lid + l * WG are all loaded before
// any is stored: one round trip for all of them. On an H200 (f32, D = 128) this made a 64k
// prefill 513.9 -> 505.7 ms; the tensor-core core's own query loads (attn_mma.wgsl) got
// slower that way and stay a plain loop (BENCHMARKS.md, twentieth session).
fn load_queries(lid: u32, n: u32, nh: u32, base: u32) {
    let dk4 = dk4();
    let loads = (ROWS * dk4 + WG - 1u) / WG;  // a constant per pipeline
    var qv: array<vec4<f32>, QUERY_LOADS>;
    for (var l = 0u; l < loads; l++) {
        let x = min(lid + l * WG, ROWS * dk4 - 1u);
        qv[l] = query_vec4(x / dk4, (x % dk4) * 4u, n, nh, base);
    }
    for (var l = 0u; l < loads; l++) {
        let x = lid + l * WG;
        if x < ROWS * dk4 {
            smem[x] = qv[l];
        }
    }
}

// vec4s of the queries one invocation loads at most: a row of Dk <= 256 (the configuration's
// limit) is 64 vec4s, which its 8 invocations share (WG = 8 * ROWS).
const QUERY_LOADS: u32 = 8u;

// Elements e .. e + 3 of query row i as load_queries numbers them: zero past Dk and for
// rows i >= n.
fn query_vec4(i: u32, e: u32, n: u32, nh: u32, base: u32) -> vec4<f32> {
    var val = vec4<f32>(0.0);
    if i < n {
        let at = params.off_q + (base + (i / nh) * params.hq + i % nh) * DK + e;
        for (var c = 0u; c < 4u; c++) {
            if e + c < DK {
                val[c] = load_q1(at + c);
            }
        }
    }
    return val;
}

// vec4s one invocation loads per tile at most: SMEM4_MAX / 128 (Rust's `SMEM4_MAX`; the
// fewest invocations a workgroup has).
const LOADS: u32 = 20u;

// One invocation's share of a tile between fetch_tile and store_tile: the loads stay in
// registers while the workgroup computes, and land in workgroup memory after a barrier. Whole
// vec4s hold raw_k4 / raw_v4's `in_raw` (f16 pairs still packed), which only tile_vec4
// reads, so no instruction waits on a load before the tile is stored; a row's last, partial
// vec4 (d not a multiple of 4) holds its elements' bits.
var<private> pre: array<in_raw, LOADS>;

// vec4s of a tile of rows of width `d` one invocation fetches: a constant per pipeline, so
// the fetch and store loops unroll exactly.
fn tile_loads(d: u32) -> u32 {
    return (KT * ((d + 3u) / 4u) + WG - 1u) / WG;
}

// Fetches `nk` (>= 1) rows of width `d` (row j at `base + j * Hkv * d`, keys or values as
// `from_k` says) into `pre`, zero past `d`. Every load is issued before any is used, so an
// invocation has all its loads in flight at once rather than one round trip per vec4. An
// invocation's loads past the tile's vec4s load its last one again (store_tile never stores
// them): straight-line loads, with no branch around each.
fn fetch_tile(lid: u32, base: u32, nk: u32, d: u32, from_k: bool) {
    fetch_into(&pre, lid, base, nk, d, from_k);
}

// fetch_tile into `dst` (`pre`, or the tensor-core core's value prefetch).
fn fetch_into(
    dst: ptr<private, array<in_raw, LOADS>>,
    lid: u32,
    base: u32,
    nk: u32,
    d: u32,
    from_k: bool,
) {
    let d4 = (d + 3u) / 4u;
    if rows_whole(d) {
        // Load i takes row r0 + i * WG / d4, r0 = lid / d4 (past the tile's keys, its last
        // again), at the invocation's own column: one clamp against this tile's rows left
        // and one multiply-add per load. Clamping r0 + i * WG / d4 itself instead let the
        // compiler keep each of those sums in a register of its own from tile to tile.
        let rs = params.hkv * d;
        let r0 = min(lid / d4, nk - 1u);
        let left = nk - 1u - r0;
        let at0 = base + r0 * rs + (lid % d4) * 4u;
        for (var i = 0u; i < tile_loads(d); i++) {
            (*dst)[i] = fetch4(from_k, at0 + min(i * (WG / d4), left) * rs);
        }
        return;
    }
    let n = nk * d4;
    for (var i = 0u; i < tile_loads(d); i++) {
        let x = min(lid + i * WG, n - 1u);
        let e = (x % d4) * 4u;
        let at = base + (x / d4) * params.hkv * d + e;
        if whole_vec4(x, d) {
            (*dst)[i] = fetch4(from_k, at);
        } else {
            var val = vec4<f32>(0.0);
            for (var c = 0u; c < 4u; c++) {
                if e + c < d {
                    val[c] = fetch_kv(from_k, at + c);
                }
            }
            (*dst)[i] = bitcast<in_raw>(val);
        }
    }
}

// Whether a tile of rows of width `d` (a multiple of 4) takes whole rows per WG vec4s, so
// that an invocation's vec4s of a tile share their column and lie WG / d4 rows apart (a
// constant per pipeline: Dk and Dv of 32, 64, 128 or 256), and ROW_STEPS. Their addresses
// then step by a constant, where the general form divides, takes remainders and clamps per
// vec4: on an H200 selected attention's tensor-core tile loop has 863 instructions so, 986
// in the general form.
// With them a 64k prefill (f16, D = 128) took 157.8 ms instead of 160.7: compressed
// attention 73.3 against 74.8, the window 23.2 against 24.2; our dense kernel at 16k 59.2
// against 62.0 (BENCHMARKS.md, forty-third session).
fn rows_whole(d: u32) -> bool {
    return ROW_STEPS && d % 4u == 0u && WG % (d / 4u) == 0u;
}

// Off for selected attention's union walk (`QUERIES` > 1, Rust's Specialization::queries),
// which took 92.0 ms instead of 89.7 at 64k with it (Hq = 32, Hkv = 8), likely its
// registers.
override ROW_STEPS: bool = true;

// Whether vec4 x of a tile of rows of width `d` lies inside its row (only a row's last one
// may not, where d is not a multiple of 4: a constant condition otherwise).
fn whole_vec4(x: u32, d: u32) -> bool {
    return d % 4u == 0u || (x % ((d + 3u) / 4u)) * 4u + 4u <= d;
}

// The elements of the fetched vec4 `i`, x = lid + i * WG of a tile of rows of width `d`.
fn tile_vec4(i: u32, x: u32, d: u32) -> vec4<f32> {
    return tile_vec4_in(&pre, i, x, d);
}

// tile_vec4 from what fetch_into fetched into `src`.
fn tile_vec4_in(src: ptr<private, array<in_raw, LOADS>>, i: u32, x: u32, d: u32) -> vec4<f32> {
    if whole_vec4(x, d) {
        return unraw4((*src)[i], d);
    }
    return bitcast<vec4<f32>>((*src)[i]);
}

// Stores what fetch_tile fetched (`nk` rows of width `d`) into the tile.
fn store_tile(lid: u32, nk: u32, d: u32) {
    let d4 = (d + 3u) / 4u;
    for (var i = 0u; i < tile_loads(d); i++) {
        let x = lid + i * WG;
        // Row and column of vec4 x, in fetch_into's constant steps where rows_whole.
        if rows_whole(d) {
            // Row lid / d4 + i * WG / d4 (fetch_into), tested against the rows left.
            if i * (WG / d4) < nk - min(lid / d4, nk) {
                smem[tile_at(lid / d4 + i * (WG / d4), lid % d4)] = tile_vec4(i, x, d);
            }
        } else if x < nk * d4 {
            smem[tile_at(x / d4, x % d4)] = tile_vec4(i, x, d);
        }
    }
}

// Scores of query rows 4*rg .. 4*rg+3 against two tile keys: `a` for one, `b` for the other.
struct Score8 {
    a: vec4<f32>,
    b: vec4<f32>,
}

// Item x of a tile's scores, 4 rows x 2 keys: rows 4*rg .. 4*rg+3 against keys j and j1 = j
// + half (half = ceil(nk / 2), so that neighbouring invocations read neighbouring tile rows);
// `s.b` is to be dropped when j1 >= nk.
struct ScoreItem {
    rg: u32,
    j: u32,
    j1: u32,
    s: Score8,
}

fn score_item(x: u32, half: u32, nk: u32) -> ScoreItem {
    let rg = x / half;
    let j = x % half;
    let j1 = j + half;
    return ScoreItem(rg, j, j1, score8(rg, j, min(j1, nk - 1u)));
}

// The same for few rows (4 at most, selected attention and selection in small groups): item
// x is one row i against keys j and j1, so that every invocation has work.
struct RowItem {
    i: u32,
    j: u32,
    j1: u32,
    s: vec2<f32>,
}

fn row_item(x: u32, half: u32, nk: u32) -> RowItem {
    let i = x / half;
    let j = x % half;
    let j1 = j + half;
    let k1 = min(j1, nk - 1u);
    var s = vec2<f32>(0.0);
    for (var e = 0u; e < dk4(); e++) {
        let qv = smem[i * dk4() + e];
        let a = smem[tile_at(j, e)];
        let b = smem[tile_at(k1, e)];
        // One fused multiply-add per product, as in score8.
        s = fma(vec2<f32>(qv.x), vec2<f32>(a.x, b.x), s);
        s = fma(vec2<f32>(qv.y), vec2<f32>(a.y, b.y), s);
        s = fma(vec2<f32>(qv.z), vec2<f32>(a.z, b.z), s);
        s = fma(vec2<f32>(qv.w), vec2<f32>(a.w, b.w), s);
    }
    return RowItem(i, j, j1, s);
}

// q . k for query rows 4*rg .. 4*rg+3 and tile keys j0, j1 (unscaled). Two keys per item
// share each query load: per vec4 of the head, six loads feed 32 FMAs.
fn score8(rg: u32, j0: u32, j1: u32) -> Score8 {
    let dk4 = dk4();
    let q0 = rg * 4u * dk4;
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    for (var e = 0u; e < dk4; e++) {
        let k0 = smem[tile_at(j0, e)];
        let k1 = smem[tile_at(j1, e)];
        let x0 = smem[q0 + e];
        let x1 = smem[q0 + dk4 + e];
        let x2 = smem[q0 + 2u * dk4 + e];
        let x3 = smem[q0 + 3u * dk4 + e];
        // Dimension by dimension, so that every product is one fused multiply-add into the
        // running sums (a dot product and an add would take five instructions per four).
        a = fma(vec4<f32>(x0.x, x1.x, x2.x, x3.x), vec4<f32>(k0.x), a);
        b = fma(vec4<f32>(x0.x, x1.x, x2.x, x3.x), vec4<f32>(k1.x), b);
        a = fma(vec4<f32>(x0.y, x1.y, x2.y, x3.y), vec4<f32>(k0.y), a);
        b = fma(vec4<f32>(x0.y, x1.y, x2.y, x3.y), vec4<f32>(k1.y), b);
        a = fma(vec4<f32>(x0.z, x1.z, x2.z, x3.z), vec4<f32>(k0.z), a);
        b = fma(vec4<f32>(x0.z, x1.z, x2.z, x3.z), vec4<f32>(k1.z), b);
        a = fma(vec4<f32>(x0.w, x1.w, x2.w, x3.w), vec4<f32>(k0.w), a);
        b = fma(vec4<f32>(x0.w, x1.w, x2.w, x3.w), vec4<f32>(k1.w), b);
    }
    return Score8(a, b);
}
