//! The CPU reference.
//!
//! One module per GPU kernel, written to mirror its shader stage by stage (f32, the same
//! order of operations where it matters), and [`naive`]: an end-to-end NSA that follows
//! SPEC.md line by line in f64. Tests hold each kernel against its twin and the whole GPU
//! forward against [`naive`]; the command-line tool's `--cpu` runs [`forward`].

pub mod cmp_attn;
pub mod compress;
pub mod dense_attn;
pub mod naive;
pub mod select;
pub mod slc_attn;
pub mod win_attn;

use crate::config::{Compression, NsaConfig, Shape};
use crate::error::{NsaError, Result};
use crate::inputs::{
    check_cu_seqlens, check_cu_seqlens_qk, BranchOutputs, NsaInputs, NsaOutputs, OutputRequest,
};

/// The selected blocks' output, `[B, Tq, Hkv, n]` of `-1`: an [`NsaError::InvalidConfig`]
/// naming `top_n` where the host cannot hold it (the one output whose size a config sets
/// apart from the inputs'), rather than an aborted allocation.
pub(crate) fn unselected(config: &NsaConfig, shape: &Shape) -> Result<Vec<i32>> {
    let len = crate::config::elements(&[shape.batch, shape.tq, shape.hkv, config.top_n]);
    let mut idx = Vec::new();
    match len {
        Some(len) if idx.try_reserve_exact(len).is_ok() => {
            idx.resize(len, -1);
            Ok(idx)
        }
        _ => Err(NsaError::InvalidConfig {
            field: "top_n",
            value: config.top_n.to_string(),
            rule: "B * Tq * Hkv * n selected blocks fit in the host's memory",
        }),
    }
}

/// Softmax attention of one query row over the keys `keys` (absolute row indices into
/// `k`/`v`, laid out `[rows, Hkv, D]` for kv head `h`), as the shaders compute it: running max,
/// f32 accumulation. Returns the normalised output and the log-sum-exp (`None` without keys).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    hkv: usize,
    h: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    keys: impl Iterator<Item = usize>,
    out: &mut [f32],
) -> Option<f32> {
    let mut m = f32::NEG_INFINITY;
    let mut l = 0.0f32;
    out.iter_mut().for_each(|o| *o = 0.0);
    for t in keys {
        let kr = &k[(t * hkv + h) * dk..][..dk];
        let s = scale * q.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>();
        let m_new = m.max(s);
        let alpha = (m - m_new).exp();
        let p = (s - m_new).exp();
        l = l * alpha + p;
        let vr = &v[(t * hkv + h) * dv..][..dv];
        for (o, x) in out.iter_mut().zip(vr) {
            *o = *o * alpha + p * x;
        }
        m = m_new;
    }
    if l > 0.0 {
        out.iter_mut().for_each(|o| *o /= l);
        Some(m + l.ln())
    } else {
        None
    }
}

/// The whole forward pass on the CPU through the kernel twins, returning what the GPU path
/// returns for the same request.
pub fn forward(
    config: &NsaConfig,
    shape: &Shape,
    inputs: &NsaInputs,
    request: OutputRequest,
) -> Result<NsaOutputs> {
    inputs.validate(config, shape)?;
    let (kc_in, vc_in) = inputs.cmp_kv();
    let (wk, wv) = match (config.compression, inputs.linear) {
        (Compression::Linear, Some(lw)) => (Some((lw.w_k, lw.pe_k)), Some((lw.w_v, lw.pe_v))),
        _ => (None, None),
    };
    let kc = compress::compress(
        config,
        shape.batch,
        shape.tk,
        shape.hkv,
        shape.dk,
        kc_in,
        wk,
    );
    let vc = compress::compress(
        config,
        shape.batch,
        shape.tk,
        shape.hkv,
        shape.dv,
        vc_in,
        wv,
    );
    let (o_cmp, lse) = cmp_attn::cmp_attn(config, shape, inputs.q, &kc, &vc);
    let idx = select::select(config, shape, inputs.q, &kc, &lse)?;
    let (ks, vs) = inputs.slc_kv();
    let o_slc = slc_attn::slc_attn(config, shape, inputs.q, ks, vs, &idx);
    let (kw, vw) = inputs.win_kv();
    let (o_win, out) = win_attn::win_attn(
        config,
        shape,
        inputs.q,
        kw,
        vw,
        inputs.gates,
        &o_cmp,
        &o_slc,
    );
    Ok(NsaOutputs {
        out,
        block_indices: request.block_indices.then_some(idx),
        branches: request.branches.then_some(BranchOutputs {
            o_cmp,
            o_slc,
            o_win,
        }),
    })
}

/// [`forward`] for a packed batch (FlashAttention's `cu_seqlens`, as
/// [`crate::NsaPipeline::run_varlen`] takes it, `heads = (Hq, Hkv, Dk, Dv)`): each sequence
/// alone, the outputs concatenated the same way.
pub fn forward_varlen(
    config: &NsaConfig,
    cu_seqlens: &[usize],
    heads: (usize, usize, usize, usize),
    inputs: &NsaInputs,
    request: OutputRequest,
) -> Result<NsaOutputs> {
    check_cu_seqlens(cu_seqlens)?;
    forward_packed(config, (cu_seqlens, cu_seqlens), heads, inputs, request)
}

/// [`forward`] for a packed batch of chunks (FlashAttention's `cu_seqlens_q` and
/// `cu_seqlens_k`, as [`crate::NsaPipeline::run_varlen_qk`] takes them): sequence `i`'s
/// queries and gates are rows `cu_seqlens_q[i] .. cu_seqlens_q[i+1]`, its keys and values
/// rows `cu_seqlens_k[i] .. cu_seqlens_k[i+1]`, and its queries sit at its last positions;
/// each sequence alone, the outputs packed like the queries.
pub fn forward_varlen_qk(
    config: &NsaConfig,
    cu_seqlens_q: &[usize],
    cu_seqlens_k: &[usize],
    heads: (usize, usize, usize, usize),
    inputs: &NsaInputs,
    request: OutputRequest,
) -> Result<NsaOutputs> {
    check_cu_seqlens_qk(cu_seqlens_q, cu_seqlens_k)?;
    forward_packed(config, (cu_seqlens_q, cu_seqlens_k), heads, inputs, request)
}

/// [`forward_varlen_qk`] on offsets already checked.
fn forward_packed(
    config: &NsaConfig,
    (cu_q, cu_k): (&[usize], &[usize]),
    heads: (usize, usize, usize, usize),
    inputs: &NsaInputs,
    request: OutputRequest,
) -> Result<NsaOutputs> {
    inputs.validate(config, &Shape::packed(cu_q, cu_k, heads))?;
    // (A sequence without queries has no rows.)
    let parts = (inputs.packed_sequences((cu_q, cu_k), heads))
        .filter(|(shape, _)| shape.tq > 0)
        .map(|(shape, rows)| forward(config, &shape, &rows, request))
        .collect::<Result<Vec<_>>>()?;
    Ok(crate::cache::concat(parts, request))
}
