//! [`NsaCache`]: GPU-resident keys, values and compressed tokens for decode, chunked prefill
//! and variable-length batches.
//!
//! Appending tokens writes their keys and values into the cache and compresses only the
//! compressed tokens the new tokens complete; earlier ones are never recomputed. The rows of
//! the new tokens are then computed against the whole cached context, for every sequence of
//! the call in one submission.

use crate::config::{Compression, NsaConfig, Precision, Shape};
use crate::error::{NsaError, Result};
use crate::inputs::{
    check_tensor, stored_bytes, BranchOutputs, LinearWeights, NsaOutputs, OutputRequest, Stored,
};
use crate::kernels::{KernelId, Params};
use crate::pipeline::{
    buffer_init, read_staging, reusable, stage_readback_ranges, GpuBuffers, NsaPipeline,
};
use crate::plan::{binding_unit, CacheRows, Plan, Tensor, RAGGED_MAX};
use crate::profile::StepTimer;
use crate::split::{self, PartInputs, Planned};

/// The sizes of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOptions {
    /// Sequences held (each grows independently).
    pub seqs: usize,
    /// Query heads of the calls (`Hq = G * Hkv`).
    pub hq: usize,
    /// Key/value heads.
    pub hkv: usize,
    /// Key head dimension.
    pub dk: usize,
    /// Value head dimension.
    pub dv: usize,
    /// Key rows reserved per sequence at creation.
    pub capacity: usize,
    /// The hard limit on rows per sequence; appending beyond it is an error. Growth beyond
    /// the adapter's binding or buffer limits is also an error.
    pub max_capacity: usize,
    /// Whether each branch has its own keys/values (`k_cmp … v_win`).
    pub independent_kv: bool,
    /// How the cached keys, values, compressed tokens and the calls' queries are stored.
    /// [`Precision::F16`] (needs the adapter's `shader-f16`) halves the cache's memory and
    /// the bytes a decode step reads, and runs attention on tensor cores where the pipeline
    /// has them ([`NsaPipeline::tensor_cores`]); `Hkv * Dk` and `Hkv * Dv` must then be even
    /// (rows are written in 4-byte words). Arithmetic stays f32 either way.
    pub precision: Precision,
}

/// Keys and values of the sequences, as the kernels need them, on the GPU.
#[derive(Debug)]
pub struct NsaCache {
    config: NsaConfig,
    opts: CacheOptions,
    capacity: usize,
    lens: Vec<usize>,
    /// `[k, v]`, or `[k_cmp, v_cmp, k_slc, v_slc, k_win, v_win]` with independent K/V; each
    /// `[S, capacity, Hkv, D]`.
    raw: Vec<wgpu::Buffer>,
    /// Compressed keys and values, `[S, C(capacity), Hkv, D]`.
    compressed: [wgpu::Buffer; 2],
    linear: Option<[wgpu::Buffer; 4]>,
    compressed_tokens: u64,
    /// What the last `extend` call's plans that compute rows leave to the next call's, in
    /// order (a decode loop then allocates nothing per step).
    rows_kept: Vec<RowsKept>,
    /// The scratches of the last call's compression-only plans, in order, for the next
    /// call's to refit.
    compress_kept: Vec<Option<crate::NsaScratch>>,
    /// Where `extend` uploads its new keys and values (replaced when too small), and the
    /// append kernel's staging buffer.
    upload: Option<wgpu::Buffer>,
    /// The append kernel's bind groups on `upload` and `raw` (remade when either changes).
    append: Option<AppendBinding>,
    /// The context (device) every buffer above lives on: calls through a pipeline of another
    /// context are errors (wgpu-core panics on another instance's resources).
    context: crate::GpuContext,
}

/// The append kernel's bindings for a cache (`shaders/append.wgsl`): the staging and raw
/// buffers they were made on, and one bind group per pair of raw buffers (keys, values),
/// whose `Params` name where the two tensors' entries of the staging table start.
#[derive(Debug)]
struct AppendBinding {
    staging: wgpu::Buffer,
    raw: Vec<wgpu::Buffer>,
    groups: Vec<wgpu::BindGroup>,
}

/// What a cache keeps of one plan that computes rows, for the plan in the same place of its
/// next `extend` call.
#[derive(Debug, Default)]
struct RowsKept {
    /// The buffers of the plan's queries, gates and outputs (see `fit_io` for when they are
    /// replaced).
    io: Option<[wgpu::Buffer; 3]>,
    /// Its readback buffers (`stage_readback_ranges` reuses those of equal size).
    readback: Vec<wgpu::Buffer>,
    /// Its scratch, which the next plan refits (`NsaPipeline::refit_scratch`): a decode step
    /// then allocates no intermediate buffers and mostly reuses its bind groups.
    scratch: Option<crate::NsaScratch>,
}

/// One plan of an `extend` call.
struct Job {
    /// Which of the call's chunks (consecutive sequences).
    seqs: std::ops::Range<usize>,
    /// Which of each of their new tokens (all, unless one sequence's rows are planned in
    /// pieces).
    tokens: std::ops::Range<usize>,
    /// Whether it computes their rows (else only compresses their new tokens).
    rows_out: bool,
    /// Whether their lengths differ ([`Plan::cached_ragged`]).
    ragged: bool,
}

/// What an extend call records per plan: its readback buffers (for a step from GPU buffers,
/// those it took over, unused), its scratch, how many sequences it computes rows for (0:
/// compression only), and whether they are later rows of the previous plan's one sequence.
type Recorded = (Vec<wgpu::Buffer>, crate::NsaScratch, usize, bool);

/// One extend call as `record_extend` takes it: sequence `seqs[i]` appends `sizes[i]`
/// tokens from `feed`, whose rows are computed with `attend` (`request` says which outputs).
struct Call<'c> {
    seqs: &'c [usize],
    sizes: &'c [usize],
    feed: &'c Feed<'c, 'c>,
    request: OutputRequest,
    attend: bool,
}

/// Where an extend call's new tokens come from and where its rows go.
enum Feed<'f, 'a> {
    /// The caller's slices as stored (converted and checked): keys and values per chunk and
    /// raw buffer, queries and gates per chunk. Written through the queue, rows read back.
    Host {
        kv: Vec<Vec<Stored<'a>>>,
        q: Vec<Stored<'a>>,
        gates: Vec<&'a [f32]>,
    },
    /// The caller's buffers, copied in its encoder; rows copied into its `out`.
    Device(&'f DeviceStep<'a>),
}

/// New tokens of consecutive sequences in the caller's GPU buffers, for
/// [`NsaPipeline::encode_extend`]: `tokens` rows for each of the cache's sequences
/// `first_seq .. first_seq + seqs`, each tensor laid out as SPEC's with `B = seqs` and
/// `T = tokens`. `q`, `k`, `v` and `branch_kv` hold the cache's [`CacheOptions::precision`]
/// (f32, or IEEE half floats for f16), `gates` and `out` f32.
///
/// Each tensor is a [`wgpu::BufferSlice`] (`buffer.slice(..)` for a whole buffer): the
/// tensor starts at the slice's offset, which must be a multiple of 4
/// ([`wgpu::COPY_BUFFER_ALIGNMENT`]), and the slice may be longer than the tensor, so that
/// several tensors can share one buffer. Inputs need `COPY_SRC` usage, `out` `COPY_DST`.
#[derive(Debug, Clone, Copy)]
pub struct DeviceStep<'a> {
    /// The first sequence of the cache the step extends.
    pub first_seq: usize,
    /// How many consecutive sequences it extends.
    pub seqs: usize,
    /// New tokens per sequence (1: a decode step).
    pub tokens: usize,
    /// `q`: `[seqs, tokens, Hq, Dk]`.
    pub q: wgpu::BufferSlice<'a>,
    /// `k`: `[seqs, tokens, Hkv, Dk]` (ignored with independent K/V).
    pub k: wgpu::BufferSlice<'a>,
    /// `v`: `[seqs, tokens, Hkv, Dv]` (ignored with independent K/V).
    pub v: wgpu::BufferSlice<'a>,
    /// `gates`: `[seqs, tokens, Hq, 3]`.
    pub gates: wgpu::BufferSlice<'a>,
    /// `out`: `[seqs, tokens, Hq, Dv]`, written.
    pub out: wgpu::BufferSlice<'a>,
    /// With independent K/V: `k_cmp, v_cmp, k_slc, v_slc, k_win, v_win`, each
    /// `[seqs, tokens, Hkv, D]`.
    pub branch_kv: Option<[wgpu::BufferSlice<'a>; 6]>,
    /// Where wanted, the selected blocks, written as `extend` returns them: `[seqs, tokens,
    /// Hkv, n]` i32 (`COPY_DST` usage).
    pub block_indices: Option<wgpu::BufferSlice<'a>>,
    /// Where wanted, the branch outputs `o_cmp, o_slc, o_win`, each laid out as `out`
    /// (`COPY_DST` usage). The step then plans with [`crate::Plan::with_branch_outputs`],
    /// whose kernels also store them, as `extend` does when asked for them.
    pub branches: Option<[wgpu::BufferSlice<'a>; 3]>,
}

impl DeviceStep<'_> {
    /// Bytes of one sequence's rows of `q`, `gates` and `out` in a cache of `opts`.
    /// (Saturating, as the step's other sizes: a count past u64 is a slice too short.)
    fn seq_bytes(&self, opts: &CacheOptions) -> [u64; 3] {
        let rows = (self.tokens as u64).saturating_mul(opts.hq as u64);
        [
            rows.saturating_mul(opts.dk as u64 * opts.precision.bytes()),
            rows.saturating_mul(3 * 4),
            rows.saturating_mul(opts.dv as u64 * 4),
        ]
    }

    /// The key/value slices in the order of the cache's raw buffers.
    fn key_value_buffers(&self) -> Vec<wgpu::BufferSlice<'_>> {
        kv_order([self.k, self.v], self.branch_kv)
    }

    /// Bytes of one sequence's rows of `block_indices` with `n` selected blocks per row.
    fn idx_seq_bytes(&self, opts: &CacheOptions, n: usize) -> u64 {
        (self.tokens as u64)
            .saturating_mul(opts.hkv as u64)
            .saturating_mul(n as u64 * 4)
    }

    /// Checks the step against a cache of `opts` (selecting `top_n` blocks per row): its
    /// sequences, and each slice's size, offset and usage.
    fn check(&self, opts: &CacheOptions, top_n: usize) -> Result<()> {
        let end = self.first_seq.saturating_add(self.seqs);
        if self.seqs == 0 || end > opts.seqs {
            return Err(NsaError::InvalidShape {
                what: "first_seq + seqs",
                value: end,
                rule: "at least one sequence, all < the cache's seqs",
            });
        }
        if self.tokens == 0 {
            return Err(NsaError::InvalidShape {
                what: "tokens",
                value: 0,
                rule: "at least one new token per sequence",
            });
        }
        // (More than a sequence may ever hold fails here, before any size is computed.)
        if self.tokens > opts.max_capacity {
            return Err(NsaError::ExceedsLimit {
                what: "NsaCache max_capacity (rows per sequence)",
                needed: self.tokens as u64,
                limit: opts.max_capacity as u64,
            });
        }
        check_kv_mode(opts, self.branch_kv.is_some())?;
        let n = (self.seqs as u64).saturating_mul(self.tokens as u64);
        let per = self.seq_bytes(opts);
        let all = |per: u64| per.saturating_mul(self.seqs as u64);
        let mut wanted = vec![
            ("q", self.q, all(per[0]), wgpu::BufferUsages::COPY_SRC),
            (
                "gates",
                self.gates,
                all(per[1]),
                wgpu::BufferUsages::COPY_SRC,
            ),
            ("out", self.out, all(per[2]), wgpu::BufferUsages::COPY_DST),
        ];
        if let Some(idx) = self.block_indices {
            let need = all(self.idx_seq_bytes(opts, top_n));
            wanted.push(("block_indices", idx, need, wgpu::BufferUsages::COPY_DST));
        }
        for (name, b) in ["o_cmp", "o_slc", "o_win"]
            .into_iter()
            .zip(self.branches.iter().flatten())
        {
            wanted.push((name, *b, all(per[2]), wgpu::BufferUsages::COPY_DST));
        }
        for ((name, buf), d) in kv_names(opts)
            .iter()
            .zip(self.key_value_buffers())
            .zip(raw_dims(opts))
        {
            wanted.push((
                name,
                buf,
                n.saturating_mul(row_bytes(opts, d)),
                wgpu::BufferUsages::COPY_SRC,
            ));
        }
        for (tensor, slice, need, usage) in wanted {
            let bad = |problem| Err(NsaError::BadBuffer { tensor, problem });
            if slice.size() < need {
                return bad(format!(
                    "holds {} bytes, the step needs {need}",
                    slice.size()
                ));
            }
            if slice.offset() % wgpu::COPY_BUFFER_ALIGNMENT != 0 {
                return bad(format!(
                    "starts at byte {}, not a multiple of {} (COPY_BUFFER_ALIGNMENT)",
                    slice.offset(),
                    wgpu::COPY_BUFFER_ALIGNMENT
                ));
            }
            let has = slice.buffer().usage();
            if !has.contains(usage) {
                return bad(format!("usage {has:?} lacks {usage:?}"));
            }
        }
        Ok(())
    }
}

