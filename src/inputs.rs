//! Host-side inputs and outputs of one NSA call, and their validation.

use std::ops::Range;

use crate::config::{Compression, NsaConfig, Precision, Shape};
use crate::error::{NsaError, Result};

/// Learned compression weights for [`Compression::Linear`], separately for keys and values.
#[derive(Debug, Clone, Copy)]
pub struct LinearWeights<'a> {
    /// Key weights `W_k`: `[Hkv, l, Dk, Dk]` (input dim, then output dim).
    pub w_k: &'a [f32],
    /// Key intra-block position encoding `pe_k`: `[Hkv, l, Dk]`.
    pub pe_k: &'a [f32],
    /// Value weights `W_v`: `[Hkv, l, Dv, Dv]`.
    pub w_v: &'a [f32],
    /// Value intra-block position encoding `pe_v`: `[Hkv, l, Dv]`.
    pub pe_v: &'a [f32],
}

/// The tensors of one NSA call, as flat row-major `f32` slices in SPEC's layouts.
///
/// The per-branch keys/values (`k_cmp` … `v_win`) are optional: a branch without its own
/// uses `k`, `v`.
#[derive(Debug, Clone, Copy)]
pub struct NsaInputs<'a> {
    /// `q`: `[B, Tq, Hq, Dk]`.
    pub q: &'a [f32],
    /// `k`: `[B, Tk, Hkv, Dk]`.
    pub k: &'a [f32],
    /// `v`: `[B, Tk, Hkv, Dv]`.
    pub v: &'a [f32],
    /// `gates`: `[B, Tq, Hq, 3]`, (cmp, slc, win) after the sigmoid.
    pub gates: &'a [f32],
    /// Keys of the compression branch, shaped like `k`.
    pub k_cmp: Option<&'a [f32]>,
    /// Values of the compression branch, shaped like `v`.
    pub v_cmp: Option<&'a [f32]>,
    /// Keys of the selection branch, shaped like `k`.
    pub k_slc: Option<&'a [f32]>,
    /// Values of the selection branch, shaped like `v`.
    pub v_slc: Option<&'a [f32]>,
    /// Keys of the window branch, shaped like `k`.
    pub k_win: Option<&'a [f32]>,
    /// Values of the window branch, shaped like `v`.
    pub v_win: Option<&'a [f32]>,
    /// Weights for [`Compression::Linear`]; required by it, ignored by `Mean`.
    pub linear: Option<LinearWeights<'a>>,
}

impl<'a> NsaInputs<'a> {
    /// Inputs where every branch uses `k`, `v`.
    pub fn new(q: &'a [f32], k: &'a [f32], v: &'a [f32], gates: &'a [f32]) -> Self {
        Self {
            q,
            k,
            v,
            gates,
            k_cmp: None,
            v_cmp: None,
            k_slc: None,
            v_slc: None,
            k_win: None,
            v_win: None,
            linear: None,
        }
    }

