//! CPU twin of `shaders/compress.wgsl`.

use crate::config::NsaConfig;

/// Compresses `x: [B, T, H, D]` into `[B, C, H, D]`: the mean of each block of `l` rows, or
/// with `linear = Some((w, pe))` the sum over the block of `W[h][j]^T (x + pe[h][j])`.
pub fn compress(
    config: &NsaConfig,
    batch: usize,
    t: usize,
    heads: usize,
    dim: usize,
    x: &[f32],
    linear: Option<(&[f32], &[f32])>,
) -> Vec<f32> {
    let (l, d) = (config.cmp_block, config.cmp_stride);
    let n_cmp = config.num_compressed(t);
    let mut out = vec![0.0f32; batch * n_cmp * heads * dim];
    let mut row = vec![0.0f32; dim];
    for b in 0..batch {
        for i in 0..n_cmp {
            for h in 0..heads {
                let o = &mut out[((b * n_cmp + i) * heads + h) * dim..][..dim];
                for j in 0..l {
                    let src = &x[((b * t + i * d + j) * heads + h) * dim..][..dim];
                    match linear {
                        None => o.iter_mut().zip(src).for_each(|(a, s)| *a += s),
                        Some((w, pe)) => {
                            let pe = &pe[(h * l + j) * dim..][..dim];
                            row.iter_mut()
                                .zip(src.iter().zip(pe))
                                .for_each(|(r, (s, p))| *r = s + p);
                            let wj = &w[(h * l + j) * dim * dim..][..dim * dim];
                            for (din, r) in row.iter().enumerate() {
                                let wr = &wj[din * dim..][..dim];
                                o.iter_mut().zip(wr).for_each(|(a, wv)| *a += wv * r);
                            }
                        }
                    }
                }
                if linear.is_none() {
                    o.iter_mut().for_each(|a| *a /= l as f32);
                }
            }
        }
    }
    out
}
