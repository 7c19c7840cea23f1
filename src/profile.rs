//! GPU timing with timestamp queries (one timestamp before and after each step's pass), and
//! the benchmark loop `nsa bench` and `benches/` share.

use crate::error::{NsaError, Result};
use crate::kernels::KernelId;
use crate::pipeline::{buffer_init, read_staging, GpuContext};
use crate::plan::{Plan, Tensor};
#[cfg(not(target_arch = "wasm32"))]
use crate::{GpuBuffers, NsaPipeline};

/// Timestamps for the passes of up to `steps` plan steps (see
/// [`crate::NsaPipeline::encode_timed`]).
#[derive(Debug)]
pub struct StepTimer {
    query_set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    steps: usize,
}

impl StepTimer {
    /// A timer for `steps` steps; `None` when the device lacks `TIMESTAMP_QUERY`.
    pub fn new(ctx: &GpuContext, steps: usize) -> Option<Self> {
        if !ctx
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            || steps == 0
        {
            return None;
        }
        let count = 2 * steps as u32;
        let query_set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("nsa.timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("nsa.timestamps.resolve"),
            size: count as u64 * 8,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Some(Self {
            query_set,
            resolve,
            steps,
        })
    }

    /// How many steps the timer holds.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The query set passes write into.
    pub fn query_set(&self) -> &wgpu::QuerySet {
        &self.query_set
    }

    /// Records the resolve of the first `steps` steps' timestamps and a copy to a readable
    /// buffer; returns that buffer for [`Self::read`].
    pub fn resolve(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        steps: usize,
    ) -> wgpu::Buffer {
        let n = 2 * steps.min(self.steps) as u32;
        encoder.resolve_query_set(&self.query_set, 0..n, &self.resolve, 0);
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("nsa.timestamps.readback"),
            size: n as u64 * 8,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &staging, 0, n as u64 * 8);
        staging
    }

    /// Reads a resolved buffer (after submit): the duration of each step's pass in
    /// milliseconds.
    pub async fn read(ctx: &GpuContext, staging: wgpu::Buffer) -> Result<Vec<f64>> {
        let bytes = read_staging(&ctx.device, std::slice::from_ref(&staging)).await?;
        let ticks: &[u64] = bytemuck::cast_slice(&bytes[0]);
        let period = ctx.queue.get_timestamp_period() as f64;
        if ticks.len() % 2 != 0 {
            return Err(NsaError::Readback("odd number of timestamps".into()));
        }
        Ok(ticks
            .chunks(2)
            .map(|t| t[1].saturating_sub(t[0]) as f64 * period / 1e6)
            .collect())
    }
}

/// The device's copy bandwidth in GB/s, bytes read plus written (as `torch_baselines.py`
/// measures CUDA's from a 1 GiB `copy_`): the median of `iters` (at most 2048, half a query
/// set's limit) copies of `bytes` bytes (at most `max_buffer_size`) from one buffer to
/// another (`copy_buffer_to_buffer`, each between two timestamps written into the encoder),
/// after three untimed ones, in one submission. `None` where the device lacks
/// `TIMESTAMP_QUERY_INSIDE_ENCODERS`, `iters` is 0 or the copies time as taking no time;
/// [`NsaError::Gpu`] when it cannot hold the two buffers.
#[cfg(not(target_arch = "wasm32"))]
pub async fn copy_bandwidth(ctx: &GpuContext, bytes: u64, iters: usize) -> Result<Option<f64>> {
    let needs = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
    if !ctx.device.features().contains(needs) {
        return Ok(None);
    }
    // Two timestamps per copy.
    let iters = iters.min(wgpu::QUERY_SET_MAX_QUERIES as usize / 2);
    let Some(timer) = StepTimer::new(ctx, iters) else {
        return Ok(None);
    };
    // Copies move multiples of 4 bytes.
    let bytes = bytes.min(ctx.device.limits().max_buffer_size) / 4 * 4;
    let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let buffer = |label, usage| {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    };
    let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let (src, dst) = (buffer("nsa.copy.src", copy), buffer("nsa.copy.dst", copy));
    if let Some(e) = oom.pop().await {
        return Err(NsaError::Gpu(format!(
            "the copy's {bytes}-byte buffers: {e}"
        )));
    }
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.clear_buffer(&src, 0, None);
    for _ in 0..3 {
        enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
    }
    for i in 0..iters as u32 {
        enc.write_timestamp(timer.query_set(), 2 * i);
        enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
        enc.write_timestamp(timer.query_set(), 2 * i + 1);
    }
    let staging = timer.resolve(ctx, &mut enc, iters);
    ctx.queue.submit([enc.finish()]);
    let ms = median(StepTimer::read(ctx, staging).await?);
    Ok((ms > 0.0).then(|| 2.0 * bytes as f64 / (ms * 1e-3) / 1e9))
}