    /// Rows `[a, b)` of every per-token tensor (rows counted over B and T together) for a
    /// shape whose queries are all its tokens (`Tq == Tk`, as packed sequences and prefill
    /// batches lay them out): one sequence of a packed batch, or a chunk of one. The linear
    /// weights stay as they are. Panics past the tensors' ends, as slicing does.
    pub fn token_rows(&self, shape: &Shape, a: usize, b: usize) -> NsaInputs<'a> {
        self.query_key_rows(shape, a..b, a..b)
    }

    /// Query rows `q` of `q` and `gates`, and key rows `k` of the keys and values (each
    /// counted over B and T together), for packed inputs whose queries and keys are laid out
    /// apart (a packed batch of chunks, [`crate::NsaPipeline::run_varlen_qk`]). The linear
    /// weights stay as they are. Panics past the tensors' ends, as slicing does.
    pub fn query_key_rows(&self, shape: &Shape, q: Range<usize>, k: Range<usize>) -> NsaInputs<'a> {
        let (kw, vw) = (shape.hkv * shape.dk, shape.hkv * shape.dv);
        let rows = |t: &'a [f32], r: &Range<usize>, w: usize| &t[r.start * w..r.end * w];
        let kv = |t: Option<&'a [f32]>, w: usize| t.map(|t| rows(t, &k, w));
        NsaInputs {
            q: rows(self.q, &q, shape.hq * shape.dk),
            k: rows(self.k, &k, kw),
            v: rows(self.v, &k, vw),
            gates: rows(self.gates, &q, shape.hq * 3),
            k_cmp: kv(self.k_cmp, kw),
            v_cmp: kv(self.v_cmp, vw),
            k_slc: kv(self.k_slc, kw),
            v_slc: kv(self.v_slc, vw),
            k_win: kv(self.k_win, kw),
            v_win: kv(self.v_win, vw),
            linear: self.linear,
        }
    }

    /// Each sequence of packed inputs (offsets `cu_seqlens_q`, `cu_seqlens_k` as
    /// [`check_cu_seqlens_qk`] takes them, `heads = (Hq, Hkv, Dk, Dv)`) as a call of its own:
    /// its shape (`B = 1`, its queries and keys) and its rows.
    pub(crate) fn packed_sequences<'c>(
        &'c self,
        (cu_q, cu_k): (&'c [usize], &'c [usize]),
        heads: (usize, usize, usize, usize),
    ) -> impl Iterator<Item = (Shape, NsaInputs<'a>)> + 'c {
        let all = Shape::packed(cu_q, cu_k, heads);
        (cu_q.windows(2).zip(cu_k.windows(2))).map(move |(q, k)| {
            let rows = self.query_key_rows(&all, q[0]..q[1], k[0]..k[1]);
            (Shape::packed(q, k, heads), rows)
        })
    }

    /// Whether any branch has keys or values of its own (`k_cmp` … `v_win`).
    pub fn has_branch_kv(&self) -> bool {
        self.branch_tensors().iter().any(|(_, t)| t.is_some())
    }

    /// The per-branch keys and values by name, keys at even places: `k_cmp, v_cmp, k_slc,
    /// v_slc, k_win, v_win`.
    pub(crate) fn branch_tensors(&self) -> [(&'static str, Option<&'a [f32]>); 6] {
        [
            ("k_cmp", self.k_cmp),
            ("v_cmp", self.v_cmp),
            ("k_slc", self.k_slc),
            ("v_slc", self.v_slc),
            ("k_win", self.k_win),
            ("v_win", self.v_win),
        ]
    }

    /// The tensors stored at the call's precision (the rest stay f32): `q`, `k`, `v` and
    /// the branches' own keys and values.
    pub(crate) fn stored_tensors(&self) -> Vec<(&'static str, &'a [f32])> {
        let given = self.branch_tensors().into_iter();
        [("q", self.q), ("k", self.k), ("v", self.v)]
            .into_iter()
            .chain(given.filter_map(|(name, t)| Some((name, t?))))
            .collect()
    }

    /// Keys and values of the compression branch.
    pub fn cmp_kv(&self) -> (&'a [f32], &'a [f32]) {
        (self.k_cmp.unwrap_or(self.k), self.v_cmp.unwrap_or(self.v))
    }
    /// Keys and values of the selection branch.
    pub fn slc_kv(&self) -> (&'a [f32], &'a [f32]) {
        (self.k_slc.unwrap_or(self.k), self.v_slc.unwrap_or(self.v))
    }
    /// Keys and values of the window branch.
    pub fn win_kv(&self) -> (&'a [f32], &'a [f32]) {
        (self.k_win.unwrap_or(self.k), self.v_win.unwrap_or(self.v))
    }

    /// Checks the config and shape rules, every tensor's length, that linear weights are
    /// present when needed, and that no tensor holds NaN or infinity.
    pub fn validate(&self, config: &NsaConfig, shape: &Shape) -> Result<()> {
        config.validate()?;
        shape.validate()?;
        let kd = shape.k_shape().to_vec();
        let vd = shape.v_shape().to_vec();
        let mut tensors: Vec<(&'static str, &[f32], Vec<usize>)> = vec![
            ("q", self.q, shape.q_shape().to_vec()),
            ("k", self.k, kd.clone()),
            ("v", self.v, vd.clone()),
            ("gates", self.gates, shape.gates_shape().to_vec()),
        ];
        for (i, (name, t)) in self.branch_tensors().into_iter().enumerate() {
            if let Some(t) = t {
                let dims = if i % 2 == 0 { &kd } else { &vd };
                tensors.push((name, t, dims.clone()));
            }
        }
        if config.compression == Compression::Linear {
            let lw = self.linear.ok_or(NsaError::MissingInput {
                tensor: "w_k",
                why: "Compression::Linear needs w_k, pe_k, w_v, pe_v",
            })?;
            let (h, l, dk, dv) = (shape.hkv, config.cmp_block, shape.dk, shape.dv);
            tensors.push(("w_k", lw.w_k, vec![h, l, dk, dk]));
            tensors.push(("pe_k", lw.pe_k, vec![h, l, dk]));
            tensors.push(("w_v", lw.w_v, vec![h, l, dv, dv]));
            tensors.push(("pe_v", lw.pe_v, vec![h, l, dv]));
        }
        for (tensor, data, expected) in tensors {
            check_tensor(tensor, data, &expected)?;
        }
        Ok(())
    }
}

