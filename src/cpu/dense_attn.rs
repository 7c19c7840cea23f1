//! CPU twin of `shaders/dense_attn.wgsl`.

use crate::config::Shape;

/// Dense causal attention: each query row at position `p` attends to keys `0 ..= p`.
/// Returns `[B, Tq, Hq, Dv]`.
pub fn dense_attn(shape: &Shape, scale: f32, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let s = shape;
    let mut o = vec![0.0f32; s.batch * s.tq * s.hq * s.dv];
    for b in 0..s.batch {
        let kb = &k[b * s.tk * s.hkv * s.dk..];
        let vb = &v[b * s.tk * s.hkv * s.dv..];
        for i in 0..s.tq {
            let p = s.position(i);
            for hq in 0..s.hq {
                let row = (b * s.tq + i) * s.hq + hq;
                let (qr, or) = (&q[row * s.dk..][..s.dk], &mut o[row * s.dv..][..s.dv]);
                super::attend(
                    qr,
                    kb,
                    vb,
                    s.hkv,
                    hq / s.group(),
                    s.dk,
                    s.dv,
                    scale,
                    0..=p,
                    or,
                );
            }
        }
    }
    o
}
