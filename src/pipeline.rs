//! [`GpuContext`] (which adapter and device), [`NsaPipeline`] (compiled kernels), its
//! [`NsaScratch`] (intermediate buffers of one plan), `encode()` into a caller's command
//! encoder, and the convenience `run()` on host slices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::{NsaConfig, Precision, Shape};
use crate::error::{NsaError, Result};
use crate::inputs::{stored_bytes, BranchOutputs, NsaInputs, NsaOutputs, OutputRequest};
use crate::kernels::{top_list_len, KernelId, KernelLayout, Params, Specialization, WIDE_ROWS};
use crate::plan::{
    DeviceLimits, Plan, SplitTargets, Tensor, Window, DEFAULT_KEPT_SCORES, LLVMPIPE_KEY_TILES,
    LLVMPIPE_LOOP_ITERATIONS,
};
use crate::shaders::{Kept, Variant};
use crate::split::{self, Kind, Layout, PartInputs, Planned};

/// A device and queue to run on, and what adapter they came from.
#[derive(Debug, Clone)]
pub struct GpuContext {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The adapter the device belongs to.
    pub adapter_info: wgpu::AdapterInfo,
    /// Whether the device was created with `EXPERIMENTAL_COOPERATIVE_MATRIX` on an adapter
    /// that multiplies 16x16x16 cooperative matrices of f16 into f32 (tensor cores): the
    /// attention core then runs on them for f16-stored inputs (by default, see
    /// [`NsaPipeline::set_tensor_cores`]). [`GpuContext::new`] finds out; with
    /// [`GpuContext::from_device`] it is `false` unless the caller sets it.
    pub coop_f16: bool,
    /// Why the device was lost, once it is (see [`GpuContext::lost`]).
    lost: Arc<Mutex<Option<String>>>,
    /// The first wgpu error raised outside any error scope since a call last checked
    /// (`check_alive`), on a device this crate made.
    uncaptured: Arc<Mutex<Option<String>>>,
}

/// Which adapter [`GpuContext::with_options`] picks.
#[derive(Debug, Clone, Default)]
pub struct AdapterOptions {
    /// Restrict to these backends (`None`: wgpu's defaults, honouring `WGPU_BACKEND`).
    pub backends: Option<wgpu::Backends>,
    /// Take the first adapter whose name contains this (case-insensitive).
    pub name: Option<String>,
    /// Caps the device's limits: each is the adapter's, or this one's where that is worse
    /// (`wgpu::Limits::or_worse_values_from`). `Some(wgpu::Limits::default())` plans as a
    /// browser's WebGPU defaults would (128 MiB storage bindings, 16 KiB of workgroup
    /// memory); a lowered `max_storage_buffer_binding_size` makes caches and plans split
    /// across bindings at small sizes (tests/decode.rs). `None`: the adapter's limits.
    pub limits: Option<wgpu::Limits>,
}

impl GpuContext {
    /// The best adapter on this machine (high performance preference) and a device with
    /// that adapter's limits.
    pub async fn new() -> Result<Self> {
        Self::with_options(&AdapterOptions::default()).await
    }

    /// An adapter chosen by backend and name, and a device with its limits (or lower ones:
    /// [`AdapterOptions::limits`]).
    ///
    /// A wgpu error on this device outside any error scope (a buffer the device has no memory
    /// for, or work the caller records on it) does not panic, as in wgpu's default handler:
    /// the crate's next call that uses the device fails with [`NsaError::Gpu`] naming the
    /// first such error. A caller may install a handler of its own
    /// (`device.on_uncaptured_error`).
    pub async fn with_options(options: &AdapterOptions) -> Result<Self> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        match options.backends {
            Some(b) => desc.backends = b,
            // By default only the primary backends (Vulkan, Metal, DX12, WebGPU): wgpu's GL
            // fallback is not supported (its compute path on Mesa's llvmpipe never finishes
            // these kernels), so a machine without a driver gets NoAdapter instead.
            // WGPU_BACKEND still chooses explicitly.
            None if std::env::var_os("WGPU_BACKEND").is_none() => {
                desc.backends = wgpu::Backends::PRIMARY
            }
            None => {}
        }
        let backends = desc.backends;
        let instance = wgpu::Instance::new(desc);
        let adapter = match &options.name {
            Some(name) => {
                let want = name.to_lowercase();
                let all = instance.enumerate_adapters(backends).await;
                let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
                all.into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&want))
                    .ok_or_else(|| {
                        NsaError::NoAdapter(format!(
                            "no adapter name contains `{name}`; found {names:?}"
                        ))
                    })?
            }
            None => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    NsaError::NoAdapter(format!(
                        "{e} (backends {backends:?}); without a GPU driver, install a Vulkan one \
                         (Debian: apt-get install mesa-vulkan-drivers libvulkan1)"
                    ))
                })?,
        };
        // The optional features the crate can use, where the adapter has them.
        let mut wanted = wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
            | wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP;
        let coop_f16 = adapter.cooperative_matrix_properties().iter().any(|p| {
            (p.m_size, p.n_size, p.k_size) == (16, 16, 16)
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        });
        if coop_f16 {
            wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let required_features = adapter.features() & wanted;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("nsa-wgpu"),
                required_features,
                required_limits: match &options.limits {
                    Some(cap) => adapter.limits().or_worse_values_from(cap),
                    None => adapter.limits(),
                },
                // SAFETY: the only experimental feature requested is cooperative matrices,
                // used by one shader module (attn_mma.wgsl) whose loads and stores stay inside
                // workgroup arrays sized for them; the GPU tests check its results against
                // the reference wherever an adapter has it.
                experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
                ..Default::default()
            })
            .await
            .map_err(|e| NsaError::Device(e.to_string()))?;
        let lost = Arc::new(Mutex::new(None));
        let note = Arc::clone(&lost);
        device.set_device_lost_callback(move |reason, message| {
            let why = if message.is_empty() {
                format!("{reason:?}")
            } else {
                format!("{reason:?}: {message}")
            };
            *note.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        });
        // wgpu's default handler of errors outside any error scope panics. The crate's calls
        // validate their inputs and capture what they record in scopes of their own; what
        // still escapes them (an allocation the device cannot make, work the caller records
        // on this device) becomes an error of the next call instead.
        let uncaptured = Arc::new(Mutex::new(None));
        let first = Arc::clone(&uncaptured);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            first
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| e.to_string());
        }));
        Ok(Self {
            device,
            queue,
            adapter_info: adapter.get_info(),
            coop_f16: coop_f16
                && required_features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
            lost,
            uncaptured,
        })
    }

    /// Wraps a caller's device and queue. The caller's device-lost callback stays in place,
    /// so [`GpuContext::lost`] does not know about its loss: calls on a lost device then fail
    /// with [`NsaError::Readback`] (or [`NsaError::Gpu`]) instead. `adapter_info` must be
    /// the device's adapter's own (`wgpu::Adapter::get_info`): its subgroup sizes decide
    /// how the tensor-core kernels are compiled ([`GpuContext::fixed_subgroup_size`]).
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        adapter_info: wgpu::AdapterInfo,
    ) -> Self {
        Self {
            device,
            queue,
            adapter_info,
            coop_f16: false,
            lost: Arc::default(),
            uncaptured: Arc::default(),
        }
    }

    /// Whether `other` is this context or a clone of it (the same device of the same wgpu
    /// instance). Device handles alone cannot tell: wgpu compares them by an id that another
    /// instance's device may share.
    pub fn same_context(&self, other: &GpuContext) -> bool {
        Arc::ptr_eq(&self.lost, &other.lost) && self.device == other.device
    }

    /// Why the device was lost (the reason and wgpu's message), for a device this crate
    /// created ([`GpuContext::new`], [`GpuContext::with_options`]); `None` while it works.
    /// Every call that records GPU work, makes a pipeline or makes or grows a cache then fails
    /// with [`NsaError::DeviceLost`].
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// [`NsaError::DeviceLost`] once the device is lost ([`GpuContext::lost`]), and
    /// [`NsaError::Gpu`] for a wgpu error raised outside any error scope since the last check
    /// (on a device this crate made; reported once). wgpu runs the device-lost callback when
    /// it next maintains the device, so this polls it first (without waiting).
    pub(crate) fn check_alive(&self) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        let _ = self.device.poll(wgpu::PollType::Poll);
        if let Some(why) = self.lost() {
            return Err(NsaError::DeviceLost(why));
        }
        self.check_escaped()
    }

    /// [`NsaError::Gpu`] for a wgpu error raised outside any error scope since the last check
    /// (reported once), without polling the device: after creating buffers, whose errors
    /// wgpu reports at once on native devices.
    pub(crate) fn check_escaped(&self) -> Result<()> {
        let escaped = self
            .uncaptured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match escaped {
            Some(e) => Err(NsaError::Gpu(e)),
            None => Ok(()),
        }
    }

    /// The adapter's subgroup size where it has only one (its least and most agree: 32 on
    /// NVIDIA), which the tensor-core kernels then take as a constant
    /// (`kernels::variant_constants`); `None` where it varies (they read it at run time).
    /// wgpu's limit buckets only widen the range, so equal bounds are the device's own.
    pub fn fixed_subgroup_size(&self) -> Option<u32> {
        Self::one_subgroup_size(&self.adapter_info)
    }

    /// [`Self::fixed_subgroup_size`] of an adapter before any device is made on it (`nsa
    /// info` lists adapters so).
    pub fn one_subgroup_size(info: &wgpu::AdapterInfo) -> Option<u32> {
        (info.subgroup_min_size == info.subgroup_max_size).then_some(info.subgroup_min_size)
    }

    /// One line naming the adapter: name, backend, type, driver.
    pub fn describe(&self) -> String {
        Self::describe_adapter(&self.adapter_info)
    }

    /// [`Self::describe`] of an adapter before any device is made on it: name, backend,
    /// type, and the driver's name and version where the adapter reports them (browsers and
    /// some software adapters report none).
    pub fn describe_adapter(info: &wgpu::AdapterInfo) -> String {
        let driver = format!("{} {}", info.driver.trim(), info.driver_info.trim());
        let driver = match driver.trim() {
            "" => String::new(),
            d => format!(", driver {d}"),
        };
        format!(
            "{} ({:?}, {:?}{driver})",
            info.name, info.backend, info.device_type
        )
    }
}