/// Checks FlashAttention's `cu_seqlens` convention as the packed calls take it: at least one
/// sequence, starting at 0, non-decreasing (an empty sequence, equal neighbours, has no
/// rows: it writes nothing and changes no other sequence's).
pub fn check_cu_seqlens(cu_seqlens: &[usize]) -> Result<()> {
    check_offsets("cu_seqlens", cu_seqlens)
}

/// Checks the offsets of a packed batch of chunks (FlashAttention's `cu_seqlens_q` and
/// `cu_seqlens_k`): each as [`check_cu_seqlens`] checks one, the same number of sequences in
/// both, and no sequence with more queries than keys (its queries are its last positions:
/// query `i` of a sequence of `tq` queries and `tk` keys sits at `tk - tq + i`).
pub fn check_cu_seqlens_qk(cu_seqlens_q: &[usize], cu_seqlens_k: &[usize]) -> Result<()> {
    check_offsets("cu_seqlens_q", cu_seqlens_q)?;
    check_offsets("cu_seqlens_k", cu_seqlens_k)?;
    if cu_seqlens_q.len() != cu_seqlens_k.len() {
        return Err(NsaError::InvalidShape {
            what: "cu_seqlens_q",
            value: cu_seqlens_q.len(),
            rule: "as many entries as cu_seqlens_k (one sequence each)",
        });
    }
    let lens = |cu: &[usize]| cu.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>();
    let too_many = (lens(cu_seqlens_q).into_iter())
        .zip(lens(cu_seqlens_k))
        .find(|(q, k)| q > k);
    match too_many {
        Some((q, _)) => Err(NsaError::InvalidShape {
            what: "cu_seqlens_q",
            value: q,
            rule: "no sequence has more queries than keys (Tq <= Tk each)",
        }),
        None => Ok(()),
    }
}

/// [`check_cu_seqlens`] for the offsets named `what`.
fn check_offsets(what: &'static str, cu: &[usize]) -> Result<()> {
    if cu.len() < 2 || cu[0] != 0 || cu.windows(2).any(|w| w[1] < w[0]) {
        return Err(NsaError::InvalidShape {
            what,
            value: cu.len(),
            rule: "starts at 0, non-decreasing, at least one sequence",
        });
    }
    Ok(())
}

/// Checks that `data` has `expected`'s element count and holds only finite values.
pub fn check_tensor(tensor: &'static str, data: &[f32], expected: &[usize]) -> Result<()> {
    // (A product past usize::MAX matches no slice.)
    if crate::config::elements(expected) != Some(data.len()) {
        return Err(NsaError::ShapeMismatch {
            tensor,
            expected: expected.to_vec(),
            got: data.len(),
        });
    }
    if let Some(index) = first_where(data, |x| !x.is_finite()) {
        return Err(NsaError::NonFinite {
            tensor,
            index,
            value: data[index],
        });
    }
    Ok(())
}

/// The first index of `data` where `bad` holds: blocks of 64 are tested without an early
/// exit (so that the test vectorizes), and only a block that holds one is searched. For the
/// 150k values of a 16-sequence decode step (Hq = 64, D = 128) the finiteness check took 7
/// instead of 24 µs on the development machine, and f16 conversion with its range check 28
/// instead of 90 µs (warm; the conversion's fresh allocation adds up to 140 µs more).
fn first_where(data: &[f32], bad: impl Fn(f32) -> bool + Copy) -> Option<usize> {
    let block = data
        .chunks(64)
        .position(|c| c.iter().fold(false, |any, &x| any | bad(x)))?;
    let at = block * 64;
    data[at..].iter().position(|&x| bad(x)).map(|i| at + i)
}

/// A tensor as the GPU stores it ([`stored_bytes`]): the caller's f32 values, or their f16
/// conversion; its bytes through `Deref`.
pub(crate) enum Stored<'a> {
    F32(&'a [f32]),
    F16(Vec<half::f16>),
}

impl std::ops::Deref for Stored<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        use half::slice::HalfFloatSliceExt;
        match self {
            Stored::F32(data) => bytemuck::cast_slice(data),
            Stored::F16(halves) => bytemuck::cast_slice::<u16, u8>(halves.reinterpret_cast()),
        }
    }
}

