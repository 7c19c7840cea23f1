//! Pure sizing: every buffer size, binding window and dispatch of one NSA call, computed from
//! the config, the shapes and the adapter's limits. No GPU types: unit-testable anywhere.
//!
//! Work is split so that no binding exceeds `max_storage_buffer_binding_size` and no grid
//! dimension exceeds `max_compute_workgroups_per_dimension`: whole batches per chunk when they
//! fit, else ranges of query rows within one sequence. Where splitting cannot help (the keys
//! of one sequence are larger than a binding, a buffer is larger than `max_buffer_size`), the
//! plan fails with [`NsaError::ExceedsLimit`].

use crate::config::{Compression, NsaConfig, Precision, Shape};
use crate::error::{NsaError, Result};
use crate::kernels::{
    mma_max_kt, mma_specialization, select_top_invocations, smem_vec4s, specialized_fixed_bytes,
    top_list_len, KernelId, Params, Specialization, ROWS, WIDE_ROWS,
};

/// The adapter limits a plan respects (a copy of the relevant `wgpu::Limits` fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// `max_storage_buffer_binding_size`.
    pub max_storage_binding: u64,
    /// `max_buffer_size`.
    pub max_buffer: u64,
    /// `min_storage_buffer_offset_alignment`.
    pub storage_align: u64,
    /// `min_uniform_buffer_offset_alignment`.
    pub uniform_align: u64,
    /// `max_compute_workgroups_per_dimension`.
    pub max_workgroups_per_dim: u32,
    /// `max_compute_workgroup_storage_size`: sizes the attention tiles.
    pub workgroup_storage: u32,
    /// `max_compute_invocations_per_workgroup` (and `max_compute_workgroup_size_x`: the
    /// kernels' workgroups are one-dimensional): at least 256 for wide attention steps.
    pub max_invocations: u32,
    /// Not an adapter limit: the bytes of compressed-attention scores (or block sums) one
    /// chunk of a call may keep for the selection ([`DEFAULT_KEPT_SCORES`]; within a binding
    /// and a buffer). Long prefills run in chunks of query rows whose scores fit; 0 keeps
    /// none (the selection then multiplies q.k over the compressed keys a second time).
    pub kept_scores: u64,
    /// Not an adapter limit: whether attention on f16 inputs runs on tensor cores (what
    /// [`crate::NsaPipeline::tensor_cores`] says; false by default). Their tiles are f16, so
    /// wide steps then run for heads whose plain tiles do not fit beside 32 query rows
    /// ([`Plan::wide_kv_tile`]; Dk = 192 on an H200).
    pub tensor_cores: bool,
    /// Not a WebGPU limit: key tiles one attention workgroup may walk, 0 for any number.
    /// Mesa's llvmpipe (software Vulkan) silently ends an invocation's loops once they have
    /// taken 65,535 iterations together, so on it ([`LLVMPIPE_KEY_TILES`]) longer key
    /// ranges split over several workgroups, whose partial results a merge combines as in
    /// decode steps; where the most splits a binding holds cannot bring a range within it,
    /// the plan fails with [`NsaError::ExceedsLimit`] rather than compute partial sums.
    pub max_key_tiles: u64,
    /// Not a WebGPU limit: loop iterations one invocation may take in all, 0 for any number
    /// ([`LLVMPIPE_LOOP_ITERATIONS`] on llvmpipe, which silently ends the loops there).
    /// The compression kernel takes [`Plan::compress_iterations`]; a config past this is
    /// [`NsaError::ExceedsLimit`] rather than partial sums.
    pub loop_iterations: u64,
    /// Not an adapter limit: whether calls with few rows (decode steps, short chunks) split
    /// their selection over several workgroups per row and merge the candidates
    /// (`select.wgsl`, `select_merge.wgsl`) even where one workgroup per row ranks all its
    /// blocks from kept block sums (`select_top.wgsl`, the default; false).
    pub split_select: bool,
    /// Not an adapter limit: the workgroups each attention branch aims for in calls of few
    /// row groups (decode steps, short chunks), which split each row group's keys and merge
    /// the parts ([`SplitTargets`]; chosen on an H200 by default).
    pub split_targets: SplitTargets,
}

/// The workgroups NSA's attention branches aim for in calls of few row groups (decode steps,
/// short chunks), which split each row group's keys over several workgroups and merge their
/// partial results in one pass ([`DeviceLimits::split_targets`],
/// `NsaPipeline::set_split_targets`). A branch with `g` row groups below its target splits
/// each toward `target / g` workgroups (within 32 splits and one key tile per split, and as
/// many as [`DeviceLimits::max_key_tiles`] needs); at or above it, or with a target of 0, it
/// does not split. The defaults were measured on an H200 (132 multiprocessors; DESIGN.md and
/// the doc comments in `src/plan.rs` have the tables): a GPU with far fewer or far more
/// multiprocessors may want others, which `nsa bench --decode --split-target` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitTargets {
    /// Compressed attention on the shader cores: 512 by default.
    pub compressed: u64,
    /// Compressed attention on tensor cores: 256 by default, though where `compressed`
    /// splits finer no workgroup walks more than 32 key tiles.
    pub compressed_mma: u64,
    /// Selected attention: 128 by default (its workgroups each take one query's blocks).
    pub selected: u64,
    /// The sliding window: 768 by default.
    pub window: u64,
}

impl SplitTargets {
    /// Each branch's name, as `nsa bench --split-target` takes it (and the JavaScript API's
    /// `splitTargets` in camel case), with its target: `cmp_attn` ([`Self::compressed`]),
    /// `cmp_attn_mma` ([`Self::compressed_mma`]), `slc_attn` ([`Self::selected`]),
    /// `win_attn` ([`Self::window`]).
    pub fn named_mut(&mut self) -> [(&'static str, &mut u64); 4] {
        [
            ("cmp_attn", &mut self.compressed),
            ("cmp_attn_mma", &mut self.compressed_mma),
            ("slc_attn", &mut self.selected),
            ("win_attn", &mut self.window),
        ]
    }

    /// [`Self::named_mut`]'s names with the targets' values.
    pub fn named(mut self) -> [(&'static str, u64); 4] {
        self.named_mut().map(|(name, target)| (name, *target))
    }
}

impl Default for SplitTargets {
    fn default() -> Self {
        Self {
            compressed: CMP_SPLIT_TARGET,
            compressed_mma: CMP_SPLIT_TARGET_MMA,
            selected: SLC_SPLIT_TARGET,
            window: SPLIT_TARGET,
        }
    }
}

/// The compression kernel's tokens per workgroup (`TOKENS` in `shaders/compress.wgsl`, and
/// its `Sums` struct's fields; `tests/shaders.rs` checks both): Linear's share each load of
/// the weights.
pub const COMPRESS_TOKENS: usize = 4;

/// [`DeviceLimits::loop_iterations`] on Mesa's llvmpipe: 65,535, after which it ends an
/// invocation's loops (tests/gpu.rs `long_linear_l512`).
pub const LLVMPIPE_LOOP_ITERATIONS: u64 = 65_535;

/// [`DeviceLimits::max_key_tiles`] on llvmpipe. Dense attention on it (Mesa 22.3, Hq = Hkv
/// = 1; a throwaway check of the last 64 rows, whose D = 128 case tests/gpu
/// `long_64k_dense` keeps) was exact over 512 key tiles at D = 128 (32k keys) and 1024 at
/// D = 32 (64k), and off by 2.5e-2 over 1024 at D = 128 and 3.9e-2 at D = 256: the tile
/// loop's iterations grow with D. Half of the largest that passed at D = 128 leaves room
/// for D = 256 (exact there with it).
pub const LLVMPIPE_KEY_TILES: u64 = 256;

/// The default [`DeviceLimits::kept_scores`]: 2 GiB, chunks of 2048 query rows of scores for
/// a prefill at 64k with 64 heads (on an H200, 1.9% faster there than 1 GiB's 1024-row
/// chunks), or 7281 of block sums in 64-key tiles.
pub const DEFAULT_KEPT_SCORES: u64 = 2 << 30;

impl Default for DeviceLimits {
    /// WebGPU's default limits, except 32 KiB of workgroup memory instead of 16 KiB (what
    /// lavapipe and SwiftShader offer; at Dk = 128 the kernels need more than 16 KiB).
    fn default() -> Self {
        Self {
            max_storage_binding: 128 << 20,
            max_buffer: 256 << 20,
            storage_align: 256,
            uniform_align: 256,
            max_workgroups_per_dim: 65535,
            workgroup_storage: 32 << 10,
            max_invocations: 256,
            kept_scores: DEFAULT_KEPT_SCORES,
            tensor_cores: false,
            max_key_tiles: 0,
            loop_iterations: 0,
            split_select: false,
            split_targets: SplitTargets::default(),
        }
    }
}

/// The tensors a kernel binds. Per-branch keys/values fall back to `K`/`V` when not given,
/// linear weights to a dummy buffer under `Mean`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Tensor {
    Q,
    Gates,
    KCmp,
    VCmp,
    KSlc,
    VSlc,
    KWin,
    VWin,
    WK,
    PeK,
    WV,
    PeV,
    /// Compressed keys `[B, C, Hkv, Dk]` (scratch).
    Kc,
    /// Compressed values `[B, C, Hkv, Dv]` (scratch).
    Vc,
    /// Log-sum-exp of compressed attention `[B, Tq, Hq]` (scratch).
    Lse,
    /// `block_indices` `[B, Tq, Hkv, n]`.
    Idx,
    OCmp,
    OSlc,
    OWin,
    Out,
    /// Partial results of split attention `[rows, splits, Dv + 2]`: the compressed branch's
    /// (or dense attention's) (scratch, shared by the chunks of a plan, which run one after
    /// another).
    Part,
    /// The selected branch's partial results, as `Part`.
    PartSlc,
    /// The window branch's partial results, as `Part`: a buffer apart from the compressed
    /// branch's, so that the two dispatches, which run back to back in a decode step, need
    /// no barrier between them and may overlap on the GPU.
    PartWin,
    /// Candidates of split selection `[B * Tq * Hkv, splits, n, 2]` (scratch).
    Cand,
    /// Compressed attention's scaled scores, kept for the selection wherever a chunk's fit
    /// the budget (decode steps, short chunks, prefills in chunks of query rows),
    /// `[B * Tq * Hq, C rounded up to 4]`; or its block sums, `[B * Tq * Hq, tiles * (tile
    /// / 4 + 2) rounded up to 4]` (see `Params::kept_tile`) (scratch).
    Kept,
    /// A read-only slot the dispatch does not use (bound to a small dummy buffer).
    Unused,
    /// A writable slot the dispatch does not use: a separate 16-byte piece, at an aligned
    /// offset, of another dummy buffer (writable bindings may not overlap).
    UnusedOut,
}

/// Every binding of a tensor whose elements take `elem_bytes` bytes spans a whole multiple
/// of this many bytes: 8 for f16 (the kernels read f16 tensors as pairs of words, four
/// elements per 8-byte load: `shaders/shared/input_f16.wgsl`), else 4. Buffers of f16
/// tensors are padded to it ([`Plan::tensor_bytes`]).
pub fn binding_unit(elem_bytes: u64) -> u64 {
    if elem_bytes == 2 {
        8
    } else {
        4
    }
}

/// A byte range of a buffer bound to one binding; its start is aligned to
/// `min_storage_buffer_offset_alignment` (the element residual goes into `Params`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Byte offset (aligned).
    pub offset: u64,
    /// Byte size.
    pub size: u64,
}