/// The most readback bytes of one plan a cache keeps between calls, and the largest scratch
/// (all its buffers, in bytes) it keeps in a place that the next call does not use: a decode
/// step's, even at B=16 and 64k (its kept scores and partials take tens of MB), but not a
/// long chunk's, whose kept scores take up to the plan's budget. A larger scratch stays
/// only while calls take its place, until one whose plan needs less than a quarter of it
/// (the refit lets it go): a Dk = 192 prefill at 64k in calls of 4096 tokens that made its
/// 2 GiB of kept scores anew per call took 354-458 ms on an H200 instead of 253 (the
/// one-shot prefill's 256; BENCHMARKS.md, forty-fifth session).
const KEEP_SCRATCH_BYTES: u64 = 256 << 20;

/// The most bytes of new keys and values an `extend` call uploads in one piece (see
/// `record_extend`): a decode step of 16 sequences at Hkv = 4, D = 128 in f16 takes 32 KB.
const UPLOAD_MAX: u64 = 4 << 20;

/// Sequences a call appends to at least for the append kernel, which takes a dispatch per
/// pair of cached tensors (and, from GPU buffers, a copy of the table and one per tensor),
/// instead of a copy per sequence and tensor, which wgpu orders by a barrier each (the same
/// written usage of one buffer twice). On an H200 (f16 cache at 64k, BENCHMARKS.md,
/// thirty-first session), 32 such copies took a 16-sequence decode step from GPU buffers
/// to 0.38 ms against 0.29 without them; the kernel made it 0.32-0.34 ms, 8 sequences
/// 0.26 against 0.275, and left 4 within the noise (0.22-0.25 either way).
const APPEND_MIN_SEQS: usize = 3;

/// Usages of the kept query, gate and output buffers.
const IO_USAGES: [wgpu::BufferUsages; 3] = [
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST),
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST),
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_SRC),
];

/// New tokens of one sequence: `n` rows of each tensor, in SPEC's layouts without `B`.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// Which sequence of the cache.
    pub seq: usize,
    /// `q`: `[n, Hq, Dk]`.
    pub q: &'a [f32],
    /// `k`: `[n, Hkv, Dk]` (ignored with independent K/V).
    pub k: &'a [f32],
    /// `v`: `[n, Hkv, Dv]` (ignored with independent K/V).
    pub v: &'a [f32],
    /// `gates`: `[n, Hq, 3]`.
    pub gates: &'a [f32],
    /// With independent K/V: `k_cmp, v_cmp, k_slc, v_slc, k_win, v_win`, each `[n, Hkv, D]`.
    pub branch_kv: Option<[&'a [f32]; 6]>,
}

impl<'a> SeqChunk<'a> {
    /// Rows of sequence `seq` to append and compute (`extend`), with keys and values shared
    /// by the branches.
    pub fn new(seq: usize, q: &'a [f32], k: &'a [f32], v: &'a [f32], gates: &'a [f32]) -> Self {
        SeqChunk {
            seq,
            q,
            k,
            v,
            gates,
            branch_kv: None,
        }
    }

    /// Keys and values of sequence `seq` to append without computing rows (`append`).
    pub fn keys_values(seq: usize, k: &'a [f32], v: &'a [f32]) -> Self {
        Self::new(seq, &[], k, v, &[])
    }

    /// Rows of sequence `seq` from `rows` (a sequence's or chunk's rows of prefill-shaped
    /// inputs, [`crate::NsaInputs::token_rows`]), with every branch's keys and values where
    /// `independent` (a cache made with `independent_kv`; a branch without its own takes
    /// `k`, `v`), else the shared ones.
    pub fn from_rows(seq: usize, rows: &crate::NsaInputs<'a>, independent: bool) -> Self {
        let (kc, vc) = rows.cmp_kv();
        let (ks, vs) = rows.slc_kv();
        let (kw, vw) = rows.win_kv();
        SeqChunk {
            branch_kv: independent.then_some([kc, vc, ks, vs, kw, vw]),
            ..Self::new(seq, rows.q, rows.k, rows.v, rows.gates)
        }
    }
}

/// Bytes of one cached row (all heads) of a tensor whose heads hold `d` values.
fn row_bytes(opts: &CacheOptions, d: usize) -> u64 {
    (opts.hkv * d) as u64 * opts.precision.bytes()
}

/// The names of the cache's raw key/value tensors, in the order of `raw_dims`.
fn kv_names(opts: &CacheOptions) -> &'static [&'static str] {
    if opts.independent_kv {
        &["k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win"]
    } else {
        &["k", "v"]
    }
}

/// New keys and values in the order of `raw_dims`: the per-branch ones where a call has
/// them, else the shared pair (`check_kv_mode` says whether that matches the cache).
fn kv_order<T: Copy>(shared: [T; 2], branch: Option<[T; 6]>) -> Vec<T> {
    branch.map_or(shared.to_vec(), |b| b.to_vec())
}

/// An error unless a call brings per-branch keys/values (`branch`) exactly where the cache
/// holds them.
fn check_kv_mode(opts: &CacheOptions, branch: bool) -> Result<()> {
    match (opts.independent_kv, branch) {
        (true, false) => Err(NsaError::MissingInput {
            tensor: "k_cmp",
            why: "the cache holds independent keys/values per branch",
        }),
        (false, true) => Err(NsaError::InvalidShape {
            what: "branch_kv",
            value: 6,
            rule: "the cache was created without independent keys/values",
        }),
        _ => Ok(()),
    }
}

fn raw_dims(opts: &CacheOptions) -> Vec<usize> {
    let n = if opts.independent_kv { 3 } else { 1 };
    (0..2 * n)
        .map(|i| if i % 2 == 0 { opts.dk } else { opts.dv })
        .collect()
}

