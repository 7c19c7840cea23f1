//! CPU twin of `shaders/select.wgsl`: block importance, group sum and top-n selection.

use crate::config::{NsaConfig, Shape};
use crate::error::Result;

/// The forced blocks of a query whose own block is `c`: `{0..init} ∪ {c-local+1..=c}`
/// within `[0, c]`, ascending, without repeats.
pub fn forced_blocks(config: &NsaConfig, c: usize) -> Vec<usize> {
    let mut f: Vec<usize> = (0..config.init_blocks.min(c + 1)).collect();
    let lo = (c + 1).saturating_sub(config.local_blocks);
    f.extend((lo..=c).filter(|j| *j >= config.init_blocks));
    f
}

/// Selects `n` blocks per query row and kv head: `[B, Tq, Hkv, n]`, ascending, `-1` padded.
///
/// `p_cmp` is recomputed from `q`, the compressed keys `kc: [B, C, Hkv, Dk]` and the
/// log-sum-exp of [`super::cmp_attn::cmp_attn`], summed over the group's heads, spread onto
/// blocks by SPEC's overlap weights; ties go to the lower block index. An `n` whose output
/// the host cannot hold is an [`crate::NsaError::InvalidConfig`].
pub fn select(
    config: &NsaConfig,
    shape: &Shape,
    q: &[f32],
    kc: &[f32],
    lse: &[f32],
) -> Result<Vec<i32>> {
    let s = shape;
    let n = config.top_n;
    let n_cmp = config.num_compressed(s.tk);
    let scale = config.scale_for(s.dk);
    let g = s.group();
    let m = config.sel_block / config.cmp_stride;
    let u = config.cmp_block / config.cmp_stride;
    let mut out = super::unselected(config, s)?;
    let mut pc = vec![0.0f32; n_cmp];
    for b in 0..s.batch {
        for i in 0..s.tq {
            let p = s.position(i);
            let c = p / config.sel_block;
            let nv = config.visible_compressed(p, n_cmp);
            for h in 0..s.hkv {
                // P[t] = sum over the group's heads of p_cmp[t].
                pc[..nv].iter_mut().for_each(|x| *x = 0.0);
                for gi in 0..g {
                    let row = (b * s.tq + i) * s.hq + h * g + gi;
                    let qr = &q[row * s.dk..][..s.dk];
                    for (t, pt) in pc[..nv].iter_mut().enumerate() {
                        let kr = &kc[((b * n_cmp + t) * s.hkv + h) * s.dk..][..s.dk];
                        let sc = scale * qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>();
                        *pt += (sc - lse[row]).exp();
                    }
                }
                let forced = forced_blocks(config, c);
                let mut cand: Vec<(f32, usize)> = (0..=c)
                    .filter(|j| !forced.contains(j))
                    .map(|j| (block_score(&pc[..nv], j, m, u), j))
                    .collect();
                cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let mut chosen = forced;
                chosen.extend(cand.iter().take(n - chosen.len()).map(|x| x.1));
                chosen.sort_unstable();
                let o = &mut out[((b * s.tq + i) * s.hkv + h) * n..][..n];
                for (slot, j) in o.iter_mut().zip(chosen) {
                    *slot = j as i32;
                }
            }
        }
    }
    Ok(out)
}

/// How many of a selection block's `m` pieces overlap token `g` of the `m + u - 1` that reach
/// into it (the `u - 1` before its first piece first): SPEC's overlap sum counted per token.
pub fn overlap(g: usize, m: usize, u: usize) -> usize {
    m.min(g + 1) - ((g + 1).max(u) - u)
}

/// Block `j`'s importance from the group's probabilities `pc` of the visible compressed
/// tokens, as select.wgsl forms it: sum over g of `overlap(g) * pc[m j - (u - 1) + g]`,
/// added 16 terms at a time (f32's rounding then grows with the groups, not the terms)
/// from the block's first token past the sequence's start, so that blocks the same tokens
/// overlap alike (all of them whole, where a compressed token spans several blocks) tie bit
/// for bit and the lower wins, as SPEC asks. Only the visible tokens' terms are added (a
/// walk over all `m + u - 1` would take billions of steps where `l / d` is in the billions).
pub fn block_score(pc: &[f32], j: usize, m: usize, u: usize) -> f32 {
    // Token m j - (u - 1) + g is visible for g in [lo, hi), in u64: u - 1 plus the
    // visible tokens may pass a 32-bit usize.
    let (back, first) = ((u - 1) as u64, (m as u64) * (j as u64));
    let n = m as u64 + back;
    let lo = back.saturating_sub(first);
    let hi = (pc.len() as u64 + back).saturating_sub(first).min(n);
    let mut s = 0.0f32;
    let mut g0 = lo;
    while g0 < hi {
        let mut part = 0.0f32;
        for g in g0..(g0 + 16).min(hi) {
            let t = (first + g - back) as usize;
            part += overlap(g as usize, m, u) as f32 * pc[t];
        }
        s += part;
        g0 += 16;
    }
    s
}
