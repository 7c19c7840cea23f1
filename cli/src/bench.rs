//! `nsa bench`: NSA per stage against dense causal attention, timed on the GPU with timestamp
//! queries (wall clock where the adapter has none), medians over repeated runs.

use std::time::Instant;

use clap::Args;
use nsa_wgpu::kernels::KernelId;
use nsa_wgpu::profile::StepTimer;
use nsa_wgpu::{GpuBuffers, NsaConfig, NsaPipeline, Plan, Shape, Tensor};
use wgpu::util::DeviceExt;

use crate::AdapterArgs;

#[derive(Args)]
pub struct BenchArgs {
    /// Sequence lengths (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "8192,16384,32768,65536")]
    lengths: Vec<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Query heads.
    #[arg(long, default_value_t = 64)]
    hq: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 4)]
    hkv: usize,
    /// Key head dimension.
    #[arg(long, default_value_t = 128)]
    dk: usize,
    /// Value head dimension.
    #[arg(long, default_value_t = 128)]
    dv: usize,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Skip the dense baseline above this length (it grows quadratically).
    #[arg(long, default_value_t = usize::MAX)]
    dense_max: usize,
    /// A tiny run for CI on software adapters: lengths 256 and 700, Hq=4, Hkv=2, D=32, 2 iterations.
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    adapter: AdapterArgs,
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds per kernel kind (summed over its steps) and in total.
fn time_plan(
    pipe: &NsaPipeline,
    plan: &Plan,
    bufs: &GpuBuffers,
    iters: usize,
    warmup: usize,
) -> Result<(Vec<(KernelId, f64)>, f64), String> {
    let ctx = pipe.context();
    let scratch = pipe.scratch(plan).map_err(|e| e.to_string())?;
    let timer = StepTimer::new(ctx, plan.steps.len());
    let mut per_kind: Vec<(KernelId, Vec<f64>)> = Vec::new();
    let mut totals = Vec::new();
    for it in 0..warmup + iters {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let staging = match &timer {
            Some(t) => {
                pipe.encode_timed(&mut enc, &scratch, bufs, t)
                    .map_err(|e| e.to_string())?;
                Some(t.resolve(ctx, &mut enc, plan.steps.len()))
            }
            None => {
                pipe.encode(&mut enc, &scratch, bufs)
                    .map_err(|e| e.to_string())?;
                None
            }
        };
        let start = Instant::now();
        ctx.queue.submit([enc.finish()]);
        ctx.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| e.to_string())?;
        let wall = start.elapsed().as_secs_f64() * 1e3;
        if it < warmup {
            continue;
        }
        match staging {
            Some(s) => {
                let ms = pollster::block_on(StepTimer::read(ctx, s)).map_err(|e| e.to_string())?;
                let mut sums: Vec<(KernelId, f64)> = Vec::new();
                for (step, t) in plan.steps.iter().zip(&ms) {
                    match sums.iter_mut().find(|(k, _)| *k == step.kernel) {
                        Some((_, acc)) => *acc += t,
                        None => sums.push((step.kernel, *t)),
                    }
                }
                totals.push(ms.iter().sum());
                for (k, t) in sums {
                    match per_kind.iter_mut().find(|(x, _)| *x == k) {
                        Some((_, v)) => v.push(t),
                        None => per_kind.push((k, vec![t])),
                    }
                }
            }
            None => totals.push(wall),
        }
    }
    Ok((
        per_kind.into_iter().map(|(k, v)| (k, median(v))).collect(),
        median(totals),
    ))
}

pub fn bench(args: &BenchArgs) -> Result<(), String> {
    let (lengths, hq, hkv, dk, dv, iters) = if args.quick {
        (vec![256, 700], 4, 2, 32, 32, 2)
    } else {
        (
            args.lengths.clone(),
            args.hq,
            args.hkv,
            args.dk,
            args.dv,
            args.iters,
        )
    };
    let pipe = args.adapter.pipeline()?;
    let ctx = pipe.context();
    let timed = StepTimer::new(ctx, 1).is_some();
    println!("adapter: {}", ctx.describe());
    println!(
        "NSA (paper config) vs dense causal attention, B={} Hq={hq} Hkv={hkv} Dk={dk} Dv={dv}, f32, median of {iters} ({})",
        args.batch,
        if timed { "GPU timestamps" } else { "wall clock: no timestamp queries" }
    );
    let kinds = [
        KernelId::Compress,
        KernelId::CmpAttn,
        KernelId::Select,
        KernelId::SlcAttn,
        KernelId::WinAttn,
    ];
    println!(
        "| T | compress | cmp_attn | select | slc_attn | win+combine | NSA total | dense | dense/NSA |\n|---|---|---|---|---|---|---|---|---|"
    );
    let cfg = NsaConfig::default();
    for t in lengths {
        let shape = Shape::prefill(args.batch, t, hq, hkv, dk, dv);
        let plan = pipe.plan(&cfg, &shape).map_err(|e| e.to_string())?;
        let up = |label: &str, n: u64, seed: u64| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytemuck::cast_slice(&values(n as usize, seed)),
                    usage: wgpu::BufferUsages::STORAGE,
                })
        };
        let q = up("q", plan.tensor_len(Tensor::Q), 1);
        let k = up("k", plan.tensor_len(Tensor::KCmp), 2);
        let v = up("v", plan.tensor_len(Tensor::VCmp), 3);
        let g = up("gates", plan.tensor_len(Tensor::Gates), 4);
        let out = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("out"),
            size: plan.tensor_bytes(Tensor::Out),
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let (stages, total) = time_plan(
            &pipe,
            &plan,
            &GpuBuffers::new(&q, &k, &v, &g, &out),
            iters,
            args.warmup,
        )?;
        let dense = if t <= args.dense_max {
            let dplan = pipe.plan_dense(&shape, None).map_err(|e| e.to_string())?;
            Some(
                time_plan(
                    &pipe,
                    &dplan,
                    &NsaPipeline::dense_buffers(&q, &k, &v, &out),
                    iters,
                    args.warmup,
                )?
                .1,
            )
        } else {
            None
        };
        let cell = |k: KernelId| {
            stages
                .iter()
                .find(|(x, _)| *x == k)
                .map_or("-".to_string(), |(_, ms)| format!("{ms:.3}"))
        };
        let cells: Vec<String> = kinds.iter().map(|k| cell(*k)).collect();
        println!(
            "| {t} | {} | {total:.3} | {} | {} |",
            cells.join(" | "),
            dense.map_or("-".into(), |d| format!("{d:.3}")),
            dense.map_or("-".into(), |d| format!("{:.2}x", d / total)),
        );
    }
    println!("times in ms");
    Ok(())
}