/// `data` as the GPU stores it at `precision`: f32 as it is (borrowed), f16 converted with
/// the CPU's f16 instructions where it has them (one pass, no further copy), every value
/// still finite ([`NsaError::OutOfRange`] otherwise). Little-endian, as wgpu's targets are.
pub(crate) fn stored_bytes<'a>(
    tensor: &'static str,
    data: &'a [f32],
    precision: Precision,
) -> Result<Stored<'a>> {
    use half::slice::HalfFloatSliceExt;
    if precision == Precision::F32 {
        return Ok(Stored::F32(data));
    }
    check_stored_range(tensor, data, precision)?;
    let mut halves = vec![half::f16::ZERO; data.len()];
    halves.convert_from_f32_slice(data);
    Ok(Stored::F16(halves))
}

/// Checks that every value of `data` stays finite when stored at `precision`
/// ([`NsaError::OutOfRange`] names the first that does not).
pub(crate) fn check_stored_range(
    tensor: &'static str,
    data: &[f32],
    precision: Precision,
) -> Result<()> {
    if precision == Precision::F32 {
        return Ok(());
    }
    // Only a value of f16's largest magnitude or more can round to infinity: the exact test
    // runs only from the first such value on.
    let max = half::f16::MAX.to_f32();
    let overflow = first_where(data, |x| x.abs() >= max).and_then(|from| {
        let past = |x: &f32| half::f16::from_f32(*x).is_infinite() && x.is_finite();
        data[from..].iter().position(past).map(|i| from + i)
    });
    match overflow {
        Some(index) => Err(NsaError::OutOfRange {
            tensor,
            index,
            value: data[index],
            precision: "f16",
            limit: max,
        }),
        None => Ok(()),
    }
}

/// Which outputs besides `out` a call should return.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputRequest {
    /// Return the selected blocks, `[B, Tq, Hkv, n]`.
    pub block_indices: bool,
    /// Return the three branch outputs, each `[B, Tq, Hq, Dv]`: the call then plans with
    /// [`crate::Plan::with_branch_outputs`], whose kernels also store them (otherwise
    /// `o_win` is never written, nor a decode step's three).
    pub branches: bool,
}

impl OutputRequest {
    /// Every output.
    pub fn all() -> Self {
        Self {
            block_indices: true,
            branches: true,
        }
    }
}

/// The three branch outputs before gating, each `[B, Tq, Hq, Dv]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchOutputs {
    /// Compressed attention.
    pub o_cmp: Vec<f32>,
    /// Selected-block attention.
    pub o_slc: Vec<f32>,
    /// Sliding-window attention.
    pub o_win: Vec<f32>,
}

/// The results of one NSA call.
#[derive(Debug, Clone, PartialEq)]
pub struct NsaOutputs {
    /// `out`: `[B, Tq, Hq, Dv]`.
    pub out: Vec<f32>,
    /// Selected blocks `[B, Tq, Hkv, n]`, ascending, `-1` padded (when requested).
    pub block_indices: Option<Vec<i32>>,
    /// The branch outputs (when requested).
    pub branches: Option<BranchOutputs>,
}

#[cfg(test)]
mod tests {
    use super::{check_tensor, stored_bytes};
    use crate::{NsaError, Precision};

    #[test]
    fn the_first_bad_value_is_found_in_any_block() {
        // Past the first block of 64 and inside a later one; and f16's rounding edge: 65519
        // rounds to 65504, 65520 to infinity.
        let data: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.01).sin()).collect();
        assert!(check_tensor("q", &data, &[1000]).is_ok());
        assert!(stored_bytes("q", &data, Precision::F16).is_ok());
        for at in [0, 63, 64, 700, 999] {
            let mut bad = data.clone();
            bad[at] = f32::NAN;
            bad[999.min(at + 5)] = f32::INFINITY;
            let err = check_tensor("q", &bad, &[1000]).unwrap_err();
            assert!(
                matches!(err, NsaError::NonFinite { index, .. } if index == at),
                "{err}"
            );
            bad[at] = 65519.0;
            bad[999.min(at + 5)] = -65520.0;
            let err = stored_bytes("q", &bad, Precision::F16).err();
            let want = 999.min(at + 5);
            assert!(
                matches!(err, Some(NsaError::OutOfRange { index, .. }) if index == want),
                "{at}: {err:?}"
            );
            bad[999.min(at + 5)] = 1.0;
            assert!(stored_bytes("q", &bad, Precision::F16).is_ok(), "{at}");
        }
    }
}
