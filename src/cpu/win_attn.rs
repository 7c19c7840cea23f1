//! CPU twin of `shaders/win_attn.wgsl`: sliding-window attention fused with the gates.

use crate::config::{NsaConfig, Shape};

/// Window attention over keys `max(0, p-w+1) ..= p`, then
/// `out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`. Returns `(o_win, out)`, each
/// `[B, Tq, Hq, Dv]`.
#[allow(clippy::too_many_arguments)]
pub fn win_attn(
    config: &NsaConfig,
    shape: &Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    gates: &[f32],
    o_cmp: &[f32],
    o_slc: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let s = shape;
    let scale = config.scale_for(s.dk);
    let mut o_win = vec![0.0f32; s.batch * s.tq * s.hq * s.dv];
    let mut out = o_win.clone();
    for b in 0..s.batch {
        let kb = &k[b * s.tk * s.hkv * s.dk..];
        let vb = &v[b * s.tk * s.hkv * s.dv..];
        for i in 0..s.tq {
            let p = s.position(i);
            let lo = (p + 1).saturating_sub(config.window);
            for hq in 0..s.hq {
                let h = hq / s.group();
                let row = (b * s.tq + i) * s.hq + hq;
                let qr = &q[row * s.dk..][..s.dk];
                let ow = &mut o_win[row * s.dv..][..s.dv];
                super::attend(qr, kb, vb, s.hkv, h, s.dk, s.dv, scale, lo..=p, ow);
                let g = &gates[row * 3..][..3];
                for e in 0..s.dv {
                    let r = row * s.dv + e;
                    out[r] = g[0] * o_cmp[r] + g[1] * o_slc[r] + g[2] * o_win[r];
                }
            }
        }
    }
    (o_win, out)
}
