// Queries and key tiles in workgroup memory, and the register-blocked score they feed:
// shared by the attention core and the selection kernel. The including kernel defines
// `fn fetch_kv(from_k: bool, at: u32) -> f32`, the element load behind `load_tile`.

#import input
#import params

@group(0) @binding(1) var<storage, read> q: array<in_t>;  // [B, Tq, Hq, Dk]
@group(0) @binding(2) var<storage, read> k: array<in_t>;  // [B, T, Hkv, Dk] (T = Tk, or C for compressed keys)

const WG: u32 = 128u;          // invocations per workgroup
const ROWS: u32 = 16u;         // query rows per workgroup
const DMAX4: u32 = 64u;        // vec4s per row at Dk, Dv <= 256
const TILE4: u32 = 528u;       // vec4s of one key (or value) tile: kv_tile * tile_stride() <= TILE4

var<workgroup> qs: array<vec4<f32>, 1024>;     // [ROWS, DMAX4], zero past Dk and past n rows
var<workgroup> tile: array<vec4<f32>, TILE4>;  // [kv_tile, tile_stride()], zero past D

// Head sizes and keys per tile, set per shape when the pipeline is created (Rust's
// `Specialization`), so that the loops over head dimensions and tile keys have constant
// bounds the driver can unroll. They equal params.dk, params.dv and params.kv_tile.
override DK: u32;
override DV: u32;
override KT: u32;

// vec4s per tile row: max(ceil(Dk/4), ceil(Dv/4)) rounded up to odd, so that the keys that
// neighbouring invocations score sit in different banks.
fn tile_stride() -> u32 {
    return max((DK + 3u) / 4u, (DV + 3u) / 4u) | 1u;
}

// Loads `n` query rows into `qs`: row i is flat [.., Hq] row `base + (i / nh) * Hq + i % nh`
// (nh heads of consecutive queries).
fn load_queries(lid: u32, n: u32, nh: u32, base: u32) {
    let dk4 = (DK + 3u) / 4u;
    for (var x = lid; x < ROWS * dk4; x += WG) {
        let i = x / dk4;
        let e = (x % dk4) * 4u;
        var val = vec4<f32>(0.0);
        if i < n {
            let at = params.off_q + (base + (i / nh) * params.hq + i % nh) * DK + e;
            for (var c = 0u; c < 4u; c++) {
                if e + c < DK {
                    val[c] = f32(q[at + c]);
                }
            }
        }
        qs[i * DMAX4 + x % dk4] = val;
    }
}

// Loads `nk` rows of width `d` (row j at `base + j * Hkv * d`, keys or values as `from_k`
// says) into `tile` as vec4s (row j at j * tile_stride()), zero past `d`.
fn load_tile(lid: u32, base: u32, nk: u32, d: u32, from_k: bool) {
    let d4 = (d + 3u) / 4u;
    let ts = tile_stride();
    for (var x = lid; x < nk * d4; x += WG) {
        let j = x / d4;
        let e = (x % d4) * 4u;
        let at = base + j * params.hkv * d + e;
        var val = vec4<f32>(0.0);
        for (var c = 0u; c < 4u; c++) {
            if e + c < d {
                val[c] = fetch_kv(from_k, at + c);
            }
        }
        tile[j * ts + x % d4] = val;
    }
}

// q . k for query rows 4*rg .. 4*rg+3 and tile key j (unscaled).
fn score4(rg: u32, j: u32) -> vec4<f32> {
    let dk4 = (DK + 3u) / 4u;
    let kb = j * tile_stride();
    var s = vec4<f32>(0.0);
    for (var e = 0u; e < dk4; e++) {
        let kv = tile[kb + e];
        s[0] += dot(qs[(rg * 4u) * DMAX4 + e], kv);
        s[1] += dot(qs[(rg * 4u + 1u) * DMAX4 + e], kv);
        s[2] += dot(qs[(rg * 4u + 2u) * DMAX4 + e], kv);
        s[3] += dot(qs[(rg * 4u + 3u) * DMAX4 + e], kv);
    }
    return s;
}