/// The median of `v` (the upper one of an even count). `v` must not be empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Brings a GPU to its working clocks and empties its caches before a timed run.
///
/// A benchmark that waits for each result leaves the GPU idle between runs, and an idle GPU
/// drops its clocks: on the H200, 345 MHz instead of 1980 MHz, which made batched decode steps
/// (too short to bring the clocks back up) up to 5x slower from run to run. In a model, the
/// GPU is busy between attention calls (the other layers) and their caches hold other data;
/// [`Warmer::warm`] stands in for that: it keeps the GPU busy with dense attention for a
/// while, then overwrites a buffer several times the size of any GPU's L2 cache, and waits
/// for both, so that the timed run starts on a busy-clocked GPU with cold caches.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug)]
pub struct Warmer<'p> {
    pipe: &'p NsaPipeline,
    scratch: crate::NsaScratch,
    buffers: [wgpu::Buffer; 4],
    flush: wgpu::Buffer,
    busy: std::time::Duration,
}

#[cfg(not(target_arch = "wasm32"))]
impl<'p> Warmer<'p> {
    /// Whether timing on `ctx` needs a warmer: not on a software adapter, whose clocks do
    /// not idle (and where the dense warm-up work is slow).
    pub fn needed(ctx: &GpuContext) -> bool {
        ctx.adapter_info.device_type != wgpu::DeviceType::Cpu
    }

    /// A warmer on `pipe`'s device that keeps it busy for `busy` before each timed run.
    /// [`NsaError::Gpu`] when the device cannot hold its buffers.
    pub fn new(pipe: &'p NsaPipeline, busy: std::time::Duration) -> Result<Self> {
        let ctx = pipe.context();
        let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let plan = pipe.plan_dense(&crate::Shape::prefill(1, 1024, 16, 1, 64, 64), None)?;
        let scratch = pipe.scratch(&plan)?;
        let make = |t: Tensor, seed: u64| {
            let values = crate::data::sample_values(plan.tensor_len(t) as usize, seed);
            let usage = wgpu::BufferUsages::STORAGE;
            buffer_init(
                &ctx.device,
                "nsa.warmer",
                usage,
                bytemuck::cast_slice(&values),
            )
        };
        let buffers = [
            make(Tensor::Q, 1),
            make(Tensor::KWin, 2),
            make(Tensor::VWin, 3),
            make(Tensor::Out, 4),
        ];
        // 512 MiB (or half the largest buffer): over twice the largest last-level cache of
        // today's GPUs.
        let size = (512u64 << 20).min(pipe.limits().max_buffer / 2) / 4 * 4;
        let flush = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("nsa.warmer.flush"),
            size,
            usage: wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(oom.pop()) {
            return Err(NsaError::Gpu(format!("the warm-up's buffers: {e}")));
        }
        Ok(Self {
            pipe,
            scratch,
            buffers,
            flush,
            busy,
        })
    }

    /// Runs dense attention until `busy` has passed, then overwrites the flush buffer, and
    /// waits for the GPU to finish.
    pub fn warm(&self) -> Result<()> {
        let ctx = self.pipe.context();
        let [q, k, v, out] = &self.buffers;
        let bufs = NsaPipeline::dense_buffers(q, k, v, out);
        let start = std::time::Instant::now();
        loop {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            let last = start.elapsed() >= self.busy;
            if last {
                enc.clear_buffer(&self.flush, 0, None);
            } else {
                self.pipe.encode(&mut enc, &self.scratch, &bufs)?;
            }
            ctx.queue.submit([enc.finish()]);
            ctx.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| NsaError::Gpu(e.to_string()))?;
            if last {
                return Ok(());
            }
        }
    }
}

