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

/// The device's copy bandwidth, measured two ways, in GB/s counting bytes read plus written
/// (as `torch_baselines.py` counts CUDA's from a 1 GiB `copy_`); see [`copy_bandwidth`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CopyBandwidth {
    /// A compute kernel copying 16-byte words (`shaders/copy.wgsl`), each copy in a pass
    /// of its own between the pass's timestamps: what kernels can move, as a CUDA copy
    /// kernel measures it. `None` where the device lacks `TIMESTAMP_QUERY`.
    pub kernel: Option<f64>,
    /// `copy_buffer_to_buffer`, each copy between two timestamps written into the encoder.
    /// `None` where the device lacks `TIMESTAMP_QUERY_INSIDE_ENCODERS`. On an H200
    /// (Vulkan) this read 850 GB/s where the kernel moves several times that.
    pub transfer: Option<f64>,
}

impl CopyBandwidth {
    /// The faster of the two ways: the device's copy bandwidth.
    pub fn best(&self) -> Option<f64> {
        match (self.kernel, self.transfer) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The device's copy bandwidth ([`CopyBandwidth`]): for each way, the median of `iters`
/// (at most 2048, half a query set's limit) copies of `bytes` bytes (rounded down to 16
/// bytes, at most `max_buffer_size` and, for the kernel, `max_storage_buffer_binding_size`
/// and 4 GiB)
/// from one buffer to another, after three untimed ones, in one submission per way. A way
/// the device cannot time, or whose copies time as taking no time, is `None`, as both are
/// when `iters` is 0. [`NsaError::Gpu`] when the device cannot hold the two buffers, and
/// when the kernel's copy is wrong (its first and last words are checked).
#[cfg(not(target_arch = "wasm32"))]
pub async fn copy_bandwidth(ctx: &GpuContext, bytes: u64, iters: usize) -> Result<CopyBandwidth> {
    let features = ctx.device.features();
    let limits = ctx.device.limits();
    // Two timestamps per copy.
    let iters = iters.min(wgpu::QUERY_SET_MAX_QUERIES as usize / 2);
    let timed = |needs: wgpu::Features| iters > 0 && features.contains(needs);
    let by_kernel = timed(wgpu::Features::TIMESTAMP_QUERY);
    let by_transfer =
        timed(wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);
    let mut cap = limits.max_buffer_size;
    if by_kernel {
        // The kernel binds both buffers whole and counts words in u32: at most 4 GiB.
        cap = cap.min(limits.max_storage_buffer_binding_size).min(1 << 32);
    }
    let bytes = bytes.min(cap) / 16 * 16;
    if bytes == 0 || !(by_kernel || by_transfer) {
        return Ok(CopyBandwidth::default());
    }
    let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let buffer = |label, usage| {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    };
    let usage =
        wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::STORAGE;
    let (src, dst) = (buffer("nsa.copy.src", usage), buffer("nsa.copy.dst", usage));
    if let Some(e) = oom.pop().await {
        return Err(NsaError::Gpu(format!(
            "the copy's {bytes}-byte buffers: {e}"
        )));
    }
    let gbps = |ms: f64| (ms > 0.0).then(|| 2.0 * bytes as f64 / (ms * 1e-3) / 1e9);
    let mut out = CopyBandwidth::default();
    if by_kernel {
        out.kernel = gbps(copy_kernel(ctx, &src, &dst, bytes, iters).await?);
    }
    if by_transfer {
        let timer = StepTimer::new(ctx, iters).expect("the device has timestamps");
        let mut enc = ctx.device.create_command_encoder(&Default::default());
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
        out.transfer = gbps(median(StepTimer::read(ctx, staging).await?));
    }
    Ok(out)
}

/// [`copy_bandwidth`]'s kernel: the median time in ms of `iters` (>= 1) copies of `src`
/// into `dst` (`bytes` each, a multiple of 16) by `shaders/copy.wgsl`, after three untimed
/// ones; then the first and last 16 bytes of `dst` are read back and held against what
/// was written into `src` there (`dst` held other bytes before).
#[cfg(not(target_arch = "wasm32"))]
async fn copy_kernel(
    ctx: &GpuContext,
    src: &wgpu::Buffer,
    dst: &wgpu::Buffer,
    bytes: u64,
    iters: usize,
) -> Result<f64> {
    const WG: u32 = 256;
    let device = &ctx.device;
    // SAFETY: every index is below WORDS, the words both buffers (bound whole) hold, and
    // the one loop advances by at least WG words up to it, far below u32's end (WORDS <=
    // 2^28: copy_bandwidth copies at most 4 GiB).
    let module = unsafe {
        device.create_shader_module_trusted(
            wgpu::ShaderModuleDescriptor {
                label: Some("nsa.copy"),
                source: wgpu::ShaderSource::Wgsl(crate::shaders::COPY.into()),
            },
            wgpu::ShaderRuntimeChecks::unchecked(),
        )
    };
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("nsa.copy"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &[("WG", WG as f64), ("WORDS", (bytes / 16) as f64)],
            zero_initialize_workgroup_memory: false,
        },
        cache: None,
    });
    let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("nsa.copy"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: src.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: dst.as_entire_binding(),
            },
        ],
    });
    // Marks: words in `src` at both ends, other bytes in `dst` there.
    let last = bytes - 16;
    let mark = |w: u32| -> [u32; 4] { [w, w ^ 0x5a5a_5a5a, !w, w.rotate_left(7)] };
    let (first_mark, last_mark) = (mark(0x1234_5678), mark(0x9abc_def0));
    ctx.queue
        .write_buffer(src, 0, bytemuck::cast_slice(&first_mark));
    ctx.queue
        .write_buffer(src, last, bytemuck::cast_slice(&last_mark));
    ctx.queue.write_buffer(dst, 0, &[0xff; 16]);
    ctx.queue.write_buffer(dst, last, &[0xff; 16]);
    // At most GROUPS workgroups (two waves of a large GPU), each invocation looping over
    // its words.
    const GROUPS: u64 = 2048;
    let groups = (bytes / 16).div_ceil(WG as u64).min(GROUPS) as u32;
    let timer = StepTimer::new(ctx, iters).expect("the device has timestamps");
    let mut enc = device.create_command_encoder(&Default::default());
    for i in 0..3 + iters as u32 {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("nsa.copy"),
            timestamp_writes: (i >= 3).then(|| wgpu::ComputePassTimestampWrites {
                query_set: timer.query_set(),
                beginning_of_pass_write_index: Some(2 * (i - 3)),
                end_of_pass_write_index: Some(2 * (i - 3) + 1),
            }),
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(groups, 1, 1);
    }
    let staging = timer.resolve(ctx, &mut enc, iters);
    let ends = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("nsa.copy.ends"),
        size: 32,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    enc.copy_buffer_to_buffer(dst, 0, &ends, 0, 16);
    enc.copy_buffer_to_buffer(dst, last, &ends, 16, 16);
    ctx.queue.submit([enc.finish()]);
    let ms = median(StepTimer::read(ctx, staging).await?);
    let got = read_staging(device, std::slice::from_ref(&ends)).await?;
    let got: &[u32] = bytemuck::cast_slice(&got[0]);
    // One word copies only the last mark, written over the first.
    let first_mark = if last == 0 { last_mark } else { first_mark };
    if got[..4] != first_mark || got[4..] != last_mark {
        return Err(NsaError::Gpu(format!(
            "the copy kernel's {bytes}-byte copy came back wrong at its ends: {got:x?}"
        )));
    }
    Ok(ms)
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
