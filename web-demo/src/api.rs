//! The JavaScript API: sessions that run NSA, dense attention, the CPU reference and decode
//! steps on `Float32Array`s in SPEC's layouts with `B = 1`, and an inspector for the viewer.

use js_sys::{Array, Float32Array, Int32Array, Object, Reflect};
use nsa_wgpu::cpu;
use nsa_wgpu::{
    CacheOptions, Compression, GpuContext, LinearWeights, NsaCache, NsaConfig, NsaInputs,
    NsaOutputs, NsaPipeline, OutputRequest, Precision, SeqChunk, Shape, SplitTargets,
};
use wasm_bindgen::prelude::*;

fn err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

fn get(obj: &JsValue, name: &str) -> Option<f64> {
    Reflect::get(obj, &JsValue::from_str(name))
        .ok()
        .and_then(|v| v.as_f64())
}

fn get_usize(obj: &JsValue, name: &str, default: usize) -> Result<usize, JsError> {
    match get(obj, name) {
        None => Ok(default),
        // (`as` would saturate: 2^32 became 4294967295 in wasm32's usize.)
        Some(v) if v >= 0.0 && v.fract() == 0.0 && v <= usize::MAX as f64 => Ok(v as usize),
        Some(v) => Err(JsError::new(&format!(
            "option `{name}` must be an integer from 0 to {}, got {v}",
            usize::MAX
        ))),
    }
}

/// The `precision` option: `"f32"` (the default), `"f16"` (inputs and KV cache stored as
/// f16, f32 arithmetic; needs the adapter's `shader-f16`) or `"auto"` (f16 where the
/// adapter has it).
fn precision(opts: &JsValue, pipe: &NsaPipeline) -> Result<Precision, JsError> {
    let v = Reflect::get(opts, &JsValue::from_str("precision")).unwrap_or(JsValue::UNDEFINED);
    if v.is_undefined() {
        return Ok(Precision::F32);
    }
    let f16 = pipe.supports(Precision::F16);
    match v.as_string().as_deref() {
        Some("f32") => Ok(Precision::F32),
        Some("f16") if f16 => Ok(Precision::F16),
        Some("f16") => Err(JsError::new(&format!(
            "precision \"f16\" needs shader-f16, which this adapter lacks ({}); \"auto\" falls back to f32",
            pipe.context().describe()
        ))),
        Some("auto") => Ok(if f16 { Precision::F16 } else { Precision::F32 }),
        _ => Err(JsError::new(&format!(
            "option `precision` must be \"f32\", \"f16\" or \"auto\", got {v:?}"
        ))),
    }
}

/// The `compression` option: `"mean"` (the default) or `"linear"` (weights from
/// `setLinearWeights`).
fn compression(opts: &JsValue) -> Result<Compression, JsError> {
    let v = Reflect::get(opts, &JsValue::from_str("compression")).unwrap_or(JsValue::UNDEFINED);
    match v.as_string().as_deref() {
        _ if v.is_undefined() => Ok(Compression::Mean),
        Some("mean") => Ok(Compression::Mean),
        Some("linear") => Ok(Compression::Linear),
        _ => Err(JsError::new(&format!(
            "option `compression` must be \"mean\" or \"linear\", got {v:?}"
        ))),
    }
}

/// A branch's name in the `splitTargets` option: `SplitTargets::named_mut`'s (the CLI's
/// `--split-target` names) in camel case, `cmp_attn_mma` as `cmpAttnMma`.
fn camel(name: &str) -> String {
    let mut parts = name.split('_');
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        let mut chars = part.chars();
        out.extend(chars.next().map(|c| c.to_ascii_uppercase()));
        out.push_str(chars.as_str());
    }
    out
}