/// Runs `plan` `warmup + iters` times, one submission each, and returns the median
/// milliseconds per NSA stage (see [`stage_sums`]) and in total over the last `iters`; run
/// `it` reads the input set `sets[it % sets.len()]`, so that rotating sets keep caches from
/// flattering the figures. With a `warmer`, each run starts on a warmed GPU with cold caches
/// (see [`Warmer`]). GPU timestamps where the device has them, else wall clock (and no
/// stages). With timestamps, each submission runs the plan twice: a pass per step, timed per
/// step, for the stages, then (on the next input set) one pass as
/// [`NsaPipeline::encode`] records it, timed as a whole, for the total.
#[cfg(not(target_arch = "wasm32"))]
pub fn time_plan(
    pipe: &NsaPipeline,
    plan: &Plan,
    sets: &[GpuBuffers],
    iters: usize,
    warmup: usize,
    warmer: Option<&Warmer>,
) -> Result<(Vec<(KernelId, f64)>, f64)> {
    let ctx = pipe.context();
    let scratch = pipe.scratch(plan)?;
    let n = plan.steps.len();
    let timer = StepTimer::new(ctx, n + 1);
    let mut per_kind: Vec<(KernelId, Vec<f64>)> = Vec::new();
    let mut totals = Vec::new();
    for it in 0..warmup + iters {
        let bufs = &sets[it % sets.len()];
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let staging = match &timer {
            Some(t) => {
                pipe.encode_timed(&mut enc, &scratch, bufs, t, 0)?;
                let next = &sets[(it + 1) % sets.len()];
                pipe.encode_timed_whole(&mut enc, &scratch, next, t, n)?;
                Some(t.resolve(ctx, &mut enc, n + 1))
            }
            None => {
                pipe.encode(&mut enc, &scratch, bufs)?;
                None
            }
        };
        if let Some(w) = warmer {
            w.warm()?;
        }
        let start = std::time::Instant::now();
        ctx.queue.submit([enc.finish()]);
        ctx.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| NsaError::Gpu(e.to_string()))?;
        let wall = start.elapsed().as_secs_f64() * 1e3;
        if it < warmup {
            continue;
        }
        match staging {
            Some(s) => {
                let ms = pollster::block_on(StepTimer::read(ctx, s))?;
                let sums = stage_sums(plan.steps.iter().map(|s| s.kernel).zip(ms.iter().copied()));
                totals.push(ms[n]);
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

/// `sets` independent input sets `[q, k, v, gates]` for `plan`, from
/// [`crate::data::sample_values`] (set `r` seeded apart from the others), stored at the plan's
/// precision: what [`time_plan`] rotates through.
pub fn sample_input_sets(device: &wgpu::Device, plan: &Plan, sets: u64) -> Vec<[wgpu::Buffer; 4]> {
    let up = |t: Tensor, seed: u64| sample_tensor(device, plan, t, seed);
    (0..sets)
        .map(|r| {
            let seed = 16 * r;
            [
                up(Tensor::Q, seed + 1),
                up(Tensor::KCmp, seed + 2),
                up(Tensor::VCmp, seed + 3),
                up(Tensor::Gates, seed + 4),
            ]
        })
        .collect()
}

/// Tensor `t` of `plan` filled from [`crate::data::sample_values`] with `seed`, stored as the
/// plan stores it (f16 or f32), usable in storage bindings and as a copy's source or destination.
pub fn sample_tensor(device: &wgpu::Device, plan: &Plan, t: Tensor, seed: u64) -> wgpu::Buffer {
    let data = crate::data::sample_values(plan.tensor_len(t) as usize, seed);
    let precision = if plan.elem_bytes(t) == 2 {
        crate::Precision::F16
    } else {
        crate::Precision::F32
    };
    let bytes = crate::inputs::stored_bytes("sample", &data, precision)
        .expect("sample values lie within f16's range");
    buffer_init(
        device,
        "nsa.bench.input",
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        &bytes,
    )
}

/// The NSA stages, in the benchmark tables' column order.
pub const STAGES: [KernelId; 5] = [
    KernelId::Compress,
    KernelId::CmpAttn,
    KernelId::Select,
    KernelId::SlcAttn,
    KernelId::WinAttn,
];

/// Chains of dependent dispatches among `kernels` (a plan's steps in order, or a timed run's
/// per-step kernels): one per chunk of the batch or of the queries that the plan made to fit
/// the adapter's bindings, each paying every dispatch level's latency again. Counted by the
/// attention kernel each chain runs once (compressed attention for NSA, dense attention for
/// the baseline).
pub fn chains(kernels: impl Iterator<Item = KernelId>) -> usize {
    kernels
        .filter(|k| matches!(k, KernelId::CmpAttn | KernelId::Dense))
        .count()
}

/// GPU time per NSA stage from per-step times: a merge counts toward the stage of the step
/// before it (the selection's merge toward the selection, the dense merge toward dense
/// attention), except the merge of all three branches' partials, which also applies the
/// gates: it counts toward window attention and the combination, the stage that combines
/// when nothing is split.
pub fn stage_sums(steps: impl Iterator<Item = (KernelId, f64)>) -> Vec<(KernelId, f64)> {
    let mut sums: Vec<(KernelId, f64)> = Vec::new();
    let mut stage = KernelId::Compress;
    for (kernel, t) in steps {
        stage = match kernel {
            KernelId::SelectMerge => stage,
            KernelId::SelectTop => KernelId::Select,
            KernelId::Merge if stage == KernelId::Dense => stage,
            KernelId::Merge => KernelId::WinAttn,
            other => other,
        };
        match sums.iter_mut().find(|(k, _)| *k == stage) {
            Some((_, acc)) => *acc += t,
            None => sums.push((stage, t)),
        }
    }
    sums
}
