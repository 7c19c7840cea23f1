//! Reading inputs from and writing outputs to safetensors files, with shape checks that name
//! the tensor, the expected and the actual shape.

use std::collections::HashMap;
use std::path::Path;

use nsa_wgpu::{Compression, LinearWeights, NsaConfig, NsaInputs, NsaOutputs, Shape};
use safetensors::{Dtype, SafeTensors};

/// The integer tensors of a packed file: `cu_seqlens` (queries and keys alike), or
/// `cu_seqlens_q` and `cu_seqlens_k` (FlashAttention's pair, for chunks).
const OFFSETS: [&str; 3] = ["cu_seqlens", "cu_seqlens_q", "cu_seqlens_k"];

/// Every tensor of an input file, converted to f32, and the offsets ([`OFFSETS`]) where the
/// file packs sequences of different lengths.
pub struct Loaded {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    offsets: HashMap<String, Vec<usize>>,
}

/// The tensors of one NSA call, with their shapes checked.
pub struct Problem {
    pub shape: Shape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    gates: Vec<f32>,
    branch: [Option<Vec<f32>>; 6],
    linear: Option<[Vec<f32>; 4]>,
    /// Where the file packs sequences (FlashAttention's convention), the query and the key
    /// offsets: sequence `i` is rows `q[i] .. q[i + 1]` of `q` and `gates` and rows
    /// `k[i] .. k[i + 1]` of the keys and values (`cu_seqlens` gives both), its queries at its
    /// last positions; `shape` is the packed one (`B = 1`, `Tq` and `Tk` the totals).
    pub packed: Option<Packed>,
}

/// The offsets of a packed file's query rows and key rows.
pub struct Packed {
    /// `cu_seqlens_q` (or `cu_seqlens`).
    pub q: Vec<usize>,
    /// `cu_seqlens_k` (or `cu_seqlens`).
    pub k: Vec<usize>,
}

const BRANCH: [&str; 6] = ["k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win"];

fn to_f32(name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, String> {
    match dtype {
        Dtype::F32 => Ok(data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()),
        Dtype::F16 => Ok(data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        Dtype::BF16 => Ok(data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        // Rounded to the nearest f32, as the GPU computes in f32 at most (an out-of-range
        // value becomes infinite, which the input checks then name).
        Dtype::F64 => Ok(words(data).map(|b| f64::from_le_bytes(b) as f32).collect()),
        other => Err(format!(
            "tensor `{name}` has dtype {other:?}; expected F32, F16, BF16 or F64 (only `cu_seqlens`, `cu_seqlens_q` and `cu_seqlens_k` hold integers)"
        )),
    }
}

/// `data` as little-endian words of `N` bytes.
fn words<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N)
        .map(|b| b.try_into().expect("chunks of N bytes"))
}

/// Offsets `name` (`cu_seqlens` or one of its pair) as sizes: I32, I64, U32 or U64, rank 1,
/// none negative.
fn to_offsets(
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    data: &[u8],
) -> Result<Vec<usize>, String> {
    if shape.len() != 1 {
        return Err(format!(
            "tensor `{name}` has shape {shape:?}; expected rank 1 [B + 1]"
        ));
    }
    let values: Vec<i128> = match dtype {
        Dtype::I32 => words(data).map(|b| i32::from_le_bytes(b).into()).collect(),
        Dtype::U32 => words(data).map(|b| u32::from_le_bytes(b).into()).collect(),
        Dtype::I64 => words(data).map(|b| i64::from_le_bytes(b).into()).collect(),
        Dtype::U64 => words(data).map(|b| u64::from_le_bytes(b).into()).collect(),
        other => {
            return Err(format!(
                "tensor `{name}` has dtype {other:?}; expected I32, I64, U32 or U64"
            ))
        }
    };
    values
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            usize::try_from(x)
                .map_err(|_| format!("{name}[{i}] = {x}; offsets must be non-negative"))
        })
        .collect()
}