/// Where a call's keys live when they come from a [`crate::NsaCache`]: `shape.batch`
/// consecutive sequences (of equal length, except in [`Plan::cached_ragged`]), the first
/// one's key rows starting at `key_row0` of the cache's key buffers (`capacity` rows per
/// sequence) and its compressed rows at `cmp_row0` of the compressed buffers (`cmp_capacity`
/// per sequence), of which the first `cmp_done` already exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheRows {
    /// First key row of the first sequence in the cache's `[S * capacity, Hkv, D]` buffers.
    pub key_row0: u64,
    /// First compressed row of the first sequence in the cache's compressed buffers.
    pub cmp_row0: u64,
    /// Compressed tokens already in the cache (only later ones are computed).
    pub cmp_done: usize,
    /// Key rows per sequence in the cache.
    pub capacity: usize,
    /// Compressed rows per sequence in the cache.
    pub cmp_capacity: usize,
}

impl CacheRows {
    /// An error unless the cache holds `shape.tk` rows and their compressed tokens per
    /// sequence.
    fn check(&self, config: &NsaConfig, shape: &Shape) -> Result<()> {
        if self.capacity < shape.tk || self.cmp_capacity < config.num_compressed(shape.tk) {
            return Err(NsaError::InvalidShape {
                what: "capacity",
                value: self.capacity,
                rule: "a cache holds at least Tk rows and C(Tk) compressed rows per sequence",
            });
        }
        Ok(())
    }
}

/// One dispatch: which kernel, its uniform, its grid and what each binding sees.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The kernel.
    pub kernel: KernelId,
    /// Its uniform.
    pub params: Params,
    /// Workgroups in x and y (x * y >= params.total_wg).
    pub grid: [u32; 2],
    /// Query rows per workgroup the kernel is compiled for (`ROWS`): [`ROWS`] = 16, or
    /// [`WIDE_ROWS`] = 32 for compressed, window and dense attention over a chunk of many
    /// queries (see [`Plan::wide_kv_tile`]).
    pub rows: u32,
    /// `(tensor, window)` for bindings 1.. in order.
    pub bindings: Vec<(Tensor, Window)>,
}

/// Every size and dispatch of one NSA call.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The configuration.
    pub config: NsaConfig,
    /// The shapes.
    pub shape: Shape,
    /// Compressed tokens per sequence, `C`.
    pub n_cmp: usize,
    /// Keys per tile in the attention kernels.
    pub kv_tile: u32,
    /// Keys per tile of the wide attention steps ([`WIDE_ROWS`] query rows, 256
    /// invocations): [`WIDE_KEYS`], or 0 where none runs wide: the adapter allows fewer than
    /// 256 invocations per workgroup, or its workgroup memory holds fewer than [`WIDE_KEYS`]
    /// keys per tile beside 32 query rows (large heads), neither as the plain kernels store
    /// them nor, for f16 inputs on tensor cores ([`DeviceLimits::tensor_cores`]), as f16.
    pub wide_kv_tile: u32,
    /// The dispatches, in dataflow order.
    pub steps: Vec<Step>,
    /// The limits the plan was made for.
    pub limits: DeviceLimits,
    /// Set when the keys come from a KV cache.
    pub cache: Option<CacheRows>,
    /// How inputs and compressed keys/values are stored.
    pub precision: Precision,
    /// Elements of the split-attention partials (`Tensor::Part`, `PartSlc`, `PartWin`), 0
    /// when nothing is split.
    pub part_len: [u64; 3],
    /// Elements of the split-selection candidates (`Tensor::Cand`), 0 when not split.
    pub cand_len: u64,
    /// Elements of the kept compressed-attention scores or block sums (`Tensor::Kept`), 0
    /// when none.
    pub kept_len: u64,
    /// Per sequence, how many tokens fewer than `Tk` it holds ([`Plan::cached_ragged`]);
    /// empty when all hold `Tk`.
    pub behind: Vec<usize>,
    /// Whether the steps write the branch outputs `o_cmp`, `o_slc`, `o_win`
    /// ([`Plan::with_branch_outputs`]). Without them no step writes `o_win`, and `o_cmp`,
    /// `o_slc` are only an unsplit prefill's intermediates.
    pub branch_outputs: bool,
}

/// Sequences of different lengths one plan may hold ([`Plan::cached_ragged`]): `behind` in
/// `shaders/shared/params.wgsl`.
pub const RAGGED_MAX: usize = 64;

/// Keys per tile of the wide steps, where the workgroup memory holds them beside 32 query
/// rows (else no step runs wide, unless their f16 tiles on tensor cores fit:
/// [`Plan::wide_kv_tile`]). The wide kernels declare only what 32 keys need (42.6 KiB
/// at D = 128): on an H200, 16k dense attention took 254.0 ms with them against 304.6 ms
/// with the largest tile that fits 48 KiB (42 keys). Not for occupancy: at 130-148
/// registers per invocation (`tools/pipeline-stats`) one wide workgroup takes a
/// multiprocessor's registers either way.
pub const WIDE_KEYS: u32 = 32;
/// Queries a chunk needs for wide steps: decode steps and short chunks keep 16 rows (and
/// split each row group's keys over more workgroups instead).
const WIDE_MIN_QUERIES: usize = 16;
/// `KT_MAX` in `shaders/shared/attention.wgsl`.
const KT_MAX: usize = 64;
/// Workgroups a dispatch should have: below this, attention and selection split each row
/// group's keys over several workgroups (decode, short chunks) and merge the parts
/// (compressed and selected attention aim for [`CMP_SPLIT_TARGET`] and [`SLC_SPLIT_TARGET`]
/// instead). On an H200 with an f32 cache (an earlier build, one target for all branches),
/// 768 made a B=16 decode step at 64k 0.722 ms where 512, 1024 and 2048 gave 0.738, 0.787
/// and 0.810 ms (the dense decode baseline: 3.45 ms, against 4.05, 3.70 and 3.61 ms).
const SPLIT_TARGET: u64 = 768;
/// Workgroups selected attention's dispatch aims for when it splits (its workgroups each
/// take one query's blocks, a share of `n`): fewer than [`SPLIT_TARGET`]. On an H200 (f16
/// cache, B=16: 64 row groups) a decode step took 0.127 / 0.245-0.246 ms at 16k / 64k with
/// 128 (2 splits), 0.129-0.130 / 0.252 with 256 (4 splits), 0.139 / 0.257 with 768 (12
/// splits), and 0.155 / 0.246-0.279 unsplit; B=4 and B=8 (8 and 4 splits) were 3-5%
/// faster with 128 than with 768 (BENCHMARKS.md, twenty-third session); B=1 keeps its 16
/// splits. With the fifty-second session's kernels 256 still made steps of 4 to 16
/// sequences 3-9% longer, though the stage alone took 0.031 ms instead of 0.042 at B=16.
const SLC_SPLIT_TARGET: u64 = 128;
/// Consecutive queries per workgroup of selected attention at most (`QUERIES` in
/// `shaders/slc_attn.wgsl` is at most 4: one list cursor per component of a vec4), for groups
/// of fewer than [`ROWS`] heads (`Plan::slc_queries`).
pub const SLC_QUERIES_MAX: usize = 4;
/// Workgroups compressed attention's dispatch aims for when it splits on the shader cores:
/// fewer than [`SPLIT_TARGET`], so that a batch's workgroups each walk more tiles but start
/// fewer times. Chosen on tensor cores (an H200, f16 cache, 64k, twenty-fourth session: a
/// decode step took 0.130 / 0.157-0.158 / 0.179 ms for 8 / 12 / 16 sequences with 512 (16,
/// 11, 8 splits) against 0.137 / 0.161-0.165 / 0.184 with 768, and the same for 1 to 4
/// sequences, whose splits stop at [`ATTN_SPLITS_MAX`] either way; 1536 made 16 sequences
/// 0.198), where [`CMP_SPLIT_TARGET_MMA`] has since replaced it. With an f32 cache on the
/// shader cores (forty-seventh session) 256 made 4 sequences at 64k 0.146 ms against 0.154
/// but 16 sequences 0.451 against 0.424 (BENCHMARKS.md).
const CMP_SPLIT_TARGET: u64 = 512;
/// [`CMP_SPLIT_TARGET`] on tensor cores, where fewer, longer workgroups pay since the
/// selection ranks kept block sums (`select_top.wgsl`, which derives each head's
/// log-sum-exp from the partials, as the merge does: both read half as many). On an H200
/// (f16 cache, forty-seventh session, two rounds) a decode step took, with 256 against 512:
/// 4 sequences at 64k 0.089-0.090 against 0.097-0.098 ms (16 against 32 splits); 8 at 16k /
/// 64k 0.082 / 0.113-0.114 against 0.089 / 0.119-0.120; 16 at 16k / 64k 0.107-0.108 /
/// 0.157 against 0.112 / 0.161-0.162 (4 against 8 splits). 192 and 128 were slower for 8
/// and 16 sequences (0.121 / 0.173 and 0.131 / 0.191 ms at 64k). Its 256 workgroups of a
/// 16-sequence step at 64k take 0.075 ms in most runs and 0.108-0.113 in some (likely placed
/// unevenly on the 132 multiprocessors); forced to 8 splits (512) they took 0.079-0.082 in
/// five of six caches, to 6 a steady 0.097 (fifty-third session). With 512 over 20 fresh
/// caches a step took 0.149-0.153 ms against 256's 0.145-0.146 (0.172-0.181 in 6 of 20):
/// no better on average, and 4 and 8 sequences 6-11% slower (fifty-fourth session,
/// BENCHMARKS.md).
const CMP_SPLIT_TARGET_MMA: u64 = 256;
/// Key tiles a tensor-core compressed-attention workgroup walks at most where
/// [`CMP_SPLIT_TARGET`] would split finer than [`CMP_SPLIT_TARGET_MMA`]: on an H200 (f16
/// cache, 64k, forty-seventh session) a decode step of 16 sequences took 0.157 ms with 4
/// splits of 32 tiles, 0.173 with 3 of 43 and 0.191 with 2 of 64; of 16 sequences with Hq =
/// 32, Hkv = 8 (128 row groups), 0.312 with 2 splits of 64 tiles against 0.300-0.301 with 4
/// of 32 (at 16k, 0.143-0.146 with 2 splits of 16 tiles against 0.147-0.148 with 4).
const CMP_WALK_MMA: u64 = 32;
/// `SPLITS_MAX` in `shaders/merge.wgsl`.
const SPLITS_MAX: u64 = 64;
/// Attention splits at most (within `SPLITS_MAX`): beyond this the merge's reads of the
/// partials cost more than the parallelism gains (measured on an H200).
const ATTN_SPLITS_MAX: u64 = 32;
const _: () = assert!(ATTN_SPLITS_MAX <= SPLITS_MAX);
/// Selection splits at most (and `CAND_MAX / n`): more made neither the selection nor its
/// merge faster on an H200 (64 at a 64k decode step: 89 µs for both against 53 µs).
const SELECT_SPLITS_MAX: u64 = 16;
// `SPLITS_MAX` in `shaders/select_merge.wgsl` (one invocation per split).
const _: () = assert!(SELECT_SPLITS_MAX <= 64);
/// `CAND_MAX` in `shaders/select_merge.wgsl`: splits * n at most. 768 (not 1024) so that
/// the merge's workgroup memory (four arrays of it) fits WebGPU's default 16 KiB; at the
/// paper's n = 16 the 16 selection splits take 256.
pub(crate) const CAND_MAX: u64 = 768;
/// Query rows per chunk below which a prefill does not chunk itself to keep scores (it
/// multiplies q.k a second time in the selection instead).
const KEEP_MIN_ROWS: u64 = 256;
/// `BCHUNK` in `shaders/select.wgsl`.
const SELECT_BCHUNK: usize = 128;
/// `PBUF` in `shaders/select.wgsl`.
const SELECT_PBUF: usize = 512;
/// `TOP_BLOCKS` in `shaders/select_top.wgsl`: the most candidate blocks of a row that
/// its one workgroup (256 invocations, 8 blocks each) ranks.
pub const TOP_BLOCKS: usize = 2048;
/// `NMAX` of `shaders/select_merge.wgsl`: the most selected blocks a split selection's merge
/// ranks. A config with a larger `n` runs its selection unsplit (the selection's own lists
/// are sized by `n`: [`top_list_len`], [`list_entries`]).
pub const MERGE_TOP_N: usize = 256;

