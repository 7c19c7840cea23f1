//! `nsa bench`: NSA per stage against dense causal attention, timed on the GPU with timestamp
//! queries (wall clock where the adapter has none), medians over repeated runs.

use std::time::Instant;

use clap::Args;
use nsa_wgpu::data::sample_values;
use nsa_wgpu::kernels::KernelId;
use nsa_wgpu::profile::{
    chains, median, sample_input_sets, sample_tensor, stage_sums, time_plan, StepTimer, Warmer,
    STAGES,
};
use nsa_wgpu::{
    Compression, GpuBuffers, NsaConfig, NsaError, NsaPipeline, Plan, Precision, Shape, Tensor,
};
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
    /// Prefill: independent input sets the runs take in turn, so that no run finds its
    /// inputs in cache from the run before.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    rotate: u64,
    /// Skip the dense baseline above this length (it grows quadratically).
    #[arg(long, default_value_t = usize::MAX)]
    dense_max: usize,
    /// A tiny run for CI on software adapters: lengths 256 and 700, Hq=4, Hkv=2, D=32, 2 iterations.
    #[arg(long)]
    quick: bool,
    /// Benchmark one decode step through the KV cache at each length (cache length), for
    /// each batch size of --batches, instead of prefill.
    #[arg(long)]
    decode: bool,
    /// Benchmark chunked prefill instead: each length's tokens go through the KV cache in
    /// calls of CHUNK tokens per sequence (`extend`), against the one-shot prefill of the
    /// same length in the same run.
    #[arg(long, conflicts_with = "decode", value_parser = clap::value_parser!(u64).range(1..))]
    chunk: Option<u64>,
    /// Storage precision of the inputs (prefill) or of the KV cache (--decode): by default
    /// f16 where the adapter has shader-f16 (the fast path, as CUDA baselines run bf16),
    /// else f32.
    #[arg(long, value_enum, default_value = "auto")]
    precision: crate::Precision,
    /// The device's copy bandwidth in GB/s (bytes read + written), e.g. from
    /// torch_baselines.py in the same run; --decode reports the step's bandwidth against it.
    /// Without it --decode measures it: 1 GiB copied between two buffers (16 MiB with
    /// --quick), timed with timestamps written into the encoder, where the adapter has them.
    #[arg(long)]
    copy_gbps: Option<f64>,
    /// Batch sizes for --decode (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batches: Vec<usize>,
    /// --decode with sequences of different lengths: sequence s of a batch holds
    /// `RAGGED * s` tokens fewer than the cache length (the dense baseline and the bytes
    /// still count every sequence at the full length).
    #[arg(long, default_value_t = 0)]
    ragged: usize,
    /// Reduce attention rows through workgroup memory (the plain-WGSL fallback) even where
    /// the adapter has subgroup operations (this also turns tensor cores off).
    #[arg(long)]
    no_subgroups: bool,
    /// Time an idle GPU: skip the warm-up (dense attention for --warm-ms, then a cache flush)
    /// before each timed run. An idle GPU lowers its clocks, so short runs then measure
    /// the clock ramp more than the kernels.
    #[arg(long)]
    idle: bool,
    /// Milliseconds of warm-up work before each timed run.
    #[arg(long, default_value_t = 20)]
    warm_ms: u64,
    /// Run f16 attention on the shader cores even where the adapter has tensor cores
    /// (cooperative matrices), which it uses by default.
    #[arg(long)]
    shader_cores: bool,
    /// Compile the kernels with naga's bounds checks (every array index clamped), to measure
    /// what the library saves by leaving them out.
    #[arg(long)]
    bounds_checks: bool,
    /// MiB of compressed-attention scores one chunk may keep for the selection (0: none,
    /// the selection multiplies q.k a second time); long prefills run in chunks of query
    /// rows whose scores fit.
    #[arg(long, default_value_t = nsa_wgpu::DEFAULT_KEPT_SCORES >> 20)]
    kept_mib: u64,
    /// Split the selection of calls with few rows (decode steps, short chunks) over several
    /// workgroups per row and merge their candidates, even where one workgroup per row
    /// ranks all blocks (the default), to compare the two.
    #[arg(long)]
    split_select: bool,
    /// Kernels whose dispatches the timed passes leave out (comma-separated, named as their
    /// shaders are, e.g. cmp_attn,select_top; a wrong name lists them all): what each
    /// dispatch costs a forward pass or decode step, bounded from
    /// above (the barrier in front of what follows it goes too). NSA's and the dense
    /// baseline's passes alike; their outputs are then wrong, which the benchmark never
    /// reads.
    #[arg(long, value_delimiter = ',', value_parser = kernel_by_name)]
    leave_out: Vec<KernelId>,
    /// Workgroups an NSA attention branch aims for in calls of few row groups (decode
    /// steps, short chunks), which split each row group's keys and merge the parts:
    /// comma-separated NAME=N, NAME one of cmp_attn (compressed attention on the shader
    /// cores; on tensor cores no workgroup then walks more than 32 key tiles where it
    /// splits finer), cmp_attn_mma (on tensor cores), slc_attn, win_attn; 0 splits none.
    /// The defaults, chosen on an H200: 512, 256, 128, 768 (`nsa_wgpu::SplitTargets`).
    /// Results do not change.
    #[arg(long, value_delimiter = ',', value_parser = split_target)]
    split_target: Vec<(&'static str, u64)>,
    #[command(flatten)]
    config: crate::ConfigArgs,
    #[command(flatten)]
    adapter: AdapterArgs,
}