impl Loaded {
    /// Reads and parses a safetensors file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| format!("{} is not a valid safetensors file: {e}", path.display()))?;
        let mut tensors = HashMap::new();
        let mut offsets = HashMap::new();
        for (name, view) in st.tensors() {
            if OFFSETS.contains(&name.as_str()) {
                let cu = to_offsets(&name, view.dtype(), view.shape(), view.data())?;
                offsets.insert(name, cu);
                continue;
            }
            let data = to_f32(&name, view.dtype(), view.data())?;
            tensors.insert(name, (view.shape().to_vec(), data));
        }
        Ok(Self { tensors, offsets })
    }

    fn take(&mut self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        self.tensors.remove(name)
    }

    fn need(&mut self, name: &str, why: &str) -> Result<(Vec<usize>, Vec<f32>), String> {
        self.take(name)
            .ok_or_else(|| format!("missing tensor `{name}` ({why})"))
    }

    /// Checks shapes against each other and the config, and assembles the call.
    pub fn problem(mut self, config: &NsaConfig) -> Result<Problem, String> {
        let (qs, q) = self.need("q", "[B, Tq, Hq, Dk]")?;
        let (ks, k) = self.need("k", "[B, Tk, Hkv, Dk]")?;
        let (vs, v) = self.need("v", "[B, Tk, Hkv, Dv]")?;
        let (gs, gates) = self.need("gates", "[B, Tq, Hq, 3]")?;
        let rank4 = |name: &str, s: Vec<usize>| -> Result<[usize; 4], String> {
            match s.len() {
                4 => Ok([s[0], s[1], s[2], s[3]]),
                3 => Ok([1, s[0], s[1], s[2]]),
                _ => Err(format!("tensor `{name}` has shape {s:?}; expected rank 4 [B, T, H, D] or rank 3 [T, H, D]")),
            }
        };
        let [b, tq, hq, dk] = rank4("q", qs)?;
        let [_, tk, hkv, _] = rank4("k", ks.clone())?;
        let packed = self.packed(b, tq, tk)?;
        let vdims = rank4("v", vs.clone())?;
        let dv = vdims[3];
        let shape = Shape {
            batch: b,
            tq,
            tk,
            hq,
            hkv,
            dk,
            dv,
        };
        let expect = |name: &str, got: [usize; 4], want: [usize; 4]| -> Result<(), String> {
            if got == want {
                Ok(())
            } else {
                Err(format!(
                    "tensor `{name}` has shape {got:?}; expected {want:?}"
                ))
            }
        };
        expect("k", rank4("k", ks)?, shape.k_shape())?;
        expect("v", vdims, shape.v_shape())?;
        expect("gates", rank4("gates", gs)?, shape.gates_shape())?;
        if hkv == 0 || hq % hkv != 0 {
            return Err(format!(
                "Hq = {hq} (from q) is not a multiple of Hkv = {hkv} (from k)"
            ));
        }
        if tq > tk {
            return Err(format!("Tq = {tq} (from q) exceeds Tk = {tk} (from k): queries are the last Tq of Tk positions"));
        }
        shape.validate().map_err(|e| e.to_string())?;
        let mut branch: [Option<Vec<f32>>; 6] = Default::default();
        for (i, name) in BRANCH.iter().enumerate() {
            if let Some((s, data)) = self.take(name) {
                let want = if i % 2 == 0 {
                    shape.k_shape()
                } else {
                    shape.v_shape()
                };
                expect(name, rank4(name, s)?, want)?;
                branch[i] = Some(data);
            }
        }
        let linear = if config.compression == Compression::Linear {
            let l = config.cmp_block;
            let mut four = Vec::new();
            for (name, want) in [
                ("w_k", vec![hkv, l, dk, dk]),
                ("pe_k", vec![hkv, l, dk]),
                ("w_v", vec![hkv, l, dv, dv]),
                ("pe_v", vec![hkv, l, dv]),
            ] {
                let (s, data) =
                    self.need(name, "--compression linear needs w_k, pe_k, w_v, pe_v")?;
                if s != want {
                    return Err(format!(
                        "tensor `{name}` has shape {s:?}; expected {want:?}"
                    ));
                }
                four.push(data);
            }
            let [a, b, c, d]: [Vec<f32>; 4] = four
                .try_into()
                .map_err(|_| "internal: four weights".to_string())?;
            Some([a, b, c, d])
        } else {
            None
        };
        Ok(Problem {
            shape,
            q,
            k,
            v,
            gates,
            branch,
            linear,
            packed,
        })
    }

    /// The file's offsets: none, `cu_seqlens` for queries and keys alike, or both of
    /// `cu_seqlens_q` and `cu_seqlens_k`; checked against the tensors' `B`, `Tq` and `Tk`.
    fn packed(&mut self, b: usize, tq: usize, tk: usize) -> Result<Option<Packed>, String> {
        let mut take = |name: &str| self.offsets.remove(name);
        let given = (
            take("cu_seqlens"),
            take("cu_seqlens_q"),
            take("cu_seqlens_k"),
        );
        if given == (None, None, None) {
            return Ok(None);
        }
        if b != 1 {
            return Err(format!("with cu_seqlens the tensors pack the sequences along T: rank 3 [total, H, D] (or B = 1), got B = {b}"));
        }
        let packed = match given {
            (Some(cu), None, None) => {
                if tq != tk {
                    return Err(format!("with cu_seqlens every token is a query: Tq = {tq} (from q) must equal Tk = {tk} (from k); chunks take cu_seqlens_q and cu_seqlens_k"));
                }
                check_offsets("cu_seqlens", &cu, tk)?;
                Packed {
                    q: cu.clone(),
                    k: cu,
                }
            }
            (None, Some(q), Some(k)) => {
                check_offsets("cu_seqlens_q", &q, tq)?;
                check_offsets("cu_seqlens_k", &k, tk)?;
                if q.len() != k.len() {
                    return Err(format!(
                        "cu_seqlens_q has {} entries and cu_seqlens_k {}: one pair of offsets per sequence",
                        q.len(),
                        k.len()
                    ));
                }
                let lens = |cu: &[usize], i: usize| cu[i + 1] - cu[i];
                if let Some(i) = (0..q.len() - 1).find(|&i| lens(&q, i) > lens(&k, i)) {
                    return Err(format!(
                        "sequence {i} has {} queries but {} keys: its queries are its last positions (Tq <= Tk)",
                        lens(&q, i),
                        lens(&k, i)
                    ));
                }
                Packed { q, k }
            }
            _ => {
                return Err(
                    "a packed file holds cu_seqlens, or both cu_seqlens_q and cu_seqlens_k".into(),
                )
            }
        };
        Ok(Some(packed))
    }
}