/// The entries the selection's top lists need for `config` over `tk` keys: `n`, or fewer
/// where the keys have fewer selection blocks than `n` (the lists never hold more), rounded
/// up to a power of two so that a growing cache's plans change the lists' length rarely.
/// So a config that selects every block (any `n` at least the blocks) costs the selection's
/// workgroup memory only what the blocks need.
pub fn list_entries(config: &NsaConfig, tk: usize) -> usize {
    let blocks = tk.div_ceil(config.sel_block).max(1).next_power_of_two();
    config.top_n.min(blocks.max(16))
}

/// The keys a plan's top lists are sized for ([`list_entries`]): a cache's capacity per
/// sequence, so that a decode loop's steps keep one length of lists (and one key tile, which
/// the lists' workgroup memory may bound) until the cache grows; else the shape's keys.
fn list_keys(shape: &Shape, cache: Option<&CacheRows>) -> usize {
    cache.map_or(shape.tk, |c| c.capacity.max(shape.tk))
}

/// A range of the work: whole batches (`q_count == Tq`) or query rows of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    b0: usize,
    nb: usize,
    q0: usize,
    qc: usize,
}

/// Keys per attention tile for workgroups of `rows` query rows: as many rows of
/// `tile_stride()` vec4s (the wider of Dk, Dv in vec4s; rounded up to odd unless a multiple
/// of 8) as fit the `smem` buffer the adapter's workgroup memory allows ([`smem_vec4s`])
/// after the queries (`rows` rows of Dk) and beside the fixed arrays of that tile and of the
/// selection's lists of `top_list` entries, at most `KT_MAX` (a multiple of 4 from 8 keys
/// on); an error when not even one fits.
fn kv_tile(s: &Shape, limits: &DeviceLimits, rows: u32, top_list: u32) -> Result<u32> {
    let stride = tile_stride(s);
    let queries = rows as usize * s.dk.div_ceil(4);
    // The score rows grow with the tile, so the `smem` buffer shrinks as it does: the
    // largest tile whose keys fit beside them (fewer keys never need more).
    let fits_lists = |kt: u32, list: u32| {
        smem_vec4s(limits.workgroup_storage, rows, kt, list) as usize
            >= queries + kt as usize * stride
    };
    let fits = |kt: u32| fits_lists(kt, top_list);
    let Some(fit) = (1..=KT_MAX as u32).rev().find(|&kt| fits(kt)) else {
        // Where one key would fit beside the shortest lists, the lists are what does not.
        let what = if fits_lists(1, top_list_len(1)) {
            "max_compute_workgroup_storage_size (the selection's top lists: 16 bytes per entry, n or the selection blocks there are, whichever is fewer)"
        } else {
            "max_compute_workgroup_storage_size (queries and one key of Dk, Dv)"
        };
        return Err(exceeds(
            what,
            specialized_fixed_bytes(rows, 1, top_list) as u64 + 16 * (queries + stride) as u64,
            limits.workgroup_storage as u64,
        ));
    };
    // Whole quads of keys from 8 on: the products take four keys per step, and kept block
    // sums need tiles of whole selection blocks (4 strides in the paper's config).
    Ok(if fit >= 8 { fit / 4 * 4 } else { fit })
}

/// vec4s per tile row (`tile_stride()` in `shaders/shared/qk.wgsl`).
fn tile_stride(s: &Shape) -> usize {
    let d4 = s.dk.max(s.dv).div_ceil(4);
    if d4 % 8 == 0 {
        d4
    } else {
        d4 | 1
    }
}

/// Keys per tile of the wide steps ([`Plan::wide_kv_tile`]), 0 for none. On tensor cores
/// the wide kernels hold f16 tiles of their own size (`mma_specialization`), so large heads
/// run wide there too: on an H200, f16 prefill at 64k with Dk = 192 took 318 ms wide
/// against 462 ms in 16-row workgroups (compressed attention 131.5 against 245.1 ms).
fn wide_kv_tile(s: &Shape, limits: &DeviceLimits, precision: Precision, top_list: u32) -> u32 {
    if limits.max_invocations < 8 * WIDE_ROWS {
        return 0;
    }
    let plain = matches!(kv_tile(s, limits, WIDE_ROWS, top_list), Ok(kt) if kt >= WIDE_KEYS);
    let on_tensor_cores = precision == Precision::F16
        && limits.tensor_cores
        && mma_specialization(
            s.dk as u32,
            s.dv as u32,
            limits.workgroup_storage,
            WIDE_ROWS,
            KT_MAX as u32,
        )
        .is_some_and(|spec| spec.kv_tile >= WIDE_KEYS);
    if plain || on_tensor_cores {
        WIDE_KEYS
    } else {
        0
    }
}

/// How the attention core's workgroups cover a chunk: `rows` per workgroup, `q_block`
/// consecutive queries times up to `rows` of a group's heads, `head_chunks` workgroups per
/// (query block, kv head), `kv_tile` keys per tile.
#[derive(Debug, Clone, Copy)]
struct Core {
    rows: u32,
    q_block: u32,
    head_chunks: u32,
    kv_tile: u32,
}

impl Core {
    /// Workgroups (row groups) over `seqs` sequences of `queries` queries and `hkv` kv heads.
    fn row_groups(&self, seqs: usize, queries: usize, hkv: usize) -> u64 {
        (seqs * queries.div_ceil(self.q_block as usize) * hkv) as u64 * self.head_chunks as u64
    }
}

/// Checks that Linear compression's weights `W_k: [Hkv, l, Dk, Dk]` and `W_v` fit one
/// binding each: the compression kernel binds them whole (Mean has none).
pub(crate) fn check_linear_weights(
    config: &NsaConfig,
    shape: &Shape,
    limits: &DeviceLimits,
) -> Result<()> {
    if config.compression != Compression::Linear {
        return Ok(());
    }
    let (l, d) = (config.cmp_block, shape.dk.max(shape.dv));
    let bytes = (shape.hkv * l * d * d * 4) as u64;
    if bytes > limits.max_storage_binding {
        return Err(exceeds(
            "max_storage_buffer_binding_size (Linear compression's W_k or W_v)",
            bytes,
            limits.max_storage_binding,
        ));
    }
    Ok(())
}

fn exceeds(what: &'static str, needed: u64, limit: u64) -> NsaError {
    NsaError::ExceedsLimit {
        what,
        needed,
        limit,
    }
}

impl Plan {
    /// The shape constants its kernels of `rows` query rows per workgroup (a [`Step`]'s
    /// `rows`) are compiled for.
    pub fn specialization(&self, rows: u32) -> Specialization {
        let wide = rows == WIDE_ROWS;
        Specialization {
            dk: self.shape.dk as u32,
            dv: self.shape.dv as u32,
            kv_tile: self.core(wide).kv_tile,
            // The wide kernels' buffer holds exactly the queries and one tile (see
            // WIDE_KEYS); the others' as much as the adapter allows.
            smem4: if wide {
                (rows as usize * self.shape.dk.div_ceil(4)
                    + WIDE_KEYS as usize * tile_stride(&self.shape)) as u32
            } else {
                smem_vec4s(
                    self.limits.workgroup_storage,
                    rows,
                    self.kv_tile,
                    self.top_list(),
                )
            },
            rows,
            // The fewest heads a workgroup owns: the group's last chunk of `rows`.
            few_rows: (self.shape.group() - 1) % (rows as usize) < 4,
            top_list: self.top_list(),
            queries: self.slc_queries(),
            parts: self.slc_parts(),
            invocations: select_top_invocations(self.limits.max_invocations),
        }
    }

    /// The specialization kernel `id` of a step of `rows` query rows compiles with, and
    /// whether it runs on tensor cores: with `tensor_cores` asked for, f16 inputs and a
    /// kernel that runs the attention core, the tensor-core core's own (a multiple of 16
    /// keys per tile, at most [`mma_max_kt`], and its workgroup-memory layout) where a tile
    /// fits `workgroup_storage` bytes; else [`Self::specialization`]. Either way
    /// [`Specialization::for_kernel`]: the top-list length only for the selection.
    pub fn kernel_specialization(
        &self,
        id: KernelId,
        rows: u32,
        tensor_cores: bool,
        workgroup_storage: u32,
    ) -> (Specialization, bool) {
        let plain = self.specialization(rows);
        let mma = self
            .mma_specialization(id, rows, tensor_cores, workgroup_storage)
            .map(|m| Specialization {
                queries: plain.queries,
                parts: plain.parts,
                ..m
            });
        (mma.unwrap_or(plain).for_kernel(id), mma.is_some())
    }

