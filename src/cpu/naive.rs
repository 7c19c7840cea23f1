//! End-to-end NSA that follows SPEC.md line by line, in f64. Slow and plain on purpose: it is
//! the reference every kernel and every test answers to.

use crate::config::{Compression, NsaConfig, Shape};
use crate::error::Result;
use crate::inputs::NsaInputs;

/// Everything the naive reference computes, in f64.
#[derive(Debug, Clone)]
pub struct NaiveOutputs {
    /// `out`: `[B, Tq, Hq, Dv]`.
    pub out: Vec<f64>,
    /// Compressed-attention output, `[B, Tq, Hq, Dv]`.
    pub o_cmp: Vec<f64>,
    /// Selected-attention output, `[B, Tq, Hq, Dv]`.
    pub o_slc: Vec<f64>,
    /// Window-attention output, `[B, Tq, Hq, Dv]`.
    pub o_win: Vec<f64>,
    /// Selected blocks `[B, Tq, Hkv, n]`, ascending, `-1` padded.
    pub block_indices: Vec<i32>,
    /// Group block scores `S[j]` for `j in 0..=c`, one vector per `(b, i, kv head)` in
    /// `[B, Tq, Hkv]` order (for judging near ties).
    pub block_scores: Vec<Vec<f64>>,
}

#[allow(clippy::too_many_arguments)]
/// SPEC §1: compressed tokens of `x: [B, T, H, D]` for batch `b`, kv head `h`.
fn compress(
    cfg: &NsaConfig,
    x: &[f32],
    t: usize,
    hkv: usize,
    dim: usize,
    b: usize,
    h: usize,
    w: Option<(&[f32], &[f32])>,
) -> Vec<Vec<f64>> {
    let (l, d) = (cfg.cmp_block, cfg.cmp_stride);
    let row = |s: usize| &x[((b * t + s) * hkv + h) * dim..][..dim];
    (0..cfg.num_compressed(t))
        .map(|i| {
            let mut o = vec![0.0f64; dim];
            for j in 0..l {
                let kr = row(i * d + j);
                match w {
                    None => (0..dim).for_each(|e| o[e] += kr[e] as f64 / l as f64),
                    Some((w, pe)) => {
                        for din in 0..dim {
                            let xin = kr[din] as f64 + pe[(h * l + j) * dim + din] as f64;
                            for (e, oe) in o.iter_mut().enumerate() {
                                *oe += w[((h * l + j) * dim + din) * dim + e] as f64 * xin;
                            }
                        }
                    }
                }
            }
            o
        })
        .collect()
}

fn dot(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum()
}

/// Softmax attention of `q` over `(key, value)` rows; the empty set gives zeros.
fn softmax_attend(
    q: &[f32],
    scale: f64,
    kv: &[(Vec<f64>, Vec<f64>)],
    dv: usize,
) -> (Vec<f64>, Vec<f64>) {
    let s: Vec<f64> = kv.iter().map(|(k, _)| scale * dot(q, k)).collect();
    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
    let z: f64 = e.iter().sum();
    let p: Vec<f64> = e.iter().map(|x| x / z).collect();
    let mut o = vec![0.0; dv];
    for (pi, (_, v)) in p.iter().zip(kv) {
        o.iter_mut().zip(v).for_each(|(a, b)| *a += pi * b);
    }
    (o, p)
}

/// SPEC §3 for one query head: the importance `p_slc[j]` of blocks `0..=c` from the
/// probabilities `p_cmp` of the visible compressed tokens.
pub fn block_importance(cfg: &NsaConfig, p_cmp: &[f64], c: usize) -> Vec<f64> {
    let (l, d, lb) = (cfg.cmp_block, cfg.cmp_stride, cfg.sel_block);
    (0..=c)
        .map(|j| {
            let mut sj = 0.0;
            for m in 0..lb / d {
                for u in 0..l / d {
                    let idx = (lb / d * j + m) as isize - u as isize;
                    if idx >= 0 && (idx as usize) < p_cmp.len() {
                        sj += p_cmp[idx as usize];
                    }
                }
            }
            sj
        })
        .collect()
}

/// SPEC §4: the `n` selected blocks of a query whose own block is `c`, given the group
/// scores `score[0..=c]`: ascending, padded with `-1`.
pub fn select_blocks(cfg: &NsaConfig, score: &[f64], c: usize) -> Vec<i32> {
    let n = cfg.top_n;
    let mut chosen: Vec<usize> = (0..cfg.init_blocks)
        .chain((c + 1).saturating_sub(cfg.local_blocks)..=c)
        .filter(|j| *j <= c)
        .collect();
    chosen.sort_unstable();
    chosen.dedup();
    let mut rest: Vec<usize> = (0..=c).filter(|j| !chosen.contains(j)).collect();
    rest.sort_by(|a, b| score[*b].total_cmp(&score[*a]).then(a.cmp(b)));
    let free = n - chosen.len();
    chosen.extend(rest.into_iter().take(free));
    chosen.sort_unstable();
    let mut out = vec![-1; n];
    for (slot, j) in out.iter_mut().zip(chosen) {
        *slot = j as i32;
    }
    out
}