/// A kernel of the timed passes by its shader's name (`KernelId::name`), for --leave-out:
/// every kernel but `append`, which a cache dispatches outside them.
fn kernel_by_name(name: &str) -> Result<KernelId, String> {
    let passes = KernelId::ALL.into_iter().filter(|&k| k != KernelId::Append);
    passes.clone().find(|k| k.name() == name).ok_or_else(|| {
        let names: Vec<&str> = passes.map(|k| k.name()).collect();
        format!(
            "no kernel `{name}` in the timed passes; they run {}",
            names.join(", ")
        )
    })
}

/// A --split-target item, NAME=N: the branch it names (`SplitTargets::named_mut`), and its
/// target.
fn split_target(item: &str) -> Result<(&'static str, u64), String> {
    let (name, n) = item
        .split_once('=')
        .ok_or_else(|| format!("`{item}`: expected NAME=N, e.g. cmp_attn_mma=512"))?;
    let names = nsa_wgpu::SplitTargets::default()
        .named()
        .map(|(branch, _)| branch);
    let branch = names
        .iter()
        .find(|&&branch| branch == name)
        .ok_or_else(|| format!("`{name}`: split targets are for {}", names.join(", ")))?;
    let n = n
        .parse()
        .map_err(|e| format!("`{n}` (the workgroups {name} aims for): {e}"))?;
    Ok((branch, n))
}

/// The default split targets with `items` (--split-target) in their place.
fn split_targets(items: &[(&'static str, u64)]) -> nsa_wgpu::SplitTargets {
    let mut t = nsa_wgpu::SplitTargets::default();
    for &(name, n) in items {
        for (branch, target) in t.named_mut() {
            if branch == name {
                *target = n;
            }
        }
    }
    t
}

/// The pipeline on the chosen adapter, with the chosen reductions; prints both.
fn bench_pipeline(args: &BenchArgs) -> Result<NsaPipeline, String> {
    let mut pipe = args.adapter.pipeline()?;
    let subgroups = pipe.set_subgroup_reductions(!args.no_subgroups);
    let tensor_cores = pipe.set_tensor_cores(!args.shader_cores);
    let checks = pipe.set_bounds_checks(args.bounds_checks);
    pipe.set_kept_scores(args.kept_mib << 20);
    pipe.set_split_select(args.split_select);
    pipe.set_timed_leave_out(&args.leave_out);
    let targets = split_targets(&args.split_target);
    pipe.set_split_targets(targets);
    let on = |b: bool| if b { "on" } else { "off" };
    let cores = match (tensor_cores, pipe.context().fixed_subgroup_size()) {
        (false, _) => "off".to_string(),
        (true, Some(n)) => format!("on, subgroups of {n} compiled in"),
        (true, None) => "on, subgroup size read at run time".to_string(),
    };
    println!(
        "adapter: {} (limits: {}); subgroup reductions: {}; tensor cores for f16: {}; bounds checks: {}; \
         kept scores: {} MiB per chunk; few-row selections: {}",
        pipe.context().describe(),
        args.adapter.limits_note(),
        on(subgroups),
        cores,
        on(checks),
        args.kept_mib,
        if args.split_select { "split and merged" } else { "one workgroup per row" }
    );
    if !args.split_target.is_empty() {
        let named = targets.named().map(|(name, n)| format!("{name} {n}"));
        println!("split targets (workgroups): {}", named.join(", "));
    }
    if !args.leave_out.is_empty() {
        let names: Vec<&str> = args.leave_out.iter().map(|k| k.name()).collect();
        println!(
            "timed passes leave out: {} (their outputs are wrong; the times bound what those dispatches cost)",
            names.join(", ")
        );
    }
    Ok(pipe)
}

/// The warm-up before each timed run (none with --idle or on a software adapter).
fn warmer<'p>(pipe: &'p NsaPipeline, args: &BenchArgs) -> Option<Warmer<'p>> {
    if args.idle {
        return None;
    }
    if !Warmer::needed(pipe.context()) {
        println!("software adapter: no warm-up before timed runs");
        return None;
    }
    println!(
        "each timed run follows {} ms of other GPU work and a cache flush (--idle: none)",
        args.warm_ms
    );
    match Warmer::new(pipe, std::time::Duration::from_millis(args.warm_ms)) {
        Ok(w) => Some(w),
        Err(e) => {
            println!("no warm-up after all ({e}); the times below are from an idle GPU");
            None
        }
    }
}

