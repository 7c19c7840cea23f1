//! CPU twin of `shaders/slc_attn.wgsl`.

use crate::config::{NsaConfig, Shape};

/// Selected-block attention: each query row attends to the keys `s <= p` of its kv head's
/// selected blocks `idx: [B, Tq, Hkv, n]`. Returns `o_slc: [B, Tq, Hq, Dv]`.
pub fn slc_attn(
    config: &NsaConfig,
    shape: &Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    idx: &[i32],
) -> Vec<f32> {
    let s = shape;
    let (n, lb) = (config.top_n, config.sel_block);
    let scale = config.scale_for(s.dk);
    let mut o = vec![0.0f32; s.batch * s.tq * s.hq * s.dv];
    for b in 0..s.batch {
        let kb = &k[b * s.tk * s.hkv * s.dk..];
        let vb = &v[b * s.tk * s.hkv * s.dv..];
        for i in 0..s.tq {
            let p = s.position(i);
            for hq in 0..s.hq {
                let h = hq / s.group();
                let blocks = &idx[((b * s.tq + i) * s.hkv + h) * n..][..n];
                let keys = blocks
                    .iter()
                    .filter(|j| **j >= 0)
                    .flat_map(|&j| (j as usize * lb)..((j as usize + 1) * lb).min(p + 1));
                let row = (b * s.tq + i) * s.hq + hq;
                let (qr, or) = (&q[row * s.dk..][..s.dk], &mut o[row * s.dv..][..s.dv]);
                super::attend(qr, kb, vb, s.hkv, h, s.dk, s.dv, scale, keys, or);
            }
        }
    }
    o
}
