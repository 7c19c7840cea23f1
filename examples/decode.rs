//! Decodes through the KV cache: appends a generated context of CONTEXT tokens to an f16 cache
//! (f32 where the adapter lacks shader-f16), then runs STEPS decode steps, and prints the
//! adapter, the cache's precision and the median time of a step (upload, GPU, readback).
//!
//! cargo run --release --example decode [-- CONTEXT STEPS]

use std::time::Instant;

use nsa_wgpu::data::sample_values;
use nsa_wgpu::{
    CacheOptions, GpuContext, NsaCache, NsaConfig, NsaPipeline, OutputRequest, Precision, SeqChunk,
};

fn main() -> Result<(), nsa_wgpu::NsaError> {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (context, steps) = (arg(1, 8192), arg(2, 32).max(1));
    let ctx = pollster::block_on(GpuContext::new())?;
    let nsa = pollster::block_on(NsaPipeline::new(&ctx))?;
    let precision = if nsa.supports(Precision::F16) {
        Precision::F16
    } else {
        Precision::F32
    };
    println!("adapter: {}; cache: {precision:?}", ctx.describe());
    let (hq, hkv, d) = (16, 1, 128);
    let opts = CacheOptions {
        seqs: 1,
        hq,
        hkv,
        dk: d,
        dv: d,
        capacity: context + steps,
        max_capacity: context + steps,
        independent_kv: false,
        precision,
    };
    let cfg = NsaConfig::default();
    let mut cache = NsaCache::new(&nsa, &cfg, opts, None)?;
    // The context: keys and values only (no output rows).
    let (k, v) = (
        sample_values(context * hkv * d, 1),
        sample_values(context * hkv * d, 2),
    );
    if context > 0 {
        pollster::block_on(nsa.append(&mut cache, &[SeqChunk::keys_values(0, &k, &v)]))?;
    }
    let mut ms = Vec::with_capacity(steps);
    for s in 0..steps as u64 {
        let (q, k, v) = (
            sample_values(hq * d, 10 + s),
            sample_values(hkv * d, 20 + s),
            sample_values(hkv * d, 30 + s),
        );
        let gates = vec![1.0; hq * 3];
        let step = SeqChunk::new(0, &q, &k, &v, &gates);
        let start = Instant::now();
        let out = pollster::block_on(nsa.extend(&mut cache, &[step], OutputRequest::default()))?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(out[0].out.len(), hq * d);
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "{steps} decode steps after {context} tokens (Hq={hq}, Hkv={hkv}, D={d}): median {:.3} ms per step, {} tokens cached",
        ms[ms.len() / 2],
        cache.lens()[0]
    );
    Ok(())
}
