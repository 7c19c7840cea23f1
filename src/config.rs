//! [`NsaConfig`]: the paper's hyper-parameters and SPEC's rules.

use crate::error::{NsaError, Result};

/// How the compression branch summarises a block of `l` keys (or values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// `k~_i = (1/l) * sum_j k[i*d + j]`.
    #[default]
    Mean,
    /// `k~_i = sum_j W[h][j]^T (k[i*d + j] + pe[h][j])`, with caller-given weights
    /// `W: [Hkv, l, D, D]` (input dim, then output dim) and `pe: [Hkv, l, D]`,
    /// separately for keys and values (see [`crate::LinearWeights`]).
    Linear,
}

/// How the inputs (`q`, `k`, `v`, per-branch keys/values) and the compressed keys/values are
/// stored on the GPU. Arithmetic is f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// 4-byte floats.
    #[default]
    F32,
    /// 2-byte floats (needs the adapter's `shader-f16`): half the memory traffic, inputs rounded
    /// to f16. `out` stays within SPEC's f16 tolerance (1e-2) on every row whose selection
    /// matches an exact computation's; but the compressed keys are stored as f16 too, which
    /// moves block scores by about 1e-5 relative, so blocks whose scores lie that close (past
    /// SPEC's 1e-6 near-tie rule) may be chosen differently, and such a row's output differs by
    /// what the swapped block carries (up to 0.08 on N(0, 1) inputs; a few rows in 10^3 at 8k
    /// tokens). Use [`Precision::F32`] where selections must match exactly.
    F16,
}

impl Precision {
    /// Bytes per stored input element.
    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::F16 => 2,
        }
    }
}

/// NSA's hyper-parameters. [`Default`] gives the paper's values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NsaConfig {
    /// Compression block length `l` (paper: 32).
    pub cmp_block: usize,
    /// Compression stride `d` (paper: 16).
    pub cmp_stride: usize,
    /// Selection block length `l'` (paper: 64).
    pub sel_block: usize,
    /// Selected blocks per query `n`, forced blocks included (paper: 16).
    pub top_n: usize,
    /// Forced initial blocks (paper: 1).
    pub init_blocks: usize,
    /// Forced local blocks: the query's own block and the ones before it (paper: 2).
    pub local_blocks: usize,
    /// Sliding window `w`, in keys, the query's own included (paper: 512). Any size: one past
    /// every key (`usize::MAX` too) is every key.
    pub window: usize,
    /// Softmax scale; `None` means `1 / sqrt(Dk)`.
    pub scale: Option<f32>,
    /// The compression function `phi`.
    pub compression: Compression,
}

impl Default for NsaConfig {
    fn default() -> Self {
        Self {
            cmp_block: 32,
            cmp_stride: 16,
            sel_block: 64,
            top_n: 16,
            init_blocks: 1,
            local_blocks: 2,
            window: 512,
            scale: None,
            compression: Compression::Mean,
        }
    }
}

fn invalid(field: &'static str, value: impl ToString, rule: &'static str) -> NsaError {
    NsaError::InvalidConfig {
        field,
        value: value.to_string(),
        rule,
    }
}