/// Offsets `name` of a packed file's rows: from 0 up to `total` (the rows its tensors hold),
/// each sequence at least one row.
fn check_offsets(name: &str, cu: &[usize], total: usize) -> Result<(), String> {
    if cu.len() < 2 {
        return Err(format!(
            "{name} has {} entries; expected B + 1 >= 2 (0, then each sequence's end)",
            cu.len()
        ));
    }
    if cu[0] != 0 {
        return Err(format!("{name}[0] = {}; it must be 0", cu[0]));
    }
    if let Some(i) = (1..cu.len()).find(|&i| cu[i] < cu[i - 1]) {
        return Err(format!(
            "{name}[{i}] = {} is below {name}[{}] = {}: offsets never decrease (an empty sequence repeats one)",
            cu[i],
            i - 1,
            cu[i - 1]
        ));
    }
    let last = cu[cu.len() - 1];
    if last != total {
        return Err(format!(
            "{name} ends at {last}, but the tensors hold {total} rows"
        ));
    }
    Ok(())
}

impl Problem {
    /// The library's view of the tensors.
    pub fn inputs(&self) -> NsaInputs<'_> {
        let mut i = NsaInputs::new(&self.q, &self.k, &self.v, &self.gates);
        let b = |j: usize| self.branch[j].as_deref();
        (i.k_cmp, i.v_cmp, i.k_slc, i.v_slc, i.k_win, i.v_win) =
            (b(0), b(1), b(2), b(3), b(4), b(5));
        i.linear = self.linear.as_ref().map(|l| LinearWeights {
            w_k: &l[0],
            pe_k: &l[1],
            w_v: &l[2],
            pe_v: &l[3],
        });
        i
    }

    /// Each sequence's keys as (first row, tokens), rows counted over B and T together: the
    /// packed sequences' key offsets, else the batch's `B` rows of `Tk` tokens.
    pub fn sequences(&self) -> Vec<(usize, usize)> {
        match &self.packed {
            Some(p) => p.k.windows(2).map(|w| (w[0], w[1] - w[0])).collect(),
            None => (0..self.shape.batch)
                .map(|b| (b * self.shape.tk, self.shape.tk))
                .collect(),
        }
    }
}

/// Writes `out`, `block_indices` and any branch outputs; all or nothing (temp file, rename).
/// `packed` (sequences given by `cu_seqlens`) drops the leading batch dimension of 1, as
/// FlashAttention's convention has it: `[total, Hq, Dv]` and `[total, Hkv, n]`.
pub fn write_outputs(
    path: &Path,
    shape: &Shape,
    top_n: usize,
    res: &NsaOutputs,
    packed: bool,
) -> Result<(), String> {
    let skip = packed as usize;
    let out_shape = shape.out_shape()[skip..].to_vec();
    let mut views: Vec<(String, Dtype, Vec<usize>, &[u8])> = vec![(
        "out".into(),
        Dtype::F32,
        out_shape.clone(),
        bytemuck::cast_slice(&res.out),
    )];
    if let Some(idx) = &res.block_indices {
        views.push((
            "block_indices".into(),
            Dtype::I32,
            shape.indices_shape(top_n)[skip..].to_vec(),
            bytemuck::cast_slice(idx),
        ));
    }
    if let Some(b) = &res.branches {
        for (name, data) in [
            ("o_cmp", &b.o_cmp),
            ("o_slc", &b.o_slc),
            ("o_win", &b.o_win),
        ] {
            views.push((
                name.into(),
                Dtype::F32,
                out_shape.clone(),
                bytemuck::cast_slice(data),
            ));
        }
    }
    let mut tensors = Vec::new();
    for (name, dtype, shape, data) in views {
        let view = safetensors::tensor::TensorView::new(dtype, shape, data)
            .map_err(|e| format!("output `{name}`: {e}"))?;
        tensors.push((name, view));
    }
    let bytes =
        safetensors::serialize(tensors, None).map_err(|e| format!("serialising outputs: {e}"))?;
    let tmp = path.with_extension("safetensors.partial");
    std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("cannot move output into {}: {e}", path.display()))
}