impl NsaCache {
    /// An empty cache on `pipe`'s device. `linear` is required by `Compression::Linear`.
    /// The cache belongs to `pipe`'s [`crate::GpuContext`]: pipelines made from it or its
    /// clones run it, while a pipeline of another context (even one made by
    /// `GpuContext::from_device` on the same device) is a [`NsaError::BadBuffer`] naming the
    /// cache, as wgpu cannot tell another instance's device apart by its handle.
    pub fn new(
        pipe: &NsaPipeline,
        config: &NsaConfig,
        opts: CacheOptions,
        linear: Option<LinearWeights>,
    ) -> Result<Self> {
        pipe.context().check_alive()?;
        config.validate()?;
        let shape = Shape::prefill(opts.seqs, 1, opts.hq, opts.hkv, opts.dk, opts.dv);
        shape.validate()?;
        // Linear's weights are uploaded whole here, and bound whole by the compression.
        crate::plan::check_linear_weights(config, &shape, &pipe.limits())?;
        if opts.capacity == 0 || opts.capacity > opts.max_capacity {
            return Err(NsaError::InvalidShape {
                what: "capacity",
                value: opts.capacity,
                rule: "1 <= capacity <= max_capacity",
            });
        }
        pipe.require(opts.precision)?;
        if opts.precision == Precision::F16 {
            for (what, width) in [
                ("hkv * dk", opts.hkv * opts.dk),
                ("hkv * dv", opts.hkv * opts.dv),
            ] {
                if width % 2 == 1 {
                    return Err(NsaError::InvalidShape {
                        what,
                        value: width,
                        rule: "even in an f16 cache (its rows are written in 4-byte words)",
                    });
                }
            }
        }
        let device = &pipe.context().device;
        let linear = match (config.compression, linear) {
            (Compression::Linear, None) => {
                return Err(NsaError::MissingInput {
                    tensor: "w_k",
                    why: "Compression::Linear needs w_k, pe_k, w_v, pe_v",
                })
            }
            (Compression::Linear, Some(w)) => {
                let (h, l, dk, dv) = (opts.hkv, config.cmp_block, opts.dk, opts.dv);
                check_tensor("w_k", w.w_k, &[h, l, dk, dk])?;
                check_tensor("pe_k", w.pe_k, &[h, l, dk])?;
                check_tensor("w_v", w.w_v, &[h, l, dv, dv])?;
                check_tensor("pe_v", w.pe_v, &[h, l, dv])?;
                let up = |d: &[f32]| {
                    let usage = wgpu::BufferUsages::STORAGE;
                    buffer_init(device, "nsa.cache.linear", usage, bytemuck::cast_slice(d))
                };
                Some([up(w.w_k), up(w.pe_k), up(w.w_v), up(w.pe_v)])
            }
            (Compression::Mean, _) => None,
        };
        let (raw, compressed) = Self::allocate(pipe, config, &opts, opts.capacity)?;
        Ok(Self {
            config: *config,
            opts,
            capacity: opts.capacity,
            lens: vec![0; opts.seqs],
            raw,
            compressed,
            linear,
            compressed_tokens: 0,
            rows_kept: Vec::new(),
            compress_kept: Vec::new(),
            upload: None,
            append: None,
            context: pipe.context().clone(),
        })
    }

    /// [`NsaError::BadBuffer`] naming the cache where `pipe` runs on another context than
    /// the one the cache was made with, or a clone of it ([`crate::GpuContext::same_context`];
    /// checked before anything changes).
    fn check_context(&self, pipe: &NsaPipeline) -> Result<()> {
        if self.context.same_context(pipe.context()) {
            return Ok(());
        }
        Err(NsaError::BadBuffer {
            tensor: "cache",
            problem: format!(
                "made on another device (GpuContext) than the pipeline's ({}): use a pipeline made from the cache's context or a clone of it",
                pipe.context().describe()
            ),
        })
    }

    fn allocate(
        pipe: &NsaPipeline,
        config: &NsaConfig,
        opts: &CacheOptions,
        capacity: usize,
    ) -> Result<(Vec<wgpu::Buffer>, [wgpu::Buffer; 2])> {
        let device = &pipe.context().device;
        let make = |size: u64| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("nsa.cache"),
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        };
        let mut sizes = Self::buffer_sizes(&pipe.limits(), config, opts, capacity)?;
        let compressed = sizes.split_off(sizes.len() - 2);
        let raw = sizes.into_iter().map(make).collect();
        let compressed = [make(compressed[0]), make(compressed[1])];
        // A buffer the device could not make (on a device this crate made).
        pipe.context().check_escaped()?;
        Ok((raw, compressed))
    }

    /// The bytes of each buffer of a cache of `opts` holding `capacity` tokens per sequence
    /// (the keys and values, then the compressed keys and values), or which limit of a device
    /// with `limits` it would exceed: one sequence's rows must fit a binding, all of them a
    /// buffer.
    fn buffer_sizes(
        limits: &crate::DeviceLimits,
        config: &NsaConfig,
        opts: &CacheOptions,
        capacity: usize,
    ) -> Result<Vec<u64>> {
        let cap_c = config.num_compressed(capacity).max(1);
        let size = |rows: usize, d: usize| -> Result<u64> {
            // (Saturating: a capacity of usize::MAX is an error here, not an overflow.)
            let per_seq = (rows as u64).saturating_mul(row_bytes(opts, d));
            let needed = per_seq.saturating_add(limits.storage_align);
            if needed > limits.max_storage_binding {
                return Err(NsaError::ExceedsLimit {
                    what: "max_storage_buffer_binding_size (one cached sequence)",
                    needed,
                    limit: limits.max_storage_binding,
                });
            }
            // Whole binding units: the last sequence's windows end at most there.
            let unit = binding_unit(opts.precision.bytes());
            let size = (per_seq.saturating_mul(opts.seqs as u64))
                .checked_next_multiple_of(unit)
                .unwrap_or(u64::MAX);
            if size > limits.max_buffer {
                return Err(NsaError::ExceedsLimit {
                    what: "max_buffer_size (cache)",
                    needed: size,
                    limit: limits.max_buffer,
                });
            }
            Ok(size)
        };
        let raw = raw_dims(opts).into_iter().map(|d| size(capacity, d));
        raw.chain([size(cap_c, opts.dk), size(cap_c, opts.dv)])
            .collect()
    }

    /// The NSA configuration the cache was made for.
    pub fn config(&self) -> &NsaConfig {
        &self.config
    }

    /// Tokens held per sequence.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// The cached keys and values, `[seqs, capacity, Hkv, D]` each, stored at the cache's
    /// precision: `[k, v]`, or with independent K/V `[k_cmp, v_cmp, k_slc, v_slc, k_win,
    /// v_win]`. Rows at and past a sequence's length are unspecified.
    pub fn key_value_buffers(&self) -> &[wgpu::Buffer] {
        &self.raw
    }

    /// Whether the cache holds each branch's own keys and values
    /// ([`CacheOptions::independent_kv`]): calls must then bring them, else must not.
    pub fn independent_kv(&self) -> bool {
        self.opts.independent_kv
    }

    /// Key rows reserved per sequence now.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Compressed tokens computed so far, over all sequences. Each is computed exactly once
    /// per time its block completes, so without [`Self::truncate`] this equals the sum of
    /// `C(len)` over the sequences; blocks that tokens appended after a truncation complete
    /// again are computed again.
    pub fn compressed_tokens(&self) -> u64 {
        self.compressed_tokens
    }

    /// Rolls sequence `seq` back to its first `len` tokens (at most its length): what a
    /// server does when a speculative draft is rejected, or, with `len = 0`
    /// ([`Self::reset`]), when the sequence's slot is to take a new request. The next call
    /// appends at `len`, and its rows equal those of a cache that never held the dropped
    /// tokens: the compressed tokens of blocks that end at or before `len` are kept (they
    /// depend on no later key), and the blocks the next tokens complete are compressed
    /// again. No GPU work; capacity and kept buffers stay. Like any other call on the
    /// cache, it must follow the submission of steps recorded by
    /// [`NsaPipeline::encode_extend`] (they would otherwise write after the next call).
    /// An error, changing nothing, for a sequence past the cache's or a `len` past the
    /// sequence's length.
    pub fn truncate(&mut self, seq: usize, len: usize) -> Result<()> {
        if seq >= self.opts.seqs {
            return Err(NsaError::InvalidShape {
                what: "seq",
                value: seq,
                rule: "a sequence < the cache's seqs",
            });
        }
        if len > self.lens[seq] {
            return Err(NsaError::InvalidShape {
                what: "len",
                value: len,
                rule: "at most the sequence's length (truncate never lengthens it)",
            });
        }
        self.lens[seq] = len;
        Ok(())
    }

    /// Empties sequence `seq` ([`Self::truncate`] to 0), so that its slot can take a new
    /// sequence.
    pub fn reset(&mut self, seq: usize) -> Result<()> {
        self.truncate(seq, 0)
    }

    /// Bytes of the GPU buffers the cache keeps between `extend` calls besides its keys and
    /// values: the last call's query, gate and output buffers, readback buffers (none of more
    /// than 256 MiB) and scratches (a long chunk's kept scores too, until a call needs less
    /// than a quarter of them), and the upload buffer of new keys and values (at most 4 MiB),
    /// which the next call reuses where they fit. [`Self::reserve`] lets the scratches go,
    /// [`Self::release_buffers`] all of them.
    pub fn kept_bytes(&self) -> u64 {
        let scratch = |s: &Option<crate::NsaScratch>| s.as_ref().map_or(0, |s| s.bytes());
        let rows: u64 = self
            .rows_kept
            .iter()
            .map(|k| {
                let buffers = k.io.iter().flatten().chain(&k.readback);
                buffers.map(|b| b.size()).sum::<u64>() + scratch(&k.scratch)
            })
            .sum();
        let upload = self.upload.as_ref().map_or(0, |b| b.size());
        rows + self.compress_kept.iter().map(scratch).sum::<u64>() + upload
    }

    /// Counts the appended tokens: sequence `seqs[i]` grew by `sizes[i]`.
    fn advance(&mut self, seqs: &[usize], sizes: &[usize]) {
        for (s, n) in seqs.iter().zip(sizes) {
            let len = self.lens[*s];
            self.compressed_tokens +=
                (self.config.num_compressed(len + n) - self.config.num_compressed(len)) as u64;
            self.lens[*s] = len + n;
        }
    }

    /// Keeps the scratches and readback buffers of an extend call's plans for the next call,
    /// in the order they were taken (a long chunk's readback excepted), and lets go of the
    /// large scratches of the places this call did not take (see `KEEP_SCRATCH_BYTES`).
    fn keep(&mut self, kept: Vec<Recorded>) {
        let mut nth = [0usize; 2];
        for (staging, scratch, nb, _) in kept {
            if nb > 0 {
                // Its place exists: the plan took its I/O buffers there.
                let slot = &mut self.rows_kept[nth[1]];
                let bytes: u64 = staging.iter().map(|b| b.size()).sum();
                if bytes <= KEEP_SCRATCH_BYTES {
                    slot.readback = staging;
                }
                slot.scratch = Some(scratch);
                nth[1] += 1;
            } else {
                let pool = &mut self.compress_kept;
                if pool.len() <= nth[0] {
                    pool.resize_with(nth[0] + 1, || None);
                }
                pool[nth[0]] = Some(scratch);
                nth[0] += 1;
            }
        }
        let untaken = self
            .rows_kept
            .iter_mut()
            .skip(nth[1])
            .map(|k| &mut k.scratch);
        for scratch in untaken.chain(self.compress_kept.iter_mut().skip(nth[0])) {
            if scratch
                .as_ref()
                .is_some_and(|s| s.bytes() > KEEP_SCRATCH_BYTES)
            {
                *scratch = None;
            }
        }
    }

    /// Lets go of every buffer the cache keeps between calls besides its keys and values
    /// ([`Self::kept_bytes`] is 0 after it): after a long prefill whose scratch (up to the
    /// pipeline's kept-score budget, [`NsaPipeline::set_kept_scores`]) should not wait for
    /// the next call. The next call allocates what it needs anew.
    pub fn release_buffers(&mut self) {
        self.rows_kept.clear();
        self.compress_kept.clear();
        self.upload = None;
        self.append = None;
    }

    /// Grows every sequence's reservation to at least `rows` (up to `max_capacity`), copying
    /// what is cached.
    pub fn reserve(&mut self, pipe: &NsaPipeline, rows: usize) -> Result<()> {
        self.reserve_in(pipe, rows, None)
    }

    /// [`Self::reserve`]; with `encoder`, the copies are recorded there instead of submitted
    /// at once, so that they follow what that encoder already wrote into the cache (steps
    /// recorded by `encode_extend` and not yet submitted).
    fn reserve_in(
        &mut self,
        pipe: &NsaPipeline,
        rows: usize,
        encoder: Option<&mut wgpu::CommandEncoder>,
    ) -> Result<()> {
        pipe.context().check_alive()?;
        self.check_context(pipe)?;
        if rows <= self.capacity {
            return Ok(());
        }
        if rows > self.opts.max_capacity {
            return Err(NsaError::ExceedsLimit {
                what: "NsaCache max_capacity (rows per sequence)",
                needed: rows as u64,
                limit: self.opts.max_capacity as u64,
            });
        }
        let new_cap = rows
            .max(self.capacity.saturating_mul(2))
            .min(self.opts.max_capacity);
        let (raw, compressed) = Self::allocate(pipe, &self.config, &self.opts, new_cap)?;
        let ctx = pipe.context();
        let mut own = None;
        let enc = match encoder {
            Some(e) => e,
            None => own.insert(ctx.device.create_command_encoder(
                &wgpu::CommandEncoderDescriptor {
                    label: Some("nsa.cache.grow"),
                },
            )),
        };
        for (seq, &len) in self.lens.iter().enumerate() {
            let to = Slot {
                raw: &raw,
                compressed: &compressed,
                capacity: new_cap,
                seq,
            };
            self.each_piece(self.slot(seq), to, len, |a, at, b, bt, n| {
                enc.copy_buffer_to_buffer(a, at, b, bt, n)
            });
        }
        if let Some(own) = own {
            ctx.queue.submit([own.finish()]);
        }
        self.raw = raw;
        self.compressed = compressed;
        self.capacity = new_cap;
        // The kept scratches' bind groups hold the old buffers alive: let both go.
        self.compress_kept.clear();
        for kept in &mut self.rows_kept {
            kept.scratch = None;
        }
        Ok(())
    }
}

