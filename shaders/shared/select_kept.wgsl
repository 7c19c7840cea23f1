// The selection's token probabilities from the scores compressed attention kept
// (cmp_attn.wgsl, params.kept_stride > 0): the sums select_qk.wgsl forms, in the same order,
// without multiplying the queries with the compressed keys a second time.

// cmp_attn's scaled scores: [B, Tq, Hq, kept_stride]
@group(0) @binding(5) var<storage, read> kept: array<f32>;

// Token probabilities, which select.wgsl turns into block scores (select_sums.wgsl's
// score_blocks is not used).
const BLOCK_SUMS: bool = false;

fn score_blocks(lid: u32, row: u32, nh: u32, j0: u32, jn: u32, nv: u32) {}

// The queries are not needed.
fn load_rows(lid: u32, nh: u32, row: u32) {}

// As select_qk.wgsl's: token t's sum at pbuf[t + base], one invocation per token, TOKENS
// tokens (t, t + WG, ...) at a time whose scores load together: one round trip per group
// of heads (4, or 1 when `narrow`) for all of them rather than per token. Each token's sum
// runs over the heads in select_qk.wgsl's order: per head when `narrow`, else per 4 heads.
fn score_tokens(lid: u32, bb: u32, h: u32, row: u32, nh: u32, t_lo: u32, t_hi: u32, base: u32) {
    workgroupBarrier();  // lse_s of these heads is in
    let narrow = FEW_ROWS != 0u && nh <= 4u;
    let stride = params.kept_stride;
    for (var t0 = t_lo + lid; t0 < t_hi; t0 += TOKENS * WG) {
        var at: array<u32, TOKENS>;
        var acc: array<f32, TOKENS>;
        for (var c = 0u; c < TOKENS; c++) {
            at[c] = params.off_kept + row * stride + min(t0 + c * WG, t_hi - 1u);
            acc[c] = 0.0;
        }
        if narrow {
            for (var i = 0u; i < nh; i++) {
                var s: array<f32, TOKENS>;
                for (var c = 0u; c < TOKENS; c++) {
                    s[c] = kept[at[c] + i * stride];
                }
                for (var c = 0u; c < TOKENS; c++) {
                    acc[c] += exp(s[c] - lse_s[i]);
                }
            }
        } else {
            for (var rg = 0u; rg < (nh + 3u) / 4u; rg++) {
                let i = rg * 4u;
                var s: array<vec4<f32>, TOKENS>;
                for (var c = 0u; c < TOKENS; c++) {
                    for (var e = 0u; e < 4u; e++) {
                        s[c][e] = kept[at[c] + min(i + e, nh - 1u) * stride];
                    }
                }
                let lse4 = vec4<f32>(lse_s[i], lse_s[i + 1u], lse_s[i + 2u], lse_s[i + 3u]);
                let live = vec4<u32>(i, i + 1u, i + 2u, i + 3u) < vec4<u32>(nh);
                for (var c = 0u; c < TOKENS; c++) {
                    let p = select(vec4<f32>(0.0), exp(s[c] - lse4), live);
                    acc[c] += p.x + p.y + p.z + p.w;
                }
            }
        }
        for (var c = 0u; c < TOKENS; c++) {
            let t = t0 + c * WG;
            if t < t_hi {
                pbuf[t + base] += acc[c];
            }
        }
    }
}

// Tokens per invocation whose kept scores load together. On an H200 (f16, 64k, D = 128)
// the selection took 17.2 ms with 1, 11.1 with 4 and 13.2 with 8.
const TOKENS: u32 = 4u;
