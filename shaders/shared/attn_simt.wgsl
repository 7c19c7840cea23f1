// The attention core's tile loop on plain WGSL: every product on the shader cores, the
// scores 4 rows x 1 key and the output 4 rows x 4 dims per item, from vec4 loads of the
// tiles in `smem` (see qk.wgsl). attn_mma.wgsl is the tensor-core variant with the same
// contract.

// Attends every owned row to keys [start, end) of the bound k, v (`stride` rows per sequence),
// each row only to those inside its [row_lo, row_hi). `start`, `end` must be uniform.
//
// Per tile, four or five barriers: the key tile is stored; scores are stored; (without
// subgroup operations) the rows' partial maxima are in; probabilities and rescale factors
// are in; the values are used. The value tile is fetched while the scores are computed and
// the next key tile while the values are accumulated, so neither load stalls the workgroup
// on its own.
fn attn_keys(lid: u32, r: Rows, stride: u32, start: u32, end: u32) {
    let dv4 = (DV + 3u) / 4u;
    let kt = KT;
    let nrg = (r.n + 3u) / 4u;
    let i = lid / 8u;      // the row this invocation helps reduce, with 7 others
    let part = lid % 8u;
    if start < end {
        fetch_tile(lid, attn_kv(r, stride, start, true), min(kt, end - start), DK, true);
    }
    for (var t0 = start; t0 < end; t0 += kt) {
        let nk = min(kt, end - t0);
        store_tile(lid, nk, DK);
        workgroupBarrier();
        fetch_tile(lid, attn_kv(r, stride, t0, false), nk, DV, false);
        // Scores: 4 rows x 1 key per item.
        for (var x = lid; x < nrg * nk; x += WG) {
            let rg = x / nk;
            let j = x % nk;
            let s = score4(rg, j) * params.scale;
            let t = t0 + j;
            store_score(rg * 4u, t, j, s.x, r.n);
            store_score(rg * 4u + 1u, t, j, s.y, r.n);
            store_score(rg * 4u + 2u, t, j, s.z, r.n);
            store_score(rg * 4u + 3u, t, j, s.w, r.n);
        }
        workgroupBarrier();
        // The value tile replaces the key tile; each row's new maximum from 8 invocations.
        store_tile(lid, nk, DV);
        var m = NEG_BIG;
        for (var j = part; j < nk; j += 8u) {
            m = max(m, scores[i * KT_MAX + j]);
        }
        let m_new = max(run_max, row_max8(lid, m));
        var sum = 0.0;
        for (var j = part; j < nk; j += 8u) {
            let s = scores[i * KT_MAX + j];
            let p = select(exp(s - m_new), 0.0, s == NEG_BIG);
            scores[i * KT_MAX + j] = p;
            sum += p;
        }
        tile_stats(lid, sum, m_new);
        // Every item rescales and accumulates.
        if t0 + kt < end {
            fetch_tile(lid, attn_kv(r, stride, t0 + kt, true), min(kt, end - t0 - kt), DK, true);
        }
        // Output: 4 rows x 4 dims per item, at most 2 items per invocation.
        let items = nrg * dv4;
        if lid < items {
            acc0 = accumulate(acc0, lid / dv4, lid % dv4, nk);
        }
        if lid + WG < items {
            acc1 = accumulate(acc1, (lid + WG) / dv4, (lid + WG) % dv4, nk);
        }
        workgroupBarrier();
    }
}

// Rescales item (rows 4*rg .. 4*rg+3, dims 4*e .. 4*e+3) by the rows' alpha and adds the
// tile's probabilities times its values.
fn accumulate(a: Acc, rg: u32, e: u32, nk: u32) -> Acc {
    var o = Acc(
        a.r0 * row_alpha[rg * 4u],
        a.r1 * row_alpha[rg * 4u + 1u],
        a.r2 * row_alpha[rg * 4u + 2u],
        a.r3 * row_alpha[rg * 4u + 3u],
    );
    for (var j = 0u; j < nk; j++) {
        let vv = smem[tile_at(j, e)];
        o.r0 += scores[(rg * 4u) * KT_MAX + j] * vv;
        o.r1 += scores[(rg * 4u + 1u) * KT_MAX + j] * vv;
        o.r2 += scores[(rg * 4u + 2u) * KT_MAX + j] * vv;
        o.r3 += scores[(rg * 4u + 3u) * KT_MAX + j] * vv;
    }
    return o;
}

// Row i's scaled score of key t (tile column j), or NEG_BIG outside its range.
fn store_score(i: u32, t: u32, j: u32, s: f32, n: u32) {
    let inside = i < n && t >= row_lo[i] && t < row_hi[i];
    scores[i * KT_MAX + j] = select(NEG_BIG, s, inside);
}