/// Where one sequence's rows live: buffers shaped as the cache's (`raw`, `compressed`) with
/// `capacity` key rows per sequence, and the sequence.
struct Slot<'b> {
    raw: &'b [wgpu::Buffer],
    compressed: &'b [wgpu::Buffer; 2],
    capacity: usize,
    seq: usize,
}

impl NsaCache {
    /// Sequence `seq` in the cache's own buffers.
    fn slot(&self, seq: usize) -> Slot<'_> {
        Slot {
            raw: &self.raw,
            compressed: &self.compressed,
            capacity: self.capacity,
            seq,
        }
    }

    /// Calls `copy(src, src_offset, dst, dst_offset, bytes)` for each piece of a sequence's
    /// first `len` key/value rows (every raw tensor) and its `C(len)` compressed rows, from
    /// `from` to `to` (each sequence's rows of a tensor are contiguous); empty pieces are
    /// left out.
    fn each_piece<'b>(
        &self,
        from: Slot<'b>,
        to: Slot<'b>,
        len: usize,
        mut copy: impl FnMut(&'b wgpu::Buffer, u64, &'b wgpu::Buffer, u64, u64),
    ) {
        // Per tensor: its buffers, rows per sequence in each, the rows to copy, the width.
        let cmp_cap = |cap: usize| self.config.num_compressed(cap).max(1);
        let raw = (from.raw.iter().zip(to.raw).zip(raw_dims(&self.opts)))
            .map(|(bufs, d)| (bufs, (from.capacity, to.capacity), len, d));
        let caps = (cmp_cap(from.capacity), cmp_cap(to.capacity));
        let nc = self.config.num_compressed(len);
        let cmp = (from
            .compressed
            .iter()
            .zip(to.compressed)
            .zip([self.opts.dk, self.opts.dv]))
        .map(|(bufs, d)| (bufs, caps, nc, d));
        for ((src, dst), (per_from, per_to), rows, d) in raw.chain(cmp) {
            let row = row_bytes(&self.opts, d);
            if rows > 0 {
                copy(
                    src,
                    (from.seq * per_from) as u64 * row,
                    dst,
                    (to.seq * per_to) as u64 * row,
                    rows as u64 * row,
                );
            }
        }
    }

    /// Makes sequence `dst` a copy of sequence `src`: its keys, values and compressed tokens,
    /// copied on the GPU (submitted at once on `pipe`'s queue), so that several
    /// continuations share a prompt appended once (parallel sampling, beam search, a shared
    /// system prompt). `dst`'s own tokens are dropped. Nothing is compressed again, and the
    /// two sequences go on independently. Like any other call on the cache, it must follow
    /// the submission of steps recorded by [`NsaPipeline::encode_extend`]. An error, changing
    /// nothing, for a sequence past the cache's or `dst == src`.
    pub fn copy_sequence(&mut self, pipe: &NsaPipeline, src: usize, dst: usize) -> Result<()> {
        let ctx = pipe.context();
        ctx.check_alive()?;
        self.check_context(pipe)?;
        for (what, seq) in [("src", src), ("dst", dst)] {
            if seq >= self.opts.seqs {
                return Err(NsaError::InvalidShape {
                    what,
                    value: seq,
                    rule: "a sequence < the cache's seqs",
                });
            }
        }
        if dst == src {
            return Err(NsaError::InvalidShape {
                what: "dst",
                value: dst,
                rule: "a sequence other than src",
            });
        }
        let len = self.lens[src];
        // wgpu copies between two buffers only: each piece through a temporary one (each no
        // larger than one sequence's rows of one tensor, which fit one binding).
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("nsa.cache.copy"),
            });
        self.each_piece(self.slot(src), self.slot(dst), len, |a, at, b, bt, n| {
            let temp = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("nsa.cache.copy"),
                size: n,
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.copy_buffer_to_buffer(a, at, &temp, 0, n);
            enc.copy_buffer_to_buffer(&temp, 0, b, bt, n);
        });
        // A temporary buffer the device could not make: nothing is submitted.
        ctx.check_escaped()?;
        ctx.queue.submit([enc.finish()]);
        self.lens[dst] = len;
        Ok(())
    }
}