/// Runs NSA exactly as SPEC.md states it.
pub fn nsa(cfg: &NsaConfig, shape: &Shape, inputs: &NsaInputs) -> Result<NaiveOutputs> {
    inputs.validate(cfg, shape)?;
    let s = shape;
    let g = s.group();
    let scale = cfg.scale_for(s.dk) as f64;
    let (l, d, lb, n) = (cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.top_n);
    let rows = s.batch * s.tq * s.hq;
    let mut res = NaiveOutputs {
        out: vec![0.0; rows * s.dv],
        o_cmp: vec![0.0; rows * s.dv],
        o_slc: vec![0.0; rows * s.dv],
        o_win: vec![0.0; rows * s.dv],
        block_indices: super::unselected(cfg, s)?,
        block_scores: vec![Vec::new(); s.batch * s.tq * s.hkv],
    };
    let (kcmp, vcmp) = inputs.cmp_kv();
    let (kslc, vslc) = inputs.slc_kv();
    let (kwin, vwin) = inputs.win_kv();
    let lin = inputs
        .linear
        .filter(|_| cfg.compression == Compression::Linear);
    let key = |x: &[f32], dim: usize, b: usize, t: usize, h: usize| -> Vec<f64> {
        x[((b * s.tk + t) * s.hkv + h) * dim..][..dim]
            .iter()
            .map(|v| *v as f64)
            .collect()
    };
    for b in 0..s.batch {
        for h in 0..s.hkv {
            let kc = compress(
                cfg,
                kcmp,
                s.tk,
                s.hkv,
                s.dk,
                b,
                h,
                lin.map(|w| (w.w_k, w.pe_k)),
            );
            let vc = compress(
                cfg,
                vcmp,
                s.tk,
                s.hkv,
                s.dv,
                b,
                h,
                lin.map(|w| (w.w_v, w.pe_v)),
            );
            for i in 0..s.tq {
                let p = s.position(i);
                // §2: compressed tokens whose whole block lies at or before p.
                let vis: Vec<(Vec<f64>, Vec<f64>)> = (0..kc.len())
                    .filter(|i| i * d + l - 1 <= p)
                    .map(|i| (kc[i].clone(), vc[i].clone()))
                    .collect();
                // §3: block importance, summed over the group.
                let c = p / lb;
                let mut score = vec![0.0f64; c + 1];
                for hq in h * g..(h + 1) * g {
                    let row = (b * s.tq + i) * s.hq + hq;
                    let q = &inputs.q[row * s.dk..][..s.dk];
                    let (o, p_cmp) = softmax_attend(q, scale, &vis, s.dv);
                    if !vis.is_empty() {
                        res.o_cmp[row * s.dv..][..s.dv].copy_from_slice(&o);
                    }
                    let sh = block_importance(cfg, &p_cmp, c);
                    score.iter_mut().zip(sh).for_each(|(a, b)| *a += b);
                }
                // §4: forced blocks, then the highest scores, ties to the lower index.
                let sel = select_blocks(cfg, &score, c);
                let chosen: Vec<usize> = sel
                    .iter()
                    .filter(|j| **j >= 0)
                    .map(|j| *j as usize)
                    .collect();
                let bi = ((b * s.tq + i) * s.hkv + h) * n;
                res.block_indices[bi..bi + n].copy_from_slice(&sel);
                res.block_scores[(b * s.tq + i) * s.hkv + h] = score;
                // §5, §6, §7 per query head.
                let slc: Vec<(Vec<f64>, Vec<f64>)> = chosen
                    .iter()
                    .flat_map(|j| j * lb..(j + 1) * lb)
                    .filter(|t| *t <= p)
                    .map(|t| (key(kslc, s.dk, b, t, h), key(vslc, s.dv, b, t, h)))
                    .collect();
                let win: Vec<(Vec<f64>, Vec<f64>)> = ((p + 1).saturating_sub(cfg.window)..=p)
                    .map(|t| (key(kwin, s.dk, b, t, h), key(vwin, s.dv, b, t, h)))
                    .collect();
                for hq in h * g..(h + 1) * g {
                    let row = (b * s.tq + i) * s.hq + hq;
                    let q = &inputs.q[row * s.dk..][..s.dk];
                    let (os, _) = softmax_attend(q, scale, &slc, s.dv);
                    let (ow, _) = softmax_attend(q, scale, &win, s.dv);
                    let gt = &inputs.gates[row * 3..][..3];
                    for e in 0..s.dv {
                        let r = row * s.dv + e;
                        res.o_slc[r] = os[e];
                        res.o_win[r] = ow[e];
                        res.out[r] = gt[0] as f64 * res.o_cmp[r]
                            + gt[1] as f64 * os[e]
                            + gt[2] as f64 * ow[e];
                    }
                }
            }
        }
    }
    Ok(res)
}
