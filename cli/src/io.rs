//! Reading inputs from and writing outputs to safetensors files, with shape checks that name
//! the tensor, the expected and the actual shape.

use std::collections::HashMap;
use std::path::Path;

use nsa_wgpu::{Compression, LinearWeights, NsaConfig, NsaInputs, NsaOutputs, Shape};
use safetensors::{Dtype, SafeTensors};

/// Every tensor of an input file, converted to f32.
pub struct Loaded {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
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
        other => Err(format!(
            "tensor `{name}` has dtype {other:?}; expected F32, F16 or BF16"
        )),
    }
}

impl Loaded {
    /// Reads and parses a safetensors file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| format!("{} is not a valid safetensors file: {e}", path.display()))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = to_f32(&name, view.dtype(), view.data())?;
            tensors.insert(name, (view.shape().to_vec(), data));
        }
        Ok(Self { tensors })
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
        })
    }
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
}

/// Writes `out`, `block_indices` and any branch outputs; all or nothing (temp file, rename).
pub fn write_outputs(
    path: &Path,
    shape: &Shape,
    top_n: usize,
    res: &NsaOutputs,
) -> Result<(), String> {
    let out_shape = shape.out_shape().to_vec();
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
            shape.indices_shape(top_n).to_vec(),
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