    /// Workgroup memory the plain kernels of this plan's wide steps need, where that is more
    /// than `limit` bytes: plans that run wide only because their f16 tiles fit on tensor
    /// cores ([`DeviceLimits::tensor_cores`]) need more than the adapter has.
    pub(crate) fn plain_wide_overflow(&self, limit: u32) -> Option<u64> {
        if self.wide_kv_tile == 0 {
            return None;
        }
        let spec = self.specialization(WIDE_ROWS);
        let needed = specialized_fixed_bytes(WIDE_ROWS, WIDE_KEYS, self.top_list()) as u64
            + 16 * spec.smem4 as u64;
        (needed > limit as u64).then_some(needed)
    }

    /// The selection's top-list length ([`top_list_len`]).
    fn top_list(&self) -> u32 {
        top_list_len(list_entries(
            &self.config,
            list_keys(&self.shape, self.cache.as_ref()),
        ))
    }

    /// Row groups of this plan's 16-row attention steps at most (all of its queries in one
    /// chunk): sequences x query blocks x kv heads x head chunks.
    fn narrow_row_groups(&self) -> u64 {
        let s = &self.shape;
        self.core(false).row_groups(s.batch, s.tq, s.hkv)
    }

    /// The attention core's layout in wide steps or in the others.
    fn core(&self, wide: bool) -> Core {
        let (rows, kv_tile) = if wide {
            (WIDE_ROWS, self.wide_kv_tile)
        } else {
            (ROWS, self.kv_tile)
        };
        let g = self.shape.group();
        Core {
            rows,
            // Consecutive queries share a workgroup when the group is smaller than its rows.
            q_block: (rows as usize / g.min(rows as usize)) as u32,
            head_chunks: g.div_ceil(rows as usize) as u32,
            kv_tile,
        }
    }

    /// Consecutive queries per workgroup of selected attention: one for groups of [`ROWS`]
    /// heads or more; else as many as the rows hold, at most [`SLC_QUERIES_MAX`] and the
    /// call's queries (a decode step's pipelines compile the walk out). The workgroup walks
    /// the union of its queries' selections once for all their rows: a tile costs the tensor
    /// cores the same for 4 live rows as for 16, and neighbouring queries share their forced
    /// blocks.
    /// (One where blocks are walked in pieces, [`Self::slc_parts`].)
    pub fn slc_queries(&self) -> u32 {
        if self.slc_parts() > 1 {
            return 1;
        }
        let rows = ROWS as usize / self.shape.group();
        rows.min(self.shape.tq).clamp(1, SLC_QUERIES_MAX) as u32
    }

    /// Pieces selected attention walks each selected block in ([`Specialization::parts`]):
    /// 1, or where the adapter caps the key tiles one workgroup walks
    /// ([`DeviceLimits::max_key_tiles`], llvmpipe) below a block's, as many as keep a piece
    /// of `ceil(l' / parts)` keys within the cap, so that one block's pieces can go to
    /// different splits (blocks of more than 256 tiles were an error on llvmpipe before).
    pub fn slc_parts(&self) -> u32 {
        let cap = self.limits.max_key_tiles;
        let tiles = (self.config.sel_block as u64).div_ceil(self.slc_min_tile() as u64);
        if cap == 0 || tiles <= cap {
            1
        } else {
            tiles.div_ceil(cap).min(u32::MAX as u64) as u32
        }
    }

    /// Keys per tile of kernel `id` in steps of `rows` rows, the fewer of its plain and its
    /// tensor-core kernel's where it may run on tensor cores (a pipeline falls back to the
    /// plain kernel where the other fails to compile): bounds on the key tiles a workgroup
    /// walks (`max_key_tiles`) hold for either.
    fn min_tile(&self, id: KernelId, rows: u32) -> u32 {
        let l = &self.limits;
        let plain = self.core(rows == WIDE_ROWS).kv_tile;
        let mma = self
            .mma_specialization(id, rows, l.tensor_cores, l.workgroup_storage)
            .map_or(plain, |m| m.kv_tile);
        plain.min(mma).max(1)
    }

    /// The tensor-core kernel's specialization of kernel `id` in steps of `rows` rows
    /// ([`mma_specialization`], without the selected-attention constants), where
    /// `tensor_cores` are asked for, the inputs are f16, the kernel runs the attention core
    /// and a tile fits `workgroup_storage` bytes.
    fn mma_specialization(
        &self,
        id: KernelId,
        rows: u32,
        tensor_cores: bool,
        workgroup_storage: u32,
    ) -> Option<Specialization> {
        let (dk, dv) = (self.shape.dk as u32, self.shape.dv as u32);
        let max_kt = mma_max_kt(id, rows, dk, dv, self.narrow_row_groups());
        (tensor_cores && self.precision == Precision::F16 && id.attention_core())
            .then(|| mma_specialization(dk, dv, workgroup_storage, rows, max_kt))
            .flatten()
    }

    /// [`Self::min_tile`] of selected attention (16-row steps).
    fn slc_min_tile(&self) -> u32 {
        self.min_tile(KernelId::SlcAttn, ROWS)
    }

    /// Selected attention's list entries per row group (pieces of blocks counted,
    /// [`Self::slc_parts`]) and key tiles per entry: `n` per query, and those that can hold
    /// keys, `n` or the blocks `Tk` has if fewer (the lists' other entries are empty).
    fn slc_entries(&self) -> (u64, u64, u64) {
        let (c, parts) = (&self.config, self.slc_parts() as u64);
        let q = self.slc_queries() as u64;
        let blocks = self.shape.tk.div_ceil(c.sel_block) as u64;
        let entry_tiles = (c.sel_block as u64)
            .div_ceil(parts)
            .div_ceil(self.slc_min_tile() as u64);
        (
            q * c.top_n as u64 * parts,
            q * (c.top_n as u64).min(blocks) * parts,
            entry_tiles,
        )
    }

    /// The plan's chains of dependent dispatches ([`crate::profile::chains`] of its steps):
    /// one per chunk it made to fit the adapter's bindings.
    pub fn chains(&self) -> usize {
        crate::profile::chains(self.steps.iter().map(|s| s.kernel))
    }

    /// Whether compressed attention keeps its scores (or block sums) for the selection in
    /// some step (those steps compile with [`crate::shaders::Kept::of`] their params).
    pub fn keeps_scores(&self) -> bool {
        self.kept_len > 0
    }

    /// Plans one call. Validates the config and shape first.
    pub fn new(config: &NsaConfig, shape: &Shape, limits: &DeviceLimits) -> Result<Plan> {
        Self::build(config, shape, limits, None, Precision::F32, &[], false)
    }

    /// Plans one call whose inputs are stored at `precision` (see [`Precision`]).
    pub fn with_precision(
        config: &NsaConfig,
        shape: &Shape,
        limits: &DeviceLimits,
        precision: Precision,
    ) -> Result<Plan> {
        Self::build(config, shape, limits, None, precision, &[], false)
    }

    /// Plans the rows of `shape.batch` consecutive, equally long sequences whose keys live in
    /// a KV cache stored at `precision`: compresses only the compressed tokens after
    /// `rows.cmp_done`, then attends.
    pub fn cached(
        config: &NsaConfig,
        shape: &Shape,
        limits: &DeviceLimits,
        rows: CacheRows,
        precision: Precision,
    ) -> Result<Plan> {
        rows.check(config, shape)?;
        Self::build(config, shape, limits, Some(rows), precision, &[], false)
    }

    /// Plans the attention of `shape.batch` consecutive sequences of a KV cache that each add
    /// `shape.tq` rows but hold different numbers of tokens: sequence `b` holds
    /// `shape.tk - behind[b]` (its new rows included), so one chain of dispatches serves a
    /// decode step of the whole batch. Compresses nothing: each sequence's new compressed
    /// tokens must exist first ([`Plan::cached`] plans of its equal-length runs, compression
    /// steps only, do that). At most [`RAGGED_MAX`] sequences.
    pub fn cached_ragged(
        config: &NsaConfig,
        shape: &Shape,
        limits: &DeviceLimits,
        rows: CacheRows,
        precision: Precision,
        behind: &[usize],
    ) -> Result<Plan> {
        if behind.len() != shape.batch || shape.batch > RAGGED_MAX {
            return Err(NsaError::InvalidShape {
                what: "behind",
                value: behind.len(),
                rule: "one entry per sequence of the batch, at most 64 sequences",
            });
        }
        if let Some(&b) = behind.iter().find(|&&b| b + shape.tq > shape.tk) {
            return Err(NsaError::InvalidShape {
                what: "behind",
                value: b,
                rule: "every sequence holds its new rows: behind + Tq <= Tk",
            });
        }
        rows.check(config, shape)?;
        Self::build(config, shape, limits, Some(rows), precision, behind, false)
    }

    /// This plan with steps that also write the branch outputs `o_cmp`, `o_slc` and `o_win`
    /// (each `[B, Tq, Hq, Dv]`: [`crate::GpuBuffers::branches`], or the scratch's), for
    /// inspection, planned again from the same inputs; the same plan where it has them
    /// already, or has no branches (dense attention, a cache's compression-only plan).
    /// Plans leave them out by default: at 64k with the paper's shape `o_win` alone is 2 GiB
    /// of f32 that only inspection reads.
    pub fn with_branch_outputs(&self) -> Result<Plan> {
        if self.branch_outputs || !self.has_branches() {
            return Ok(self.clone());
        }
        Self::build(
            &self.config,
            &self.shape,
            &self.limits,
            self.cache,
            self.precision,
            &self.behind,
            true,
        )
    }

    /// Whether the steps compute NSA's branches (and so could write their outputs): not a
    /// dense plan's nor a compression-only one's.
    pub(crate) fn has_branches(&self) -> bool {
        self.steps.iter().any(|s| s.kernel == KernelId::WinAttn)
    }