/// Heads, head dims and iterations: the arguments, or the tiny ones of --quick.
fn sizes(args: &BenchArgs) -> (usize, usize, usize, usize, usize) {
    if args.quick {
        (4, 2, 32, 32, 2)
    } else {
        (args.hq, args.hkv, args.dk, args.dv, args.iters)
    }
}

pub fn bench(args: &BenchArgs) -> Result<(), String> {
    if args.decode {
        return bench_decode(args);
    }
    if let Some(chunk) = args.chunk {
        return bench_chunked(args, chunk as usize);
    }
    let lengths = prefill_lengths(args);
    let (hq, hkv, dk, dv, iters) = sizes(args);
    let pipe = bench_pipeline(args)?;
    let warm = warmer(&pipe, args);
    let ctx = pipe.context();
    let timed = StepTimer::new(ctx, 1).is_some();
    let cfg = args.config.config()?;
    let precision = args.precision.resolve(&pipe)?;
    println!("input storage: {precision:?}");
    println!(
        "NSA ({}) vs dense causal attention, B={} Hq={hq} Hkv={hkv} Dk={dk} Dv={dv}, median of {iters}, {} input sets in turn ({})",
        describe(&cfg),
        args.batch,
        args.rotate,
        if timed { "GPU timestamps" } else { "wall clock: no timestamp queries" }
    );
    println!(
        "| T | compress | cmp_attn | select | slc_attn | win+combine | NSA total | dense | dense/NSA | chains (NSA / dense) |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    // Each length's NSA total, for the growth from one length to the next.
    let mut totals: Vec<(usize, f64)> = Vec::new();
    for t in lengths {
        let shape = Shape::prefill(args.batch, t, hq, hkv, dk, dv);
        let plan = Plan::with_precision(&cfg, &shape, &pipe.limits(), precision)
            .map_err(|e| e.to_string())?;
        let inputs = sample_input_sets(&ctx.device, &plan, args.rotate);
        let (stages, total) = time_prefill(&pipe, &plan, &inputs, args, warm.as_ref())?;
        // The dense baseline's time and chains, where it runs at this length.
        let dense = if t <= args.dense_max {
            let out = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("out"),
                size: plan.tensor_bytes(Tensor::Out),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            });
            let dplan = Plan::dense_with_precision(&shape, None, &pipe.limits(), precision)
                .map_err(|e| e.to_string())?;
            let dense_chains = dplan.chains();
            Some((
                time_plan(
                    &pipe,
                    &dplan,
                    &inputs
                        .iter()
                        .map(|[q, k, v, _]| NsaPipeline::dense_buffers(q, k, v, &out))
                        .collect::<Vec<_>>(),
                    iters,
                    args.warmup,
                    warm.as_ref(),
                )
                .map_err(|e| e.to_string())?
                .1,
                dense_chains,
            ))
        } else {
            None
        };
        let cell = |k: KernelId| {
            stages
                .iter()
                .find(|(x, _)| *x == k)
                .map_or("-".to_string(), |(_, ms)| format!("{ms:.3}"))
        };
        let cells: Vec<String> = STAGES.iter().map(|k| cell(*k)).collect();
        println!(
            "| {t} | {} | {total:.3} | {} | {} | {} / {} |",
            cells.join(" | "),
            dense.map_or("-".into(), |(d, _)| format!("{d:.3}")),
            dense.map_or("-".into(), |(d, _)| format!("{:.2}x", d / total)),
            plan.chains(),
            dense.map_or("-".into(), |(_, c)| c.to_string()),
        );
        totals.push((t, total));
    }
    println!("times in ms");
    if let Some(line) = growth(&totals) {
        println!("{line}");
    }
    Ok(())
}

/// The prefill lengths: the arguments, or the tiny ones of --quick.
fn prefill_lengths(args: &BenchArgs) -> Vec<usize> {
    if args.quick {
        vec![256, 700]
    } else {
        args.lengths.clone()
    }
}

