//! The kernels: the `Params` uniform, each kernel's binding table, and pipeline creation.

use bytemuck::{Pod, Zeroable};

/// The uniform every kernel reads. Keep in sync with `struct Params` in
/// `shaders/shared/params.wgsl` (a test checks the size against naga's layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
#[allow(missing_docs)]
pub struct Params {
    pub batch: u32,
    pub tq: u32,
    pub tk: u32,
    pub hq: u32,
    pub hkv: u32,
    pub g: u32,
    pub dk: u32,
    pub dv: u32,
    pub cmp_block: u32,
    pub cmp_stride: u32,
    pub sel_block: u32,
    pub top_n: u32,
    pub init_blocks: u32,
    pub local_blocks: u32,
    pub window: u32,
    pub n_cmp: u32,
    pub scale: f32,
    pub q_start: u32,
    pub q_count: u32,
    pub linear: u32,
    pub dim: u32,
    pub head_chunks: u32,
    pub kv_tile: u32,
    pub total_wg: u32,
    pub off_q: u32,
    pub off_k: u32,
    pub off_v: u32,
    pub off_kc: u32,
    pub off_gates: u32,
    pub off_out: u32,
    pub off_ocmp: u32,
    pub off_oslc: u32,
    pub off_owin: u32,
    pub off_lse: u32,
    pub off_idx: u32,
    pub c_start: u32,
    pub c_count: u32,
    pub q_block: u32,
    pub k_stride: u32,
    pub c_stride: u32,
    pub splits: u32,
    pub branch: u32,
    pub sel_chunk: u32,
    pub partials: u32,
    pub cmp_splits: u32,
    pub slc_splits: u32,
    pub win_splits: u32,
    pub off_pslc: u32,
    pub off_pwin: u32,
    pub kept_stride: u32,
    pub off_kept: u32,
    pub kept_tile: u32,
    /// Per batch element of the dispatch (`[bb / 4][bb % 4]`): tokens its sequence holds
    /// fewer than `tk` ([`crate::Plan::cached_ragged`]).
    pub behind: [[u32; 4]; 16],
}

/// How a kernel accesses one binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The `Params` uniform (binding 0 of every kernel).
    Uniform,
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// The kernels: NSA's five in dataflow order, the dense baseline, the merges, and the KV
/// cache's append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelId {
    /// `shaders/compress.wgsl`: blockwise compression of keys or values.
    Compress,
    /// `shaders/cmp_attn.wgsl`: compressed attention and its log-sum-exp.
    CmpAttn,
    /// `shaders/select.wgsl`: block importance, group sum, top-n.
    Select,
    /// `shaders/slc_attn.wgsl`: selected-block attention.
    SlcAttn,
    /// `shaders/win_attn.wgsl`: window attention fused with the gated combination.
    WinAttn,
    /// `shaders/dense_attn.wgsl`: dense causal attention (the baseline).
    Dense,
    /// `shaders/merge.wgsl`: combines the partial results of split attention.
    Merge,
    /// `shaders/select_merge.wgsl`: combines the candidates of split selection.
    SelectMerge,
    /// `shaders/append.wgsl`: copies a call's new key and value rows into a KV cache, every
    /// sequence in one dispatch per pair of cached tensors.
    Append,
    /// `shaders/select_top.wgsl`: block importance, group sum and top-n of one row per
    /// workgroup, all its blocks at once (calls with few rows, from kept block sums).
    SelectTop,
}

use Access::{Read, ReadWrite, Uniform};

impl KernelId {
    /// Every kernel.
    pub const ALL: [KernelId; 10] = [
        KernelId::Compress,
        KernelId::CmpAttn,
        KernelId::Select,
        KernelId::SlcAttn,
        KernelId::WinAttn,
        KernelId::Dense,
        KernelId::Merge,
        KernelId::SelectMerge,
        KernelId::Append,
        KernelId::SelectTop,
    ];