/// The limits of a device, as a plan needs them.
pub fn device_limits(limits: &wgpu::Limits) -> DeviceLimits {
    DeviceLimits {
        max_storage_binding: limits.max_storage_buffer_binding_size,
        max_buffer: limits.max_buffer_size,
        storage_align: limits.min_storage_buffer_offset_alignment as u64,
        uniform_align: limits.min_uniform_buffer_offset_alignment as u64,
        max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
        workgroup_storage: limits.max_compute_workgroup_storage_size,
        // Workgroups are one-dimensional.
        max_invocations: limits
            .max_compute_invocations_per_workgroup
            .min(limits.max_compute_workgroup_size_x),
        kept_scores: DEFAULT_KEPT_SCORES,
        tensor_cores: false,
        max_key_tiles: 0,
        loop_iterations: 0,
        split_select: false,
        split_targets: SplitTargets::default(),
    }
}

/// The caller's buffers for [`NsaPipeline::encode`]: tensors in SPEC's layouts, `f32`
/// (outputs `block_indices` as `i32`), each starting at offset 0, with `STORAGE` usage.
#[derive(Debug, Clone, Copy)]
pub struct GpuBuffers<'a> {
    /// `q`: `[B, Tq, Hq, Dk]`.
    pub q: &'a wgpu::Buffer,
    /// `k`: `[B, Tk, Hkv, Dk]`.
    pub k: &'a wgpu::Buffer,
    /// `v`: `[B, Tk, Hkv, Dv]`.
    pub v: &'a wgpu::Buffer,
    /// `gates`: `[B, Tq, Hq, 3]`.
    pub gates: &'a wgpu::Buffer,
    /// Independent keys/values per branch (`None`: `k`, `v`), in the order
    /// `k_cmp, v_cmp, k_slc, v_slc, k_win, v_win`.
    pub branch_kv: [Option<&'a wgpu::Buffer>; 6],
    /// Linear compression weights `w_k, pe_k, w_v, pe_v` (required by `Linear`).
    pub linear: Option<[&'a wgpu::Buffer; 4]>,
    /// `out`: `[B, Tq, Hq, Dv]` (written).
    pub out: &'a wgpu::Buffer,
    /// `block_indices`: `[B, Tq, Hkv, n]` (written when given; else kept in the scratch).
    pub block_indices: Option<&'a wgpu::Buffer>,
    /// `o_cmp, o_slc, o_win`, each `[B, Tq, Hq, Dv]`: written when given, for a plan made
    /// with [`Plan::with_branch_outputs`] (an error otherwise).
    pub branches: Option<[&'a wgpu::Buffer; 3]>,
    /// Compressed keys and values (a KV cache's); `None`: the scratch's.
    pub compressed: Option<[&'a wgpu::Buffer; 2]>,
}

impl<'a> GpuBuffers<'a> {
    /// The required buffers; everything optional left out.
    pub fn new(
        q: &'a wgpu::Buffer,
        k: &'a wgpu::Buffer,
        v: &'a wgpu::Buffer,
        gates: &'a wgpu::Buffer,
        out: &'a wgpu::Buffer,
    ) -> Self {
        Self {
            q,
            k,
            v,
            gates,
            branch_kv: [None; 6],
            linear: None,
            out,
            block_indices: None,
            branches: None,
            compressed: None,
        }
    }
}

/// The intermediate buffers and uniforms of one [`Plan`]. Create once per shape, reuse for
/// every call with that plan (or refit it to the next plan, [`NsaPipeline::refit_scratch`]):
/// it also keeps the bind groups of the last few sets of buffers it was encoded with
/// (holding those buffers alive), so repeated calls create none.
#[derive(Debug)]
pub struct NsaScratch {
    plan: Plan,
    params: wgpu::Buffer,
    params_stride: u64,
    buffers: Vec<(Tensor, wgpu::Buffer)>,
    /// Bind groups of recent calls, keyed by the buffers every binding resolved to and the
    /// plan's kernels and binding windows (a refitted scratch's plan changes, see
    /// [`NsaPipeline::refit_scratch`]), so that repeated calls on the same buffers create
    /// none.
    groups: Mutex<Vec<BoundGroups>>,
}

/// The bind groups of one call: the buffers of every step's bindings, in order, the kernel
/// and binding windows of every step, and the groups made from them.
#[derive(Debug)]
struct BoundGroups {
    buffers: Vec<wgpu::Buffer>,
    steps: Vec<(KernelId, Vec<Window>)>,
    groups: Vec<wgpu::BindGroup>,
}

/// Every step's kernel and binding windows: with the buffers, what a bind group depends on.
fn step_windows(plan: &Plan) -> Vec<(KernelId, Vec<Window>)> {
    plan.steps
        .iter()
        .map(|s| (s.kernel, s.bindings.iter().map(|b| b.1).collect()))
        .collect()
}

/// Whether `kept` (from [`step_windows`]) describes `plan`'s steps, compared in place: a
/// call that finds its bind groups allocates nothing for the check.
fn same_steps(kept: &[(KernelId, Vec<Window>)], plan: &Plan) -> bool {
    kept.len() == plan.steps.len()
        && kept.iter().zip(&plan.steps).all(|((id, windows), s)| {
            *id == s.kernel && windows.iter().eq(s.bindings.iter().map(|b| &b.1))
        })
}

/// Calls (sets of buffers) whose bind groups a scratch keeps, e.g. rotating inputs.
const KEPT_BIND_GROUPS: usize = 4;

/// The pipeline `compile` makes, or the validation or internal error creating it raised
/// (captured, not reported to the device's handler).
#[cfg(not(target_arch = "wasm32"))]
fn checked_compile(
    device: &wgpu::Device,
    compile: impl FnOnce() -> wgpu::ComputePipeline,
) -> std::result::Result<wgpu::ComputePipeline, wgpu::Error> {
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let pipeline = compile();
    let invalid = pollster::block_on(validation.pop());
    let failed = pollster::block_on(internal.pop());
    match invalid.or(failed) {
        Some(e) => Err(e),
        None => Ok(pipeline),
    }
}

/// In browsers, errors go to the device's handler (error scopes cannot be waited on here).
#[cfg(target_arch = "wasm32")]
fn checked_compile(
    _device: &wgpu::Device,
    compile: impl FnOnce() -> wgpu::ComputePipeline,
) -> std::result::Result<wgpu::ComputePipeline, wgpu::Error> {
    Ok(compile())
}

/// The error of kernel `id` failing to compile.
fn compile_error(id: KernelId, e: wgpu::Error) -> NsaError {
    NsaError::Gpu(format!("compiling kernel {}: {e}", id.name()))
}

/// A storage buffer holding `bytes`.
fn upload(device: &wgpu::Device, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    buffer_init(device, label, wgpu::BufferUsages::STORAGE, bytes)
}

/// A buffer of `usage` holding `bytes`, padded to whole 8-byte units (f16 tensors are bound
/// in them: [`crate::plan::binding_unit`]), as wgpu's
/// `create_buffer_init` makes it but without its panic on a lost device: the buffer is then
/// invalid and left unwritten, and the error surfaces through the caller's error scope or
/// [`GpuContext::lost`].
pub(crate) fn buffer_init(
    device: &wgpu::Device,
    label: &str,
    usage: wgpu::BufferUsages,
    bytes: &[u8],
) -> wgpu::Buffer {
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (bytes.len() as u64).next_multiple_of(8).max(8),
        usage,
        mapped_at_creation: true,
    });
    if let Ok(mut view) = buffer.get_mapped_range_mut(..) {
        view.slice(..bytes.len()).copy_from_slice(bytes);
        drop(view);
        buffer.unmap();
    }
    buffer
}

/// Whether the adapter is Mesa's llvmpipe, which ends an invocation's loops after 65,535
/// iterations in all (see [`DeviceLimits::max_key_tiles`]).
fn loops_capped(ctx: &GpuContext) -> bool {
    let info = &ctx.adapter_info;
    info.name.contains("llvmpipe") || info.driver.contains("llvmpipe")
}

fn tensor_cores_usable(ctx: &GpuContext) -> bool {
    let f = ctx.device.features();
    ctx.coop_f16
        && subgroups_usable(ctx)
        && f.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16)
}