/// NSA prefill by `plan` on `inputs` (`[q, k, v, gates]` sets, taken in turn): each stage's
/// time and the total, medians over the timed runs (`time_plan`), with generated Linear
/// compression weights where the config compresses so.
fn time_prefill(
    pipe: &NsaPipeline,
    plan: &Plan,
    inputs: &[[wgpu::Buffer; 4]],
    args: &BenchArgs,
    warm: Option<&Warmer>,
) -> Result<(Vec<(KernelId, f64)>, f64), String> {
    let device = &pipe.context().device;
    let (shape, cfg) = (&plan.shape, &plan.config);
    let out = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("out"),
        size: plan.tensor_bytes(Tensor::Out),
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let linear = (cfg.compression == Compression::Linear).then(|| {
        linear_weights(shape.hkv, cfg.cmp_block, shape.dk, shape.dv).map(|w| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("nsa.bench.linear"),
                contents: bytemuck::cast_slice(&w),
                usage: wgpu::BufferUsages::STORAGE,
            })
        })
    });
    let sets: Vec<GpuBuffers> = inputs
        .iter()
        .map(|[q, k, v, g]| GpuBuffers {
            linear: linear.as_ref().map(|[a, b, c, d]| [a, b, c, d]),
            ..GpuBuffers::new(q, k, v, g, &out)
        })
        .collect();
    let iters = sizes(args).4;
    time_plan(pipe, plan, &sets, iters, args.warmup, warm).map_err(|e| e.to_string())
}

/// Each stage's median over `runs` (per-stage sums of one run each, [`stage_sums`]), in
/// [`STAGES`] order, or "-" for a stage no run timed.
fn stage_cells(runs: &[Vec<(KernelId, f64)>]) -> Vec<String> {
    STAGES
        .iter()
        .map(|k| {
            let v: Vec<f64> = runs
                .iter()
                // A fold from +0 (a float sum starts at -0, which printed as "-0.000" for
                // steps that ran no compression).
                .map(|s| {
                    s.iter()
                        .filter(|(x, _)| x == k)
                        .fold(0.0, |a, (_, t)| a + t)
                })
                .collect();
            if v.is_empty() {
                "-".into()
            } else {
                format!("{:.3}", median(v))
            }
        })
        .collect()
}

/// A cache of `seqs` sequences of `capacity` tokens (its most) for the benchmark's heads,
/// stored at `precision`, with `weights` (`linear_weights`) where the config compresses so.
fn bench_cache(
    pipe: &NsaPipeline,
    cfg: &NsaConfig,
    args: &BenchArgs,
    seqs: usize,
    capacity: usize,
    precision: Precision,
    weights: Option<&[Vec<f32>; 4]>,
) -> Result<nsa_wgpu::NsaCache, String> {
    let (hq, hkv, dk, dv, _) = sizes(args);
    let opts = nsa_wgpu::CacheOptions {
        seqs,
        hq,
        hkv,
        dk,
        dv,
        capacity,
        max_capacity: capacity,
        independent_kv: false,
        precision,
    };
    let linear = weights.map(|[w_k, pe_k, w_v, pe_v]| nsa_wgpu::LinearWeights {
        w_k,
        pe_k,
        w_v,
        pe_v,
    });
    nsa_wgpu::NsaCache::new(pipe, cfg, opts, linear).map_err(|e| e.to_string())
}

/// A GPU buffer of `len` values from [`sample_values`] with `seed` (mapped by `f`), stored
/// at `precision`, for copies from it (`encode_extend`'s inputs).
fn input_buffer(
    device: &wgpu::Device,
    len: usize,
    seed: u64,
    precision: nsa_wgpu::Precision,
    f: impl Fn(f32) -> f32,
) -> wgpu::Buffer {
    let values: Vec<f32> = sample_values(len, seed).into_iter().map(f).collect();
    let bytes: Vec<u8> = match precision {
        nsa_wgpu::Precision::F16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        nsa_wgpu::Precision::F32 => bytemuck::cast_slice(&values).to_vec(),
    };
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("nsa.bench.chunk"),
        contents: &bytes,
        usage: wgpu::BufferUsages::COPY_SRC,
    })
}