impl NsaPipeline {
    /// Appends each chunk's tokens to its sequence in `cache` and computes their rows
    /// (`n = 1` is a decode step, larger `n` chunked prefill), for all chunks in one
    /// submission. Returns one result per chunk, each shaped `[1, n, ...]`. Consecutive
    /// chunks of equal length share a plan; where a plan would pass a limit of the device
    /// (their queries, rows or scratch past a buffer), it takes halves of them, and one
    /// chunk's rows in pieces (each compressing the blocks its tokens complete), in the same
    /// submission.
    pub async fn extend(
        &self,
        cache: &mut NsaCache,
        chunks: &[SeqChunk<'_>],
        request: OutputRequest,
    ) -> Result<Vec<NsaOutputs>> {
        Ok(self
            .extend_with(cache, chunks, request, true, None)
            .await?
            .0)
    }

    /// [`Self::extend`], timing every pass with `timer`, which must hold a slot per pass: a
    /// plan's steps, 10 at most per chunk of one chain (a decode step, or a chunk whose kept
    /// scores fit one chain), more where a long chunk's plan runs in several chains
    /// ([`crate::Plan::chains`]); too few is [`NsaError::BadBuffer`] naming the timestamps,
    /// before anything changes. Also returns each pass's kernel and GPU time in
    /// milliseconds, in order.
    pub async fn extend_timed(
        &self,
        cache: &mut NsaCache,
        chunks: &[SeqChunk<'_>],
        request: OutputRequest,
        timer: &StepTimer,
    ) -> Result<(Vec<NsaOutputs>, Vec<(KernelId, f64)>)> {
        let (out, ms) = self
            .extend_with(cache, chunks, request, true, Some((timer, false)))
            .await?;
        Ok((out, ms.unwrap_or_default()))
    }

    /// [`Self::extend`], also returning its GPU time in milliseconds: each group of
    /// sequences' plan runs as one pass, as [`Self::extend`] runs it, timed as a whole
    /// (`timer` needs a slot per group: one per chunk is always enough).
    pub async fn extend_timed_whole(
        &self,
        cache: &mut NsaCache,
        chunks: &[SeqChunk<'_>],
        request: OutputRequest,
        timer: &StepTimer,
    ) -> Result<(Vec<NsaOutputs>, f64)> {
        let (out, ms) = self
            .extend_with(cache, chunks, request, true, Some((timer, true)))
            .await?;
        Ok((out, ms.unwrap_or_default().iter().map(|(_, t)| t).sum()))
    }

    /// Appends keys and values only (`q` and `gates` of the chunks are ignored and may be
    /// empty) and compresses the blocks they complete: context that needs no output rows.
    pub async fn append(&self, cache: &mut NsaCache, chunks: &[SeqChunk<'_>]) -> Result<()> {
        self.extend_with(cache, chunks, OutputRequest::default(), false, None)
            .await
            .map(|_| ())
    }

    /// [`Self::extend`] with the inputs and outputs in the caller's GPU buffers, recorded
    /// into the caller's `encoder` and not submitted: copies each sequence's new keys and
    /// values into `cache`, compresses the blocks they complete, and writes the rows into
    /// `step.out` (and, where given, the selected blocks into `step.block_indices` and the
    /// branch outputs into `step.branches`). Nothing goes through the host, so a model can
    /// record the steps of all its layers and submit them at once, and keep its activations
    /// on the GPU.
    ///
    /// The cache counts the tokens as appended when this returns. Several steps may be
    /// recorded into one encoder (a growth of the cache is recorded there too), but `encoder`
    /// must be submitted before any other call on `cache` (`extend`, `append`, `reserve`):
    /// their queue writes and growth would otherwise run before these copies.
    ///
    /// Sizes, offsets, usages and sequences are checked ([`NsaError::BadBuffer`],
    /// [`NsaError::InvalidShape`], capacity as in [`Self::extend`]); the values are not (they
    /// never reach the host): non-finite inputs give non-finite rows. After an error the
    /// cache's lengths are unchanged, and whatever part of the step `encoder` holds writes
    /// only past them, so submitting or dropping it is safe.
    pub async fn encode_extend(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        cache: &mut NsaCache,
        step: &DeviceStep<'_>,
    ) -> Result<()> {
        self.encode_extend_with(encoder, cache, step, None)
            .await
            .map(|_| ())
    }

    /// [`Self::encode_extend`], timing its passes with `timer`: with `whole`, each plan as
    /// one pass, as `encode_extend` records it; else a pass per kernel. Returns the kernel
    /// each timed pass starts with, in the timer's slot order from 0 (the timer must hold
    /// them all, as for [`Self::extend_timed`]); record [`StepTimer::resolve`] for that many
    /// into `encoder` after this, and [`StepTimer::read`] the times after submitting it. For
    /// benchmarks of work whose inputs already are on the GPU (`nsa bench --chunk`): unlike
    /// [`Self::extend_timed`], nothing runs on the host between the call and the submission
    /// but planning and recording.
    pub async fn encode_extend_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        cache: &mut NsaCache,
        step: &DeviceStep<'_>,
        timer: &StepTimer,
        whole: bool,
    ) -> Result<Vec<KernelId>> {
        self.encode_extend_with(encoder, cache, step, Some((timer, whole)))
            .await
    }

    /// [`Self::encode_extend`], timed where `timer` is given (see
    /// [`Self::encode_extend_timed`]); returns the timed passes' kernels.
    async fn encode_extend_with(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        cache: &mut NsaCache,
        step: &DeviceStep<'_>,
        timer: Option<(&StepTimer, bool)>,
    ) -> Result<Vec<KernelId>> {
        self.context().check_alive()?;
        cache.check_context(self)?;
        step.check(&cache.opts, cache.config.top_n)?;
        let seqs: Vec<usize> = (step.first_seq..step.first_seq + step.seqs).collect();
        let sizes = vec![step.tokens; step.seqs];
        let feed = Feed::Device(step);
        let scope = self
            .context()
            .device
            .push_error_scope(wgpu::ErrorFilter::Validation);
        let call = Call {
            seqs: &seqs,
            sizes: &sizes,
            feed: &feed,
            request: OutputRequest {
                block_indices: false,
                branches: step.branches.is_some(),
            },
            attend: true,
        };
        let mut timed = Vec::new();
        let kept = self.record_extend(encoder, cache, call, timer, &mut timed);
        let error = scope.pop().await;
        let kept = kept?;
        if let Some(e) = error {
            return Err(NsaError::Gpu(e.to_string()));
        }
        cache.advance(&seqs, &sizes);
        cache.keep(kept);
        Ok(timed)
    }

    /// Records the writes of the call's new keys and values into `cache`: sequence `seqs[i]`
    /// appends `sizes[i]` rows of each raw tensor at its length.
    ///
    /// For [`APPEND_MIN_SEQS`] sequences or more (and UPLOAD_MAX bytes of rows at most, or a
    /// buffer or binding of the device if less), the append kernel writes every sequence's
    /// rows in one dispatch per pair of tensors (keys, values), reading the rows and a table
    /// of where each goes from the cache's upload buffer: queued there from the host in one
    /// write, or copied there in `encoder` (the caller's rows one copy per tensor, the table
    /// from a buffer of its own). Otherwise: host rows of that many bytes at most are queued
    /// into the upload buffer in one piece
    /// (a queue write per sequence and tensor allocates staging memory each: on lavapipe a
    /// 16-sequence step's host time up to its submission went from 97 to 74 µs so) and
    /// copied from there, larger ones take a queue write per sequence and tensor (no large
    /// buffer kept), and the caller's rows a copy per sequence and tensor.
    fn append_rows(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        cache: &mut NsaCache,
        seqs: &[usize],
        sizes: &[usize],
        feed: &Feed,
    ) -> Result<()> {
        let o = cache.opts;
        let ctx = self.context();
        let device = &ctx.device;
        let limits = self.limits();
        let cap = cache.capacity as u64;
        let dims = raw_dims(&o);
        // Bytes of sequence i's new rows of tensor r, and where they go in it.
        let len = |i: usize, r: usize| sizes[i] as u64 * row_bytes(&o, dims[r]);
        let dst = |i: usize, r: usize| {
            (seqs[i] as u64 * cap + cache.lens[seqs[i]] as u64) * row_bytes(&o, dims[r])
        };
        let rows: u64 = (0..seqs.len())
            .flat_map(|i| (0..dims.len()).map(move |r| (i, r)))
            .map(|(i, r)| len(i, r))
            .sum();
        // The upload buffer is one buffer, and the append kernel binds it whole, table
        // included.
        let table_max = 4 * (1 + 3 * dims.len() * seqs.len()) as u64;
        let upload_max = (UPLOAD_MAX.min(limits.max_buffer))
            .min(limits.max_storage_binding)
            .saturating_sub(table_max);
        if rows > upload_max {
            // Only from the host: the caller's buffers are copied from directly below.
            if let Feed::Host { kv, .. } = feed {
                for (i, kv) in kv.iter().enumerate() {
                    for (r, buf) in cache.raw.iter().enumerate() {
                        ctx.queue.write_buffer(buf, dst(i, r), &kv[r]);
                    }
                }
                return Ok(());
            }
        }
        // The kernel's table: the count, then per sequence one entry per tensor (staging
        // word, cache word, words); the rows follow, tensor by tensor, sequence by sequence
        // (so each tensor of the caller's buffers is one piece).
        let kernel = seqs.len() >= APPEND_MIN_SEQS
            && rows <= upload_max
            && seqs.len() <= limits.max_workgroups_per_dim as usize
            && cache
                .raw
                .iter()
                .all(|b| b.size() <= limits.max_storage_binding);
        let table_bytes = if kernel { table_max } else { 0 };
        let mut table = vec![0u32; (table_bytes / 4) as usize];
        let mut at = table_bytes;
        let mut pieces = Vec::new();
        for r in 0..dims.len() {
            for i in 0..seqs.len() {
                pieces.push((i, r, at));
                at += len(i, r);
            }
        }
        if kernel {
            table[0] = seqs.len() as u32;
            for &(i, r, at) in &pieces {
                let e = 1 + 3 * (i * dims.len() + r);
                // Word offsets within a binding (so below 2^32 words).
                table[e] = (at / 4) as u32;
                table[e + 1] = (dst(i, r) / 4) as u32;
                table[e + 2] = (len(i, r) / 4) as u32;
            }
        }
        let up = match feed {
            Feed::Host { kv, .. } if rows <= upload_max => {
                let up = fit_upload(device, &mut cache.upload, at).clone();
                let mut parts: Vec<&[u8]> = vec![bytemuck::cast_slice(&table)];
                parts.extend(pieces.iter().map(|&(i, r, _)| &kv[i][r][..]));
                upload(&ctx.queue, &up, &parts)?;
                Some(up)
            }
            Feed::Device(_) if kernel => {
                let up = fit_upload(device, &mut cache.upload, at).clone();
                let usage = wgpu::BufferUsages::COPY_SRC;
                let t = buffer_init(
                    device,
                    "nsa.append.table",
                    usage,
                    bytemuck::cast_slice(&table),
                );
                encoder.copy_buffer_to_buffer(&t, 0, &up, 0, table_bytes);
                Some(up)
            }
            _ => None,
        };
        // The caller's rows: one copy per tensor into the upload, or per sequence and tensor
        // into the cache.
        if let Feed::Device(step) = feed {
            for (r, src) in step.key_value_buffers().into_iter().enumerate() {
                match &up {
                    Some(up) => {
                        let first = pieces[r * seqs.len()].2;
                        let bytes: u64 = (0..seqs.len()).map(|i| len(i, r)).sum();
                        encoder.copy_buffer_to_buffer(src.buffer(), src.offset(), up, first, bytes);
                    }
                    None => {
                        for i in 0..seqs.len() {
                            let from = src.offset() + i as u64 * len(i, r);
                            encoder.copy_buffer_to_buffer(
                                src.buffer(),
                                from,
                                &cache.raw[r],
                                dst(i, r),
                                len(i, r),
                            );
                        }
                    }
                }
            }
        }
        let Some(up) = up else {
            return Ok(());
        };
        if !kernel {
            // Rows of whole f16 pairs or f32s: every offset and length is a multiple of 4.
            for &(i, r, at) in &pieces {
                encoder.copy_buffer_to_buffer(&up, at, &cache.raw[r], dst(i, r), len(i, r));
            }
            return Ok(());
        }
        let (pipeline, layout) = self.append_kernel()?;
        let fresh = cache
            .append
            .as_ref()
            .is_none_or(|a| a.staging != up || a.raw != cache.raw);
        if fresh {
            cache.append = Some(self.append_binding(layout, &up, &cache.raw));
        }
        let groups = &cache.append.as_ref().expect("made above").groups;
        let words = (0..seqs.len()).map(|i| len(i, 0).max(len(i, dims.len() - 1)) / 4);
        let y = words.max().unwrap_or(0).div_ceil(256).clamp(1, 64) as u32;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("nsa.append"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipeline);
        for group in groups {
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(seqs.len() as u32, y, 2);
        }
        Ok(())
    }

    /// The append kernel's bind groups on `staging` and each pair of `raw` (keys, values):
    /// sequence i's entry for tensor r sits at word `1 + 3 * (i * raw.len() + r)` of the
    /// table.
    fn append_binding(
        &self,
        layout: &wgpu::BindGroupLayout,
        staging: &wgpu::Buffer,
        raw: &[wgpu::Buffer],
    ) -> AppendBinding {
        let device = &self.context().device;
        let size = std::mem::size_of::<Params>() as u64;
        let stride = size.next_multiple_of(self.limits().uniform_align);
        let pairs = raw.len() / 2;
        let mut bytes = vec![0u8; (stride * pairs as u64) as usize];
        for p in 0..pairs {
            let params = Params {
                off_k: (1 + 3 * 2 * p) as u32,
                off_v: (1 + 3 * (2 * p + 1)) as u32,
                dim: (3 * raw.len()) as u32,
                ..Params::default()
            };
            bytes[p * stride as usize..][..size as usize]
                .copy_from_slice(bytemuck::bytes_of(&params));
        }
        let usage = wgpu::BufferUsages::UNIFORM;
        let params = buffer_init(device, "nsa.append.params", usage, &bytes);
        let whole = |buffer| {
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset: 0,
                size: None,
            })
        };
        let groups = (0..pairs)
            .map(|p| {
                let entry = |binding, resource| wgpu::BindGroupEntry { binding, resource };
                device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("nsa.append"),
                    layout,
                    entries: &[
                        entry(
                            0,
                            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: &params,
                                offset: p as u64 * stride,
                                size: wgpu::BufferSize::new(size),
                            }),
                        ),
                        entry(1, whole(staging)),
                        entry(2, whole(&raw[2 * p])),
                        entry(3, whole(&raw[2 * p + 1])),
                    ],
                })
            })
            .collect();
        AppendBinding {
            staging: staging.clone(),
            raw: raw.to_vec(),
            groups,
        }
    }

    async fn extend_with(
        &self,
        cache: &mut NsaCache,
        chunks: &[SeqChunk<'_>],
        request: OutputRequest,
        attend: bool,
        timer: Option<(&StepTimer, bool)>,
    ) -> Result<(Vec<NsaOutputs>, Option<Vec<(KernelId, f64)>>)> {
        self.context().check_alive()?;
        cache.check_context(self)?;
        let o = cache.opts;
        // Validate everything before touching the cache.
        let mut sizes = Vec::with_capacity(chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            if c.seq >= o.seqs || chunks[..i].iter().any(|d| d.seq == c.seq) {
                return Err(NsaError::InvalidShape {
                    what: "seq",
                    value: c.seq,
                    rule: "each chunk names a distinct sequence < seqs",
                });
            }
            let n = match (attend, c.branch_kv) {
                (true, _) => c.gates.len() / (o.hq * 3),
                (false, Some(b)) => b[0].len() / (o.hkv * o.dk),
                (false, None) => c.k.len() / (o.hkv * o.dk),
            };
            if n == 0 {
                return Err(NsaError::ShapeMismatch {
                    tensor: if attend { "gates" } else { "k" },
                    expected: if attend {
                        vec![1, o.hq, 3]
                    } else {
                        vec![1, o.hkv, o.dk]
                    },
                    got: if attend { c.gates.len() } else { c.k.len() },
                });
            }
            if attend {
                check_tensor("q", c.q, &[n, o.hq, o.dk])?;
                check_tensor("gates", c.gates, &[n, o.hq, 3])?;
            }
            check_kv_mode(&o, c.branch_kv.is_some())?;
            for ((name, t), d) in kv_names(&o)
                .iter()
                .zip(kv_order([c.k, c.v], c.branch_kv))
                .zip(raw_dims(&o))
            {
                check_tensor(name, t, &[n, o.hkv, d])?;
            }
            sizes.push(n);
        }
        // The new keys, values and queries as stored (converted, and range-checked for f16,
        // before anything changes).
        let mut stored_kv = Vec::with_capacity(chunks.len());
        let mut stored_q = Vec::with_capacity(chunks.len());
        let gates: Vec<&[f32]> = chunks.iter().map(|c| c.gates).collect();
        for c in chunks {
            let kv = kv_names(&o)
                .iter()
                .zip(kv_order([c.k, c.v], c.branch_kv))
                .map(|(name, rows)| stored_bytes(name, rows, o.precision));
            stored_kv.push(kv.collect::<Result<Vec<_>>>()?);
            if attend {
                stored_q.push(stored_bytes("q", c.q, o.precision)?);
            }
        }
        let seqs: Vec<usize> = chunks.iter().map(|c| c.seq).collect();
        let feed = Feed::Host {
            kv: stored_kv,
            q: stored_q,
            gates,
        };
        let ctx = self.context();
        let device = &ctx.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("nsa.extend"),
        });
        let mut timed: Vec<KernelId> = Vec::new();
        let call = Call {
            seqs: &seqs,
            sizes: &sizes,
            feed: &feed,
            request,
            attend,
        };
        let kept = self.record_extend(&mut encoder, cache, call, timer, &mut timed);
        let kept = match kept {
            Ok(k) => k,
            Err(e) => {
                let _ = scope.pop().await;
                return Err(e);
            }
        };
        let stamps = timer.map(|(t, _)| t.resolve(ctx, &mut encoder, timed.len()));
        ctx.queue.submit([encoder.finish()]);
        if let Some(e) = scope.pop().await {
            return Err(NsaError::Gpu(e.to_string()));
        }
        let ms = match stamps {
            Some(s) => Some(
                timed
                    .into_iter()
                    .zip(StepTimer::read(ctx, s).await?)
                    .collect(),
            ),
            None => None,
        };
        cache.advance(&seqs, &sizes);
        let mut results = Vec::with_capacity(chunks.len());
        for (staging, _, nb, continues) in kept.iter().filter(|k| k.2 > 0) {
            // Each group's outputs are [nb, n, ...]: one equal slice per sequence.
            let parts = read_staging(device, staging).await?;
            let split = |i: usize| {
                let all: &[f32] = bytemuck::cast_slice(&parts[i]);
                let per = all.len() / nb;
                all.chunks(per)
                    .take(*nb)
                    .map(|c| c.to_vec())
                    .collect::<Vec<_>>()
                    .into_iter()
            };
            let mut next = 0;
            let mut take = || {
                next += 1;
                split(next - 1)
            };
            let mut outs = take();
            let mut idx = request.block_indices.then(&mut take);
            let mut br = request.branches.then(|| (take(), take(), take()));
            for _ in 0..*nb {
                let one = |x: &mut std::vec::IntoIter<Vec<f32>>| x.next().unwrap_or_default();
                let rows = NsaOutputs {
                    out: one(&mut outs),
                    block_indices: idx
                        .as_mut()
                        .map(|x| bytemuck::cast_slice::<f32, i32>(&one(x)).to_vec()),
                    branches: br.as_mut().map(|(a, b, c)| BranchOutputs {
                        o_cmp: one(a),
                        o_slc: one(b),
                        o_win: one(c),
                    }),
                };
                match results.pop() {
                    // Later rows of the previous plan's sequence: after its earlier ones.
                    Some(earlier) if *continues => {
                        results.push(concat(vec![earlier, rows], request));
                    }
                    earlier => {
                        results.extend(earlier);
                        results.push(rows);
                    }
                }
            }
        }
        cache.keep(kept);
        Ok((results, ms))
    }

    /// Records an extend call into `encoder`: sequence `seqs[i]` appends `sizes[i]` tokens
    /// from `feed` (written through the queue from the host, or copied from the caller's
    /// buffers in `encoder`), the blocks they complete are compressed, and with `attend` their
    /// rows are computed (read back from the host, or copied into the caller's `out`).
    /// Returns, per plan, its readback buffers, its scratch and how many sequences it
    /// computes rows for (0: compression only), for [`NsaCache::keep`].
    fn record_extend(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        cache: &mut NsaCache,
        call: Call<'_>,
        timer: Option<(&StepTimer, bool)>,
        timed: &mut Vec<KernelId>,
    ) -> Result<Vec<Recorded>> {
        let Call {
            seqs,
            sizes,
            feed,
            request,
            attend,
        } = call;
        let o = cache.opts;
        let cfg = cache.config;
        let need = seqs
            .iter()
            .zip(sizes)
            .map(|(s, n)| cache.lens[*s] + n)
            .max()
            .unwrap_or(0);
        // Growth follows the steps this encoder already holds (encode_extend).
        let grow_in = matches!(feed, Feed::Device(_)).then_some(&mut *encoder);
        cache.reserve_in(self, need, grow_in)?;
        let ctx = self.context();
        let device = &ctx.device;
        let cap = cache.capacity as u64;
        let cap_c = cfg.num_compressed(cache.capacity).max(1) as u64;
        self.append_rows(encoder, cache, seqs, sizes, feed)?;
        // Per plan: its readback buffers, its scratch, and how many sequences it computes rows
        // for (0: compression only).
        let mut kept: Vec<Recorded> = Vec::new();
        // Plans of each kind so far (compression only, rows): which kept scratch to refit.
        let mut nth = [0usize; 2];
        // Consecutive sequences that add equally many tokens share one plan: one dispatch per
        // stage for all of them. Where their lengths differ (at most RAGGED_MAX of them: a
        // decode step of a ragged batch), each run of equal length first compresses its new
        // tokens with a plan of its own, then one ragged plan attends for all.
        let len_of = |i: usize| cache.lens[seqs[i]];
        let uniform = |g: &std::ops::Range<usize>| g.clone().all(|i| len_of(i) == len_of(g.start));
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        for i in 0..seqs.len() {
            let joins = groups.last().is_some_and(|g| {
                let p = g.end - 1;
                seqs[i] == seqs[p] + 1
                    && sizes[i] == sizes[p]
                    && ((uniform(g) && len_of(i) == len_of(p)) || (attend && g.len() < RAGGED_MAX))
            });
            match groups.last_mut() {
                Some(g) if joins => g.end = i + 1,
                _ => groups.push(i..i + 1),
            }
        }
        let mut jobs: Vec<Job> = Vec::new();
        for g in groups {
            let tokens = 0..sizes[g.start];
            if uniform(&g) {
                jobs.push(Job {
                    seqs: g,
                    tokens,
                    rows_out: attend,
                    ragged: false,
                });
                continue;
            }
            let mut a = g.start;
            while a < g.end {
                let b = (a..g.end)
                    .find(|&b| len_of(b) != len_of(a))
                    .unwrap_or(g.end);
                jobs.push(Job {
                    seqs: a..b,
                    tokens: tokens.clone(),
                    rows_out: false,
                    ragged: false,
                });
                a = b;
            }
            jobs.push(Job {
                seqs: g,
                tokens,
                rows_out: true,
                ragged: true,
            });
        }
        // Each job's plan (none for a compression-only job whose tokens complete no block:
        // most runs of a ragged decode step). A job of several sequences whose plan exceeds
        // a limit (their queries, rows or scratch together past a buffer) is planned as two
        // halves instead, down to one sequence, in the same order; one sequence's tokens
        // then as two halves, in order (a chunk's rows are those of its pieces one after
        // another, each compressing the blocks its tokens complete).
        let limits = self.limits();
        let plan_job = |job: &Job| -> Result<Option<Plan>> {
            let (group, rows_out) = (&job.seqs, job.rows_out);
            let first = seqs[group.start] as u64;
            let len = group.clone().map(len_of).max().unwrap_or(0) + job.tokens.start;
            let (n, nb) = (job.tokens.len(), group.len());
            if !rows_out && cfg.num_compressed(len + n) == cfg.num_compressed(len) {
                return Ok(None);
            }
            // Planning only the compression, one query row stands in for the rows no kernel
            // computes (so query-sized limits do not apply).
            let shape = Shape {
                batch: nb,
                tq: if rows_out { n } else { 1 },
                tk: len + n,
                hq: o.hq,
                hkv: o.hkv,
                dk: o.dk,
                dv: o.dv,
            };
            let rows = CacheRows {
                key_row0: first * cap,
                cmp_row0: first * cap_c,
                cmp_done: cfg.num_compressed(len),
                capacity: cache.capacity,
                cmp_capacity: cap_c as usize,
            };
            let mut plan = if job.ragged {
                let behind: Vec<usize> = (group.clone())
                    .map(|i| len - job.tokens.start - len_of(i))
                    .collect();
                Plan::cached_ragged(&cfg, &shape, &limits, rows, o.precision, &behind)?
            } else {
                Plan::cached(&cfg, &shape, &limits, rows, o.precision)?
            };
            if !rows_out {
                plan.steps.retain(|s| s.kernel == KernelId::Compress);
            } else if request.branches {
                plan = plan.with_branch_outputs()?;
            }
            plan.check_scratch(limits.max_buffer)?;
            Ok(Some(plan))
        };
        let mut planned: Vec<(Job, Plan)> = Vec::new();
        let mut todo: Vec<Job> = jobs.into_iter().rev().collect();
        while let Some(job) = todo.pop() {
            match plan_job(&job) {
                Ok(Some(plan)) => planned.push((job, plan)),
                Ok(None) => {}
                Err(NsaError::ExceedsLimit { .. }) if job.seqs.len() > 1 => {
                    let mid = job.seqs.start + job.seqs.len() / 2;
                    for seqs in [mid..job.seqs.end, job.seqs.start..mid] {
                        let tokens = job.tokens.clone();
                        todo.push(Job {
                            seqs,
                            tokens,
                            ..job
                        });
                    }
                }
                Err(NsaError::ExceedsLimit { .. }) if job.tokens.len() > 1 => {
                    let (a, b) = (job.tokens.start, job.tokens.end);
                    let mid = a + (b - a) / 2;
                    for tokens in [mid..b, a..mid] {
                        let seqs = job.seqs.clone();
                        todo.push(Job {
                            seqs,
                            tokens,
                            ..job
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
        for (job, plan) in &planned {
            let (group, rows_out) = (&job.seqs, job.rows_out);
            let nb = group.len();
            // The job's rows of one sequence's `len` elements (or bytes) of all its new
            // tokens' rows; and of the caller's tensors with `per` bytes a sequence, where the
            // job's sequences' rows start and how many bytes they take (its tokens are all of
            // them, or it has one sequence).
            let all = sizes[group.start];
            let tokens = |len: usize| {
                let row = len / all;
                job.tokens.start * row..job.tokens.end * row
            };
            let piece = |per: u64| {
                let row = per / all as u64;
                let at = group.start as u64 * per + job.tokens.start as u64 * row;
                (at, (nb * job.tokens.len()) as u64 * row)
            };
            // This plan's place among the call's plans of its kind: what it takes of the kept
            // plan in the same place (a scratch; for rows, also I/O and readback buffers).
            let j = nth[rows_out as usize];
            nth[rows_out as usize] += 1;
            let mut old_readback = Vec::new();
            let old = if rows_out {
                if cache.rows_kept.len() <= j {
                    cache.rows_kept.resize_with(j + 1, RowsKept::default);
                }
                old_readback = std::mem::take(&mut cache.rows_kept[j].readback);
                cache.rows_kept[j].scratch.take()
            } else {
                cache.compress_kept.get_mut(j).and_then(Option::take)
            };
            // Recorded into the caller's encoder, the new parameters go there too.
            let params_in = matches!(feed, Feed::Device(_)).then_some(&mut *encoder);
            let scratch = self.refit_scratch_in(old, plan, params_in)?;
            // The rows' queries and gates go straight into this plan's kept buffers (queued
            // before the commands run, or copied first in the caller's encoder); compressing
            // binds none of them.
            let (q, g, out) = if rows_out {
                let sizes = [Tensor::Q, Tensor::Gates, Tensor::Out].map(|t| plan.tensor_bytes(t));
                let b = fit_io(device, &mut cache.rows_kept[j].io, sizes);
                match feed {
                    Feed::Host { q, gates, .. } => {
                        let q: Vec<&[u8]> = (q[group.clone()].iter())
                            .map(|q| &q[tokens(q.len())])
                            .collect();
                        let gates: Vec<&[u8]> = (gates[group.clone()].iter())
                            .map(|g| bytemuck::cast_slice(&g[tokens(g.len())]))
                            .collect();
                        upload(&ctx.queue, &b[0], &q)?;
                        upload(&ctx.queue, &b[1], &gates)?;
                    }
                    Feed::Device(step) => {
                        // The group's sequences are consecutive in the step's buffers.
                        let per = step.seq_bytes(&o);
                        for (src, dst, per) in
                            [(step.q, &b[0], per[0]), (step.gates, &b[1], per[1])]
                        {
                            let (from, bytes) = piece(per);
                            let from = src.offset() + from;
                            encoder.copy_buffer_to_buffer(src.buffer(), from, dst, 0, bytes);
                        }
                    }
                }
                (&b[0], &b[1], &b[2])
            } else {
                let p = self.placeholder();
                (p, p, p)
            };
            let r = &cache.raw;
            let mut bufs = GpuBuffers::new(q, &r[0], &r[1], g, out);
            if o.independent_kv {
                bufs.branch_kv = [
                    Some(&r[0]),
                    Some(&r[1]),
                    Some(&r[2]),
                    Some(&r[3]),
                    Some(&r[4]),
                    Some(&r[5]),
                ];
            }
            bufs.linear = cache.linear.as_ref().map(|l| [&l[0], &l[1], &l[2], &l[3]]);
            bufs.compressed = Some([&cache.compressed[0], &cache.compressed[1]]);
            // Timed as a whole, a plan's time goes with its first kernel.
            match timer {
                Some((t, false)) => {
                    self.encode_timed(encoder, &scratch, &bufs, t, timed.len())?;
                    timed.extend(plan.steps.iter().map(|s| s.kernel));
                }
                Some((t, true)) => {
                    self.encode_timed_whole(encoder, &scratch, &bufs, t, timed.len())?;
                    timed.push(plan.steps[0].kernel);
                }
                None => self.encode(encoder, &scratch, &bufs)?,
            }
            if !rows_out {
                kept.push((Vec::new(), scratch, 0, false));
                continue;
            }
            let mut wanted: Vec<(&wgpu::Buffer, u64)> = vec![(out, plan.tensor_bytes(Tensor::Out))];
            let sb = |t| {
                (
                    scratch.buffer(t).expect("scratch holds the outputs"),
                    plan.tensor_bytes(t),
                )
            };
            if request.block_indices {
                wanted.push(sb(Tensor::Idx));
            }
            if request.branches {
                wanted.extend([sb(Tensor::OCmp), sb(Tensor::OSlc), sb(Tensor::OWin)]);
            }
            let staging = match feed {
                Feed::Host { .. } => stage_readback_ranges(device, encoder, &wanted, old_readback),
                Feed::Device(step) => {
                    // The rows, [nb, tokens, Hq, Dv], and where asked the plan's selection,
                    // [nb, tokens, Hkv, n], and branch outputs (as the rows), each into the
                    // caller's slice after the earlier groups' sequences.
                    let per = step.seq_bytes(&o)[2];
                    let per_idx = step.idx_seq_bytes(&o, cfg.top_n);
                    let idx = step.block_indices.map(|d| (sb(Tensor::Idx).0, d, per_idx));
                    let branches = [Tensor::OCmp, Tensor::OSlc, Tensor::OWin]
                        .into_iter()
                        .zip(step.branches.into_iter().flatten())
                        .map(|(t, d)| (sb(t).0, d, per));
                    for (src, dst, per) in [(out, step.out, per)]
                        .into_iter()
                        .chain(idx)
                        .chain(branches)
                    {
                        let (to, bytes) = piece(per);
                        let to = dst.offset() + to;
                        encoder.copy_buffer_to_buffer(src, 0, dst.buffer(), to, bytes);
                    }
                    old_readback
                }
            };
            kept.push((staging, scratch, nb, job.tokens.start > 0));
        }
        Ok(kept)
    }

    /// Variable-length prefill: sequence `i` is rows `cu_seqlens[i] .. cu_seqlens[i+1]` of
    /// `q: [total, Hq, Dk]`, `k: [total, Hkv, Dk]`, `v: [total, Hkv, Dv]`,
    /// `gates: [total, Hq, 3]` (FlashAttention's convention). Runs every sequence in one
    /// submission; the outputs are concatenated the same way. Where one sequence's cached
    /// keys would pass a storage binding (or the cache a buffer, or Linear's weights a
    /// binding), the call runs in parts of kv heads, one submission each, as
    /// [`Self::run_with`] does; a sequence whose queries or rows pass a buffer is computed
    /// in pieces of its rows ([`Self::extend`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn run_varlen(
        &self,
        config: &NsaConfig,
        cu_seqlens: &[usize],
        hq: usize,
        hkv: usize,
        dk: usize,
        dv: usize,
        inputs: &crate::NsaInputs<'_>,
        request: OutputRequest,
    ) -> Result<NsaOutputs> {
        let heads = (hq, hkv, dk, dv);
        self.run_varlen_with(config, cu_seqlens, heads, inputs, request, Precision::F32)
            .await
    }

    /// [`Self::run_varlen`] with `heads = (Hq, Hkv, Dk, Dv)` and the inputs stored on the GPU
    /// at `precision` (through a cache at that precision: see [`CacheOptions::precision`]).
    pub async fn run_varlen_with(
        &self,
        config: &NsaConfig,
        cu_seqlens: &[usize],
        heads: (usize, usize, usize, usize),
        inputs: &crate::NsaInputs<'_>,
        request: OutputRequest,
        precision: Precision,
    ) -> Result<NsaOutputs> {
        crate::inputs::check_cu_seqlens(cu_seqlens)?;
        let cu = (cu_seqlens, cu_seqlens);
        self.run_packed(config, cu, heads, inputs, request, precision)
            .await
    }

    /// A packed batch of chunks (FlashAttention's `cu_seqlens_q` and `cu_seqlens_k`, its
    /// `flash_attn_varlen_func` with `causal`): sequence `i` has queries and gates in rows
    /// `cu_seqlens_q[i] .. cu_seqlens_q[i+1]` of `q: [total_q, Hq, Dk]` and
    /// `gates: [total_q, Hq, 3]`, and keys and values in rows `cu_seqlens_k[i] ..
    /// cu_seqlens_k[i+1]` of `k: [total_k, Hkv, Dk]`, `v: [total_k, Hkv, Dv]` (and of the
    /// per-branch ones); its `tq` queries are its last `tq` positions (query `j` sits at
    /// `tk - tq + j`, SPEC's chunk), so a sequence may be a prefill (`tq == tk`), a chunk of
    /// one, or a decode step (`tq == 1`). Outputs are packed like the queries:
    /// `[total_q, Hq, Dv]`, `block_indices` `[total_q, Hkv, n]`. `heads = (Hq, Hkv, Dk, Dv)`;
    /// the inputs are stored at `precision`. Each sequence's keys before its queries are
    /// appended to a cache first (one submission), then every sequence's rows are computed
    /// in one more; calls too large for the device run as [`Self::run_varlen`] says.
    /// Offsets are checked by [`crate::inputs::check_cu_seqlens_qk`].
    #[allow(clippy::too_many_arguments)]
    pub async fn run_varlen_qk(
        &self,
        config: &NsaConfig,
        cu_seqlens_q: &[usize],
        cu_seqlens_k: &[usize],
        heads: (usize, usize, usize, usize),
        inputs: &crate::NsaInputs<'_>,
        request: OutputRequest,
        precision: Precision,
    ) -> Result<NsaOutputs> {
        crate::inputs::check_cu_seqlens_qk(cu_seqlens_q, cu_seqlens_k)?;
        let cu = (cu_seqlens_q, cu_seqlens_k);
        self.run_packed(config, cu, heads, inputs, request, precision)
            .await
    }

    /// [`Self::run_varlen_qk`] on offsets already checked.
    async fn run_packed(
        &self,
        config: &NsaConfig,
        cu: (&[usize], &[usize]),
        heads: (usize, usize, usize, usize),
        inputs: &crate::NsaInputs<'_>,
        request: OutputRequest,
        precision: Precision,
    ) -> Result<NsaOutputs> {
        let shape = Shape::packed(cu.0, cu.1, heads);
        inputs.validate(config, &shape)?;
        let longest = (cu.1.windows(2).map(|w| w[1] - w[0]).max()).unwrap_or(1);
        let opts = |s: &Shape| CacheOptions {
            seqs: cu.0.len() - 1,
            hq: s.hq,
            hkv: s.hkv,
            dk: s.dk,
            dv: s.dv,
            capacity: longest,
            max_capacity: longest,
            independent_kv: inputs.has_branch_kv(),
            precision,
        };
        // The cache's buffers, Linear's weights and a plan of one query row over the most
        // keys (what no part of the rows can do without), for all kv heads or (where they
        // exceed a limit) for parts of them, as `run_with` runs its parts. A sequence's
        // queries and rows past a buffer are no obstacle: `extend` plans them in pieces.
        let limits = self.limits();
        let fits = |s: &Shape| {
            NsaCache::buffer_sizes(&limits, config, &opts(s), longest)?;
            crate::plan::check_linear_weights(config, s, &limits)?;
            let row = Shape {
                batch: 1,
                tq: 1,
                tk: longest,
                ..*s
            };
            self.call_plan(config, &row, request, precision).map(drop)
        };
        let size = match split::plan_or_parts(&shape, false, fits)? {
            Planned::Whole(_) => {
                return self
                    .run_packed_whole(config, cu, opts(&shape), inputs, request)
                    .await
            }
            Planned::Parts(size) => size,
        };
        split::check_ranges(inputs, precision)?;
        let mut res = split::unfilled_outputs(&shape, config.top_n, request);
        for part in split::parts(&shape, size) {
            let taken = PartInputs::gather(config, &shape, inputs, &part);
            let opts = opts(&part.shape(&shape));
            let got = (self.run_packed_whole(config, cu, opts, &taken.inputs(), request)).await?;
            split::put_outputs(&mut res, &got, &shape, config.top_n, &part);
        }
        Ok(res)
    }

    /// [`Self::run_packed`] through one cache of `opts` for all of `inputs`' kv heads: the
    /// keys before each sequence's queries appended in one submission (where any sequence
    /// has such), then the sequences' rows in another.
    async fn run_packed_whole(
        &self,
        config: &NsaConfig,
        (cu_q, cu_k): (&[usize], &[usize]),
        opts: CacheOptions,
        inputs: &crate::NsaInputs<'_>,
        request: OutputRequest,
    ) -> Result<NsaOutputs> {
        let heads = (opts.hq, opts.hkv, opts.dk, opts.dv);
        let shape = Shape::packed(cu_q, cu_k, heads);
        let mut cache = NsaCache::new(self, config, opts, inputs.linear)?;
        // Per sequence: its context (keys before its queries, no query rows) and its chunk.
        let (contexts, chunks): (Vec<_>, Vec<_>) = (cu_q.windows(2).zip(cu_k.windows(2)))
            .map(|(q, k)| {
                let first = k[1] - (q[1] - q[0]);
                let context = inputs.query_key_rows(&shape, q[0]..q[0], k[0]..first);
                (
                    context,
                    inputs.query_key_rows(&shape, q[0]..q[1], first..k[1]),
                )
            })
            .unzip();
        // The non-empty ones as a cache call's chunks.
        fn as_chunks<'a>(views: &[crate::NsaInputs<'a>], independent: bool) -> Vec<SeqChunk<'a>> {
            (views.iter().enumerate())
                .map(|(s, v)| SeqChunk::from_rows(s, v, independent))
                .filter(|c| !c.k.is_empty())
                .collect()
        }
        let context = as_chunks(&contexts, opts.independent_kv);
        if !context.is_empty() {
            self.append(&mut cache, &context).await?;
        }
        let parts = self
            .extend(
                &mut cache,
                &as_chunks(&chunks, opts.independent_kv),
                request,
            )
            .await?;
        Ok(concat(parts, request))
    }
}

/// Makes `io` hold buffers of at least `sizes` bytes (queries, gates, outputs), and returns
/// them: kept while large enough and not more than four times too large (so a long
/// prefill's buffers do not stay for the decode steps after it), else replaced by buffers of
/// exactly that size.
fn fit_io<'a>(
    device: &wgpu::Device,
    io: &'a mut Option<[wgpu::Buffer; 3]>,
    sizes: [u64; 3],
) -> &'a [wgpu::Buffer; 3] {
    let make = |i: usize| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(["nsa.extend.q", "nsa.extend.gates", "nsa.extend.out"][i]),
            size: sizes[i].max(16),
            usage: IO_USAGES[i],
            mapped_at_creation: false,
        })
    };
    let bufs = io.get_or_insert_with(|| [0, 1, 2].map(make));
    for (i, buf) in bufs.iter_mut().enumerate() {
        if !reusable(buf.size(), sizes[i].max(16)) {
            *buf = make(i);
        }
    }
    bufs
}