    /// The shader's file name (without `.wgsl`).
    pub fn name(self) -> &'static str {
        match self {
            KernelId::Compress => "compress",
            KernelId::CmpAttn => "cmp_attn",
            KernelId::Select => "select",
            KernelId::SlcAttn => "slc_attn",
            KernelId::WinAttn => "win_attn",
            KernelId::Dense => "dense_attn",
            KernelId::Merge => "merge",
            KernelId::SelectMerge => "select_merge",
            KernelId::Append => "append",
            KernelId::SelectTop => "select_top",
        }
    }

    /// The debug label of its pipeline and dispatches.
    pub fn label(self) -> &'static str {
        match self {
            KernelId::Compress => "nsa.compress",
            KernelId::CmpAttn => "nsa.cmp_attn",
            KernelId::Select => "nsa.select",
            KernelId::SlcAttn => "nsa.slc_attn",
            KernelId::WinAttn => "nsa.win_attn",
            KernelId::Dense => "nsa.dense_attn",
            KernelId::Merge => "nsa.merge",
            KernelId::SelectMerge => "nsa.select_merge",
            KernelId::Append => "nsa.append",
            KernelId::SelectTop => "nsa.select_top",
        }
    }

    /// The binding table: access of `@binding(i)` for each `i`, mirroring the shader.
    pub fn bindings(self) -> &'static [Access] {
        match self {
            // params, src, dst, w, pe
            KernelId::Compress => &[Uniform, Read, ReadWrite, Read, Read],
            // params, q, kc, vc, o_cmp, lse, kept
            KernelId::CmpAttn => &[Uniform, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite],
            // params, q, kc, lse, block_indices, kept
            KernelId::Select => &[Uniform, Read, Read, Read, ReadWrite, Read],
            // params, lse, block_indices, kept
            KernelId::SelectTop => &[Uniform, Read, ReadWrite, Read],
            // params, q, k, v, block_indices, o_slc
            KernelId::SlcAttn => &[Uniform, Read, Read, Read, Read, ReadWrite],
            // params, q, k, v, gates, o_cmp, o_slc, o_win, out
            KernelId::WinAttn => &[
                Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite,
            ],
            // params, q, k, v, out
            KernelId::Dense => &[Uniform, Read, Read, Read, ReadWrite],
            // params, part, part_slc, part_win, gates, o_cmp, o_slc, o_win, out
            KernelId::Merge => &[
                Uniform, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite, ReadWrite,
            ],
            // params, cand, block_indices
            KernelId::SelectMerge => &[Uniform, Read, ReadWrite],
            // params, staging, dst_k, dst_v
            KernelId::Append => &[Uniform, Read, ReadWrite, ReadWrite],
        }
    }

    /// Workgroup memory the kernel declares besides the specialised kernels' `smem` buffer
    /// (`SMEM4` vec4s, see [`smem_vec4s`]), in bytes, compiled for `rows` query rows per
    /// workgroup (`ROWS`; 8 invocations per row), `kv_tile` keys per tile (the attention
    /// kernels' score rows: `KT4` in `shaders/shared/attn_simt.wgsl`) and, for the selection,
    /// top lists of `top_list` entries (`NMAX`, [`top_list_len`]; `SelectMerge` always has
    /// 256).
    pub fn fixed_workgroup_bytes(self, rows: u32, kv_tile: u32, top_list: u32) -> u32 {
        match self {
            // xrow: COMPRESS_TOKENS rows of 256
            KernelId::Compress => crate::plan::COMPRESS_TOKENS as u32 * 256 * 4,
            // partial, lse_s, pbuf, bscore, 4 top lists, entering
            KernelId::Select => ((16 * rows).max(256) + rows + 512 + 128 + 4 * top_list + 1) * 4,
            // split_m, split_l, weight, stat_m, stat_l (three parts each)
            KernelId::Merge => 5 * 3 * 64 * 4,
            // top_idx, cand_score, cand_idx, surv_score, surv_idx, kept, filled, bar, totals
            KernelId::SelectMerge => (256 + 4 * crate::plan::CAND_MAX as u32 + 2 * 64 + 3) * 4,
            KernelId::Append => 0,
            // partial, lse_s, hist, cut, chosen_n, top_idx
            KernelId::SelectTop => (256 + 16 + 32 + 3 + 1 + top_list) * 4,
            // scores (a vec4 per 4 keys of a row), red_max, red_sum (reduce_shared.wgsl, one
            // per invocation), 6 per-row arrays
            _ => (4 * kv_tile.div_ceil(4) * rows + 2 * 8 * rows + 6 * rows) * 4,
        }
    }
}