/// `nsa bench --chunk N`: chunked prefill through the KV cache against one-shot prefill.
/// Per length, every sequence's tokens go through a cache in calls of `chunk` tokens (the
/// last call takes what is left), each computing its rows from inputs already in GPU
/// buffers (`encode_extend_timed`, one submission per call, so that the GPU idles no
/// longer between the warm-up and a call than for the one-shot run). With timestamp
/// queries, runs take turns: one times every kernel's pass (summed per stage over the
/// calls), the next each call as `encode_extend` records it; without them, each call's
/// wall clock. The table gives the stages, the calls' sum, the first and the last call
/// (whose rows attend the most keys), and the one-shot prefill of the same shape (median
/// of `--iters` runs each) with their ratio.
fn bench_chunked(args: &BenchArgs, chunk: usize) -> Result<(), String> {
    use nsa_wgpu::DeviceStep;
    let (hq, hkv, dk, dv, iters) = sizes(args);
    let pipe = bench_pipeline(args)?;
    let warm = warmer(&pipe, args);
    let ctx = pipe.context();
    let device = &ctx.device;
    let cfg = args.config.config()?;
    let precision = args.precision.resolve(&pipe)?;
    let b = args.batch;
    // Ten passes per sequence and call, grown where a call's plan runs in more chains
    // (encode_extend_timed names the timestamps when they are too few).
    let mut timer = StepTimer::new(ctx, 10 * b);
    println!(
        "chunked prefill ({}) through the KV cache, {chunk} tokens per sequence and call, vs one-shot prefill, B={b} Hq={hq} Hkv={hkv} Dk={dk} Dv={dv}, {precision:?} inputs, median of {iters} ({})",
        describe(&cfg),
        if timer.is_some() { "GPU timestamps" } else { "wall clock: no timestamp queries" }
    );
    println!("| T | calls | compress | cmp_attn | select | slc_attn | win+combine | chunked prefill (sum of calls) | first call | last call | one-shot prefill | chunked / one-shot |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let weights = (cfg.compression == Compression::Linear)
        .then(|| linear_weights(hkv, cfg.cmp_block, dk, dv));
    let out = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("nsa.bench.chunk.out"),
        size: (b * chunk * hq * dv * 4) as u64,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    for t in prefill_lengths(args) {
        let shape = Shape::prefill(b, t, hq, hkv, dk, dv);
        let plan = Plan::with_precision(&cfg, &shape, &pipe.limits(), precision)
            .map_err(|e| e.to_string())?;
        let inputs = sample_input_sets(device, &plan, args.rotate);
        let one_shot = time_prefill(&pipe, &plan, &inputs, args, warm.as_ref())?.1;
        drop(inputs);
        let mut cache = bench_cache(&pipe, &cfg, args, b, t, precision, weights.as_ref())?;
        // Each call's tokens and inputs ([q, k, v, gates], [B, n, ...]), on the GPU.
        let calls: Vec<(usize, [wgpu::Buffer; 4])> = (0..t)
            .step_by(chunk)
            .map(|p0| {
                let n = chunk.min(t - p0);
                let seed = 4 * p0 as u64;
                let rows = b * n;
                (
                    n,
                    [
                        input_buffer(device, rows * hq * dk, seed, precision, |x| x),
                        input_buffer(device, rows * hkv * dk, seed + 1, precision, |x| x),
                        input_buffer(device, rows * hkv * dv, seed + 2, precision, |x| x),
                        input_buffer(device, rows * hq * 3, seed + 3, Precision::F32, |x| {
                            0.5 + 0.5 * x
                        }),
                    ],
                )
            })
            .collect();
        let (mut sums, mut firsts, mut lasts) = (Vec::new(), Vec::new(), Vec::new());
        let mut stage_ms: Vec<Vec<(KernelId, f64)>> = Vec::new();
        // With timestamps, a run per kernel pass, then a run timed call by call.
        let modes: &[bool] = if timer.is_some() {
            &[false, true]
        } else {
            &[true]
        };
        for it in 0..args.warmup + iters {
            for &whole in modes {
                for s in 0..b {
                    cache.reset(s).map_err(|e| e.to_string())?;
                }
                let (mut ms, mut passes) = (Vec::new(), Vec::new());
                for (n, [q, k, v, g]) in &calls {
                    let step = DeviceStep {
                        first_seq: 0,
                        seqs: b,
                        tokens: *n,
                        q: q.slice(..),
                        k: k.slice(..),
                        v: v.slice(..),
                        gates: g.slice(..),
                        out: out.slice(..),
                        branch_kv: None,
                        block_indices: None,
                        branches: None,
                    };
                    if let Some(w) = &warm {
                        w.warm().map_err(|e| e.to_string())?;
                    }
                    let start = Instant::now();
                    let mut encoder = device.create_command_encoder(&Default::default());
                    let stamps = match timer.as_mut() {
                        Some(timer) => {
                            let kernels = loop {
                                match pollster::block_on(pipe.encode_extend_timed(
                                    &mut encoder,
                                    &mut cache,
                                    &step,
                                    timer,
                                    whole,
                                )) {
                                    // Nothing changed: again with twice the slots.
                                    Err(NsaError::BadBuffer {
                                        tensor: "timestamps",
                                        ..
                                    }) => {
                                        *timer = StepTimer::new(ctx, 2 * timer.steps())
                                            .ok_or("timestamp queries went away")?;
                                        encoder =
                                            device.create_command_encoder(&Default::default());
                                    }
                                    r => break r.map_err(|e| e.to_string())?,
                                }
                            };
                            let staging = timer.resolve(ctx, &mut encoder, kernels.len());
                            Some((kernels, staging))
                        }
                        None => {
                            pollster::block_on(pipe.encode_extend(&mut encoder, &mut cache, &step))
                                .map_err(|e| e.to_string())?;
                            None
                        }
                    };
                    ctx.queue.submit([encoder.finish()]);
                    match stamps {
                        Some((kernels, staging)) => {
                            let times = pollster::block_on(StepTimer::read(ctx, staging))
                                .map_err(|e| e.to_string())?;
                            if whole {
                                ms.push(times.iter().sum::<f64>());
                            } else {
                                passes.extend(kernels.into_iter().zip(times));
                            }
                        }
                        None => {
                            device
                                .poll(wgpu::PollType::wait_indefinitely())
                                .map_err(|e| e.to_string())?;
                            ms.push(start.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                }
                if it < args.warmup {
                    continue;
                }
                if whole {
                    sums.push(ms.iter().sum::<f64>());
                    firsts.push(ms[0]);
                    lasts.push(ms[ms.len() - 1]);
                } else {
                    stage_ms.push(stage_sums(passes.into_iter()));
                }
            }
        }
        let cells = stage_cells(&stage_ms);
        let sum = median(sums);
        println!(
            "| {t} | {} | {} | {sum:.3} | {:.3} | {:.3} | {one_shot:.3} | {:.2}x |",
            calls.len(),
            cells.join(" | "),
            median(firsts),
            median(lasts),
            sum / one_shot
        );
    }
    println!("times in ms");
    Ok(())
}

/// How the NSA total grows from each length to the next, as `time(T2) / time(T1)` (issue
/// 5's target: at most 2.2 from 32k to 64k, where dense attention's is 4); `None` for one
/// length.
fn growth(totals: &[(usize, f64)]) -> Option<String> {
    let steps: Vec<String> = totals
        .windows(2)
        .map(|w| {
            format!(
                "time({}) / time({}) = {:.2}",
                w[1].0,
                w[0].0,
                w[1].1 / w[0].1
            )
        })
        .collect();
    (!steps.is_empty()).then(|| format!("NSA growth: {}", steps.join(", ")))
}

/// `cfg` in a table's heading.
fn describe(cfg: &NsaConfig) -> String {
    format!(
        "l={} d={} l'={} n={} init={} local={} w={}, {:?}",
        cfg.cmp_block,
        cfg.cmp_stride,
        cfg.sel_block,
        cfg.top_n,
        cfg.init_blocks,
        cfg.local_blocks,
        cfg.window,
        cfg.compression
    )
}

/// Linear compression weights for `--compression linear`, `[w_k, pe_k, w_v, pe_v]` in
/// [`nsa_wgpu::LinearWeights`]' layouts, the weights scaled by 1/sqrt(l * D) so that
/// compressed keys and values keep the inputs' magnitude.
fn linear_weights(hkv: usize, l: usize, dk: usize, dv: usize) -> [Vec<f32>; 4] {
    let w = |d: usize, seed| {
        let s = ((l * d) as f32).sqrt().recip();
        sample_values(hkv * l * d * d, seed)
            .into_iter()
            .map(|x| x * s)
            .collect()
    };
    [
        w(dk, 21),
        sample_values(hkv * l * dk, 22),
        w(dv, 23),
        sample_values(hkv * l * dv, 24),
    ]
}

/// Decode steps per submission in the "from GPU buffers" column: a model's layers.
const LAYERS: usize = 8;

/// The host's wall time per step of decode steps for every sequence of `cache` whose inputs
/// and outputs stay in GPU buffers (`encode_extend`), LAYERS recorded into one encoder, then
/// submitted and waited for (median over the runs, after the warm-up).
fn device_steps(
    pipe: &NsaPipeline,
    cache: &mut nsa_wgpu::NsaCache,
    precision: nsa_wgpu::Precision,
    args: &BenchArgs,
    warm: Option<&Warmer>,
) -> Result<f64, String> {
    let ctx = pipe.context();
    let (hq, hkv, dk, dv, iters) = sizes(args);
    let seqs = cache.lens().len();
    // The tensors of one token per sequence, as a one-token prefill holds them.
    let shape = Shape::prefill(seqs, 1, hq, hkv, dk, dv);
    let plan = Plan::with_precision(cache.config(), &shape, &pipe.limits(), precision)
        .map_err(|e| e.to_string())?;
    let t = |x: Tensor, seed| sample_tensor(&ctx.device, &plan, x, seed);
    let (q, k, v) = (t(Tensor::Q, 11), t(Tensor::KCmp, 12), t(Tensor::VCmp, 13));
    let (gates, out) = (t(Tensor::Gates, 14), t(Tensor::Out, 15));
    let step = nsa_wgpu::DeviceStep {
        first_seq: 0,
        seqs,
        tokens: 1,
        q: q.slice(..),
        k: k.slice(..),
        v: v.slice(..),
        gates: gates.slice(..),
        out: out.slice(..),
        branch_kv: None,
        block_indices: None,
        branches: None,
    };
    let mut ms = Vec::new();
    for it in 0..args.warmup + iters {
        if let Some(w) = warm {
            w.warm().map_err(|e| e.to_string())?;
        }
        let start = Instant::now();
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        for _ in 0..LAYERS {
            pollster::block_on(pipe.encode_extend(&mut encoder, cache, &step))
                .map_err(|e| e.to_string())?;
        }
        ctx.queue.submit([encoder.finish()]);
        ctx.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| e.to_string())?;
        if it >= args.warmup {
            ms.push(start.elapsed().as_secs_f64() * 1e3 / LAYERS as f64);
        }
    }
    Ok(median(ms))
}

/// The copy bandwidth the decode table holds steps against, and how the header states it:
/// --copy-gbps, or measured here (`nsa_wgpu::profile::copy_bandwidth`, the faster of a
/// copy kernel and `copy_buffer_to_buffer`, on a warmed GPU where the timing warms it), or
/// neither, saying why.
fn copy_bandwidth(
    pipe: &NsaPipeline,
    args: &BenchArgs,
    warm: Option<&Warmer>,
) -> (Option<f64>, String) {
    if let Some(g) = args.copy_gbps {
        return (Some(g), format!("{g:.0} GB/s (given)"));
    }
    let (mib, iters) = if args.quick { (16, 3) } else { (1024, 10) };
    let measured = warm
        .map_or(Ok(()), |w| w.warm())
        .map_err(|e| e.to_string())
        .and_then(|()| {
            pollster::block_on(nsa_wgpu::profile::copy_bandwidth(
                pipe.context(),
                mib << 20,
                iters,
            ))
            .map_err(|e| e.to_string())
        });
    let way = |g: Option<f64>| g.map_or("-".to_string(), |g| format!("{g:.0}"));
    match measured {
        Ok(c) => match c.best() {
            Some(g) => (
                Some(g),
                format!(
                    "{g:.0} GB/s (measured: the faster of a copy kernel, {} GB/s, and copy_buffer_to_buffer, {} GB/s; {mib} MiB, median of {iters}; --copy-gbps to give it)",
                    way(c.kernel),
                    way(c.transfer),
                ),
            ),
            None => (
                None,
                "not measured (the adapter lacks timestamps, or they read 0; --copy-gbps gives it)"
                    .into(),
            ),
        },
        Err(e) => (None, format!("not measured ({e}; --copy-gbps gives it)")),
    }
}

fn bench_decode(args: &BenchArgs) -> Result<(), String> {
    use nsa_wgpu::{OutputRequest, SeqChunk};
    let (lengths, batches) = if args.quick {
        (vec![300, 700], vec![1, 2])
    } else {
        (args.lengths.clone(), args.batches.clone())
    };
    let (hq, hkv, dk, dv, iters) = sizes(args);
    let pipe = bench_pipeline(args)?;
    let warm = warmer(&pipe, args);
    let ctx = pipe.context();
    let cfg = args.config.config()?;
    let precision = args.precision.resolve(&pipe)?;
    let (copy_gbps, copy_note) = copy_bandwidth(&pipe, args, warm.as_ref());
    println!(
        "NSA decode step ({}) vs dense decode, Hq={hq} Hkv={hkv} Dk={dk} Dv={dv}, {precision:?} cache, median of {iters}; copy bandwidth {copy_note}",
        describe(&cfg),
    );
    println!("| B | cache length | compress / cmp_attn / select / slc_attn / win+combine (ms) | NSA step | dense decode | dense/NSA | bytes the step must read | achieved | of copy bandwidth | host round trip | from GPU buffers, {LAYERS} per submission | chains (NSA / dense) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let weights = (cfg.compression == Compression::Linear)
        .then(|| linear_weights(hkv, cfg.cmp_block, dk, dv));
    for &b in &batches {
        for &len in &lengths {
            // With timestamps, steps take turns: a pass per kernel (the stages), one pass for
            // the whole step as `extend` runs it (the step time), and a plain `extend` (its
            // host round trip, without reading timestamps back).
            let steps = 3 * (args.warmup + iters);
            // Then the steps from GPU buffers, LAYERS to a submission.
            let cap = len + steps + LAYERS * (args.warmup + iters);
            let mut cache = bench_cache(&pipe, &cfg, args, b, cap, precision, weights.as_ref())?;
            // Fill the context in slices, every sequence per call (up to its own length).
            let seq_len = |s: usize| len - (args.ragged * s).min(len - 1);
            let slice = 8192.min(len);
            let mut pos = 0;
            while pos < len {
                let n = slice.min(len - pos);
                let kv: Vec<(usize, Vec<f32>, Vec<f32>)> = (0..b)
                    .filter(|&s| seq_len(s) > pos)
                    .map(|s| {
                        let n = n.min(seq_len(s) - pos);
                        (
                            s,
                            sample_values(n * hkv * dk, (s * 7 + pos) as u64 + 1),
                            sample_values(n * hkv * dv, (s * 7 + pos) as u64 + 2),
                        )
                    })
                    .collect();
                let chunks: Vec<SeqChunk> = kv
                    .iter()
                    .map(|(s, k, v)| SeqChunk::keys_values(*s, k, v))
                    .collect();
                pollster::block_on(pipe.append(&mut cache, &chunks)).map_err(|e| e.to_string())?;
                pos += n;
            }
            let timer = StepTimer::new(ctx, 10 * b);
            let (q, k, v) = (
                sample_values(hq * dk, 5),
                sample_values(hkv * dk, 6),
                sample_values(hkv * dv, 7),
            );
            let g: Vec<f32> = sample_values(hq * 3, 8)
                .iter()
                .map(|x| 0.5 + 0.5 * x)
                .collect();
            let mut nsa_ms = Vec::new();
            // Wall time of each plain extend: upload, plan, encode, submit, wait, read back.
            let mut host_ms = Vec::new();
            let mut stage_ms: Vec<Vec<(KernelId, f64)>> = Vec::new();
            // Chains of the timed steps (their plans are the cache's).
            let mut nsa_chains = 0;
            for it in 0..steps {
                let chunks: Vec<SeqChunk> =
                    (0..b).map(|s| SeqChunk::new(s, &q, &k, &v, &g)).collect();
                if let Some(w) = &warm {
                    w.warm().map_err(|e| e.to_string())?;
                }
                let start = Instant::now();
                let counted = it >= 3 * args.warmup;
                let ms = match &timer {
                    Some(t) if it % 3 == 0 => {
                        let (_, ms) = pollster::block_on(pipe.extend_timed(
                            &mut cache,
                            &chunks,
                            OutputRequest::default(),
                            t,
                        ))
                        .map_err(|e| e.to_string())?;
                        if counted {
                            stage_ms.push(stage_sums(ms.iter().copied()));
                            nsa_chains = chains(ms.iter().map(|(k, _)| *k));
                        }
                        continue;
                    }
                    Some(t) if it % 3 == 1 => {
                        pollster::block_on(pipe.extend_timed_whole(
                            &mut cache,
                            &chunks,
                            OutputRequest::default(),
                            t,
                        ))
                        .map_err(|e| e.to_string())?
                        .1
                    }
                    _ => {
                        pollster::block_on(pipe.extend(
                            &mut cache,
                            &chunks,
                            OutputRequest::default(),
                        ))
                        .map_err(|e| e.to_string())?;
                        let wall = start.elapsed().as_secs_f64() * 1e3;
                        if counted {
                            host_ms.push(wall);
                        }
                        if timer.is_some() {
                            continue;
                        }
                        wall
                    }
                };
                if counted {
                    nsa_ms.push(ms);
                }
            }
            let nsa = median(nsa_ms);
            let host = median(host_ms);
            let device_host = device_steps(&pipe, &mut cache, precision, args, warm.as_ref())?;
            // Dense decode over the same cached keys (the cache's stride is its capacity).
            let shape = Shape {
                batch: b,
                tq: 1,
                tk: cap,
                hq,
                hkv,
                dk,
                dv,
            };
            let dplan = Plan::dense_with_precision(&shape, None, &pipe.limits(), precision)
                .map_err(|e| e.to_string())?;
            let qb = sample_tensor(&ctx.device, &dplan, Tensor::Q, 9);
            let out = sample_tensor(&ctx.device, &dplan, Tensor::Out, 10);
            let kvb = cache.key_value_buffers();
            let dense = time_plan(
                &pipe,
                &dplan,
                &[NsaPipeline::dense_buffers(&qb, &kvb[0], &kvb[1], &out)],
                iters,
                args.warmup,
                warm.as_ref(),
            )
            .map_err(|e| e.to_string())?
            .1;
            let tokens = (cfg.top_n.saturating_mul(cfg.sel_block))
                .saturating_add(cfg.window)
                .saturating_add(cfg.num_compressed(len));
            let bytes = (b * hkv * tokens.min(len + cfg.num_compressed(len)) * (dk + dv)) as f64
                * precision.bytes() as f64;
            let achieved = bytes / (nsa / 1e3);
            let stages = stage_cells(&stage_ms);
            let lens = if args.ragged > 0 && b > 1 {
                format!("{len} .. {}", seq_len(b - 1))
            } else {
                len.to_string()
            };
            println!(
                "| {b} | {lens} | {} | {nsa:.3} ms | {dense:.3} ms | {:.2}x | {:.1} MB | {:.0} GB/s | {} | {host:.3} ms | {device_host:.3} ms | {} / {} |",
                stages.join(" / "),
                dense / nsa,
                bytes / 1e6,
                achieved / 1e9,
                copy_gbps.map_or("-".into(), |g| format!("{:.1}%", 100.0 * achieved / (g * 1e9))),
                if nsa_chains > 0 { nsa_chains.to_string() } else { "-".into() },
                dplan.chains(),
            );
        }
    }
    Ok(())
}
