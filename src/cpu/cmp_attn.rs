//! CPU twin of `shaders/cmp_attn.wgsl`.

use crate::config::{NsaConfig, Shape};

/// Compressed attention: for each query row and head, softmax over the visible compressed
/// tokens `kc, vc: [B, C, Hkv, D]`. Returns `o_cmp: [B, Tq, Hq, Dv]` (zero where no token is
/// visible) and the log-sum-exp `lse: [B, Tq, Hq]` (0 where no token is visible).
pub fn cmp_attn(
    config: &NsaConfig,
    shape: &Shape,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let s = shape;
    let n_cmp = config.num_compressed(s.tk);
    let scale = config.scale_for(s.dk);
    let mut o = vec![0.0f32; s.batch * s.tq * s.hq * s.dv];
    let mut lse = vec![0.0f32; s.batch * s.tq * s.hq];
    for b in 0..s.batch {
        let kb = &kc[b * n_cmp * s.hkv * s.dk..];
        let vb = &vc[b * n_cmp * s.hkv * s.dv..];
        for i in 0..s.tq {
            let nv = config.visible_compressed(s.position(i), n_cmp);
            for hq in 0..s.hq {
                let row = (b * s.tq + i) * s.hq + hq;
                let qr = &q[row * s.dk..][..s.dk];
                let or = &mut o[row * s.dv..][..s.dv];
                let h = hq / s.group();
                let l = super::attend(qr, kb, vb, s.hkv, h, s.dk, s.dv, scale, 0..nv, or);
                lse[row] = l.unwrap_or(0.0);
            }
        }
    }
    (o, lse)
}