    fn build(
        config: &NsaConfig,
        shape: &Shape,
        limits: &DeviceLimits,
        cache: Option<CacheRows>,
        precision: Precision,
        behind: &[usize],
        branch_outputs: bool,
    ) -> Result<Plan> {
        config.validate()?;
        shape.validate()?;
        let s = *shape;
        let n_cmp = config.num_compressed(s.tk);
        let top_list = top_list_len(list_entries(config, list_keys(&s, cache.as_ref())));
        let kv_tile = kv_tile(&s, limits, ROWS, top_list)?;
        let mut plan = Plan {
            config: *config,
            shape: s,
            n_cmp,
            kv_tile,
            wide_kv_tile: wide_kv_tile(&s, limits, precision, top_list),
            steps: Vec::new(),
            limits: *limits,
            cache,
            precision,
            part_len: [0; 3],
            cand_len: 0,
            kept_len: 0,
            behind: Vec::new(),
            branch_outputs,
        };
        for t in [
            Tensor::Q,
            Tensor::KCmp,
            Tensor::VCmp,
            Tensor::Gates,
            Tensor::Idx,
            Tensor::Out,
            Tensor::WK,
            Tensor::WV,
        ] {
            let bytes = plan.tensor_bytes(t);
            if bytes > limits.max_buffer {
                return Err(exceeds("max_buffer_size", bytes, limits.max_buffer));
            }
        }
        check_linear_weights(config, shape, limits)?;
        if behind.is_empty() {
            plan.plan_compress()?;
        } else {
            plan.behind = behind.to_vec();
        }
        plan.plan_attention(false)?;
        Ok(plan)
    }

    /// Plans dense causal attention over the same shapes (the baseline kernel): `out` from
    /// `q`, `k`, `v` only; the window field of the stored config is set to `Tk`.
    pub fn dense(shape: &Shape, scale: Option<f32>, limits: &DeviceLimits) -> Result<Plan> {
        Self::dense_with_precision(shape, scale, limits, Precision::F32)
    }

    /// [`Self::dense`] with `q`, `k`, `v` stored at `precision`.
    pub fn dense_with_precision(
        shape: &Shape,
        scale: Option<f32>,
        limits: &DeviceLimits,
        precision: Precision,
    ) -> Result<Plan> {
        shape.validate()?;
        let config = NsaConfig {
            window: shape.tk,
            scale,
            ..NsaConfig::default()
        };
        config.validate()?;
        // No selection runs, but the plan's kernels share the NSA plans' sizing.
        let top_list = top_list_len(config.top_n);
        let mut plan = Plan {
            config,
            shape: *shape,
            n_cmp: 0,
            kv_tile: kv_tile(shape, limits, ROWS, top_list)?,
            wide_kv_tile: wide_kv_tile(shape, limits, precision, top_list),
            steps: Vec::new(),
            limits: *limits,
            cache: None,
            precision,
            part_len: [0; 3],
            cand_len: 0,
            kept_len: 0,
            behind: Vec::new(),
            branch_outputs: false,
        };
        for t in [Tensor::Q, Tensor::KWin, Tensor::VWin, Tensor::Out] {
            let bytes = plan.tensor_bytes(t);
            if bytes > limits.max_buffer {
                return Err(exceeds("max_buffer_size", bytes, limits.max_buffer));
            }
        }
        plan.plan_attention(true)?;
        Ok(plan)
    }

    /// The tensors this plan keeps in scratch buffers (every intermediate it binds).
    pub fn scratch_tensors(&self) -> Vec<Tensor> {
        let mut ts: Vec<Tensor> = Vec::new();
        for step in &self.steps {
            for (t, _) in &step.bindings {
                let scratch = matches!(
                    t,
                    Tensor::Kc
                        | Tensor::Vc
                        | Tensor::Lse
                        | Tensor::Idx
                        | Tensor::OCmp
                        | Tensor::OSlc
                        | Tensor::OWin
                        | Tensor::Part
                        | Tensor::PartSlc
                        | Tensor::PartWin
                        | Tensor::Cand
                        | Tensor::Kept
                );
                let cached = self.cache.is_some() && matches!(t, Tensor::Kc | Tensor::Vc);
                if scratch && !cached && !ts.contains(t) {
                    ts.push(*t);
                }
            }
        }
        ts
    }

    /// Checks that every scratch tensor fits one buffer of a device whose `max_buffer_size`
    /// is `max_buffer`, as [`crate::NsaPipeline::scratch`] needs.
    pub fn check_scratch(&self, max_buffer: u64) -> Result<()> {
        for t in self.scratch_tensors() {
            let bytes = self.tensor_bytes(t);
            if bytes > max_buffer {
                return Err(exceeds("max_buffer_size", bytes, max_buffer));
            }
        }
        Ok(())
    }

    /// Key rows per sequence in the key/value buffers: `Tk`, or the cache's capacity.
    pub fn k_stride(&self) -> usize {
        self.cache.map_or(self.shape.tk, |c| c.capacity)
    }

    /// Compressed rows per sequence in the compressed buffers: `C`, or the cache's.
    pub fn c_stride(&self) -> usize {
        self.cache.map_or(self.n_cmp, |c| c.cmp_capacity)
    }

    /// Elements of a tensor for the whole call.
    pub fn tensor_len(&self, t: Tensor) -> u64 {
        let s = &self.shape;
        let (b, tq, tk, hq, hkv, dk, dv) = (s.batch, s.tq, s.tk, s.hq, s.hkv, s.dk, s.dv);
        let l = self.config.cmp_block;
        let linear = self.config.compression == Compression::Linear;
        let n = match t {
            Tensor::Q => b * tq * hq * dk,
            Tensor::Gates => b * tq * hq * 3,
            Tensor::KCmp | Tensor::KSlc | Tensor::KWin => b * tk * hkv * dk,
            Tensor::VCmp | Tensor::VSlc | Tensor::VWin => b * tk * hkv * dv,
            Tensor::WK if linear => hkv * l * dk * dk,
            Tensor::PeK if linear => hkv * l * dk,
            Tensor::WV if linear => hkv * l * dv * dv,
            Tensor::PeV if linear => hkv * l * dv,
            Tensor::WK | Tensor::PeK | Tensor::WV | Tensor::PeV => 0,
            Tensor::Kc => b * self.n_cmp * hkv * dk,
            Tensor::Vc => b * self.n_cmp * hkv * dv,
            Tensor::Lse => b * tq * hq,
            Tensor::Idx => b * tq * hkv * self.config.top_n,
            Tensor::OCmp | Tensor::OSlc | Tensor::OWin | Tensor::Out => b * tq * hq * dv,
            Tensor::Part => return self.part_len[0],
            Tensor::PartSlc => return self.part_len[1],
            Tensor::PartWin => return self.part_len[2],
            Tensor::Cand => return self.cand_len,
            Tensor::Kept => return self.kept_len,
            Tensor::Unused => 4,
            // Aligned 16-byte pieces at slots 1 to 3, one per unused writable slot of the
            // dense merge.
            Tensor::UnusedOut => (3 * self.limits.storage_align as usize + 16) / 4,
        };
        n as u64
    }

    /// Bytes of a tensor for the whole call, in whole binding units ([`binding_unit`]; so
    /// at least one: wgpu buffers are never empty here).
    pub fn tensor_bytes(&self, t: Tensor) -> u64 {
        let unit = binding_unit(self.elem_bytes(t));
        (self.tensor_len(t) * self.elem_bytes(t))
            .next_multiple_of(unit)
            .max(unit)
    }

    /// Bytes per element of a tensor: inputs and compressed keys/values follow the plan's
    /// precision, everything else is 4-byte (f32, or i32 indices).
    pub fn elem_bytes(&self, t: Tensor) -> u64 {
        match t {
            Tensor::Q
            | Tensor::KCmp
            | Tensor::VCmp
            | Tensor::KSlc
            | Tensor::VSlc
            | Tensor::KWin
            | Tensor::VWin
            | Tensor::Kc
            | Tensor::Vc => self.precision.bytes(),
            _ => 4,
        }
    }

    /// Elements a binding may hold, leaving room for the alignment residual.
    fn binding_elems(&self) -> u64 {
        (self
            .limits
            .max_storage_binding
            .saturating_sub(self.limits.storage_align))
            / 4
    }

    /// One sequence's keys or values (the wider), `k_stride()` rows, in the 4-byte words of
    /// [`Self::binding_elems`]: f16 keys take half as many as f32, so that a batch shares a
    /// binding as its bytes allow. Too many for one binding is an error.
    fn seq_kv_words(&self) -> Result<u64> {
        let s = self.shape;
        let bytes = (self.k_stride() * s.hkv * s.dk.max(s.dv)) as u64 * self.precision.bytes();
        let words = bytes.div_ceil(4);
        if words > self.binding_elems() {
            return Err(exceeds(
                "max_storage_buffer_binding_size (keys or values of one sequence)",
                bytes + self.limits.storage_align,
                self.limits.max_storage_binding,
            ));
        }
        Ok(words)
    }

    /// The binding window of elements `[start, start + len)` of tensor `t`: an aligned byte
    /// range (its start and size multiples of [`binding_unit`] too, so that no 8-byte load
    /// of f16 is misaligned where the adapter allows 4-byte offsets) and the element
    /// residual the shader adds.
    fn window(&self, t: Tensor, start: u64, len: u64) -> (Window, u32) {
        let eb = self.elem_bytes(t);
        let align = self.limits.storage_align.max(binding_unit(eb));
        let byte0 = start * eb;
        let offset = byte0 / align * align;
        let end = (byte0 + len.max(1) * eb).next_multiple_of(binding_unit(eb));
        (
            Window {
                offset,
                size: end - offset,
            },
            ((byte0 - offset) / eb) as u32,
        )
    }

    fn base_params(&self) -> Params {
        let (c, s) = (&self.config, &self.shape);
        Params {
            tq: s.tq as u32,
            tk: s.tk as u32,
            hq: s.hq as u32,
            hkv: s.hkv as u32,
            g: s.group() as u32,
            dk: s.dk as u32,
            dv: s.dv as u32,
            cmp_block: c.cmp_block as u32,
            cmp_stride: c.cmp_stride as u32,
            sel_block: c.sel_block as u32,
            top_n: c.top_n as u32,
            init_blocks: c.init_blocks as u32,
            local_blocks: c.local_blocks as u32,
            // (A window past every key is every key: exact at any length the kernels take.)
            window: c.window.min(u32::MAX as usize) as u32,
            n_cmp: self.n_cmp as u32,
            scale: c.scale_for(s.dk),
            linear: (c.compression == Compression::Linear) as u32,
            head_chunks: self.core(false).head_chunks,
            kv_tile: self.kv_tile,
            k_stride: self.k_stride() as u32,
            c_stride: self.c_stride() as u32,
            splits: 1,
            ..Params::default()
        }
    }

    /// A 2D grid for `total` workgroups.
    fn grid(&self, total: u64) -> [u32; 2] {
        let x = total.clamp(1, self.limits.max_workgroups_per_dim as u64);
        [x as u32, total.div_ceil(x).max(1) as u32]
    }

    fn max_workgroups(&self) -> u64 {
        let m = self.limits.max_workgroups_per_dim as u64;
        (m * m).min(u32::MAX as u64)
    }