impl NsaConfig {
    /// Checks every rule of SPEC.md, and that `l`, `l'`, `n` and `l/d + l'/d - 1` fit the
    /// kernels' 32-bit integers; the error names the field, its value and the rule.
    pub fn validate(&self) -> Result<()> {
        if self.cmp_stride < 1 {
            return Err(invalid("cmp_stride", self.cmp_stride, "d >= 1"));
        }
        if self.cmp_block < self.cmp_stride {
            return Err(invalid("cmp_block", self.cmp_block, "l >= d"));
        }
        if self.cmp_block % self.cmp_stride != 0 {
            return Err(invalid("cmp_block", self.cmp_block, "l % d == 0"));
        }
        if self.sel_block == 0 || self.sel_block % self.cmp_stride != 0 {
            return Err(invalid(
                "sel_block",
                self.sel_block,
                "l' % d == 0 and l' >= 1",
            ));
        }
        // (init + local past usize::MAX is more than any n.)
        let forced = self.init_blocks.checked_add(self.local_blocks);
        if forced.is_none_or(|f| self.top_n < f) {
            return Err(invalid("top_n", self.top_n, "n >= init + local"));
        }
        if self.top_n == 0 {
            return Err(invalid("top_n", self.top_n, "n >= 1"));
        }
        if self.window < 1 {
            return Err(invalid("window", self.window, "w >= 1"));
        }
        // The kernels take these as 32-bit integers (n, and with it init and local, is also a
        // dimension of the selected blocks' output). A longer window than any sequence is
        // every key, whatever its length: `usize::MAX` is allowed.
        for (field, v) in [
            ("cmp_block", self.cmp_block),
            ("sel_block", self.sel_block),
            ("top_n", self.top_n),
        ] {
            if v > u32::MAX as usize {
                return Err(invalid(
                    field,
                    v,
                    "<= 4294967295 (the kernels count with 32-bit integers)",
                ));
            }
        }
        // The selection counts a block's pieces with the strides before it that reach into
        // it (l'/d + l/d - 1) in 32 bits too.
        let span = (self.sel_block / self.cmp_stride) as u64
            + (self.cmp_block / self.cmp_stride) as u64
            - 1;
        if span > u32::MAX as u64 {
            return Err(invalid(
                "cmp_block",
                self.cmp_block,
                "l/d + l'/d - 1 <= 4294967295 (the selection counts a block's strides with 32-bit integers)",
            ));
        }
        if let Some(s) = self.scale {
            if !s.is_finite() || s <= 0.0 {
                return Err(invalid("scale", s, "finite and > 0"));
            }
        }
        Ok(())
    }

    /// The softmax scale for head dimension `dk`.
    pub fn scale_for(&self, dk: usize) -> f32 {
        self.scale.unwrap_or(1.0 / (dk as f32).sqrt())
    }

    /// Number of compressed tokens for `tk` keys: `C = (tk - l) / d + 1` when `tk >= l`, else 0.
    pub fn num_compressed(&self, tk: usize) -> usize {
        if tk >= self.cmp_block {
            (tk - self.cmp_block) / self.cmp_stride + 1
        } else {
            0
        }
    }

    /// Number of compressed tokens visible to the query at absolute position `p`
    /// (those whose whole block lies at or before `p`), given `n_cmp` existing ones.
    pub fn visible_compressed(&self, p: usize, n_cmp: usize) -> usize {
        if p + 1 >= self.cmp_block {
            ((p + 1 - self.cmp_block) / self.cmp_stride + 1).min(n_cmp)
        } else {
            0
        }
    }
}

/// The sizes of one NSA call. See SPEC's layout table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Batch size `B`.
    pub batch: usize,
    /// Query length `Tq` (queries are the last `Tq` of the `Tk` positions).
    pub tq: usize,
    /// Key length `Tk`.
    pub tk: usize,
    /// Query heads `Hq`.
    pub hq: usize,
    /// Key/value heads `Hkv` (`Hq = G * Hkv`).
    pub hkv: usize,
    /// Key (and query) head dimension `Dk`, 1..=256.
    pub dk: usize,
    /// Value head dimension `Dv`, 1..=256.
    pub dv: usize,
}

/// The largest head dimension the kernels support.
pub const MAX_HEAD_DIM: usize = 256;

