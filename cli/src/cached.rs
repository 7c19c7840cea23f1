//! `nsa run --decode-from P` and `--chunk N`: the same outputs as a plain run, computed
//! through the KV cache (one prefill call, then decode steps or chunks).

use nsa_wgpu::{
    BranchOutputs, CacheOptions, NsaCache, NsaConfig, NsaInputs, NsaOutputs, NsaPipeline,
    OutputRequest, Precision, Result, SeqChunk, Shape,
};

/// Rows `[a, b)` of sequence `bi` of a `[B, T, ...]` tensor whose rows hold `width` values.
fn rows(t: &[f32], tk: usize, bi: usize, a: usize, b: usize, width: usize) -> &[f32] {
    &t[(bi * tk + a) * width..(bi * tk + b) * width]
}

/// Runs positions `[0, first)` of every sequence as one call, then `step` positions per call,
/// through a cache stored at `precision`.
pub fn run(
    pipe: &NsaPipeline,
    config: &NsaConfig,
    s: &Shape,
    inputs: &NsaInputs,
    request: OutputRequest,
    precision: Precision,
    (first, step): (usize, usize),
) -> Result<NsaOutputs> {
    inputs.validate(config, s)?;
    let independent = inputs.k_cmp.is_some();
    let opts = CacheOptions {
        seqs: s.batch,
        hq: s.hq,
        hkv: s.hkv,
        dk: s.dk,
        dv: s.dv,
        capacity: s.tk,
        max_capacity: s.tk,
        independent_kv: independent,
        precision,
    };
    let mut cache = NsaCache::new(pipe, config, opts, inputs.linear)?;
    let n = config.top_n;
    let (ow, iw) = (s.hq * s.dv, s.hkv * n);
    let mut res = NsaOutputs {
        out: vec![0.0; s.batch * s.tq * ow],
        block_indices: request.block_indices.then(|| vec![0; s.batch * s.tq * iw]),
        branches: request.branches.then(|| BranchOutputs {
            o_cmp: vec![0.0; s.batch * s.tq * ow],
            o_slc: vec![0.0; s.batch * s.tq * ow],
            o_win: vec![0.0; s.batch * s.tq * ow],
        }),
    };
    let (kw, vw) = (s.hkv * s.dk, s.hkv * s.dv);
    let branch = [
        inputs.k_cmp,
        inputs.v_cmp,
        inputs.k_slc,
        inputs.v_slc,
        inputs.k_win,
        inputs.v_win,
    ];
    let mut pos = 0;
    while pos < s.tk {
        let end = if pos == 0 && first > 0 {
            first
        } else {
            (pos + step).min(s.tk)
        };
        let chunks: Vec<SeqChunk> = (0..s.batch)
            .map(|b| SeqChunk {
                seq: b,
                q: rows(inputs.q, s.tq, b, pos, end, s.hq * s.dk),
                k: rows(inputs.k, s.tk, b, pos, end, kw),
                v: rows(inputs.v, s.tk, b, pos, end, vw),
                gates: rows(inputs.gates, s.tq, b, pos, end, s.hq * 3),
                branch_kv: independent.then(|| {
                    let r = |j: usize| {
                        rows(
                            branch[j].unwrap_or(inputs.k),
                            s.tk,
                            b,
                            pos,
                            end,
                            if j % 2 == 0 { kw } else { vw },
                        )
                    };
                    [r(0), r(1), r(2), r(3), r(4), r(5)]
                }),
            })
            .collect();
        let parts = pollster::block_on(pipe.extend(&mut cache, &chunks, request))?;
        for (b, p) in parts.into_iter().enumerate() {
            let place = |dst: &mut Vec<f32>, src: &[f32], w: usize| {
                dst[(b * s.tq + pos) * w..(b * s.tq + end) * w].copy_from_slice(src);
            };
            place(&mut res.out, &p.out, ow);
            if let (Some(dst), Some(src)) = (res.block_indices.as_mut(), p.block_indices) {
                dst[(b * s.tq + pos) * iw..(b * s.tq + end) * iw].copy_from_slice(&src);
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