    /// Loop iterations one invocation of the compression kernel takes at most, for heads of
    /// `dim` (`shaders/compress.wgsl`: per block row, its two column loops and for Linear
    /// the staging of [`COMPRESS_TOKENS`] rows and each column's sum over eight inputs per
    /// iteration, the rest one at a time; 12 for the loops around them).
    pub fn compress_iterations(&self, dim: usize) -> u64 {
        let per_row = match self.config.compression {
            Compression::Linear => {
                3 + (COMPRESS_TOKENS * dim).div_ceil(128) + 2 * (dim / 8 + dim % 8)
            }
            Compression::Mean => 3,
        };
        12 + (self.config.cmp_block * per_row) as u64
    }

    fn plan_compress(&mut self) -> Result<()> {
        let s = self.shape;
        let rows = self.cache.unwrap_or_default();
        let c_count = self.n_cmp.saturating_sub(rows.cmp_done);
        if c_count == 0 {
            // No block to compress (none complete, `l > Tk` among them): no loop to bound.
            return Ok(());
        }
        let cap = self.limits.loop_iterations;
        let needed = self.compress_iterations(s.dk.max(s.dv));
        if cap != 0 && needed > cap {
            return Err(NsaError::ExceedsLimit {
                what: "loop_iterations (compression: a block's rows times the head's inputs per invocation; llvmpipe ends an invocation's loops after 65,535 iterations)",
                needed,
                limit: cap,
            });
        }
        let per_batch = self.seq_kv_words()?;
        let lim = self.binding_elems();
        let tokens = COMPRESS_TOKENS;
        let wg_per_batch = (c_count.div_ceil(tokens) * s.hkv) as u64;
        let nb = (lim / per_batch)
            .min(self.max_workgroups() / wg_per_batch)
            .max(1) as usize;
        let mut b0 = 0;
        while b0 < s.batch {
            let nb = nb.min(s.batch - b0);
            for (src, dst, w, pe, dim) in [
                (Tensor::KCmp, Tensor::Kc, Tensor::WK, Tensor::PeK, s.dk),
                (Tensor::VCmp, Tensor::Vc, Tensor::WV, Tensor::PeV, s.dv),
            ] {
                // Whole strides (see plan_attention).
                let (ks, cs) = (self.k_stride() as u64, self.c_stride() as u64);
                let (sw, soff) = self.window(
                    src,
                    (rows.key_row0 + b0 as u64 * ks) * (s.hkv * dim) as u64,
                    nb as u64 * ks * (s.hkv * dim) as u64,
                );
                let (dw, doff) = self.window(
                    dst,
                    (rows.cmp_row0 + b0 as u64 * cs) * (s.hkv * dim) as u64,
                    nb as u64 * cs * (s.hkv * dim) as u64,
                );
                let total = wg_per_batch * nb as u64;
                let params = Params {
                    batch: nb as u32,
                    dim: dim as u32,
                    total_wg: total as u32,
                    off_k: soff,
                    off_kc: doff,
                    c_start: rows.cmp_done as u32,
                    c_count: c_count as u32,
                    q_block: tokens as u32,
                    ..self.base_params()
                };
                let whole = |t: Tensor| Window {
                    offset: 0,
                    size: self.tensor_bytes(t),
                };
                self.steps.push(Step {
                    kernel: KernelId::Compress,
                    rows: ROWS,
                    params,
                    grid: self.grid(total),
                    bindings: vec![(src, sw), (dst, dw), (w, whole(w)), (pe, whole(pe))],
                });
            }
            b0 += nb;
        }
        Ok(())
    }

    fn chunks(&self, dense: bool) -> Result<Vec<Chunk>> {
        let s = self.shape;
        let lim = self.binding_elems();
        let kv = self.seq_kv_words()?;
        let row = (s.hq * s.dk.max(s.dv).max(3)).max(s.hkv * self.config.top_n) as u64;
        let wg_row = (s.hkv as u64) * self.core(false).head_chunks as u64;
        // Chunks small enough that compressed attention can keep its scores for the
        // selection, unless that takes chunks of fewer than KEEP_MIN_ROWS rows.
        // Chunks of that many rows run wide where the plan has wide steps.
        let rows = if self.wide_kv_tile > 0 {
            WIDE_ROWS
        } else {
            ROWS
        };
        let kept_row = self.kept_stride(self.kept_sums_tile(rows));
        let keep_rows = self.kept_budget() / (s.hq as u64 * kept_row).max(1);
        let keep_cap = if keep_rows >= KEEP_MIN_ROWS.min(s.tq as u64) {
            keep_rows
        } else {
            u64::MAX
        };
        let max_rows = (lim / row)
            .min(self.max_workgroups() / wg_row)
            .min(keep_cap);
        let split_rows = self.split_rows(dense);
        if split_rows == 0 {
            return Err(exceeds(
                "max_key_tiles (key tiles per attention workgroup: llvmpipe ends an invocation's loops after 65,535 iterations; the partials of one query row's splits exceed a binding)",
                self.key_tiles(dense),
                self.limits.max_key_tiles,
            ));
        }
        let max_rows = max_rows.min(split_rows);
        if max_rows == 0 {
            return Err(exceeds(
                "max_storage_buffer_binding_size (one query row of q, out or gates)",
                row * 4 + self.limits.storage_align,
                self.limits.max_storage_binding,
            ));
        }
        let per_batch = (s.tq as u64 * row).max(kv);
        let mut chunks = Vec::new();
        if s.tq as u64 <= max_rows && per_batch <= lim {
            let nb = (lim / per_batch).min(max_rows / s.tq as u64).max(1) as usize;
            let mut b0 = 0;
            while b0 < s.batch {
                let n = nb.min(s.batch - b0);
                chunks.push(Chunk {
                    b0,
                    nb: n,
                    q0: 0,
                    qc: s.tq,
                });
                b0 += n;
            }
        } else {
            for b0 in 0..s.batch {
                let mut q0 = 0;
                while q0 < s.tq {
                    let qc = (max_rows as usize).min(s.tq - q0);
                    chunks.push(Chunk { b0, nb: 1, q0, qc });
                    q0 += qc;
                }
            }
        }
        Ok(chunks)
    }

    /// The most key tiles one attention workgroup of this plan walks that chunking cannot
    /// shorten, in the smallest tile any step takes: all Tk keys for dense attention; for
    /// NSA the compressed tokens or the selected blocks (the window's range grows with a
    /// chunk's rows: splits_toward() covers it).
    fn key_tiles(&self, dense: bool) -> u64 {
        let id = if dense {
            KernelId::Dense
        } else {
            KernelId::CmpAttn
        };
        let rows: &[u32] = if self.wide_kv_tile > 0 {
            &[ROWS, WIDE_ROWS]
        } else {
            &[ROWS]
        };
        let kt = rows
            .iter()
            .map(|&r| self.min_tile(id, r))
            .min()
            .unwrap_or(1) as u64;
        let c = &self.config;
        let keys = if dense {
            self.shape.tk
        } else {
            let blocks = self.shape.tk.div_ceil(c.sel_block);
            self.n_cmp.max(c.top_n.min(blocks) * c.sel_block)
        };
        (keys as u64).div_ceil(kt)
    }

    /// Splits the longest key range of one row group needs under `max_key_tiles` (not 0):
    /// dense attention's keys, or NSA's compressed tokens or selected blocks (whole list
    /// entries per split, [`Self::slc_entries`]).
    fn splits_needed(&self, dense: bool, cap: u64) -> u64 {
        let need = self.key_tiles(dense).div_ceil(cap);
        if dense {
            return need;
        }
        let (_, filled, entry_tiles) = self.slc_entries();
        need.max(filled.div_ceil((cap / entry_tiles).max(1)))
    }

    /// Query rows per chunk whose partial results fit a binding where `max_key_tiles` makes
    /// the longest key range split as often as it must (three branches' partials per row and
    /// split for NSA, one for dense attention); 0 where not even one row's do.
    fn split_rows(&self, dense: bool) -> u64 {
        let s = self.shape;
        match self.limits.max_key_tiles {
            0 => u64::MAX,
            cap => match self.splits_needed(dense, cap) {
                0 | 1 => u64::MAX,
                need => {
                    let branches = if dense { 1 } else { 3 };
                    self.binding_elems() / (branches * need * (s.hq * (s.dv + 2)) as u64)
                }
            },
        }
    }

    /// How many workgroups share one row group's keys in an attention dispatch of `groups`
    /// workgroups over at most `tiles` key tiles, where one workgroup's keys are `walk` =
    /// (units, tiles per unit), each split taking every splits-th unit whole: a tile of a
    /// key range (`tiles`, or for the window its rows' own windows, not the chunk's), or a
    /// list entry of selected attention ([`Self::slc_entries`]). Enough splits to reach
    /// `target` workgroups, each keeping at least one tile, at most `most`, and as many as
    /// `max_key_tiles` needs, within the merge kernel's `SPLITS_MAX` and the binding limit
    /// for the partials (`part_row` elements per split); [`NsaError::ExceedsLimit`] where a
    /// split's walk stays over the cap.
    fn splits_toward(
        &self,
        target: u64,
        groups: u64,
        tiles: u64,
        walk: (u64, u64),
        most: u64,
        part_row: u64,
    ) -> Result<u32> {
        let (units, unit) = walk;
        let cap = self.limits.max_key_tiles;
        let need = if cap == 0 {
            1
        } else {
            units.div_ceil((cap / unit).max(1))
        };
        let want = if groups >= target {
            1
        } else {
            target.div_ceil(groups).min(tiles).min(ATTN_SPLITS_MAX)
        };
        let sp = want
            .max(need)
            .min(SPLITS_MAX)
            .min(self.binding_elems() / part_row.max(1))
            .min(most)
            .max(1);
        let per = units.div_ceil(sp) * unit;
        if cap > 0 && per > cap {
            return Err(exceeds(
                "max_key_tiles (key tiles per attention workgroup: llvmpipe ends an invocation's loops after 65,535 iterations)",
                per,
                cap,
            ));
        }
        Ok(sp as u32)
    }