/// The `splitTargets` option: `{cmpAttn, cmpAttnMma, slcAttn, winAttn}`, the workgroups each
/// attention branch aims for in calls of few row groups (decode steps), any of them left
/// out keeping its default (`SplitTargets::default()`, chosen on an H200); 0 splits none.
/// Results do not change, only how the work is split.
fn split_targets(opts: &JsValue) -> Result<SplitTargets, JsError> {
    let v = Reflect::get(opts, &JsValue::from_str("splitTargets")).unwrap_or(JsValue::UNDEFINED);
    let mut targets = SplitTargets::default();
    if v.is_undefined() {
        return Ok(targets);
    }
    let names: Vec<String> = targets.named().map(|(n, _)| camel(n)).into();
    if !v.is_object() {
        return Err(JsError::new(&format!(
            "option `splitTargets` must be an object with some of {}, got {v:?}",
            names.join(", ")
        )));
    }
    for key in Object::keys(v.unchecked_ref::<Object>()).iter() {
        let key = key.as_string().unwrap_or_default();
        let target = targets
            .named_mut()
            .into_iter()
            .find(|(name, _)| camel(name) == key)
            .map(|(_, target)| target)
            .ok_or_else(|| {
                JsError::new(&format!(
                    "option `splitTargets` has no target `{key}`: the targets are {}",
                    names.join(", ")
                ))
            })?;
        let val = Reflect::get(&v, &JsValue::from_str(&key)).unwrap_or(JsValue::UNDEFINED);
        *target = val
            .as_f64()
            .filter(|n| *n >= 0.0 && n.fract() == 0.0)
            .ok_or_else(|| {
                JsError::new(&format!(
                    "option `splitTargets.{key}` must be a non-negative integer, got {val:?}"
                ))
            })? as u64;
    }
    Ok(targets)
}

/// A call's per-token tensors, copied out of JavaScript: q, k, v, gates and any per-branch
/// keys and values.
struct Tensors {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    gates: Vec<f32>,
    branch: [Option<Vec<f32>>; 6],
}

/// The per-branch tensors' names in JavaScript, in `NsaInputs`' order.
const BRANCH: [&str; 6] = ["kCmp", "vCmp", "kSlc", "vSlc", "kWin", "vWin"];

impl Tensors {
    /// The four tensors and, from `branches` (`{kCmp, vCmp, kSlc, vSlc, kWin, vWin}`, any of
    /// them; undefined for none), the branches' own keys and values.
    fn new([q, k, v, gates]: [&Float32Array; 4], branches: &JsValue) -> Result<Self, JsError> {
        let mut branch: [Option<Vec<f32>>; 6] = Default::default();
        if !branches.is_undefined() && !branches.is_null() {
            for (slot, name) in branch.iter_mut().zip(BRANCH) {
                let v =
                    Reflect::get(branches, &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED);
                if !v.is_undefined() {
                    let a = v.dyn_into::<Float32Array>().map_err(|_| {
                        JsError::new(&format!("branches.{name} must be a Float32Array"))
                    })?;
                    *slot = Some(a.to_vec());
                }
            }
        }
        Ok(Tensors {
            q: q.to_vec(),
            k: k.to_vec(),
            v: v.to_vec(),
            gates: gates.to_vec(),
            branch,
        })
    }

    /// The library's view, with Linear's weights where the session has them.
    fn inputs<'a>(&'a self, weights: Option<&'a Weights>) -> NsaInputs<'a> {
        let mut i = NsaInputs::new(&self.q, &self.k, &self.v, &self.gates);
        let b = |j: usize| self.branch[j].as_deref();
        (i.k_cmp, i.v_cmp, i.k_slc, i.v_slc, i.k_win, i.v_win) =
            (b(0), b(1), b(2), b(3), b(4), b(5));
        i.linear = weights.map(Weights::view);
        i
    }
}

/// A packed batch's offsets: `cuSeqlens` for queries and keys alike, or `cuSeqlensQ` and
/// `cuSeqlensK` (`k: Some`) for chunks.
struct Offsets {
    q: Vec<usize>,
    k: Option<Vec<usize>>,
}