/// The element count of a tensor of `dims`; `None` where it overflows `usize`.
pub(crate) fn elements(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

fn bad_shape(what: &'static str, value: usize, rule: &'static str) -> NsaError {
    NsaError::InvalidShape { what, value, rule }
}

impl Shape {
    /// A prefill shape (`Tq == Tk == t`).
    pub fn prefill(batch: usize, t: usize, hq: usize, hkv: usize, dk: usize, dv: usize) -> Self {
        Self {
            batch,
            tq: t,
            tk: t,
            hq,
            hkv,
            dk,
            dv,
        }
    }

    /// The shape of packed sequences as one (`B = 1`): the query rows `cu_seqlens_q` spans
    /// (from its first offset to its last) and the key rows `cu_seqlens_k` spans, with
    /// `heads = (Hq, Hkv, Dk, Dv)`. Offsets as [`crate::NsaPipeline::run_varlen_qk`] takes
    /// them (a pair of one sequence's offsets gives its own shape; empty or falling offsets
    /// span no rows, which [`Shape::validate`] rejects).
    pub fn packed(
        cu_seqlens_q: &[usize],
        cu_seqlens_k: &[usize],
        (hq, hkv, dk, dv): (usize, usize, usize, usize),
    ) -> Self {
        let span = |cu: &[usize]| match (cu.first(), cu.last()) {
            (Some(a), Some(b)) => b.saturating_sub(*a),
            _ => 0,
        };
        Self {
            batch: 1,
            tq: span(cu_seqlens_q),
            tk: span(cu_seqlens_k),
            hq,
            hkv,
            dk,
            dv,
        }
    }

    /// Query heads per kv head, `G = Hq / Hkv`.
    pub fn group(&self) -> usize {
        self.hq / self.hkv.max(1)
    }

    /// Checks the shape rules: positive sizes within `u32`, `Tq <= Tk`, `Hq % Hkv == 0`, head
    /// dims up to 256, and every tensor's element count within `usize` (its f32 bytes within
    /// `u64`).
    pub fn validate(&self) -> Result<()> {
        for (what, v) in [
            ("batch", self.batch),
            ("tq", self.tq),
            ("tk", self.tk),
            ("hq", self.hq),
            ("hkv", self.hkv),
            ("dk", self.dk),
            ("dv", self.dv),
        ] {
            if v == 0 {
                return Err(bad_shape(what, v, ">= 1"));
            }
            if v > u32::MAX as usize {
                return Err(bad_shape(
                    what,
                    v,
                    "<= 4294967295 (the kernels count with 32-bit integers)",
                ));
            }
        }
        if self.tq > self.tk {
            return Err(bad_shape("tq", self.tq, "Tq <= Tk"));
        }
        if self.hq % self.hkv != 0 {
            return Err(bad_shape("hq", self.hq, "Hq % Hkv == 0"));
        }
        if self.dk > MAX_HEAD_DIM {
            return Err(bad_shape("dk", self.dk, "Dk <= 256"));
        }
        if self.dv > MAX_HEAD_DIM {
            return Err(bad_shape("dv", self.dv, "Dv <= 256"));
        }
        // Every tensor's element count within usize and its f32 bytes within u64 (so that
        // the sizes a plan computes from them do not overflow; on wasm32 a 2 GiB tensor on
        // the GPU is still a shape).
        for (what, dims) in [
            ("B * Tq * Hq * Dk (q)", self.q_shape()),
            ("B * Tk * Hkv * Dk (k)", self.k_shape()),
            ("B * Tk * Hkv * Dv (v)", self.v_shape()),
            ("B * Tq * Hq * 3 (gates)", self.gates_shape()),
            ("B * Tq * Hq * Dv (out)", self.out_shape()),
        ] {
            let n = elements(&dims);
            if n.is_none_or(|n| n as u64 > u64::MAX / 4) {
                return Err(bad_shape(
                    what,
                    n.unwrap_or(usize::MAX),
                    "elements within usize and their f32 bytes within u64",
                ));
            }
        }
        Ok(())
    }

    /// Absolute position of query row `i`: `Tk - Tq + i`.
    pub fn position(&self, i: usize) -> usize {
        self.tk - self.tq + i
    }

    /// `q`: `[B, Tq, Hq, Dk]`.
    pub fn q_shape(&self) -> [usize; 4] {
        [self.batch, self.tq, self.hq, self.dk]
    }
    /// `k` (and each per-branch key tensor): `[B, Tk, Hkv, Dk]`.
    pub fn k_shape(&self) -> [usize; 4] {
        [self.batch, self.tk, self.hkv, self.dk]
    }
    /// `v` (and each per-branch value tensor): `[B, Tk, Hkv, Dv]`.
    pub fn v_shape(&self) -> [usize; 4] {
        [self.batch, self.tk, self.hkv, self.dv]
    }
    /// `gates`: `[B, Tq, Hq, 3]`.
    pub fn gates_shape(&self) -> [usize; 4] {
        [self.batch, self.tq, self.hq, 3]
    }
    /// `out` and each branch output: `[B, Tq, Hq, Dv]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.tq, self.hq, self.dv]
    }
    /// `block_indices`: `[B, Tq, Hkv, n]`.
    pub fn indices_shape(&self, top_n: usize) -> [usize; 4] {
        [self.batch, self.tq, self.hkv, top_n]
    }
}
