//! `nsa run --decode-from P` and `--chunk N`: the same outputs as a plain run, computed
//! through the KV cache (one prefill call, then decode steps or chunks), for a batch or for
//! packed sequences of different lengths.

use nsa_wgpu::{
    BranchOutputs, CacheOptions, NsaCache, NsaConfig, NsaInputs, NsaOutputs, NsaPipeline,
    OutputRequest, Precision, Result, SeqChunk, Shape,
};

/// Runs positions `[0, first)` of every sequence as one call, then `step` positions per call,
/// through a cache stored at `precision`. `seqs` gives each sequence's first row and length,
/// rows counted over `s`'s B and T together (`Tq == Tk`); a sequence takes part in the calls
/// until its positions run out.
#[allow(clippy::too_many_arguments)]
pub fn run(
    pipe: &NsaPipeline,
    config: &NsaConfig,
    s: &Shape,
    seqs: &[(usize, usize)],
    inputs: &NsaInputs,
    request: OutputRequest,
    precision: Precision,
    (first, step): (usize, usize),
) -> Result<NsaOutputs> {
    inputs.validate(config, s)?;
    let independent = inputs.has_branch_kv();
    let longest = seqs.iter().map(|&(_, len)| len).max().unwrap_or(1);
    let opts = CacheOptions {
        seqs: seqs.len(),
        hq: s.hq,
        hkv: s.hkv,
        dk: s.dk,
        dv: s.dv,
        capacity: longest,
        max_capacity: longest,
        independent_kv: independent,
        precision,
    };
    let mut cache = NsaCache::new(pipe, config, opts, inputs.linear)?;
    let rows = s.batch * s.tq;
    let (ow, iw) = (s.hq * s.dv, s.hkv * config.top_n);
    let mut res = NsaOutputs {
        out: vec![0.0; rows * ow],
        block_indices: request.block_indices.then(|| vec![0; rows * iw]),
        branches: request.branches.then(|| BranchOutputs {
            o_cmp: vec![0.0; rows * ow],
            o_slc: vec![0.0; rows * ow],
            o_win: vec![0.0; rows * ow],
        }),
    };
    let mut pos = 0;
    while pos < longest {
        let end = if pos == 0 && first > 0 {
            first
        } else {
            pos + step
        };
        // Each sequence with positions left: its rows [start + pos, start + its end).
        let taking: Vec<(usize, usize, usize)> = seqs
            .iter()
            .enumerate()
            .filter(|&(_, &(_, len))| pos < len)
            .map(|(i, &(start, len))| (i, start + pos, start + end.min(len)))
            .collect();
        let views: Vec<NsaInputs> = taking
            .iter()
            .map(|&(_, a, b)| inputs.token_rows(s, a, b))
            .collect();
        let chunks: Vec<SeqChunk> = taking
            .iter()
            .zip(&views)
            .map(|(&(seq, ..), v)| SeqChunk::from_rows(seq, v, independent))
            .collect();
        let parts = pollster::block_on(pipe.extend(&mut cache, &chunks, request))?;
        for (&(_, a, b), p) in taking.iter().zip(parts) {
            let place = |dst: &mut Vec<f32>, src: &[f32], w: usize| {
                dst[a * w..b * w].copy_from_slice(src);
            };
            place(&mut res.out, &p.out, ow);
            if let (Some(dst), Some(src)) = (res.block_indices.as_mut(), p.block_indices) {
                dst[a * iw..b * iw].copy_from_slice(&src);
            }
            if let (Some(dst), Some(src)) = (res.branches.as_mut(), p.branches) {
                place(&mut dst.o_cmp, &src.o_cmp, ow);
                place(&mut dst.o_slc, &src.o_slc, ow);
                place(&mut dst.o_win, &src.o_win, ow);
            }
        }
        pos = end;
    }
    Ok(res)
}