    /// Compressed tokens per tile of compressed attention's kept block sums in steps of
    /// `rows` query rows (`keep_block_sums` in `shaders/cmp_attn.wgsl`), or 0 where it keeps
    /// every score: block sums need selection blocks of a multiple of 4 pieces (`l' / d`),
    /// compressed tokens of at most 5 (`l / d`), and key tiles of whole blocks; on tensor
    /// cores (whose softmax takes four neighbours at a time), tiles of 64 keys in the wide
    /// steps and of 32 in the 16-row ones. On an H200 at 64k (f16, tensor cores) block sums
    /// made a prefill at D = 128 (wide, 64-key tiles) 182.5 -> 179.3 ms, but one at Dk = 192
    /// (wide, 32-key tiles) 278.5 -> 279.7 ms (forty-sixth session: 254.3 -> 254.8 in one
    /// call, 251.8 -> 259.5 in 4096-token calls); on the shader cores (f32, 32-key tiles)
    /// 500.3 -> 493.2 ms. In 16-row steps (decode, short chunks) they let `select_top.wgsl`
    /// rank: a decode step of one sequence at 64k took 0.076 ms instead of 0.081 (of 16,
    /// 0.160-0.162 instead of 0.170-0.173; BENCHMARKS.md, forty-sixth session).
    fn kept_sums_tile(&self, rows: u32) -> u32 {
        let c = &self.config;
        let (m, u) = (c.sel_block / c.cmp_stride, c.cmp_block / c.cmp_stride);
        let (spec, mma) = self.kernel_specialization(
            KernelId::CmpAttn,
            rows,
            self.limits.tensor_cores,
            self.limits.workgroup_storage,
        );
        let kt = spec.kv_tile as usize;
        let quads = match (mma, rows == WIDE_ROWS) {
            (true, true) => 64,
            (true, false) => 32,
            (false, _) => 4,
        };
        if m % 4 == 0 && u <= 5 && kt % m == 0 && kt % quads == 0 {
            kt as u32
        } else {
            0
        }
    }

    /// Elements of one query head's kept scores (`tile` 0) or block sums (compressed tokens
    /// per tile: `tile / 4 + 2` per tile), padded to whole vec4s.
    fn kept_stride(&self, tile: u32) -> u64 {
        let n = self.n_cmp as u64;
        let len = if tile == 0 {
            n
        } else {
            n.div_ceil(tile as u64) * (tile as u64 / 4 + 2)
        };
        len.next_multiple_of(4)
    }

    /// Elements of kept scores one chunk may have: `DeviceLimits::kept_scores`, a binding,
    /// a buffer.
    fn kept_budget(&self) -> u64 {
        (self.limits.kept_scores / 4)
            .min(self.binding_elems())
            .min(self.limits.max_buffer / 4)
    }

    /// Blocks per selection chunk: as many as the kernel's token tile holds, and one where a
    /// block's tokens alone overflow it (`l'/d + l/d - 1` > 512: the kernel then takes them
    /// in windows of the tile).
    fn select_chunk(&self) -> u64 {
        let c = &self.config;
        let (m, u) = (c.sel_block / c.cmp_stride, c.cmp_block / c.cmp_stride);
        if m + (u - 1) > SELECT_PBUF {
            return 1;
        }
        SELECT_BCHUNK.min((SELECT_PBUF - (u - 1)) / m) as u64
    }

    /// Splits and blocks per chunk for the selection of `groups` (query, kv head) rows: splits
    /// take every splits-th chunk of blocks, and their candidates must fit `CAND_MAX` per row
    /// and a binding. Where the kernel's token tile caps the chunks, there are more chunks
    /// than splits (never more splits than `want`: the merge holds `CAND_MAX` candidates, and
    /// lists of [`MERGE_TOP_N`] at most: a larger `n` is not split).
    ///
    /// Every split walks at least one whole chunk (one block per invocation), so fewer than
    /// two chunks' blocks are not split at all: fewer splits leave the merge fewer
    /// candidates, and a whole chunk costs a split hardly more than part of one. On an H200
    /// (f16 cache, the paper's config, whose chunks hold 127 blocks: 8, 4, 2 and 1 splits at
    /// 64k, 32k, 16k and 8k instead of 16) a decode step of one sequence took 0.070-0.071 /
    /// 0.071-0.072 / 0.075-0.076 ms at 16k / 32k / 64k against 0.074 / 0.076 / 0.078, of four
    /// 0.099 against 0.102-0.103 ms at 64k, of 16 the same (BENCHMARKS.md, forty-first
    /// session).
    fn select_splits(&self, groups: u64, nrows: u64) -> (u32, u32) {
        let chunk = self.select_chunk();
        if groups >= SPLIT_TARGET || self.config.top_n > MERGE_TOP_N {
            return (1, chunk as u32);
        }
        let c = &self.config;
        let blocks = self.shape.tk.div_ceil(c.sel_block) as u64;
        let per_split = nrows * self.shape.hkv as u64 * c.top_n as u64 * 2;
        let want = SPLIT_TARGET
            .div_ceil(groups)
            .min(blocks / chunk)
            .min(SELECT_SPLITS_MAX.min(CAND_MAX / c.top_n as u64))
            .min(self.binding_elems() / per_split.max(1))
            .max(1);
        let chunk = chunk.min(blocks.div_ceil(want));
        (blocks.div_ceil(chunk).min(want) as u32, chunk as u32)
    }

    /// Whether one workgroup per row ranks the selection's blocks (`select_top.wgsl`) unless
    /// [`DeviceLimits::split_select`]: from block sums (`kept_tile` > 0), for groups of at most [`ROWS`] heads (their
    /// log-sum-exps load once) and at most [`TOP_BLOCKS`] blocks.
    fn select_top(&self, kept_tile: u32) -> bool {
        let s = &self.shape;
        !self.limits.split_select
            && kept_tile > 0
            && s.hq / s.hkv <= ROWS as usize
            && s.tk.div_ceil(self.config.sel_block) <= TOP_BLOCKS
    }