/// Whether the device can run the subgroup reductions: `SUBGROUP`, and subgroups of at least
/// 8 invocations, so that the 8 consecutive invocations of an attention row share one.
fn subgroups_usable(ctx: &GpuContext) -> bool {
    ctx.device.features().contains(wgpu::Features::SUBGROUP)
        && ctx.adapter_info.subgroup_min_size >= 8
}

/// How `record` lays out its passes: one for the whole plan (untimed, or timed as a whole),
/// or one per step, each timed.
#[derive(Clone, Copy)]
enum Timing<'a> {
    Off,
    Whole(&'a wgpu::QuerySet, u32),
    Steps(&'a wgpu::QuerySet, u32),
}

/// An error unless `timer` has slots `first .. first + n`.
fn check_slots(timer: &crate::profile::StepTimer, first: usize, n: usize) -> Result<()> {
    if timer.steps() < first + n {
        return Err(NsaError::BadBuffer {
            tensor: "timestamps",
            problem: format!(
                "the timer holds {} slots, {n} are needed from slot {first}",
                timer.steps()
            ),
        });
    }
    Ok(())
}

impl NsaScratch {
    /// The scratch buffer holding `tensor` (`Kc`, `Vc`, `Lse`, and `Idx`, `OCmp`, `OSlc`,
    /// `OWin` when the caller does not provide them), for inspection.
    pub fn buffer(&self, tensor: Tensor) -> Option<&wgpu::Buffer> {
        self.buffers
            .iter()
            .find(|(t, _)| *t == tensor)
            .map(|(_, b)| b)
    }

    /// The plan this scratch was made for.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Bytes of its intermediate buffers.
    pub(crate) fn bytes(&self) -> u64 {
        self.buffers.iter().map(|(_, b)| b.size()).sum()
    }
}

/// Whether a kept buffer of `have` bytes can serve `need` bytes again: large enough, and not
/// more than four times too large (so that a long call's buffers do not stay for the short
/// calls after it). Shared by refitted scratches and a cache's kept buffers.
pub(crate) fn reusable(have: u64, need: u64) -> bool {
    have >= need && have <= 4 * need
}

/// The NSA forward pass: the compiled kernels on one device.
#[derive(Debug)]
pub struct NsaPipeline {
    ctx: GpuContext,
    /// Each kernel's layouts, in `KernelId::ALL` order.
    layouts: Vec<KernelLayout>,
    /// Compiled kernels per input precision and specialization, built the first time a plan
    /// needs them.
    compiled: Mutex<HashMap<(KernelId, Variant, Specialization), wgpu::ComputePipeline>>,
    /// Whether the device has `shader-f16` (f16 storage).
    f16: bool,
    /// Whether attention reduces its rows with subgroup operations (see
    /// [`Self::set_subgroup_reductions`]).
    subgroups: bool,
    /// Whether the attention core runs on tensor cores for f16 inputs (see
    /// [`Self::set_tensor_cores`]).
    tensor_cores: bool,
    /// Whether kernels compile with naga's bounds checks (see [`Self::set_bounds_checks`]).
    bounds_checks: bool,
    /// The adapter's limits and the kept-score budget; `tensor_cores` stays false here, as
    /// [`Self::limits`] derives it from the current choice.
    limits: DeviceLimits,
    /// Fills read-only slots a dispatch does not use.
    dummy: wgpu::Buffer,
    /// Fills writable slots a dispatch does not use (a buffer may not be bound both ways).
    dummy_out: wgpu::Buffer,
    /// Kernels whose dispatches the timed encodes leave out (see
    /// [`Self::set_timed_leave_out`]).
    timed_leave_out: Vec<KernelId>,
}

impl NsaPipeline {
    /// Compiles every kernel on `ctx`'s device. Fails with [`NsaError::ExceedsLimit`] when the
    /// device cannot hold a kernel's bindings or workgroup memory.
    pub async fn new(ctx: &GpuContext) -> Result<Self> {
        ctx.check_alive()?;
        let lim = ctx.device.limits();
        for id in KernelId::ALL {
            let storage = id.bindings().len() as u64 - 1;
            if storage > lim.max_storage_buffers_per_shader_stage as u64 {
                return Err(NsaError::ExceedsLimit {
                    what: "max_storage_buffers_per_shader_stage",
                    needed: storage,
                    limit: lim.max_storage_buffers_per_shader_stage as u64,
                });
            }
            // One key per tile and the smallest top lists (n <= 16): a plan is held to its own.
            let fixed = id.fixed_workgroup_bytes(crate::kernels::ROWS, 1, top_list_len(1));
            if fixed > lim.max_compute_workgroup_storage_size {
                return Err(NsaError::ExceedsLimit {
                    what: "max_compute_workgroup_storage_size",
                    needed: fixed as u64,
                    limit: lim.max_compute_workgroup_storage_size as u64,
                });
            }
        }
        let one_dim = device_limits(&lim).max_invocations;
        if one_dim < 128 {
            return Err(NsaError::ExceedsLimit {
                what: "max_compute_invocations_per_workgroup (or max_compute_workgroup_size_x)",
                needed: 128,
                limit: one_dim as u64,
            });
        }
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let layouts = KernelId::ALL
            .iter()
            .map(|id| KernelLayout::new(&ctx.device, *id))
            .collect();
        let dummy_buffer = |size: u64| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("nsa.dummy"),
                size,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        // Room for the three aligned pieces of Tensor::UnusedOut (at slots 1 to 3).
        let align = lim.min_storage_buffer_offset_alignment as u64;
        let (dummy, dummy_out) = (dummy_buffer(16), dummy_buffer(3 * align + 16));
        if let Some(e) = scope.pop().await {
            return Err(NsaError::Gpu(e.to_string()));
        }
        Ok(Self {
            ctx: ctx.clone(),
            layouts,
            compiled: Mutex::new(HashMap::new()),
            f16: ctx.device.features().contains(wgpu::Features::SHADER_F16),
            subgroups: subgroups_usable(ctx),
            // Wherever the device has them (see Self::tensor_cores).
            tensor_cores: tensor_cores_usable(ctx),
            bounds_checks: false,
            timed_leave_out: Vec::new(),
            limits: DeviceLimits {
                max_key_tiles: if loops_capped(ctx) {
                    LLVMPIPE_KEY_TILES
                } else {
                    0
                },
                loop_iterations: if loops_capped(ctx) {
                    LLVMPIPE_LOOP_ITERATIONS
                } else {
                    0
                },
                ..device_limits(&lim)
            },
            dummy,
            dummy_out,
        })
    }

    /// The context the pipeline runs on.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// The device limits plans are made for, with [`DeviceLimits::tensor_cores`] as
    /// [`Self::tensor_cores`] says now.
    pub fn limits(&self) -> DeviceLimits {
        DeviceLimits {
            tensor_cores: self.tensor_cores(),
            ..self.limits
        }
    }

    /// Plans a call on this device.
    pub fn plan(&self, config: &NsaConfig, shape: &Shape) -> Result<Plan> {
        Plan::new(config, shape, &self.limits())
    }

    /// Allocates the intermediate buffers and uniforms of `plan`.
    pub fn scratch(&self, plan: &Plan) -> Result<NsaScratch> {
        self.refit_scratch(None, plan)
    }

    /// A scratch for `plan` that takes over `old`'s buffers where they are large enough and
    /// at most 4x larger than needed (creating the others), and its uniform buffer where the
    /// new parameters fit, rewritten through the queue; the bind groups it keeps stay valid
    /// for calls whose buffers and windows match (all are dropped where one of `old`'s
    /// buffers is, so that none is held alive). A decode loop refits one scratch per step
    /// instead of allocating one: consecutive steps' plans differ mostly in their parameters.
    /// Commands already submitted with `old` still see its previous contents (queue writes
    /// are ordered after them).
    pub fn refit_scratch(&self, old: Option<NsaScratch>, plan: &Plan) -> Result<NsaScratch> {
        self.refit_scratch_in(old, plan, None)
    }

    /// [`Self::refit_scratch`]; with `encoder`, a reused uniform buffer is rewritten by a copy
    /// recorded there instead of through the queue, so that commands recorded earlier in the
    /// same encoder with `old` still see its previous contents.
    pub(crate) fn refit_scratch_in(
        &self,
        old: Option<NsaScratch>,
        plan: &Plan,
        encoder: Option<&mut wgpu::CommandEncoder>,
    ) -> Result<NsaScratch> {
        let device = &self.ctx.device;
        let stride =
            (std::mem::size_of::<Params>() as u64).next_multiple_of(self.limits.uniform_align);
        let mut bytes = vec![0u8; (stride * plan.steps.len().max(1) as u64) as usize];
        const COPY_SRC: wgpu::BufferUsages = wgpu::BufferUsages::COPY_SRC;
        for (i, step) in plan.steps.iter().enumerate() {
            let at = i * stride as usize;
            bytes[at..at + std::mem::size_of::<Params>()]
                .copy_from_slice(bytemuck::bytes_of(&step.params));
        }
        // Whether a buffer is made here (its error, if any, is checked at the end).
        let mut created = true;
        let (mut old_buffers, params, mut groups) = match old {
            Some(o) if o.params.size() >= bytes.len() as u64 => {
                match encoder {
                    Some(enc) => {
                        let upload = buffer_init(device, "nsa.params.upload", COPY_SRC, &bytes);
                        enc.copy_buffer_to_buffer(&upload, 0, &o.params, 0, bytes.len() as u64);
                    }
                    None => {
                        self.ctx.queue.write_buffer(&o.params, 0, &bytes);
                        created = false;
                    }
                }
                (o.buffers, o.params, o.groups)
            }
            old => {
                let usage = wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST;
                let params = buffer_init(device, "nsa.params", usage, &bytes);
                let kept = old.map(|o| o.buffers).unwrap_or_default();
                (kept, params, Mutex::new(Vec::new()))
            }
        };
        let mut buffers = Vec::new();
        plan.check_scratch(self.limits.max_buffer)?;
        // Only what the plan's dispatches bind (a cached plan binds the cache's compressed
        // keys and values, and a dense one no NSA intermediates).
        for t in plan.scratch_tensors() {
            let size = plan.tensor_bytes(t);
            let fits = |b: &wgpu::Buffer| reusable(b.size(), size);
            let buf = match old_buffers.iter().position(|(u, b)| *u == t && fits(b)) {
                Some(at) => old_buffers.swap_remove(at).1,
                None => {
                    created = true;
                    device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("nsa.scratch"),
                        size,
                        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: false,
                    })
                }
            };
            buffers.push((t, buf));
        }
        // Bind groups on buffers this scratch let go would keep them alive (and never match).
        if !old_buffers.is_empty() {
            groups = Mutex::new(Vec::new());
        }
        // A buffer the device could not make (on a device this crate made).
        if created {
            self.ctx.check_escaped()?;
        }
        Ok(NsaScratch {
            plan: plan.clone(),
            params,
            params_stride: stride,
            buffers,
            groups,
        })
    }

    /// A buffer to pass for tensors a plan does not bind (a cache's compression-only plans:
    /// no queries, gates or outputs).
    pub(crate) fn placeholder(&self) -> &wgpu::Buffer {
        &self.dummy
    }

    fn is_dummy(&self, buffer: &wgpu::Buffer) -> bool {
        std::ptr::eq(buffer, &self.dummy) || std::ptr::eq(buffer, &self.dummy_out)
    }

    /// The buffer a step binds for `tensor`, checked for size and usage.
    fn resolve<'b>(
        &'b self,
        t: Tensor,
        plan: &Plan,
        scratch: &'b NsaScratch,
        bufs: &GpuBuffers<'b>,
    ) -> Result<&'b wgpu::Buffer> {
        let kv = |i: usize, fallback: &'b wgpu::Buffer| bufs.branch_kv[i].unwrap_or(fallback);
        let lin = |i: usize| -> Result<&'b wgpu::Buffer> {
            if plan.tensor_len(t) == 0 {
                return Ok(&self.dummy);
            }
            bufs.linear.map(|l| l[i]).ok_or(NsaError::MissingInput {
                tensor: ["w_k", "pe_k", "w_v", "pe_v"][i],
                why: "Compression::Linear needs w_k, pe_k, w_v, pe_v",
            })
        };
        let scr = |t: Tensor| scratch.buffer(t).expect("scratch holds every intermediate");
        let (name, buf) = match t {
            Tensor::Q => ("q", bufs.q),
            Tensor::Gates => ("gates", bufs.gates),
            Tensor::KCmp => ("k_cmp", kv(0, bufs.k)),
            Tensor::VCmp => ("v_cmp", kv(1, bufs.v)),
            Tensor::KSlc => ("k_slc", kv(2, bufs.k)),
            Tensor::VSlc => ("v_slc", kv(3, bufs.v)),
            Tensor::KWin => ("k_win", kv(4, bufs.k)),
            Tensor::VWin => ("v_win", kv(5, bufs.v)),
            Tensor::WK => ("w_k", lin(0)?),
            Tensor::PeK => ("pe_k", lin(1)?),
            Tensor::WV => ("w_v", lin(2)?),
            Tensor::PeV => ("pe_v", lin(3)?),
            Tensor::Kc => ("kc", bufs.compressed.map_or_else(|| scr(t), |c| c[0])),
            Tensor::Vc => ("vc", bufs.compressed.map_or_else(|| scr(t), |c| c[1])),
            Tensor::Lse => ("lse", scr(t)),
            Tensor::Idx => (
                "block_indices",
                bufs.block_indices.unwrap_or_else(|| scr(t)),
            ),
            Tensor::OCmp => ("o_cmp", bufs.branches.map_or_else(|| scr(t), |b| b[0])),
            Tensor::OSlc => ("o_slc", bufs.branches.map_or_else(|| scr(t), |b| b[1])),
            Tensor::OWin => ("o_win", bufs.branches.map_or_else(|| scr(t), |b| b[2])),
            Tensor::Out => ("out", bufs.out),
            Tensor::Part => ("partials", scr(t)),
            Tensor::PartSlc => ("selected partials", scr(t)),
            Tensor::PartWin => ("window partials", scr(t)),
            Tensor::Cand => ("candidates", scr(t)),
            Tensor::Kept => ("kept scores", scr(t)),
            Tensor::Unused => ("unused", &self.dummy),
            Tensor::UnusedOut => ("unused", &self.dummy_out),
        };
        let need = if self.is_dummy(buf) {
            4
        } else {
            plan.tensor_bytes(t)
        };
        if buf.size() < need {
            return Err(NsaError::BadBuffer {
                tensor: name,
                problem: format!("holds {} bytes, the shape needs {need}", buf.size()),
            });
        }
        if !buf.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(NsaError::BadBuffer {
                tensor: name,
                problem: format!("usage {:?} lacks STORAGE", buf.usage()),
            });
        }
        Ok(buf)
    }

    /// Records the whole forward pass into `encoder` as one compute pass, reading and
    /// writing the caller's buffers in place (no copies). Nothing runs until the caller
    /// submits.
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        scratch: &NsaScratch,
        bufs: &GpuBuffers,
    ) -> Result<()> {
        self.record(encoder, scratch, bufs, Timing::Off)
    }

    /// [`Self::encode`], but each step in a pass of its own with a timestamp before and after
    /// it in `timer` (see [`crate::profile::StepTimer`]): step `i` of the plan into slot
    /// `first_step + i` (several plans can share one timer). Per-stage times; the passes'
    /// boundaries add some time of their own.
    pub fn encode_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        scratch: &NsaScratch,
        bufs: &GpuBuffers,
        timer: &crate::profile::StepTimer,
        first_step: usize,
    ) -> Result<()> {
        check_slots(timer, first_step, scratch.plan.steps.len())?;
        self.record(
            encoder,
            scratch,
            bufs,
            Timing::Steps(timer.query_set(), first_step as u32),
        )
    }

    /// [`Self::encode`] (one pass), with a timestamp before and after the whole pass in slot
    /// `slot` of `timer`: the forward pass's GPU time as [`Self::encode`] runs it.
    pub fn encode_timed_whole(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        scratch: &NsaScratch,
        bufs: &GpuBuffers,
        timer: &crate::profile::StepTimer,
        slot: usize,
    ) -> Result<()> {
        check_slots(timer, slot, 1)?;
        self.record(
            encoder,
            scratch,
            bufs,
            Timing::Whole(timer.query_set(), slot as u32),
        )
    }

    /// The pipelines of `plan`'s steps, compiled for its precision and shape on first use.
    /// A kernel the driver rejects is [`NsaError::Gpu`] naming it (natively; a tensor-core
    /// kernel falls back to the plain one instead).
    fn kernels(&self, plan: &Plan) -> Result<Vec<wgpu::ComputePipeline>> {
        self.require(plan.precision)?;
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        let mut pipelines = Vec::with_capacity(plan.steps.len());
        for step in &plan.steps {
            let id = step.kernel;
            let (spec, tensor_cores) = plan.kernel_specialization(
                id,
                step.rows,
                self.tensor_cores(),
                self.limits.workgroup_storage,
            );
            let variant = Variant {
                precision: plan.precision,
                subgroups: self.subgroups,
                tensor_cores,
                // Per step: a plan's chunks may differ (a short last chunk splits and keeps).
                kept: Kept::of(&step.params),
            };
            let key = (id, variant, spec);
            if let Some(p) = compiled.get(&key) {
                pipelines.push(p.clone());
                continue;
            }
            let compile =
                |variant: &Variant, spec: &Specialization| self.compile_kernel(id, variant, spec);
            // An experimental feature: where the driver rejects the tensor-core kernel, the
            // plain one takes its place (under the same key).
            let tensor = if variant.tensor_cores {
                compile(&variant, &spec).ok()
            } else {
                None
            };
            let pipeline = match tensor {
                Some(p) => p,
                None => {
                    if let Some(needed) = plan
                        .plain_wide_overflow(self.limits.workgroup_storage)
                        .filter(|_| step.rows == WIDE_ROWS)
                    {
                        return Err(NsaError::ExceedsLimit {
                            what: "max_compute_workgroup_storage_size (a wide step planned for tensor cores, which this pipeline does not use for it: plan again with its limits)",
                            needed,
                            limit: self.limits.workgroup_storage as u64,
                        });
                    }
                    let plain_variant = Variant {
                        tensor_cores: false,
                        ..variant
                    };
                    // Kept block sums are laid out for the tensor-core kernel's tiles.
                    let plain_tile = plan.specialization(step.rows).kv_tile;
                    if variant.tensor_cores
                        && variant.kept == Kept::BlockSums
                        && plain_tile != step.params.kept_tile
                    {
                        return Err(NsaError::Gpu(format!(
                            "kernel {} on tensor cores failed to compile, and the plan's kept block sums are laid out for its {}-key tiles (the plain kernel's are {plain_tile}): plan again with tensor cores off",
                            id.name(),
                            step.params.kept_tile
                        )));
                    }
                    compile(&plain_variant, &plan.specialization(step.rows))
                        .map_err(|e| compile_error(id, e))?
                }
            };
            compiled.insert(key, pipeline.clone());
            pipelines.push(pipeline);
        }
        Ok(pipelines)
    }

    /// The KV cache's append kernel (`shaders/append.wgsl`), compiled on first use, and its
    /// bind group layout.
    pub(crate) fn append_kernel(&self) -> Result<(wgpu::ComputePipeline, &wgpu::BindGroupLayout)> {
        let id = KernelId::Append;
        let layout = &self.layouts[id as usize];
        // It reads no inputs and declares no overrides: one variant.
        let variant = Variant {
            precision: Precision::F32,
            subgroups: false,
            tensor_cores: false,
            kept: Kept::Nothing,
        };
        let spec = Specialization {
            dk: 0,
            dv: 0,
            kv_tile: 0,
            smem4: 0,
            rows: 0,
            few_rows: false,
            top_list: 0,
            queries: 1,
            parts: 1,
            invocations: 0,
        };
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        let pipeline = match compiled.get(&(id, variant, spec)) {
            Some(p) => p.clone(),
            None => {
                let p = self
                    .compile_kernel(id, &variant, &spec)
                    .map_err(|e| compile_error(id, e))?;
                compiled.insert((id, variant, spec), p.clone());
                p
            }
        };
        Ok((pipeline, &layout.bind_group))
    }

    /// Kernel `id` compiled in `variant` for `spec` on this pipeline's device, with its
    /// bounds-check choice; the driver's or wgpu's error where it fails.
    fn compile_kernel(
        &self,
        id: KernelId,
        variant: &Variant,
        spec: &Specialization,
    ) -> std::result::Result<wgpu::ComputePipeline, wgpu::Error> {
        let device = &self.ctx.device;
        let layout = &self.layouts[id as usize];
        checked_compile(device, || {
            let subgroup_size = self.ctx.fixed_subgroup_size().unwrap_or(0);
            layout.compile(device, id, variant, spec, self.bounds_checks, subgroup_size)
        })
    }

    /// One bind group per step of the scratch's plan, on `resolved` (every step's binding
    /// buffers, in order).
    fn bind_groups(
        &self,
        scratch: &NsaScratch,
        resolved: &[&wgpu::Buffer],
    ) -> Vec<wgpu::BindGroup> {
        let mut next = resolved.iter();
        let mut groups = Vec::with_capacity(scratch.plan.steps.len());
        for (i, step) in scratch.plan.steps.iter().enumerate() {
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &scratch.params,
                    offset: i as u64 * scratch.params_stride,
                    size: wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64),
                }),
            }];
            for (slot, (_, window)) in step.bindings.iter().enumerate() {
                let buffer: &wgpu::Buffer = next.next().expect("one buffer per binding");
                let (offset, size) = if std::ptr::eq(buffer, &self.dummy) {
                    (0, 16)
                } else if self.is_dummy(buffer) {
                    (window.offset, 16)
                } else {
                    (window.offset, window.size)
                };
                entries.push(wgpu::BindGroupEntry {
                    binding: slot as u32 + 1,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset,
                        size: wgpu::BufferSize::new(size),
                    }),
                });
            }
            groups.push(
                self.ctx
                    .device
                    .create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(step.kernel.label()),
                        layout: &self.layouts[step.kernel as usize].bind_group,
                        entries: &entries,
                    }),
            );
        }
        groups
    }

    fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        scratch: &NsaScratch,
        bufs: &GpuBuffers,
        timing: Timing,
    ) -> Result<()> {
        self.ctx.check_alive()?;
        let plan = &scratch.plan;
        if bufs.branches.is_some() && !plan.branch_outputs && plan.has_branches() {
            return Err(NsaError::BadBuffer {
                tensor: "o_cmp, o_slc, o_win",
                problem: "given, but the plan does not write the branch outputs: plan with Plan::with_branch_outputs".into(),
            });
        }
        let kernels = self.kernels(plan)?;
        // Resolve every binding first, so a bad buffer fails before anything is recorded.
        let mut resolved: Vec<&wgpu::Buffer> = Vec::new();
        for step in &plan.steps {
            for (tensor, _) in &step.bindings {
                resolved.push(self.resolve(*tensor, plan, scratch, bufs)?);
            }
        }
        let mut kept = scratch.groups.lock().unwrap_or_else(|e| e.into_inner());
        let hit = kept.iter().position(|k| {
            k.buffers.iter().eq(resolved.iter().copied()) && same_steps(&k.steps, plan)
        });
        let groups = match hit {
            Some(at) => kept[at].groups.clone(),
            None => {
                let groups = self.bind_groups(scratch, &resolved);
                if kept.len() == KEPT_BIND_GROUPS {
                    kept.remove(0);
                }
                kept.push(BoundGroups {
                    buffers: resolved.iter().map(|b| (*b).clone()).collect(),
                    steps: step_windows(plan),
                    groups: groups.clone(),
                });
                groups
            }
        };
        drop(kept);
        let stamps = |query_set, slot: u32| {
            Some(wgpu::ComputePassTimestampWrites {
                query_set,
                beginning_of_pass_write_index: Some(2 * slot),
                end_of_pass_write_index: Some(2 * slot + 1),
            })
        };
        let leave_out: &[KernelId] = match timing {
            Timing::Off => &[],
            _ => &self.timed_leave_out,
        };
        let mut pass = None;
        for (i, (step, group)) in plan.steps.iter().zip(&groups).enumerate() {
            // wgpu orders the dispatches of one pass by their buffer uses.
            let timestamp_writes = match timing {
                Timing::Steps(qs, first) => {
                    pass = None;
                    stamps(qs, first + i as u32)
                }
                Timing::Whole(qs, slot) => stamps(qs, slot),
                Timing::Off => None,
            };
            let pass = pass.get_or_insert_with(|| {
                encoder
                    .begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some(step.kernel.label()),
                        timestamp_writes,
                    })
                    .forget_lifetime()
            });
            // A step left out still has its pass where each step has one, so that its
            // timestamps are written (as nothing).
            if leave_out.contains(&step.kernel) {
                continue;
            }
            pass.set_pipeline(&kernels[i]);
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(step.grid[0], step.grid[1], 1);
        }
        Ok(())
    }

    /// Runs NSA on host slices: validates, uploads, encodes, submits and reads back. A call
    /// that no plan fits because one sequence's keys pass a storage binding or a tensor
    /// passes `max_buffer_size` runs in parts of sequences, kv heads or query rows, one
    /// submission each (see [`Self::run_with`]).
    pub async fn run(
        &self,
        config: &NsaConfig,
        shape: &Shape,
        inputs: &NsaInputs<'_>,
        request: OutputRequest,
    ) -> Result<NsaOutputs> {
        self.run_with(config, shape, inputs, request, Precision::F32)
            .await
    }

    /// Whether attention reduces each row's maximum and sum with subgroup shuffles (the
    /// default where the device has `SUBGROUP` and subgroups of at least 8 invocations) or
    /// through workgroup memory with one more barrier per tile (the plain-WGSL fallback).
    pub fn subgroup_reductions(&self) -> bool {
        self.subgroups
    }

    /// Chooses the reductions for kernels compiled from now on: subgroup shuffles when `on`
    /// and the device can, else the fallback (which also turns tensor cores off for plans
    /// made from now on, [`DeviceLimits::tensor_cores`]). Returns the choice in effect.
    pub fn set_subgroup_reductions(&mut self, on: bool) -> bool {
        let want = on && subgroups_usable(&self.ctx);
        if want != self.subgroups {
            self.subgroups = want;
            self.forget_compiled();
        }
        self.subgroups
    }

    /// Whether attention on f16-stored inputs runs on tensor cores: 16x16x16 cooperative
    /// matrices with f16 operands and f32 accumulation (probabilities round to f16), where
    /// [`Self::set_tensor_cores`] asked for them, the device has them
    /// ([`GpuContext::coop_f16`]) and subgroup reductions are on; f32 inputs always run on
    /// the shader cores. On by default where the device has them: on an H200 f16 prefill
    /// at 64k takes 172.6 ms with them against 493 on the shader cores, 12.0 against 31.9 ms
    /// at 8k (BENCHMARKS.md; the shader cores' figures from older builds).
    pub fn tensor_cores(&self) -> bool {
        self.tensor_cores && self.subgroups
    }

    /// Chooses tensor cores (when `on` and the device can) or the shader cores for kernels
    /// compiled and plans made from now on ([`DeviceLimits::tensor_cores`]). Returns the
    /// choice in effect.
    pub fn set_tensor_cores(&mut self, on: bool) -> bool {
        let want = on && tensor_cores_usable(&self.ctx);
        if want != self.tensor_cores {
            self.tensor_cores = want;
            self.forget_compiled();
        }
        self.tensor_cores()
    }

    /// Whether kernels compile with naga's bounds checks, which clamp every array index in
    /// the shaders. Off by default: every index the kernels compute is in range, and the
    /// clamps cost 1.07-1.08x on an H200 at 8k (1.1-1.3x in earlier builds; BENCHMARKS.md;
    /// browsers add their own checks regardless).
    pub fn bounds_checks(&self) -> bool {
        self.bounds_checks
    }

    /// Compiles kernels from now on with (`on`) or without naga's bounds checks: a
    /// debugging aid, and how the tests check that the unchecked kernels index nothing out
    /// of range (both must write the same bits). Returns the choice in effect.
    pub fn set_bounds_checks(&mut self, on: bool) -> bool {
        if on != self.bounds_checks {
            self.bounds_checks = on;
            self.forget_compiled();
        }
        self.bounds_checks
    }

    /// Sets how many bytes of compressed-attention scores one chunk of a call may keep for
    /// the selection ([`DeviceLimits::kept_scores`]; plans made from now on): fewer bytes
    /// mean smaller scratch and more chunks, 0 none kept (the selection multiplies q.k a
    /// second time: on an H200 an f16 prefill at 64k then spends 180 ms in the selection
    /// rather than 17, while compressed attention saves 17 ms of writes).
    pub fn set_kept_scores(&mut self, bytes: u64) {
        self.limits.kept_scores = bytes;
    }

    /// Makes calls with few rows split their selection and merge the candidates even where
    /// one workgroup per row could rank all blocks ([`DeviceLimits::split_select`]; plans
    /// made from now on): for comparing the two (`nsa bench --split-select`).
    pub fn set_split_select(&mut self, on: bool) {
        self.limits.split_select = on;
    }

    /// Sets the workgroups each attention branch aims for in calls of few row groups (decode
    /// steps, short chunks: [`SplitTargets`]; plans made from now on): for tuning them to a
    /// GPU other than the H200 they were chosen on (`nsa bench --decode --split-target`).
    /// Results do not change, only how the work is split.
    pub fn set_split_targets(&mut self, targets: SplitTargets) {
        self.limits.split_targets = targets;
    }

    /// A benchmark's diagnostic: the timed encodes ([`Self::encode_timed`],
    /// [`Self::encode_timed_whole`], and the cache's calls and [`crate::profile::time_plan`]
    /// that use them) record no dispatch of `kernels`, so that the timings say what each
    /// dispatch costs a pass (`nsa bench --leave-out`). Leaving a dispatch out also drops the
    /// barrier in front of what follows it, so such a timing bounds that dispatch's cost
    /// from above. The outputs of those calls are wrong (a cache's compressed tokens too,
    /// from then on, where `Compress` is left out; a cache's appends are not plan steps and
    /// always run): for benchmarks only. [`Self::encode`] and every untimed call are
    /// unaffected; an empty list (the default) leaves nothing out.
    pub fn set_timed_leave_out(&mut self, kernels: &[KernelId]) {
        self.timed_leave_out = kernels.to_vec();
    }

    /// Sets how many key tiles one attention workgroup may walk
    /// ([`DeviceLimits::max_key_tiles`]; plans made from now on; 0 for any number): longer
    /// key ranges split over several workgroups whose partial results a merge combines. A
    /// new pipeline sets [`LLVMPIPE_KEY_TILES`] on llvmpipe, whose invocations stop looping
    /// after 65,535 iterations, and 0 elsewhere.
    pub fn set_max_key_tiles(&mut self, tiles: u64) {
        self.limits.max_key_tiles = tiles;
    }

    /// Drops the compiled kernels (after a change of variant).
    fn forget_compiled(&mut self) {
        self.compiled
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// [`NsaError::MissingFeature`] unless this device can store inputs at `precision`.
    pub(crate) fn require(&self, precision: Precision) -> Result<()> {
        if self.supports(precision) {
            Ok(())
        } else {
            Err(NsaError::MissingFeature {
                feature: "shader-f16",
                why: "f16 storage",
            })
        }
    }

    /// Whether this device can store inputs at `precision`.
    pub fn supports(&self, precision: Precision) -> bool {
        precision == Precision::F32 || self.f16
    }

    /// The plan of a call of `shape` on this device, as `run_with` makes it: inputs stored
    /// at `precision`, the branch outputs where `request` asks for them, and its scratch
    /// within a buffer.
    pub(crate) fn call_plan(
        &self,
        config: &NsaConfig,
        shape: &Shape,
        request: OutputRequest,
        precision: Precision,
    ) -> Result<Plan> {
        let plan = Plan::with_precision(config, shape, &self.limits(), precision)?;
        let plan = if request.branches {
            plan.with_branch_outputs()?
        } else {
            plan
        };
        plan.check_scratch(self.limits.max_buffer)?;
        Ok(plan)
    }

    /// [`Self::run`] with the inputs stored on the GPU at `precision` (converted on upload).
    /// F16 needs the adapter's `shader-f16`: [`NsaError::MissingFeature`] otherwise; a value
    /// beyond f16's range in `q`, `k`, `v` or the branch keys/values is
    /// [`NsaError::OutOfRange`].
    ///
    /// Where the whole call's plan is [`NsaError::ExceedsLimit`], the call runs in parts:
    /// the most kv heads (each with its query heads), then the most sequences, that plan,
    /// each part a call of its own whose outputs go in place. NSA never mixes sequences or
    /// kv groups, so the results are the whole call's. Where not even one sequence's one kv
    /// head plans, the parts are query rows of one sequence (the most that plan, then the
    /// most kv heads), each a chunk over the keys up to its last row, whose rows are the
    /// whole call's too (SPEC: a chunk's rows are the prefill's). Where not even one query
    /// row of one kv head plans, the whole call's error is returned.
    pub async fn run_with(
        &self,
        config: &NsaConfig,
        shape: &Shape,
        inputs: &NsaInputs<'_>,
        request: OutputRequest,
        precision: Precision,
    ) -> Result<NsaOutputs> {
        inputs.validate(config, shape)?;
        self.require(precision)?;
        let plan = |s: &Shape| self.call_plan(config, s, request, precision);
        let size = match split::plan_or_parts(shape, true, plan)? {
            Planned::Whole(p) => return self.run_planned(&p, inputs, request, precision).await,
            Planned::Parts(size) => size,
        };
        split::check_ranges(inputs, precision)?;
        let mut res = split::unfilled_outputs(shape, config.top_n, request);
        for part in split::parts(shape, size) {
            let taken = PartInputs::gather(config, shape, inputs, &part);
            let plan = plan(&part.shape(shape))?;
            let got = (self.run_planned(&plan, &taken.inputs(), request, precision)).await?;
            split::put_outputs(&mut res, &got, shape, config.top_n, &part);
        }
        Ok(res)
    }

    /// [`Self::run_with`] on a plan of the whole call.
    async fn run_planned(
        &self,
        plan: &Plan,
        inputs: &NsaInputs<'_>,
        request: OutputRequest,
        precision: Precision,
    ) -> Result<NsaOutputs> {
        // The tensors stored at `precision`, converted (and range-checked) before anything
        // is allocated.
        let [q, k, v] = [("q", inputs.q), ("k", inputs.k), ("v", inputs.v)]
            .map(|(name, d)| stored_bytes(name, d, precision));
        let (q, k, v) = (q?, k?, v?);
        let branch: Vec<Option<crate::inputs::Stored>> = (inputs.branch_tensors().into_iter())
            .map(|(name, t)| t.map(|d| stored_bytes(name, d, precision)).transpose())
            .collect::<Result<_>>()?;
        let device = &self.ctx.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let upload_f32 =
            |label: &str, data: &[f32]| upload(device, label, bytemuck::cast_slice(data));
        let (q, k, v) = (
            upload(device, "nsa.q", &q),
            upload(device, "nsa.k", &k),
            upload(device, "nsa.v", &v),
        );
        let gates = upload_f32("nsa.gates", inputs.gates);
        let branch: Vec<Option<wgpu::Buffer>> = branch
            .iter()
            .map(|b| b.as_ref().map(|b| upload(device, "nsa.branch_kv", b)))
            .collect();
        let linear: Option<Vec<wgpu::Buffer>> = inputs
            .linear
            .filter(|_| plan.tensor_len(Tensor::WK) > 0)
            .map(|l| {
                [l.w_k, l.pe_k, l.w_v, l.pe_v]
                    .iter()
                    .map(|d| upload_f32("nsa.linear", d))
                    .collect()
            });
        let out = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("nsa.out"),
            size: plan.tensor_bytes(Tensor::Out),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let scratch = self.scratch(plan)?;
        let mut bufs = GpuBuffers::new(&q, &k, &v, &gates, &out);
        for (slot, b) in bufs.branch_kv.iter_mut().zip(&branch) {
            *slot = b.as_ref();
        }
        bufs.linear = linear.as_ref().map(|l| [&l[0], &l[1], &l[2], &l[3]]);
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("nsa.run"),
        });
        self.encode(&mut encoder, &scratch, &bufs)?;
        let mut wanted = vec![(Tensor::Out, &out)];
        if request.block_indices {
            wanted.push((
                Tensor::Idx,
                scratch.buffer(Tensor::Idx).expect("scratch idx"),
            ));
        }
        if request.branches {
            for t in [Tensor::OCmp, Tensor::OSlc, Tensor::OWin] {
                wanted.push((t, scratch.buffer(t).expect("scratch branch")));
            }
        }
        let buffers: Vec<&wgpu::Buffer> = wanted.iter().map(|(_, b)| *b).collect();
        let staging = stage_readback(device, &mut encoder, &buffers);
        self.ctx.queue.submit([encoder.finish()]);
        if let Some(e) = oom.pop().await {
            return Err(NsaError::Gpu(e.to_string()));
        }
        if let Some(e) = scope.pop().await {
            return Err(NsaError::Gpu(e.to_string()));
        }
        let mut data = read_staging(device, &staging).await?.into_iter();
        let mut next_f32 =
            || -> Vec<f32> { bytemuck::cast_slice(&data.next().expect("one per wanted")).to_vec() };
        let out = next_f32();
        let block_indices = request
            .block_indices
            .then(|| bytemuck::cast_slice::<f32, i32>(&next_f32()).to_vec());
        let branches = request.branches.then(|| BranchOutputs {
            o_cmp: next_f32(),
            o_slc: next_f32(),
            o_win: next_f32(),
        });
        Ok(NsaOutputs {
            out,
            block_indices,
            branches,
        })
    }

    /// Plans dense causal attention (the baseline kernel) on this device.
    pub fn plan_dense(&self, shape: &Shape, scale: Option<f32>) -> Result<Plan> {
        Plan::dense(shape, scale, &self.limits())
    }

    /// Buffers for a dense plan: `q`, `k`, `v` in, `out` written.
    pub fn dense_buffers<'b>(
        q: &'b wgpu::Buffer,
        k: &'b wgpu::Buffer,
        v: &'b wgpu::Buffer,
        out: &'b wgpu::Buffer,
    ) -> GpuBuffers<'b> {
        // Dense attention binds no gates; any buffer fills the slot.
        GpuBuffers::new(q, k, v, q, out)
    }

    /// Dense causal attention on host slices (`q: [B, Tq, Hq, Dk]`, `k`, `v` as for NSA),
    /// returning `[B, Tq, Hq, Dv]`.
    pub async fn dense_attention(
        &self,
        shape: &Shape,
        scale: Option<f32>,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<Vec<f32>> {
        self.dense_attention_with(shape, scale, q, k, v, Precision::F32)
            .await
    }

    /// [`Self::dense_attention`] with `q`, `k`, `v` stored on the GPU at `precision`
    /// (converted on upload; f16 runs on tensor cores where [`Self::tensor_cores`] and a
    /// workgroup has 16 rows; values beyond f16's range are [`NsaError::OutOfRange`]). A
    /// call too large for one plan runs in parts, as [`Self::run_with`] says.
    pub async fn dense_attention_with(
        &self,
        shape: &Shape,
        scale: Option<f32>,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        precision: Precision,
    ) -> Result<Vec<f32>> {
        use crate::inputs::check_tensor;
        shape.validate()?;
        check_tensor("q", q, &shape.q_shape())?;
        check_tensor("k", k, &shape.k_shape())?;
        check_tensor("v", v, &shape.v_shape())?;
        self.require(precision)?;
        let plan = |s: &Shape| {
            let plan = Plan::dense_with_precision(s, scale, &self.limits(), precision)?;
            plan.check_scratch(self.limits.max_buffer)?;
            Ok(plan)
        };
        let size = match split::plan_or_parts(shape, true, plan)? {
            Planned::Whole(p) => return self.dense_planned(&p, q, k, v, precision).await,
            Planned::Parts(size) => size,
        };
        // As in `run_with`: range errors first, then each part alone, its output put in place.
        split::check_ranges(&NsaInputs::new(q, k, v, &[]), precision)?;
        let s = shape;
        let mut out = vec![f32::NAN; s.batch * s.tq * s.hq * s.dv];
        for part in split::parts(s, size) {
            let take = |kind: Kind, w: usize, x: &[f32]| Layout::of(s, kind, w).gather(x, &part, s);
            let (q, k, v) = (
                take(Kind::Queries, s.dk, q),
                take(Kind::Keys, s.dk, k),
                take(Kind::Keys, s.dv, v),
            );
            let got = self
                .dense_planned(&plan(&part.shape(s))?, &q, &k, &v, precision)
                .await?;
            Layout::of(s, Kind::Queries, s.dv).scatter(&mut out, &got, &part, s);
        }
        Ok(out)
    }

    /// [`Self::dense_attention_with`] on a plan of the whole call.
    async fn dense_planned(
        &self,
        plan: &Plan,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        precision: Precision,
    ) -> Result<Vec<f32>> {
        let [q, k, v] =
            [("q", q), ("k", k), ("v", v)].map(|(name, d)| stored_bytes(name, d, precision));
        let (q, k, v) = (q?, k?, v?);
        let device = &self.ctx.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let (qb, kb, vb) = (
            upload(device, "nsa.dense.input", &q),
            upload(device, "nsa.dense.input", &k),
            upload(device, "nsa.dense.input", &v),
        );
        let out = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("nsa.dense.out"),
            size: plan.tensor_bytes(Tensor::Out),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let scratch = self.scratch(plan)?;
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("nsa.dense"),
        });
        self.encode(
            &mut encoder,
            &scratch,
            &Self::dense_buffers(&qb, &kb, &vb, &out),
        )?;
        let staging = stage_readback(device, &mut encoder, &[&out]);
        self.ctx.queue.submit([encoder.finish()]);
        if let Some(e) = scope.pop().await {
            return Err(NsaError::Gpu(e.to_string()));
        }
        let data = read_staging(device, &staging).await?;
        Ok(bytemuck::cast_slice(&data[0]).to_vec())
    }

    /// [`Self::run`], blocking on the result (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run_blocking(
        &self,
        config: &NsaConfig,
        shape: &Shape,
        inputs: &NsaInputs<'_>,
        request: OutputRequest,
    ) -> Result<NsaOutputs> {
        pollster::block_on(self.run(config, shape, inputs, request))
    }
}

