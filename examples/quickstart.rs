//! Runs NSA on a generated 8k-token input on the best adapter and prints the adapter, the
//! time, and how many keys each query attended against dense causal attention.
//!
//! cargo run --release --example quickstart [-- TOKENS]

use std::time::Instant;

use nsa_wgpu::data::sample_values;
use nsa_wgpu::{GpuContext, NsaConfig, NsaInputs, NsaPipeline, OutputRequest, Shape};

fn main() -> Result<(), nsa_wgpu::NsaError> {
    let t: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(8192);
    let ctx = pollster::block_on(GpuContext::new())?;
    println!("adapter: {}", ctx.describe());
    let nsa = pollster::block_on(NsaPipeline::new(&ctx))?;
    let cfg = NsaConfig::default();
    let shape = Shape::prefill(1, t, 8, 1, 64, 64);
    let q = sample_values(t * shape.hq * shape.dk, 1);
    let k = sample_values(t * shape.hkv * shape.dk, 2);
    let v = sample_values(t * shape.hkv * shape.dv, 3);
    let gates: Vec<f32> = sample_values(t * shape.hq * 3, 4)
        .iter()
        .map(|x| 0.5 + 0.5 * x)
        .collect();
    let inputs = NsaInputs::new(&q, &k, &v, &gates);
    let request = OutputRequest {
        block_indices: true,
        branches: false,
    };
    let start = Instant::now();
    let res = nsa.run_blocking(&cfg, &shape, &inputs, request)?;
    let took = start.elapsed();
    // Keys each query reads: visible compressed tokens + keys in selected blocks + window.
    let idx = res.block_indices.expect("requested");
    let n_cmp = cfg.num_compressed(t);
    let (mut nsa_keys, mut dense_keys) = (0u64, 0u64);
    for i in 0..t {
        let sel = &idx[i * cfg.top_n..(i + 1) * cfg.top_n];
        let slc: usize = sel
            .iter()
            .filter(|j| **j >= 0)
            .map(|&j| (cfg.sel_block).min(i + 1 - j as usize * cfg.sel_block))
            .sum();
        nsa_keys += (cfg.visible_compressed(i, n_cmp) + slc + cfg.window.min(i + 1)) as u64;
        dense_keys += i as u64 + 1;
    }
    println!(
        "NSA on {t} tokens (Hq={}, Hkv={}, D={}): {:.1} ms end to end (upload, compute, readback)",
        shape.hq,
        shape.hkv,
        shape.dk,
        took.as_secs_f64() * 1e3
    );
    println!(
        "keys attended per query: {:.0} on average, against {:.0} for dense causal attention (dense/NSA = {:.1}x; the three branches overlap, counted separately)",
        nsa_keys as f64 / t as f64,
        dense_keys as f64 / t as f64,
        dense_keys as f64 / nsa_keys as f64
    );
    let last = &idx[(t - 1) * cfg.top_n..t * cfg.top_n];
    println!(
        "the last query selected blocks {last:?}; out[0..4] = {:?}",
        &res.out[..4]
    );
    Ok(())
}