/// Invocations per workgroup of `select_top.wgsl` (its `WG`) on an adapter of
/// `max_invocations` per workgroup: the most of 1024, 512 and 256 it allows (plans need 256).
/// More invocations score fewer blocks each: on an H200 (f16, forty-eighth session) the
/// selection of a one-sequence decode step at 64k took 0.019 ms with 1024 against 0.025
/// with 256. Its workgroup memory does not depend on it.
pub fn select_top_invocations(max_invocations: u32) -> u32 {
    [1024, 512]
        .into_iter()
        .find(|&n| n <= max_invocations)
        .unwrap_or(256)
}

/// The largest `smem` buffer (WGSL's `SMEM4`, in vec4s) a specialised kernel declares: 40
/// KiB, which holds 64 keys per tile at Dk = Dv = 128.
pub const SMEM4_MAX: u32 = 2560;

/// The `smem` buffer (vec4s) for an adapter with `limit` bytes of workgroup memory and
/// kernels of `rows` query rows: what every specialised kernel has left after its fixed
/// arrays, at most [`SMEM4_MAX`]. More keys per tile mean fewer barriers per key. `kv_tile`
/// is the keys per tile, `top_list` the selection's list length ([`top_list_len`]).
pub fn smem_vec4s(limit: u32, rows: u32, kv_tile: u32, top_list: u32) -> u32 {
    (limit.saturating_sub(specialized_fixed_bytes(rows, kv_tile, top_list)) / 16).min(SMEM4_MAX)
}

/// The most workgroup memory a specialised kernel of `rows` query rows declares besides
/// `smem`, in bytes, with `kv_tile` keys per tile and the selection's top lists of
/// `top_list` entries.
pub fn specialized_fixed_bytes(rows: u32, kv_tile: u32, top_list: u32) -> u32 {
    KernelId::ALL
        .iter()
        .filter(|k| k.specialized())
        .map(|k| k.fixed_workgroup_bytes(rows, kv_tile, top_list))
        .max()
        .unwrap_or(0)
}

/// The length of the selection kernel's top lists (its `NMAX` override) for `top_n` selected
/// blocks: `top_n` rounded up to a multiple of 16 (few distinct pipelines). The lists were 256
/// entries for every config before; sized by `n`, the selection's fixed workgroup memory
/// drops from 7.6 KiB to 3.8 KiB at the paper's n = 16, which the other specialised kernels'
/// key tiles get (D = 128 then fits WebGPU's default 16 KiB of workgroup memory).
pub fn top_list_len(top_n: usize) -> u32 {
    (top_n.max(1) as u32).next_multiple_of(16)
}

/// The constants an attention or selection kernel is compiled for: WGSL's `DK`, `DV`, `KT`,
/// `SMEM4` and `FEW_ROWS` overrides (`shaders/shared/qk.wgsl`), so that loops over head
/// dimensions and tile keys have constant bounds, the tile fills the adapter's workgroup
/// memory, and the one-row score path is compiled only where it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Specialization {
    /// Key/query head dimension.
    pub dk: u32,
    /// Value head dimension.
    pub dv: u32,
    /// Keys per workgroup-memory tile.
    pub kv_tile: u32,
    /// vec4s of the `smem` buffer that holds the queries and one tile.
    pub smem4: u32,
    /// Query rows per workgroup (`ROWS`; 8 invocations each): [`ROWS`] = 16, or
    /// [`WIDE_ROWS`] = 32 for the wide attention steps (see `Plan`).
    pub rows: u32,
    /// The selection's top-list length (`NMAX`, [`top_list_len`]); 0 for the other kernels,
    /// which declare no top lists ([`Self::for_kernel`]).
    pub top_list: u32,
    /// Whether some workgroups own 4 query rows or fewer (groups of at most 4 heads, in
    /// selected attention and selection): their scores then take one row per item, so that
    /// every invocation has work. Off, that path is compiled out.
    pub few_rows: bool,
    /// Selected attention's consecutive queries per workgroup at most (`QUERIES`,
    /// [`crate::Plan::slc_queries`]): above 1 it walks the union of their selections, at 1
    /// that walk is compiled out. 1 for the other kernels, which declare no such override.
    pub queries: u32,
    /// Pieces selected attention walks each selected block in (`PARTS`,
    /// [`crate::Plan::slc_parts`]): above 1 only where the adapter caps the key tiles one
    /// workgroup walks below a block's (llvmpipe), so that a block's pieces can go to
    /// different splits. 1 for the other kernels, which declare no such override.
    pub parts: u32,
    /// Invocations per workgroup of `select_top.wgsl` (its `WG`: 256, 512 or 1024,
    /// [`select_top_invocations`]); as the other kernels compile ([`Self::for_kernel`]) 0:
    /// their workgroups are fixed.
    pub invocations: u32,
}