/// Records copies of `buffers` into fresh `MAP_READ` buffers.
pub fn stage_readback(
    device: &wgpu::Device,
    encoder: &mut wgpu::CommandEncoder,
    buffers: &[&wgpu::Buffer],
) -> Vec<wgpu::Buffer> {
    let whole: Vec<_> = buffers.iter().map(|b| (*b, b.size())).collect();
    stage_readback_ranges(device, encoder, &whole, Vec::new())
}

/// [`stage_readback`] of the first `bytes` of each buffer, taking over the staging buffer at
/// the same place in `old` where its size matches (a decode loop reads back the same sizes
/// every step; `old`'s buffers must be unmapped, as [`read_staging`] leaves them).
pub fn stage_readback_ranges(
    device: &wgpu::Device,
    encoder: &mut wgpu::CommandEncoder,
    buffers: &[(&wgpu::Buffer, u64)],
    old: Vec<wgpu::Buffer>,
) -> Vec<wgpu::Buffer> {
    let mut old = old.into_iter();
    buffers
        .iter()
        .map(|&(b, bytes)| {
            let staging = match old.next() {
                Some(s) if s.size() == bytes => s,
                _ => device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("nsa.readback"),
                    size: bytes,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
            };
            encoder.copy_buffer_to_buffer(b, 0, &staging, 0, bytes);
            staging
        })
        .collect()
}