    fn plan_attention(&mut self, dense: bool) -> Result<()> {
        let s = self.shape;
        let n = self.config.top_n;
        for ch in self.chunks(dense)? {
            let rows = (ch.b0 * s.tq + ch.q0) as u64;
            let nrows = (ch.nb * ch.qc) as u64;
            let rows0 = self.cache.unwrap_or_default();
            let (ks, cs) = (self.k_stride() as u64, self.c_stride() as u64);
            // Keys and compressed keys are bound by whole strides (Tk and C, or a cache's
            // capacities, which chunks() fits into one binding), so that a cache's windows
            // stay the same from one decode step to the next and its bind groups can be kept.
            let keys = rows0.key_row0 + ch.b0 as u64 * ks;
            let nkeys = ch.nb as u64 * ks;
            let cmp0 = rows0.cmp_row0 + ch.b0 as u64 * cs;
            let ncmp = ch.nb as u64 * cs;
            let (hq, hkv, dk, dv) = (s.hq as u64, s.hkv as u64, s.dk as u64, s.dv as u64);
            let q = self.window(Tensor::Q, rows * hq * dk, nrows * hq * dk);
            let gates = self.window(Tensor::Gates, rows * hq * 3, nrows * hq * 3);
            let lse = self.window(Tensor::Lse, rows * hq, nrows * hq);
            let idx = self.window(Tensor::Idx, rows * hkv * n as u64, nrows * hkv * n as u64);
            let kc = self.window(Tensor::Kc, cmp0 * hkv * dk, ncmp * hkv * dk);
            let vc = self.window(Tensor::Vc, cmp0 * hkv * dv, ncmp * hkv * dv);
            // out and the three branch outputs share one layout, as do all key (value) tensors.
            let out = self.window(Tensor::Out, rows * hq * dv, nrows * hq * dv);
            let (ocmp, oslc, owin) = (out, out, out);
            let kw = self.window(Tensor::KWin, keys * hkv * dk, nkeys * hkv * dk);
            let vw = self.window(Tensor::VWin, keys * hkv * dv, nkeys * hkv * dv);
            let mut base = Params {
                batch: ch.nb as u32,
                q_start: ch.q0 as u32,
                q_count: ch.qc as u32,
                off_q: q.1,
                off_gates: gates.1,
                off_lse: lse.1,
                off_idx: idx.1,
                off_kc: kc.1,
                off_ocmp: ocmp.1,
                off_oslc: oslc.1,
                off_owin: owin.1,
                off_out: out.1,
                ..self.base_params()
            };
            let behind = self.behind.iter().skip(ch.b0).take(ch.nb);
            for (bb, &b) in behind.enumerate() {
                base.behind[bb / 4][bb % 4] = b as u32;
            }
            // Compressed, window and dense attention over many queries run wide; selected
            // attention keeps one query per workgroup (each has its own blocks).
            let core = self.core(self.wide_kv_tile > 0 && ch.qc >= WIDE_MIN_QUERIES);
            let attn_total = core.row_groups(ch.nb, ch.qc, self.shape.hkv);
            let attn = Params {
                total_wg: attn_total as u32,
                q_block: core.q_block,
                head_chunks: core.head_chunks,
                kv_tile: core.kv_tile,
                ..base
            };
            let slc_q = self.slc_queries();
            let slc_total = ch.nb as u64
                * (ch.qc as u64).div_ceil(slc_q as u64)
                * hkv
                * self.core(false).head_chunks as u64;
            let slc = Params {
                total_wg: slc_total as u32,
                q_block: slc_q,
                ..base
            };
            // Few row groups (decode, short chunks): split each group's keys over several
            // workgroups, which write partials, and merge them in one pass at the end.
            let part_row = nrows * hq * (dv + 2);
            let tiles = |keys: u64, kt: u32| keys.div_ceil(kt as u64);
            let align = self.limits.storage_align;
            // A piece of the dummy for a binding a step does not use: read-only, or writable.
            // WebGPU forbids overlapping writable bindings of one buffer, and a buffer bound
            // both ways in one dispatch, so each writable one takes its own aligned slot of
            // the writable dummy.
            let unused = |writable: bool, slot: u64| {
                if writable {
                    (
                        Tensor::UnusedOut,
                        Window {
                            offset: slot * align,
                            size: 16,
                        },
                    )
                } else {
                    (
                        Tensor::Unused,
                        Window {
                            offset: 0,
                            size: 16,
                        },
                    )
                }
            };
            let merge_total = nrows * hq;
            if dense {
                let t = tiles(s.tk as u64, core.kv_tile);
                let walk = tiles(s.tk as u64, self.min_tile(KernelId::Dense, core.rows));
                let sp =
                    self.splits_toward(SPLIT_TARGET, attn_total, t, (walk, 1), u64::MAX, part_row)?;
                let len = part_row * sp as u64;
                let pw = self.window(Tensor::Part, 0, len);
                let o = if sp > 1 {
                    self.part_len[0] = self.part_len[0].max(len);
                    (Tensor::Part, pw)
                } else {
                    (Tensor::Out, out)
                };
                self.steps.push(Step {
                    kernel: KernelId::Dense,
                    rows: core.rows,
                    params: Params {
                        off_k: kw.1,
                        off_v: vw.1,
                        off_out: o.1 .1,
                        splits: sp,
                        partials: (sp > 1) as u32,
                        total_wg: (attn_total * sp as u64) as u32,
                        ..attn
                    },
                    grid: self.grid(attn_total * sp as u64),
                    bindings: vec![
                        (Tensor::Q, q.0),
                        (Tensor::KWin, kw.0),
                        (Tensor::VWin, vw.0),
                        (o.0, o.1 .0),
                    ],
                });
                if sp > 1 {
                    self.steps.push(Step {
                        kernel: KernelId::Merge,
                        rows: ROWS,
                        params: Params {
                            splits: sp,
                            branch: 0,
                            total_wg: merge_total as u32,
                            off_k: pw.1,
                            ..base
                        },
                        grid: self.grid(merge_total),
                        bindings: vec![
                            (Tensor::Part, pw.0),
                            unused(false, 0),
                            unused(false, 0),
                            unused(false, 0),
                            unused(true, 1),
                            unused(true, 2),
                            unused(true, 3),
                            (Tensor::Out, out.0),
                        ],
                    });
                }
                continue;
            }
            // When any branch splits, all three write partials (a third of a binding each at
            // most, in three buffers) and one merge pass combines them with the gates.
            let sel_total = nrows * hkv;
            let (ks, vs) = (kw, vw);
            let cmp_tiles = tiles(self.n_cmp as u64, core.kv_tile);
            let limits = &self.limits;
            let (cmp_spec, cmp_mma) = self.kernel_specialization(
                KernelId::CmpAttn,
                core.rows,
                limits.tensor_cores,
                limits.workgroup_storage,
            );
            let cmp_walk = tiles(
                self.n_cmp as u64,
                self.min_tile(KernelId::CmpAttn, core.rows),
            );
            let cmp_split = |target| {
                let walk = (cmp_walk, 1);
                self.splits_toward(target, attn_total, cmp_tiles, walk, u64::MAX, 3 * part_row)
            };
            let targets = self.limits.split_targets;
            let mut sp_c = cmp_split(targets.compressed)?;
            if cmp_mma {
                // Toward the tensor cores' target, but never walks longer than CMP_WALK_MMA
                // tiles where the shader cores' target splits finer.
                let walk = tiles(self.n_cmp as u64, cmp_spec.kv_tile);
                let walk = walk.div_ceil(CMP_WALK_MMA) as u32;
                sp_c = cmp_split(targets.compressed_mma)?.max(walk.min(sp_c));
            }
            // A workgroup's queries select n blocks each, their union at most all of them.
            // Whole entries per split, at most one split per entry.
            let (entries, filled, entry_tiles) = self.slc_entries();
            let sp_s = self.splits_toward(
                targets.selected,
                slc_total,
                entries * entry_tiles,
                (filled, entry_tiles),
                entries,
                3 * part_row,
            )?;
            let win_keys = self.config.window.saturating_add(ch.qc).min(s.tk) as u64;
            // One workgroup's rows: nq <= q_block consecutive queries' windows.
            let walk = (self.config.window)
                .saturating_add((core.q_block as usize).min(ch.qc))
                .min(s.tk) as u64;
            let sp_w = self.splits_toward(
                targets.window,
                attn_total,
                tiles(win_keys, core.kv_tile),
                (tiles(walk, self.min_tile(KernelId::WinAttn, core.rows)), 1),
                u64::MAX,
                3 * part_row,
            )?;
            let split = sp_c > 1 || sp_s > 1 || sp_w > 1;
            let lens = [sp_c, sp_s, sp_w].map(|sp| part_row * sp as u64 * split as u64);
            let pc = self.window(Tensor::Part, 0, lens[0]);
            let ps = self.window(Tensor::PartSlc, 0, lens[1]);
            let pw = self.window(Tensor::PartWin, 0, lens[2]);
            for (have, len) in self.part_len.iter_mut().zip(lens) {
                *have = (*have).max(len);
            }
            // Compressed attention keeps its scores (or block sums) and the selection reads
            // them where they fit: the selection then only sums probabilities and ranks
            // blocks. Rows are padded to whole vec4s (cmp_attn stores four scores at a time).
            let kept_tile = self.kept_sums_tile(core.rows);
            let stride = self.kept_stride(kept_tile);
            let kept_len = nrows * hq * stride;
            let keep = kept_len > 0 && kept_len <= self.kept_budget();
            // Not kept: stride 0, a writable dummy piece for cmp_attn, a read-only dummy for
            // the selection.
            let (kept_out, kept_in, kept_stride, off_kept) = if keep {
                self.kept_len = self.kept_len.max(kept_len);
                let (w, off) = self.window(Tensor::Kept, 0, kept_len);
                ((Tensor::Kept, w), (Tensor::Kept, w), stride as u32, off)
            } else {
                (unused(true, 0), unused(false, 0), 0, 0)
            };
            let kept_tile = if keep { kept_tile } else { 0 };
            let o = if split {
                (Tensor::PartWin, pw)
            } else {
                (Tensor::Out, out)
            };
            // The branch outputs where a step writes them: the window's combination reads
            // o_cmp and o_slc unsplit and writes o_win when asked; split, the merge writes all
            // three when asked and nothing else touches them.
            let bound = |t: Tensor, w: Window, used: bool, writable: bool, slot: u64| {
                if used {
                    (t, w)
                } else {
                    unused(writable, slot)
                }
            };
            let branches = self.branch_outputs;
            let win = Step {
                kernel: KernelId::WinAttn,
                rows: core.rows,
                params: Params {
                    off_k: kw.1,
                    off_v: vw.1,
                    off_out: o.1 .1,
                    splits: sp_w,
                    partials: split as u32,
                    branch: if branches && !split { 2 } else { 1 },
                    total_wg: (attn_total * sp_w as u64) as u32,
                    ..attn
                },
                grid: self.grid(attn_total * sp_w as u64),
                bindings: vec![
                    (Tensor::Q, q.0),
                    (Tensor::KWin, kw.0),
                    (Tensor::VWin, vw.0),
                    (Tensor::Gates, gates.0),
                    bound(Tensor::OCmp, ocmp.0, !split, false, 0),
                    bound(Tensor::OSlc, oslc.0, !split, false, 0),
                    bound(Tensor::OWin, owin.0, branches && !split, true, 3),
                    (o.0, o.1 .0),
                ],
            };
            let o = if split {
                (Tensor::Part, pc)
            } else {
                (Tensor::OCmp, ocmp)
            };
            self.steps.push(Step {
                kernel: KernelId::CmpAttn,
                rows: core.rows,
                params: Params {
                    off_k: kc.1,
                    off_v: vc.1,
                    off_ocmp: o.1 .1,
                    splits: sp_c,
                    partials: split as u32,
                    total_wg: (attn_total * sp_c as u64) as u32,
                    kept_stride,
                    off_kept,
                    kept_tile,
                    ..attn
                },
                grid: self.grid(attn_total * sp_c as u64),
                bindings: vec![
                    (Tensor::Q, q.0),
                    (Tensor::Kc, kc.0),
                    (Tensor::Vc, vc.0),
                    (o.0, o.1 .0),
                    (Tensor::Lse, lse.0),
                    kept_out,
                ],
            });
            // The selection reads the log-sum-exp, or derives it from the partials.
            let l = if split {
                (Tensor::Part, pc)
            } else {
                (Tensor::Lse, lse)
            };
            let (sp, sel_chunk) = self.select_splits(sel_total, nrows);
            // Where the selection would split and ranks block sums, one workgroup per row
            // ranks all its blocks instead (select_top.wgsl): no candidates, no merge.
            let top = sp > 1 && self.select_top(kept_tile);
            let sp = if top { 1 } else { sp };
            let cand_len = sel_total * n as u64 * 2 * sp as u64;
            let cw = self.window(Tensor::Cand, 0, cand_len);
            let o = if sp > 1 {
                self.cand_len = self.cand_len.max(cand_len);
                (Tensor::Cand, cw)
            } else {
                (Tensor::Idx, idx)
            };
            self.steps.push(Step {
                kernel: if top {
                    KernelId::SelectTop
                } else {
                    KernelId::Select
                },
                rows: ROWS,
                params: Params {
                    total_wg: (sel_total * sp as u64) as u32,
                    splits: sp,
                    sel_chunk,
                    off_idx: o.1 .1,
                    off_lse: l.1 .1,
                    cmp_splits: if split { sp_c } else { 0 },
                    kept_stride,
                    off_kept,
                    kept_tile,
                    ..base
                },
                grid: self.grid(sel_total * sp as u64),
                bindings: if top {
                    vec![(l.0, l.1 .0), (o.0, o.1 .0), kept_in]
                } else {
                    vec![
                        (Tensor::Q, q.0),
                        (Tensor::Kc, kc.0),
                        (l.0, l.1 .0),
                        (o.0, o.1 .0),
                        kept_in,
                    ]
                },
            });
            if sp > 1 {
                self.steps.push(Step {
                    kernel: KernelId::SelectMerge,
                    rows: ROWS,
                    params: Params {
                        total_wg: sel_total as u32,
                        splits: sp,
                        off_kc: cw.1,
                        ..base
                    },
                    grid: self.grid(sel_total),
                    bindings: vec![(Tensor::Cand, cw.0), (Tensor::Idx, idx.0)],
                });
            }
            let o = if split {
                (Tensor::PartSlc, ps)
            } else {
                (Tensor::OSlc, oslc)
            };
            self.steps.push(Step {
                kernel: KernelId::SlcAttn,
                rows: ROWS,
                params: Params {
                    off_k: ks.1,
                    off_v: vs.1,
                    off_oslc: o.1 .1,
                    splits: sp_s,
                    partials: split as u32,
                    total_wg: (slc_total * sp_s as u64) as u32,
                    ..slc
                },
                grid: self.grid(slc_total * sp_s as u64),
                bindings: vec![
                    (Tensor::Q, q.0),
                    (Tensor::KSlc, ks.0),
                    (Tensor::VSlc, vs.0),
                    (Tensor::Idx, idx.0),
                    (o.0, o.1 .0),
                ],
            });
            // Split, the window still goes last before the merge: its workgroups then run
            // beside the selected branch's rather than with the compressed branch's, which
            // the rest of the step waits for (an H200 decode step at 64k, B=1: 0.124 ms
            // against 0.137 ms with the window right after the compressed branch).
            self.steps.push(win);
            if split {
                self.steps.push(Step {
                    kernel: KernelId::Merge,
                    rows: ROWS,
                    params: Params {
                        splits: sp_c,
                        slc_splits: sp_s,
                        win_splits: sp_w,
                        branch: if branches { 2 } else { 1 },
                        total_wg: merge_total as u32,
                        off_k: pc.1,
                        off_pslc: ps.1,
                        off_pwin: pw.1,
                        ..base
                    },
                    grid: self.grid(merge_total),
                    bindings: vec![
                        (Tensor::Part, pc.0),
                        (Tensor::PartSlc, ps.0),
                        (Tensor::PartWin, pw.0),
                        (Tensor::Gates, gates.0),
                        bound(Tensor::OCmp, ocmp.0, branches, true, 1),
                        bound(Tensor::OSlc, oslc.0, branches, true, 2),
                        bound(Tensor::OWin, owin.0, branches, true, 3),
                        (Tensor::Out, out.0),
                    ],
                });
            }
        }
        Ok(())
    }
}
