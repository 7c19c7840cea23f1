// The selection's token probabilities from a second q.k over the compressed keys: what
// select.wgsl imports unless compressed attention kept its scores (select_kept.wgsl) or
// block sums (select_sums.wgsl). All three define BLOCK_SUMS, load_rows, score_tokens and
// score_blocks.

// Token probabilities, which select.wgsl turns into block scores (select_sums.wgsl's
// score_blocks is not used).
const BLOCK_SUMS: bool = false;

fn score_blocks(lid: u32, row: u32, nh: u32, j0: u32, jn: u32, nv: u32) {}

// Loads the queries of heads row .. row + nh.
fn load_rows(lid: u32, nh: u32, row: u32) {
    load_queries(lid, nh, nh, row);
}

// Adds the probabilities of compressed tokens [t_lo, t_hi) of the nh heads whose queries and
// log-sum-exps are loaded (heads row .., kv head h of batch bb), summed over the heads, to
// pbuf[t + base]: key tiles scored against the queries in workgroup memory.
fn score_tokens(lid: u32, bb: u32, h: u32, row: u32, nh: u32, t_lo: u32, t_hi: u32, base: u32) {
    let nrg = (nh + 3u) / 4u;
    let kt = KT;
    // The next tile's keys are fetched while this tile is scored.
    let kbase = params.off_kc + (bb * params.c_stride * params.hkv + h) * DK;
    let kstep = params.hkv * DK;
    if t_lo < t_hi {
        fetch_tile(lid, kbase + t_lo * kstep, min(kt, t_hi - t_lo), DK, true);
    }
    for (var t0 = t_lo; t0 < t_hi; t0 += kt) {
        let nk = min(kt, t_hi - t0);
        store_tile(lid, nk, DK);
        workgroupBarrier();
        if t0 + kt < t_hi {
            fetch_tile(lid, kbase + (t0 + kt) * kstep, min(kt, t_hi - t0 - kt), DK, true);
        }
        // 4 heads x 2 tokens per item (score_item), or, for 4 heads at most, 1 head
        // x 2 tokens (row_item); `partial` then holds one row per head.
        let half = (nk + 1u) / 2u;
        let narrow = FEW_ROWS != 0u && nrg == 1u;
        if narrow {
            for (var x = lid; x < nh * half; x += WG) {
                let it = row_item(x, half, nk);
                let p = exp(it.s * params.scale - lse_s[it.i]);
                partial[it.i * KT_MAX + it.j] = p.x;
                if it.j1 < nk {
                    partial[it.i * KT_MAX + it.j1] = p.y;
                }
            }
        } else {
            for (var x = lid; x < nrg * half; x += WG) {
                let it = score_item(x, half, nk);
                partial[it.rg * KT_MAX + it.j] = head_sum(it.rg, nh, it.s.a);
                if it.j1 < nk {
                    partial[it.rg * KT_MAX + it.j1] = head_sum(it.rg, nh, it.s.b);
                }
            }
        }
        workgroupBarrier();
        if lid < nk {
            var acc = 0.0;
            for (var rg = 0u; rg < select(nrg, nh, narrow); rg++) {
                acc += partial[rg * KT_MAX + lid];
            }
            pbuf[t0 + lid + base] += acc;
        }
    }
}

// The probabilities of heads 4*rg .. 4*rg+3 (of nh) for one token, from their unscaled
// scores `s` and the heads' log-sum-exp, summed.
fn head_sum(rg: u32, nh: u32, s: vec4<f32>) -> f32 {
    let i = rg * 4u;
    let lse4 = vec4<f32>(lse_s[i], lse_s[i + 1u], lse_s[i + 2u], lse_s[i + 3u]);
    let live = vec4<u32>(i, i + 1u, i + 2u, i + 3u) < vec4<u32>(nh);
    let p = select(vec4<f32>(0.0), exp(s * params.scale - lse4), live);
    return p.x + p.y + p.z + p.w;
}