impl Specialization {
    /// The overrides a pipeline of kernel `id` is created with: [`Self::constants`] for the
    /// specialised kernels, `NMAX` ([`Self::top_list`]) for the selection, `WG`
    /// ([`Self::invocations`], where set) for `select_top.wgsl`, and `QUERIES`
    /// ([`Self::queries`]) with `ROW_STEPS` (off where `QUERIES` > 1) and `PARTS`
    /// ([`Self::parts`]) for selected attention; none for the others (which declare no
    /// overrides).
    pub fn constants_for(&self, id: KernelId) -> Vec<(&'static str, f64)> {
        let mut constants = Vec::new();
        if id.specialized() {
            constants.extend(self.constants());
        }
        if id.has_top_list() {
            constants.push(("NMAX", self.top_list as f64));
        }
        if id == KernelId::SelectTop && self.invocations > 0 {
            constants.push(("WG", self.invocations as f64));
        }
        if id == KernelId::SlcAttn {
            constants.push(("QUERIES", self.queries as f64));
            // The union walk reads its tiles in the general form (`ROW_STEPS` in
            // shaders/shared/qk.wgsl).
            constants.push(("ROW_STEPS", (self.queries == 1) as u32 as f64));
            constants.push(("PARTS", self.parts as f64));
        }
        constants
    }

    /// This specialization as kernel `id` compiles it: [`Self::top_list`] only where the
    /// kernel has top lists (the selection), [`Self::invocations`] only for
    /// `select_top.wgsl`, and [`Self::queries`] and [`Self::parts`] only for selected
    /// attention, so that the other kernels' pipelines do not differ by them.
    pub fn for_kernel(self, id: KernelId) -> Specialization {
        Specialization {
            top_list: if id.has_top_list() { self.top_list } else { 0 },
            queries: if id == KernelId::SlcAttn {
                self.queries
            } else {
                1
            },
            parts: if id == KernelId::SlcAttn {
                self.parts
            } else {
                1
            },
            invocations: if id == KernelId::SelectTop {
                self.invocations
            } else {
                0
            },
            ..self
        }
    }

