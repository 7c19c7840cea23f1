// The selection's token probabilities from the scores compressed attention kept
// (cmp_attn.wgsl, params.kept_stride > 0): the sums select_qk.wgsl forms, in the same order,
// without multiplying the queries with the compressed keys a second time.

// cmp_attn's scaled scores: [B, Tq, Hq, kept_stride]
@group(0) @binding(5) var<storage, read> kept: array<f32>;

// The queries are not needed.
fn load_rows(lid: u32, nh: u32, row: u32) {}

// As select_qk.wgsl's: token t's sum at pbuf[t + base], one invocation per token.
fn score_tokens(lid: u32, bb: u32, h: u32, row: u32, nh: u32, t_lo: u32, t_hi: u32, base: u32) {
    workgroupBarrier();  // lse_s of these heads is in
    let narrow = FEW_ROWS != 0u && nh <= 4u;
    for (var t = t_lo + lid; t < t_hi; t += WG) {
        pbuf[t + base] += kept_sum(row, nh, t, narrow);
    }
}

// The group sum of token t's probabilities over heads row .. row + nh: per head when
// `narrow`, else per 4 heads, as select_qk.wgsl adds them.
fn kept_sum(row: u32, nh: u32, t: u32, narrow: bool) -> f32 {
    let at = params.off_kept + row * params.kept_stride + t;
    var acc = 0.0;
    if narrow {
        for (var i = 0u; i < nh; i++) {
            acc += exp(kept[at + i * params.kept_stride] - lse_s[i]);
        }
        return acc;
    }
    for (var rg = 0u; rg < (nh + 3u) / 4u; rg++) {
        let i = rg * 4u;
        var s: vec4<f32>;
        for (var c = 0u; c < 4u; c++) {
            s[c] = kept[at + min(i + c, nh - 1u) * params.kept_stride];
        }
        let lse4 = vec4<f32>(lse_s[i], lse_s[i + 1u], lse_s[i + 2u], lse_s[i + 3u]);
        let live = vec4<u32>(i, i + 1u, i + 2u, i + 3u) < vec4<u32>(nh);
        let p = select(vec4<f32>(0.0), exp(s - lse4), live);
        acc += p.x + p.y + p.z + p.w;
    }
    return acc;
}