/// Maps staging buffers (after their copies were submitted) and returns their bytes. Works
/// the same on native (polls the device) and on the web (the browser drives the mapping).
/// An invalid buffer (a lost device's) is an error, not a panic in wgpu's default handler.
pub async fn read_staging(device: &wgpu::Device, staging: &[wgpu::Buffer]) -> Result<Vec<Vec<u8>>> {
    #[cfg(not(target_arch = "wasm32"))]
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let mut receivers = Vec::new();
    for b in staging {
        let (tx, rx) = futures_channel::oneshot::channel();
        b.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        receivers.push(rx);
    }
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(e) = scope.pop().await {
        return Err(NsaError::Readback(e.to_string()));
    }
    #[cfg(not(target_arch = "wasm32"))]
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| NsaError::Readback(e.to_string()))?;
    #[cfg(target_arch = "wasm32")]
    let _ = device;
    let mut out = Vec::new();
    for (b, rx) in staging.iter().zip(receivers) {
        rx.await
            .map_err(|_| NsaError::Readback("the mapping callback was dropped".into()))?
            .map_err(|e| NsaError::Readback(e.to_string()))?;
        let view = b
            .slice(..)
            .get_mapped_range()
            .map_err(|e| NsaError::Readback(e.to_string()))?;
        out.push(view.to_vec());
        drop(view);
        b.unmap();
    }
    Ok(out)
}