    /// The pipeline-overridable constants, by name.
    pub fn constants(&self) -> [(&'static str, f64); 6] {
        [
            ("ROWS", self.rows as f64),
            ("DK", self.dk as f64),
            ("DV", self.dv as f64),
            ("KT", self.kv_tile as f64),
            ("SMEM4", self.smem4 as f64),
            ("FEW_ROWS", self.few_rows as u32 as f64),
        ]
    }
}

/// The constants kernel `id` takes in `variant` beyond its [`Specialization`]'s: the
/// tensor-core core's subgroup size (`SUBGROUP_SIZE` in `shaders/shared/attn_mma.wgsl`),
/// where `subgroup_size` is the adapter's one size (not 0) and `id` runs attention on
/// tensor cores. With it the loops that hand out matrix blocks to subgroups step by
/// constants.
pub fn variant_constants(
    id: KernelId,
    variant: &crate::shaders::Variant,
    subgroup_size: u32,
) -> Option<(&'static str, f64)> {
    (subgroup_size > 0 && variant.mma() && id.attention_core())
        .then_some(("SUBGROUP_SIZE", subgroup_size as f64))
}

/// Query rows of the attention core's workgroups (`ROWS` in `shaders/shared/qk.wgsl`), and
/// always of the selection and the tensor-core core.
pub const ROWS: u32 = 16;
/// Query rows of a wide attention workgroup (256 invocations): compressed, sliding-window
/// and dense attention over many queries, where two queries of a 16-head group (or 32 heads
/// of a larger one) then share every key tile. On an H200 (D = 128, 32 keys per tile against
/// 64) this made 16k compressed attention 27%, the window 27% and dense attention 27% faster.
pub const WIDE_ROWS: u32 = 32;
// The tensor-core core takes one or two 16-row blocks (`shaders/shared/attn_mma.wgsl`).
const _: () = assert!(ROWS == 16 && WIDE_ROWS == 2 * ROWS);

/// Workgroup memory of an attention kernel on tensor cores (`shaders/shared/attn_mma.wgsl`)
/// for head sizes `dk`, `dv`, `kv_tile` keys per tile and `rows` query rows, in bytes: the
/// per-row arrays (its row reductions use subgroups, which declare none), a one-vec4 `smem`,
/// the f16 query, tile and probability arrays, and the f32 array that holds a tile's scores,
/// then its products, then the staged output.
///
/// Keep the 16-row kernels near their 23.9 KiB (D = 128, 32-key tiles): on the H200 a
/// build that gave the value tile and the products room of their own (36.9 KiB) made
/// selected attention in a 64k prefill 94 against 54 ms, with or without the barrier it
/// saved, and so did padding only the query rows to 29.9 KiB (BENCHMARKS.md, fiftieth
/// session).
pub fn mma_workgroup_bytes(dk: u32, dv: u32, kv_tile: u32, rows: u32) -> u32 {
    let (dkp, dvp) = (dk.div_ceil(16) * 16, dv.div_ceil(16) * 16);
    let (qs, ts) = (dkp + 8, dkp.max(dvp) + 8);
    // The probabilities', the scores' and the products' rows are 64 + 8 halves, 64 + 8
    // floats and dvp + 8 floats (PS, SS, VS).
    6 * rows * 4
        + 16 * MMA_SMEM4
        + 2 * (rows * qs + kv_tile * ts + rows * 72)
        + 4 * rows * (dvp + 8).max(72)
}

/// `smem` of the tensor-core kernels, in vec4s: declared by the shared code, unused.
const MMA_SMEM4: u32 = 1;

/// The vec4s one invocation holds of a fetched tile at most (`LOADS` in
/// `shaders/shared/qk.wgsl`, the size of its prefetch array). The plain kernels stay within it
/// through [`SMEM4_MAX`]; the tensor-core kernels' tiles are sized against it.
pub const TILE_LOADS: u32 = 20;

/// Keys per tile at most for NSA's attention kernels of [`ROWS`] = 16 rows on tensor cores
/// (selected attention; compressed and window attention in decode steps and short chunks).
/// Their workgroups (128 invocations) hold half as many fetched vec4s per invocation at 32
/// keys: 105 registers on the H200 against 135 at 64, so four workgroups share a
/// multiprocessor instead of three. f16 prefill at 64k (D=128): selected attention 63.8
/// against 81.6 ms; an f16 cache's decode step at 64k, B=16: 0.265 against 0.307 ms
/// (BENCHMARKS.md, seventeenth and eighteenth sessions).
pub const MMA_NARROW_KT: u32 = 32;

/// Fetched vec4s per invocation and tile at most for those kernels: fewer keys per tile
/// for heads wider than 128 (16 at Dk = 192). On the H200 at Dk = 192, Dv = 128 (f16),
/// 16-key tiles made selected attention in a 64k prefill 104.7 against 126.1 ms, and a
/// B=16 decode step at 64k 0.41 against 0.46 ms (BENCHMARKS.md, nineteenth session).
/// Compressed attention in calls of few row groups takes [`MMA_FEW_GROUPS_LOADS`] instead.
pub const MMA_NARROW_LOADS: u32 = 8;

/// Fetched vec4s per invocation and tile at most for compressed attention's 16-row steps on
/// tensor cores in calls of at most [`CMP_FEW_GROUPS`] row groups (one sequence's decode
/// step with Hkv <= 4), in place of [`MMA_NARROW_LOADS`]: 32-key tiles at Dk = 192, which
/// keep block sums, so that `select_top.wgsl` ranks the blocks in one dispatch where 16-key
/// tiles keep scores and split the selection. On the H200 (f16, Dk = 192, Dv = 128, Hq =
/// 64, Hkv = 4, forty-ninth session, builds alternating) a one-sequence decode step took
/// 0.066 / 0.074 ms at 16k / 64k so against 0.079 / 0.088; in the forty-eighth session's
/// study two to eight sequences at 64k took 3-5% longer with them (the wider fetches cost
/// compressed attention more than the ranking saves), so they keep 16 keys.
pub const MMA_FEW_GROUPS_LOADS: u32 = 12;

/// Row groups (workgroups of 16 rows over a call's queries and kv heads) a call may have at
/// most for [`MMA_FEW_GROUPS_LOADS`].
pub const CMP_FEW_GROUPS: u64 = 4;

/// Row groups a call of dense attention's 16-row steps may have at most for tiles of 64 keys
/// on tensor cores; calls of more take [`MMA_NARROW_KT`] (see [`mma_max_kt`]).
pub const DENSE_FEW_GROUPS: u64 = 4;

/// Keys per tile at most for kernel `id` of `rows` query rows on tensor cores, for heads of
/// `dk`, `dv`, in a call of `row_groups` row groups: for compressed, selected and window
/// attention of [`ROWS`] rows, the most (a multiple of 16, at least 16) within
/// [`MMA_NARROW_KT`] whose tile each invocation fetches in [`MMA_NARROW_LOADS`] vec4s
/// ([`MMA_FEW_GROUPS_LOADS`] for compressed attention in calls of few row groups); for
/// dense attention of [`ROWS`] rows, [`MMA_NARROW_KT`] in calls of more than
/// [`DENSE_FEW_GROUPS`] row groups; 64 (the core's `KT_MAX`) otherwise.
///
/// Dense attention's decode: one sequence (4 row groups) runs few workgroups of many serial
/// tiles, where 32-key tiles made a 64k step 0.106 against 0.081 ms on the H200; from two
/// sequences on its split workgroups outnumber the multiprocessors, and 32-key tiles (23.9
/// KiB of workgroup memory at D = 128, against 32.4 with 64 keys: within the 16-row
/// kernels' 24 KiB, `mma_workgroup_bytes`) made 2, 4, 8 and 16 sequences' steps at 64k
/// 0.123 / 0.223 / 0.412 / 0.784 against 0.136 / 0.245 / 0.444 / 0.835 ms, and the small
/// group's (Hq = 32, Hkv = 8) one-sequence step 0.118 against 0.131-0.132, but its
/// 16-sequence step (128 row groups) 1.720-1.732 against 1.693-1.702 (BENCHMARKS.md,
/// fifty-first session).
pub fn mma_max_kt(id: KernelId, rows: u32, dk: u32, dv: u32, row_groups: u64) -> u32 {
    match id {
        KernelId::CmpAttn | KernelId::SlcAttn | KernelId::WinAttn if rows == ROWS => {
            let loads = if id == KernelId::CmpAttn && row_groups <= CMP_FEW_GROUPS {
                MMA_FEW_GROUPS_LOADS
            } else {
                MMA_NARROW_LOADS
            };
            let keys = loads * 8 * ROWS / dk.max(dv).div_ceil(4);
            (keys / 16 * 16).clamp(16, MMA_NARROW_KT)
        }
        KernelId::Dense if rows == ROWS && row_groups > DENSE_FEW_GROUPS => MMA_NARROW_KT,
        _ => 64,
    }
}

/// The specialization of an attention kernel on tensor cores of `rows` query rows (a
/// multiple of 16) for an adapter with `limit` bytes of workgroup memory: as many keys per
/// tile (64, 32 or 16, at most `max_kt`) as fit, and as each invocation's [`TILE_LOADS`]
/// hold; `None` when not even 16 do (the kernel then runs on the shader cores).
///
/// Never 48: the softmax of a tile whose scores are kept takes its keys in quads of 32
/// (`tile_key` in `shaders/shared/attn_mma.wgsl`), so a 48-key tile left 16 of its keys
/// out of the softmax and read 16 past it. On the H200 (48 KiB), f16 compressed attention
/// was wrong so until the twenty-ninth session for heads whose 32-row tiles fit 48 keys but
/// not 64: Dk = 192 with Dv <= 80, Dk = 176 with Dv <= 96, Dk = 128 with Dv of 129-144, and
/// others where one head size exceeds 128 (found by the random f16 sweep, `NSA_SWEEP_SEED`
/// 1000-1011). D = 128 and the paper's Dk = 192, Dv = 128 never had 48-key tiles.
pub fn mma_specialization(
    dk: u32,
    dv: u32,
    limit: u32,
    rows: u32,
    max_kt: u32,
) -> Option<Specialization> {
    [64, 32, 16]
        .into_iter()
        .filter(|&kt| kt <= max_kt)
        .find(|&kt| {
            mma_workgroup_bytes(dk, dv, kt, rows) <= limit
                && kt * dk.max(dv).div_ceil(4) <= TILE_LOADS * 8 * rows
        })
        .map(|kv_tile| Specialization {
            dk,
            dv,
            kv_tile,
            smem4: MMA_SMEM4,
            rows,
            // The tensor-core core scores whole 16x16 blocks; it has no one-row path.
            few_rows: false,
            top_list: 0,
            queries: 1,
            parts: 1,
            invocations: 0,
        })
}

impl KernelId {
    /// Whether the kernel runs the attention core (`shaders/shared/attention.wgsl`), which
    /// has a tensor-core variant.
    pub fn attention_core(self) -> bool {
        matches!(
            self,
            KernelId::CmpAttn | KernelId::SlcAttn | KernelId::WinAttn | KernelId::Dense
        )
    }