/// `{cuSeqlens, q, k, v, gates, branches}` (or `cuSeqlensQ` and `cuSeqlensK` for
/// `cuSeqlens`): the offsets as sizes (negative ones are errors; the library checks the
/// rest) and the tensors.
fn packed(batch: &JsValue) -> Result<(Offsets, Tensors), JsError> {
    let field = |name: &str| {
        Reflect::get(batch, &JsValue::from_str(name))
            .ok()
            .filter(|v| !v.is_undefined())
    };
    let floats = |name: &str| -> Result<Float32Array, JsError> {
        field(name)
            .and_then(|v| v.dyn_into::<Float32Array>().ok())
            .ok_or_else(|| JsError::new(&format!("runPacked: `{name}` must be a Float32Array")))
    };
    let offsets = |name: &str| -> Result<Option<Vec<usize>>, JsError> {
        let Some(v) = field(name) else {
            return Ok(None);
        };
        let ints = v
            .dyn_into::<Int32Array>()
            .map_err(|_| JsError::new(&format!("runPacked: `{name}` must be an Int32Array")))?;
        let sizes = (ints.to_vec().into_iter().enumerate())
            .map(|(i, x)| {
                usize::try_from(x)
                    .map_err(|_| JsError::new(&format!("{name}[{i}] = {x}: offsets are >= 0")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(sizes))
    };
    let cu = match (
        offsets("cuSeqlens")?,
        offsets("cuSeqlensQ")?,
        offsets("cuSeqlensK")?,
    ) {
        (Some(q), None, None) => Offsets { q, k: None },
        (None, Some(q), Some(k)) => Offsets { q, k: Some(k) },
        _ => {
            return Err(JsError::new(
                "runPacked: give `cuSeqlens`, or both `cuSeqlensQ` and `cuSeqlensK`",
            ))
        }
    };
    let four = [floats("q")?, floats("k")?, floats("v")?, floats("gates")?];
    let branches = field("branches").unwrap_or(JsValue::UNDEFINED);
    let t = Tensors::new([&four[0], &four[1], &four[2], &four[3]], &branches)?;
    Ok((cu, t))
}

/// Linear compression's weights, owned: `w_k`, `pe_k`, `w_v`, `pe_v`.
struct Weights([Vec<f32>; 4]);

impl Weights {
    fn view(&self) -> LinearWeights<'_> {
        let [w_k, pe_k, w_v, pe_v] = &self.0;
        LinearWeights {
            w_k,
            pe_k,
            w_v,
            pe_v,
        }
    }
}

fn set(obj: &Object, name: &str, value: impl Into<JsValue>) {
    // Setting a property on a fresh plain object cannot fail.
    let _ = Reflect::set(obj, &JsValue::from_str(name), &value.into());
}

/// The inputs of the last run, kept for the inspector.
struct LastRun {
    q: Vec<f32>,
    kc: Vec<f32>,
    gates: Vec<f32>,
    block_indices: Vec<i32>,
}

/// One configuration and shape on one WebGPU device.
#[wasm_bindgen]
pub struct NsaSession {
    pipe: NsaPipeline,
    config: NsaConfig,
    shape: Shape,
    precision: Precision,
    weights: Option<Weights>,
    last: Option<LastRun>,
    cache: Option<NsaCache>,
}

fn outputs_to_js(r: &NsaOutputs, ms: f64) -> Object {
    let o = Object::new();
    set(&o, "out", Float32Array::from(&r.out[..]));
    if let Some(b) = &r.block_indices {
        set(&o, "blockIndices", Int32Array::from(&b[..]));
    }
    if let Some(b) = &r.branches {
        set(&o, "oCmp", Float32Array::from(&b.o_cmp[..]));
        set(&o, "oSlc", Float32Array::from(&b.o_slc[..]));
        set(&o, "oWin", Float32Array::from(&b.o_win[..]));
    }
    set(&o, "ms", ms);
    o
}

fn now_ms() -> f64 {
    js_sys::Date::now()
}

#[wasm_bindgen]
impl NsaSession {
    /// `await NsaSession.create({t, hq, hkv, dk, dv, cmpBlock, cmpStride, selBlock, topN,
    /// initBlocks, localBlocks, window, scale, compression, precision})`: picks the browser's
    /// WebGPU adapter and compiles the kernels. Missing config fields take the paper's
    /// defaults; `compression` is `"mean"` (default) or `"linear"` (then `setLinearWeights`
    /// before a run); `precision` is `"f32"` (default), `"f16"` (storage, where the adapter
    /// has `shader-f16`) or `"auto"`; `splitTargets` is `{cmpAttn, cmpAttnMma, slcAttn,
    /// winAttn}`, the workgroups each attention branch of a decode step aims for (for tuning
    /// to a GPU; results do not change).
    pub async fn create(opts: JsValue) -> Result<NsaSession, JsError> {
        console_error_panic_hook::set_once();
        let d = NsaConfig::default();
        let config = NsaConfig {
            cmp_block: get_usize(&opts, "cmpBlock", d.cmp_block)?,
            cmp_stride: get_usize(&opts, "cmpStride", d.cmp_stride)?,
            sel_block: get_usize(&opts, "selBlock", d.sel_block)?,
            top_n: get_usize(&opts, "topN", d.top_n)?,
            init_blocks: get_usize(&opts, "initBlocks", d.init_blocks)?,
            local_blocks: get_usize(&opts, "localBlocks", d.local_blocks)?,
            window: get_usize(&opts, "window", d.window)?,
            scale: get(&opts, "scale").map(|s| s as f32),
            compression: compression(&opts)?,
        };
        config.validate().map_err(err)?;
        let t = get_usize(&opts, "t", 0)?;
        let shape = Shape::prefill(
            1,
            t,
            get_usize(&opts, "hq", 4)?,
            get_usize(&opts, "hkv", 1)?,
            get_usize(&opts, "dk", 32)?,
            get_usize(&opts, "dv", 32)?,
        );
        shape.validate().map_err(err)?;
        let targets = split_targets(&opts)?;
        let ctx = GpuContext::new().await.map_err(err)?;
        let mut pipe = NsaPipeline::new(&ctx).await.map_err(err)?;
        pipe.set_split_targets(targets);
        let precision = precision(&opts, &pipe)?;
        pipe.plan(&config, &shape).map_err(err)?;
        Ok(NsaSession {
            pipe,
            config,
            shape,
            precision,
            weights: None,
            last: None,
            cache: None,
        })
    }

    /// The adapter the session runs on: name, backend, type, driver.
    #[wasm_bindgen(js_name = adapterInfo)]
    pub fn adapter_info(&self) -> String {
        self.pipe.context().describe()
    }

    /// `{t, hq, hkv, dk, dv, cmpBlock, cmpStride, selBlock, topN, window, nCmp, precision,
    /// compression, splitTargets}` of the session (`precision`: `"f32"` or `"f16"`, what
    /// `"auto"` resolved to; `splitTargets`: every target the plans use).
    pub fn layout(&self) -> Object {
        let (s, c) = (&self.shape, &self.config);
        let o = Object::new();
        for (k, v) in [
            ("t", s.tk),
            ("hq", s.hq),
            ("hkv", s.hkv),
            ("dk", s.dk),
            ("dv", s.dv),
            ("cmpBlock", c.cmp_block),
            ("cmpStride", c.cmp_stride),
            ("selBlock", c.sel_block),
            ("topN", c.top_n),
            ("initBlocks", c.init_blocks),
            ("localBlocks", c.local_blocks),
            ("window", c.window),
            ("nCmp", c.num_compressed(s.tk)),
        ] {
            set(&o, k, v as f64);
        }
        let p = match self.precision {
            Precision::F16 => "f16",
            Precision::F32 => "f32",
        };
        set(&o, "precision", p);
        let comp = match c.compression {
            Compression::Mean => "mean",
            Compression::Linear => "linear",
        };
        set(&o, "compression", comp);
        let t = Object::new();
        for (name, target) in self.pipe.limits().split_targets.named() {
            set(&t, &camel(name), target as f64);
        }
        set(&o, "splitTargets", t);
        o
    }

    /// `session.setLinearWeights(wK, peK, wV, peV)`: Linear compression's weights (`wK:
    /// [hkv, cmpBlock, dk, dk]`, input dim then output dim, `peK: [hkv, cmpBlock, dk]`, `wV`,
    /// `peV` likewise with `dv`), used by every later call; forgets the KV cache, whose
    /// compressed tokens came from the old ones. A session with Mean compression refuses them.
    #[wasm_bindgen(js_name = setLinearWeights)]
    pub fn set_linear_weights(
        &mut self,
        w_k: Float32Array,
        pe_k: Float32Array,
        w_v: Float32Array,
        pe_v: Float32Array,
    ) -> Result<(), JsError> {
        if self.config.compression != Compression::Linear {
            return Err(JsError::new(
                "setLinearWeights: the session compresses by the mean (create it with compression: \"linear\")",
            ));
        }
        let w = Weights([w_k.to_vec(), pe_k.to_vec(), w_v.to_vec(), pe_v.to_vec()]);
        // The shapes and values, checked now (with stand-ins for the per-token tensors).
        let s = &self.shape;
        let one = Shape { tq: 1, tk: 1, ..*s };
        let (q, k, v, g) = (
            vec![0.0; s.hq * s.dk],
            vec![0.0; s.hkv * s.dk],
            vec![0.0; s.hkv * s.dv],
            vec![0.0; s.hq * 3],
        );
        let mut probe = NsaInputs::new(&q, &k, &v, &g);
        probe.linear = Some(w.view());
        probe.validate(&self.config, &one).map_err(err)?;
        self.weights = Some(w);
        self.cache = None;
        Ok(())
    }

    /// `await session.run(q, k, v, gates, branches)` on WebGPU, the inputs stored at the
    /// session's precision; `branches` (optional): `{kCmp, vCmp, kSlc, vSlc, kWin, vWin}`,
    /// any of them, the paper's independent keys and values per branch (a branch without its
    /// own uses `k`, `v`). Resolves to `{out, blockIndices, oCmp, oSlc, oWin, ms}` (`ms`: wall
    /// time of the call, upload and readback included).
    pub async fn run(
        &mut self,
        q: Float32Array,
        k: Float32Array,
        v: Float32Array,
        gates: Float32Array,
        branches: JsValue,
    ) -> Result<Object, JsError> {
        let t = Tensors::new([&q, &k, &v, &gates], &branches)?;
        let inputs = t.inputs(self.weights.as_ref());
        let start = now_ms();
        let r = self
            .pipe
            .run_with(
                &self.config,
                &self.shape,
                &inputs,
                OutputRequest::all(),
                self.precision,
            )
            .await
            .map_err(err)?;
        let ms = now_ms() - start;
        let s = &self.shape;
        let wk = inputs.linear.map(|w| (w.w_k, w.pe_k));
        let keys = inputs.cmp_kv().0;
        let kc = cpu::compress::compress(&self.config, 1, s.tk, s.hkv, s.dk, keys, wk);
        self.last = Some(LastRun {
            q: t.q,
            kc,
            gates: t.gates,
            block_indices: r.block_indices.clone().unwrap_or_default(),
        });
        Ok(outputs_to_js(&r, ms))
    }

    /// `await session.runPacked({cuSeqlens, q, k, v, gates, branches})`: sequences of
    /// different lengths packed along T (FlashAttention's convention: `cuSeqlens` an
    /// `Int32Array` `[B + 1]` from 0 up to the total, `q: [total, hq, dk]` ...; the session's
    /// `t` plays no part; `branches` as `run` takes it), each attending only to its own
    /// tokens, in one submission: `{out, blockIndices, oCmp, oSlc, oWin, ms}` packed the same
    /// way. With `cuSeqlensQ` and `cuSeqlensK` instead of `cuSeqlens`, a batch of chunks:
    /// `q` and `gates` hold each sequence's last queries (a chunk, or one row for a decode
    /// step) by the first, the keys and values all its keys by the second, and the outputs
    /// pack like `q`.
    #[wasm_bindgen(js_name = runPacked)]
    pub async fn run_packed(&self, batch: JsValue) -> Result<Object, JsError> {
        let (cu, t) = packed(&batch)?;
        let inputs = t.inputs(self.weights.as_ref());
        let (cfg, heads, all) = (&self.config, self.heads(), OutputRequest::all());
        let start = now_ms();
        let r = match &cu.k {
            None => {
                (self.pipe)
                    .run_varlen_with(cfg, &cu.q, heads, &inputs, all, self.precision)
                    .await
            }
            Some(k) => {
                (self.pipe)
                    .run_varlen_qk(cfg, &cu.q, k, heads, &inputs, all, self.precision)
                    .await
            }
        };
        Ok(outputs_to_js(&r.map_err(err)?, now_ms() - start))
    }

    /// `session.referencePacked({cuSeqlens, q, k, v, gates, branches})` (or with
    /// `cuSeqlensQ` and `cuSeqlensK`): the CPU reference of `runPacked` (each sequence
    /// alone), same result shape.
    #[wasm_bindgen(js_name = referencePacked)]
    pub fn reference_packed(&self, batch: JsValue) -> Result<Object, JsError> {
        let (cu, t) = packed(&batch)?;
        let inputs = t.inputs(self.weights.as_ref());
        let (cfg, heads, all) = (&self.config, self.heads(), OutputRequest::all());
        let start = now_ms();
        let r = match &cu.k {
            None => cpu::forward_varlen(cfg, &cu.q, heads, &inputs, all),
            Some(k) => cpu::forward_varlen_qk(cfg, &cu.q, k, heads, &inputs, all),
        };
        Ok(outputs_to_js(&r.map_err(err)?, now_ms() - start))
    }

    /// `await session.dense(q, k, v)`: dense causal attention on WebGPU, `{out, ms}`.
    pub async fn dense(
        &self,
        q: Float32Array,
        k: Float32Array,
        v: Float32Array,
    ) -> Result<Object, JsError> {
        let (q, k, v) = (q.to_vec(), k.to_vec(), v.to_vec());
        let start = now_ms();
        let out = self
            .pipe
            .dense_attention(&self.shape, self.config.scale, &q, &k, &v)
            .await
            .map_err(err)?;
        let o = Object::new();
        set(&o, "out", Float32Array::from(&out[..]));
        set(&o, "ms", now_ms() - start);
        Ok(o)
    }

    /// `session.reference(q, k, v, gates, branches)`: the CPU reference (compiled to wasm),
    /// same arguments and result shape as `run`.
    pub fn reference(
        &self,
        q: Float32Array,
        k: Float32Array,
        v: Float32Array,
        gates: Float32Array,
        branches: JsValue,
    ) -> Result<Object, JsError> {
        let t = Tensors::new([&q, &k, &v, &gates], &branches)?;
        let start = now_ms();
        let inputs = t.inputs(self.weights.as_ref());
        let r =
            cpu::forward(&self.config, &self.shape, &inputs, OutputRequest::all()).map_err(err)?;
        Ok(outputs_to_js(&r, now_ms() - start))
    }

    /// `session.inspect(query, head)` after a run: what query row `query` of head `head` saw:
    /// `{position, pCmp, headScores, groupScores, selected, windowStart, windowEnd, gates}`.
    pub fn inspect(&self, query: usize, head: usize) -> Result<Object, JsError> {
        let last = self
            .last
            .as_ref()
            .ok_or_else(|| JsError::new("inspect needs a run first"))?;
        let (s, c) = (&self.shape, &self.config);
        if query >= s.tq || head >= s.hq {
            return Err(JsError::new(&format!(
                "query {query} / head {head} out of range (Tq = {}, Hq = {})",
                s.tq, s.hq
            )));
        }
        let p = s.position(query);
        let n_cmp = c.num_compressed(s.tk);
        let nv = c.visible_compressed(p, n_cmp);
        let g = s.group();
        let h = head / g;
        let scale = c.scale_for(s.dk) as f64;
        let blocks = p / c.sel_block + 1;
        let probs = |hq: usize| -> Vec<f64> {
            let qr = &last.q[(query * s.hq + hq) * s.dk..][..s.dk];
            let sc: Vec<f64> = (0..nv)
                .map(|t| {
                    let kr = &last.kc[(t * s.hkv + h) * s.dk..][..s.dk];
                    scale
                        * qr.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
            sc.iter().map(|x| (x - mx).exp() / z).collect()
        };
        let mine = probs(head);
        let head_scores = cpu::naive::block_importance(c, &mine, blocks - 1);
        let mut group = vec![0.0; blocks];
        for hq in h * g..(h + 1) * g {
            let sc = cpu::naive::block_importance(c, &probs(hq), blocks - 1);
            group.iter_mut().zip(sc).for_each(|(a, b)| *a += b);
        }
        let to32 =
            |x: &[f64]| Float32Array::from(&x.iter().map(|v| *v as f32).collect::<Vec<_>>()[..]);
        let o = Object::new();
        set(&o, "position", p as f64);
        set(&o, "pCmp", to32(&mine));
        set(&o, "headScores", to32(&head_scores));
        set(&o, "groupScores", to32(&group));
        let sel = &last.block_indices[(query * s.hkv + h) * c.top_n..][..c.top_n];
        set(&o, "selected", Int32Array::from(sel));
        set(&o, "windowStart", (p + 1).saturating_sub(c.window) as f64);
        set(&o, "windowEnd", p as f64);
        let gates = Array::new();
        for x in &last.gates[(query * s.hq + head) * 3..][..3] {
            gates.push(&JsValue::from_f64(*x as f64));
        }
        set(&o, "gates", gates);
        Ok(o)
    }

    /// `await session.decodeStep(q, k, v, gates, branches)`: appends `n` tokens (`q: [n, Hq,
    /// Dk]`, `k: [n, Hkv, Dk]`, `v: [n, Hkv, Dv]`, `gates: [n, Hq, 3]`, `branches` as `run`
    /// takes it) to the session's KV cache and returns their rows `{out, blockIndices, ms,
    /// length}` (`length`: tokens now cached). A cache started with per-branch keys and values
    /// keeps them per branch (later calls without them give `k`, `v` to every branch); one
    /// started without refuses them until `resetCache`.
    #[wasm_bindgen(js_name = decodeStep)]
    pub async fn decode_step(
        &mut self,
        q: Float32Array,
        k: Float32Array,
        v: Float32Array,
        gates: Float32Array,
        branches: JsValue,
    ) -> Result<Object, JsError> {
        let t = Tensors::new([&q, &k, &v, &gates], &branches)?;
        let rows = t.inputs(None);
        let s = self.shape;
        if self.cache.is_none() {
            let opts = CacheOptions {
                seqs: 1,
                hq: s.hq,
                hkv: s.hkv,
                dk: s.dk,
                dv: s.dv,
                capacity: 1024,
                max_capacity: 1 << 20,
                independent_kv: rows.has_branch_kv(),
                precision: self.precision,
            };
            let linear = self.weights.as_ref().map(Weights::view);
            self.cache = Some(NsaCache::new(&self.pipe, &self.config, opts, linear).map_err(err)?);
        }
        let cache = self.cache.as_mut().expect("created above");
        if rows.has_branch_kv() && !cache.independent_kv() {
            return Err(JsError::new(
                "decodeStep: the KV cache was started without per-branch keys and values (resetCache() first)",
            ));
        }
        let chunk = SeqChunk::from_rows(0, &rows, cache.independent_kv());
        let req = OutputRequest {
            block_indices: true,
            branches: false,
        };
        let start = now_ms();
        let mut r = self.pipe.extend(cache, &[chunk], req).await.map_err(err)?;
        let o = outputs_to_js(&r.remove(0), now_ms() - start);
        set(&o, "length", cache.lens()[0] as f64);
        Ok(o)
    }

    /// Forgets the KV cache of `decodeStep`.
    #[wasm_bindgen(js_name = resetCache)]
    pub fn reset_cache(&mut self) {
        self.cache = None;
    }

    /// `session.truncateCache(len)`: rolls the KV cache of `decodeStep` back to its first
    /// `len` tokens (at most those cached), so that the next `decodeStep` appends at `len`
    /// (`NsaCache::truncate`: a rejected draft, or another continuation of a prompt).
    #[wasm_bindgen(js_name = truncateCache)]
    pub fn truncate_cache(&mut self, len: usize) -> Result<(), JsError> {
        match self.cache.as_mut() {
            Some(cache) => cache.truncate(0, len).map_err(err),
            None if len == 0 => Ok(()),
            None => Err(JsError::new("truncateCache: nothing is cached")),
        }
    }
}

impl NsaSession {
    /// `(Hq, Hkv, Dk, Dv)`.
    fn heads(&self) -> (usize, usize, usize, usize) {
        let s = &self.shape;
        (s.hq, s.hkv, s.dk, s.dv)
    }
}