/// `slot`'s upload buffer for `bytes` of keys and values, replaced by one of exactly that size
/// (rounded to whole words) where it is smaller.
fn fit_upload<'a>(
    device: &wgpu::Device,
    slot: &'a mut Option<wgpu::Buffer>,
    bytes: u64,
) -> &'a wgpu::Buffer {
    if slot.as_ref().is_none_or(|b| b.size() < bytes) {
        *slot = Some(device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("nsa.extend.kv"),
            size: bytes.next_multiple_of(4).max(16),
            usage: wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        }));
    }
    slot.as_ref().expect("fitted above")
}

/// Queues `parts` to be written one after another at the start of `buf`, straight into the
/// queue's staging memory (padded to whole words: an odd count of f16 values fills two bytes
/// of the buffer's last word).
fn upload(queue: &wgpu::Queue, buf: &wgpu::Buffer, parts: &[&[u8]]) -> Result<()> {
    let bytes: usize = parts.iter().map(|p| p.len()).sum();
    let Some(size) = wgpu::BufferSize::new(bytes.next_multiple_of(4) as u64) else {
        return Ok(());
    };
    let mut view = queue
        .write_buffer_with(buf, 0, size)
        .ok_or_else(|| NsaError::Gpu(format!("writing {bytes} bytes of rows failed")))?;
    let mut at = 0;
    for p in parts {
        view.slice(at..at + p.len()).copy_from_slice(p);
        at += p.len();
    }
    Ok(())
}

/// Concatenates per-chunk results along the query rows.
pub fn concat(parts: Vec<NsaOutputs>, request: OutputRequest) -> NsaOutputs {
    let mut out = NsaOutputs {
        out: Vec::new(),
        block_indices: request.block_indices.then(Vec::new),
        branches: request.branches.then(|| BranchOutputs {
            o_cmp: Vec::new(),
            o_slc: Vec::new(),
            o_win: Vec::new(),
        }),
    };
    for p in parts {
        out.out.extend(p.out);
        if let (Some(a), Some(b)) = (out.block_indices.as_mut(), p.block_indices) {
            a.extend(b);
        }
        if let (Some(a), Some(b)) = (out.branches.as_mut(), p.branches) {
            a.o_cmp.extend(b.o_cmp);
            a.o_slc.extend(b.o_slc);
            a.o_win.extend(b.o_win);
        }
    }
    out
}