    /// Whether the shader declares the [`Specialization`] overrides (the kernels with
    /// key tiles: all but `Compress`, `Merge`, `SelectMerge`, `Append` and `SelectTop`).
    pub fn specialized(self) -> bool {
        !matches!(
            self,
            KernelId::Compress
                | KernelId::Merge
                | KernelId::SelectMerge
                | KernelId::Append
                | KernelId::SelectTop
        )
    }

    /// Whether the shader has top lists (`NMAX`, [`Specialization::top_list`]).
    fn has_top_list(self) -> bool {
        matches!(self, KernelId::Select | KernelId::SelectTop)
    }
}

/// One kernel's bind group layout and the pipeline layout built on it, shared by every
/// compiled variant of the kernel.
#[derive(Debug)]
pub(crate) struct KernelLayout {
    pub bind_group: wgpu::BindGroupLayout,
    pub pipeline: wgpu::PipelineLayout,
}

impl KernelLayout {
    /// Builds the layouts from the binding table.
    pub fn new(device: &wgpu::Device, id: KernelId) -> KernelLayout {
        let entries: Vec<wgpu::BindGroupLayoutEntry> = id
            .bindings()
            .iter()
            .enumerate()
            .map(|(i, access)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match access {
                    Uniform => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: wgpu::BufferSize::new(
                            std::mem::size_of::<Params>() as u64
                        ),
                    },
                    Read | ReadWrite => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: *access == Read,
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        let bind_group = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(id.label()),
            entries: &entries,
        });
        let pipeline = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(id.label()),
            bind_group_layouts: &[Some(&bind_group)],
            immediate_size: 0,
        });
        KernelLayout {
            bind_group,
            pipeline,
        }
    }

    /// Compiles the kernel in `variant` (input storage, reductions, tensor cores),
    /// specialized to `spec`. Workgroup memory is not zero-initialized (every kernel writes
    /// what it reads), and naga's loop bounding is off (every loop is bounded), as are its
    /// bounds checks (every index is in range) unless `bounds_checks`.
    ///
    /// `subgroup_size`: the adapter's one subgroup size, or 0 where it has several (see
    /// [`variant_constants`]).
    pub fn compile(
        &self,
        device: &wgpu::Device,
        id: KernelId,
        variant: &crate::shaders::Variant,
        spec: &Specialization,
        bounds_checks: bool,
        subgroup_size: u32,
    ) -> wgpu::ComputePipeline {
        let source = crate::shaders::source_variant(id.name(), variant)
            .expect("every KernelId has a shader");
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(id.label()),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        // naga's loop bounding adds a counter to every loop, which keeps the driver from
        // unrolling and scheduling them (the kernels ran about 1.9x slower with it on an
        // H200), and its bounds checks clamp every index, which costs the integer work of
        // each workgroup-memory access and keeps the driver from folding constant offsets
        // into the loads (1.07-1.08x on an H200 at 8k; 1.1-1.3x in earlier builds). Division
        // checks stay on.
        let checks = wgpu::ShaderRuntimeChecks {
            force_loop_bounding: false,
            bounds_checks,
            ..wgpu::ShaderRuntimeChecks::checked()
        };
        // SAFETY: every index stays inside its array. Storage arrays are indexed inside the
        // windows the plan binds (checked against the buffers before any dispatch, and
        // robust buffer access keeps what a driver allows in bounds where it has it);
        // workgroup and private arrays are indexed below the sizes their kernels declare
        // (Rust sizes `SMEM4` and `KT` so that the queries and a tile fit, and the tests run
        // every kernel on shapes that fill and straddle each tile and row limit). And no
        // kernel has an unbounded loop. Every `for` counts up to a bound taken from
        // the Params uniform or a constant (tile loops advance by KT >= 1, block and split
        // loops by their counts >= 1), and select_merge's binary search narrows [lo, hi) on
        // every iteration.
        let module = unsafe { device.create_shader_module_trusted(desc, checks) };
        let mut constants = spec.constants_for(id);
        constants.extend(variant_constants(id, variant, subgroup_size));
        device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(id.label()),
            layout: Some(&self.pipeline),
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        })
    }
}
