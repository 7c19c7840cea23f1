//! Test helpers shared by the test binaries: seeded inputs and `assert_close`.
#![allow(dead_code)]

use nsa_wgpu::{Compression, NsaConfig, Shape};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// A decode step's shape: one query per sequence over `tk` keys.
pub fn step_shape(batch: usize, tk: usize, hq: usize, hkv: usize, dk: usize, dv: usize) -> Shape {
    Shape {
        tq: 1,
        ..Shape::prefill(batch, tk, hq, hkv, dk, dv)
    }
}

/// The GPU pipeline shared by a test binary's tests (lavapipe in CI), with subgroup
/// reductions where the adapter has them and every product on the shader cores (the plain
/// core; tensor_core_pipeline has the other); prints the adapter.
pub fn pipeline() -> &'static nsa_wgpu::NsaPipeline {
    static PIPE: std::sync::OnceLock<nsa_wgpu::NsaPipeline> = std::sync::OnceLock::new();
    PIPE.get_or_init(|| make_pipeline(true, false))
}

/// A second pipeline on the same kind of adapter that always uses the workgroup-memory
/// reductions (the fallback browsers get).
pub fn fallback_pipeline() -> &'static nsa_wgpu::NsaPipeline {
    static PIPE: std::sync::OnceLock<nsa_wgpu::NsaPipeline> = std::sync::OnceLock::new();
    PIPE.get_or_init(|| make_pipeline(false, false))
}

/// A third pipeline with the tensor-core attention core for f16 inputs (the default where
/// the adapter has it: the H200; not lavapipe), or `None` without it.
pub fn tensor_core_pipeline() -> Option<&'static nsa_wgpu::NsaPipeline> {
    static PIPE: std::sync::OnceLock<Option<nsa_wgpu::NsaPipeline>> = std::sync::OnceLock::new();
    PIPE.get_or_init(|| {
        let pipe = make_pipeline(true, true);
        pipe.tensor_cores().then_some(pipe)
    })
    .as_ref()
}

/// A fourth pipeline with the tensor-core core, on a context that reports subgroups of 32
/// to 64 invocations (AMD's range, whatever the adapter's own), so that the kernels read the
/// subgroup size at run time (`SUBGROUP_SIZE` 0 in `shaders/shared/attn_mma.wgsl`) as they
/// do on adapters whose subgroups vary; `None` without tensor cores.
pub fn runtime_subgroup_pipeline() -> Option<&'static nsa_wgpu::NsaPipeline> {
    static PIPE: std::sync::OnceLock<Option<nsa_wgpu::NsaPipeline>> = std::sync::OnceLock::new();
    PIPE.get_or_init(|| {
        let base = tensor_core_pipeline()?.context();
        let info = wgpu::AdapterInfo {
            subgroup_min_size: 32,
            subgroup_max_size: 64,
            ..base.adapter_info.clone()
        };
        let mut ctx =
            nsa_wgpu::GpuContext::from_device(base.device.clone(), base.queue.clone(), info);
        ctx.coop_f16 = base.coop_f16;
        assert_eq!(ctx.fixed_subgroup_size(), None);
        let mut pipe = pollster::block_on(nsa_wgpu::NsaPipeline::new(&ctx)).expect("pipeline");
        pipe.set_tensor_cores(true).then_some(pipe)
    })
    .as_ref()
}

/// Where `pipe` runs f16 attention, for test messages: "shader cores", "tensor cores", or
/// "tensor cores, subgroup size at run time" (runtime_subgroup_pipeline's).
pub fn core_of(pipe: &nsa_wgpu::NsaPipeline) -> &'static str {
    match (pipe.tensor_cores(), pipe.context().fixed_subgroup_size()) {
        (false, _) => "shader cores",
        (true, Some(_)) => "tensor cores",
        (true, None) => "tensor cores, subgroup size at run time",
    }
}

/// The pipelines to test f16 storage on: the shader cores, and the tensor cores where the
/// adapter has them (the H200; not lavapipe), with the subgroup size a constant and read at
/// run time. None without shader-f16.
pub fn f16_pipelines() -> Vec<&'static nsa_wgpu::NsaPipeline> {
    if !pipeline().supports(nsa_wgpu::Precision::F16) {
        eprintln!("adapter lacks shader-f16: f16 storage is not exercised here");
        return Vec::new();
    }
    let mut pipes = vec![pipeline()];
    pipes.extend(tensor_core_pipeline());
    pipes.extend(runtime_subgroup_pipeline());
    pipes
}

/// A new pipeline on `base`'s device with its subgroup and tensor-core choices (a new
/// pipeline takes tensor cores where it can), for tests that change its other settings.
pub fn pipeline_like(base: &nsa_wgpu::NsaPipeline) -> nsa_wgpu::NsaPipeline {
    let mut pipe =
        pollster::block_on(nsa_wgpu::NsaPipeline::new(base.context())).expect("pipeline");
    pipe.set_subgroup_reductions(base.subgroup_reductions());
    pipe.set_tensor_cores(base.tensor_cores());
    pipe
}

/// A pipeline on a new device of the best adapter with `limits`, with the shared pipeline's
/// subgroup and tensor-core choices.
pub fn pipeline_with_limits(limits: wgpu::Limits) -> nsa_wgpu::NsaPipeline {
    let opts = nsa_wgpu::AdapterOptions {
        limits: Some(limits),
        ..Default::default()
    };
    let ctx = pollster::block_on(nsa_wgpu::GpuContext::with_options(&opts)).expect("device");
    let mut pipe = pollster::block_on(nsa_wgpu::NsaPipeline::new(&ctx)).expect("pipeline");
    pipe.set_subgroup_reductions(pipeline().subgroup_reductions());
    pipe.set_tensor_cores(pipeline().tensor_cores());
    pipe
}

/// A pipeline on a device whose storage bindings hold 32 KiB and buffers 128 KiB, for the
/// calls that run in parts.
pub fn small_limits_pipeline() -> nsa_wgpu::NsaPipeline {
    pipeline_with_limits(wgpu::Limits {
        max_storage_buffer_binding_size: 32 << 10,
        max_buffer_size: 128 << 10,
        ..pipeline().context().device.limits()
    })
}

fn make_pipeline(subgroups: bool, tensor_cores: bool) -> nsa_wgpu::NsaPipeline {
    let ctx =
        pollster::block_on(nsa_wgpu::GpuContext::new()).expect("a GPU adapter (lavapipe in CI)");
    let mut pipe = pollster::block_on(nsa_wgpu::NsaPipeline::new(&ctx)).expect("pipeline");
    let on = pipe.set_subgroup_reductions(subgroups);
    let tc = pipe.set_tensor_cores(tensor_cores);
    eprintln!(
        "adapter: {}; subgroup reductions: {on}; tensor cores: {tc}",
        ctx.describe()
    );
    pipe
}

/// Owned input tensors for one case.
pub struct Data {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub gates: Vec<f32>,
    /// k_cmp, v_cmp, k_slc, v_slc, k_win, v_win
    pub branch: Option<[Vec<f32>; 6]>,
    /// w_k, pe_k, w_v, pe_v
    pub linear: Option<[Vec<f32>; 4]>,
}

/// `f` of every item, each on a thread of its own, in the items' order: the naive NSA on
/// several row sets at 64k, each of which takes seconds to minutes on one core.
pub fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items.iter().map(|x| s.spawn(move || f(x))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a par_map thread panicked"))
            .collect()
    })
}

pub fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

impl Data {
    pub fn new(cfg: &NsaConfig, s: &Shape, branch: bool, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let kn = s.batch * s.tk * s.hkv * s.dk;
        let vn = s.batch * s.tk * s.hkv * s.dv;
        let q = normal(&mut rng, s.batch * s.tq * s.hq * s.dk);
        let k = normal(&mut rng, kn);
        let v = normal(&mut rng, vn);
        let gates = (0..s.batch * s.tq * s.hq * 3)
            .map(|_| rng.random::<f32>())
            .collect();
        let branch = branch.then(|| {
            [
                normal(&mut rng, kn),
                normal(&mut rng, vn),
                normal(&mut rng, kn),
                normal(&mut rng, vn),
                normal(&mut rng, kn),
                normal(&mut rng, vn),
            ]
        });
        let linear = (cfg.compression == Compression::Linear).then(|| {
            let l = cfg.cmp_block;
            let w = |rng: &mut StdRng, d: usize| -> Vec<f32> {
                normal(rng, s.hkv * l * d * d)
                    .iter()
                    .map(|x| x / (l as f32 * (d as f32).sqrt()))
                    .collect()
            };
            let wk = w(&mut rng, s.dk);
            let pk = normal(&mut rng, s.hkv * l * s.dk)
                .iter()
                .map(|x| x * 0.1)
                .collect();
            let wv = w(&mut rng, s.dv);
            let pv = normal(&mut rng, s.hkv * l * s.dv)
                .iter()
                .map(|x| x * 0.1)
                .collect();
            [wk, pk, wv, pv]
        });
        Self {
            q,
            k,
            v,
            gates,
            branch,
            linear,
        }
    }

    pub fn inputs(&self) -> nsa_wgpu::NsaInputs<'_> {
        let mut i = nsa_wgpu::NsaInputs::new(&self.q, &self.k, &self.v, &self.gates);
        if let Some(b) = &self.branch {
            set_branch_kv(&mut i, b);
        }
        if let Some(l) = &self.linear {
            i.linear = Some(nsa_wgpu::LinearWeights {
                w_k: &l[0],
                pe_k: &l[1],
                w_v: &l[2],
                pe_v: &l[3],
            });
        }
        i
    }
}

/// The generator and case count of a seeded sweep: `seed` and `cases` as written, so that CI
/// always runs the same cases, unless the environment asks for others. `NSA_SWEEP_SEED=S`
/// mixes `S` into the seed (other cases of the same kinds: a fuzzing loop runs S = 1, 2, ...)
/// and `NSA_SWEEP_CASES=N` runs `N` cases. The sweep prints the seed it runs with; a failing
/// case's message names its config and shape.
pub fn sweep(name: &str, seed: u64, cases: usize) -> (StdRng, usize) {
    let var = |key: &str| {
        std::env::var(key).ok().map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{key}={v} is not a whole number"))
        })
    };
    let extra = var("NSA_SWEEP_SEED").unwrap_or(0);
    let cases = var("NSA_SWEEP_CASES").map_or(cases, |n| n as usize);
    // Times an odd constant: distinct extras give distinct seeds, and 0 keeps CI's.
    let seed = seed ^ extra.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    println!("sweep {name}: seed {seed:#x} (NSA_SWEEP_SEED {extra}), {cases} cases");
    (StdRng::seed_from_u64(seed), cases)
}

/// One of `xs`, at random.
pub fn pick(rng: &mut StdRng, xs: &[usize]) -> usize {
    xs[rng.random_range(0..xs.len())]
}

/// A random valid config: stride `d` one of `strides`, compression and selection blocks of
/// 1 to 4 strides, 0-2 initial and 0-3 local blocks and up to 6 more, a window from
/// `windows`, sometimes an explicit scale (0.3) and Linear compression.
pub fn random_config(rng: &mut StdRng, strides: &[usize], windows: &[usize]) -> NsaConfig {
    let d = pick(rng, strides);
    let init_blocks = rng.random_range(0..=2);
    let local_blocks = rng.random_range(0..=3);
    NsaConfig {
        cmp_block: d * rng.random_range(1..=4),
        cmp_stride: d,
        sel_block: d * rng.random_range(1..=4),
        top_n: (init_blocks + local_blocks).max(1) + rng.random_range(0..=6),
        init_blocks,
        local_blocks,
        window: pick(rng, windows),
        scale: rng.random_bool(0.3).then_some(0.3),
        compression: if rng.random_bool(0.4) {
            Compression::Linear
        } else {
            Compression::Mean
        },
    }
}

/// [`random_config`] with many blocks per query: compression and selection blocks of 1 to 8
/// strides, and up to `more_n` more selected blocks (n stays within 256 for `more_n <= 245`).
pub fn random_long_config(
    rng: &mut StdRng,
    strides: &[usize],
    windows: &[usize],
    more_n: usize,
) -> NsaConfig {
    let base = random_config(rng, strides, windows);
    let d = base.cmp_stride;
    NsaConfig {
        cmp_block: d * rng.random_range(1..=8),
        sel_block: d * rng.random_range(1..=8),
        top_n: base.top_n + rng.random_range(0..=more_n),
        ..base
    }
}

/// A random config for the sweeps at up to 64k tokens: strides 1 to 64, compression and
/// selection blocks of up to 8 strides, up to 71 selected blocks, windows of 1 to 5000,
/// Mean and Linear ([`random_long_config`]); and now and then ([`widen`]) selection blocks
/// of 400 to 700 strides or 200 to 500 more selected blocks.
pub fn random_64k_config(rng: &mut StdRng) -> NsaConfig {
    let cfg = random_long_config(
        rng,
        &[1, 2, 4, 8, 16, 32, 64],
        &[1, 100, 512, 2048, 5000],
        60,
    );
    widen(rng, cfg)
}

/// `cfg` with, at times, selection blocks of 400 to 700 strides (past the selection's
/// 512-token tile, which it then takes in windows) or 200 to 500 more selected blocks (past
/// the 256 its merge ranks: the selection then runs unsplit).
pub fn widen(rng: &mut StdRng, mut cfg: NsaConfig) -> NsaConfig {
    if rng.random_bool(0.15) {
        cfg.sel_block = cfg.cmp_stride * rng.random_range(400..=700);
    }
    if rng.random_bool(0.1) {
        cfg.top_n += rng.random_range(200..=500);
    }
    cfg
}

/// Sets `i`'s per-branch keys and values to `b`: `k_cmp, v_cmp, k_slc, v_slc, k_win, v_win`.
pub fn set_branch_kv<'a>(i: &mut nsa_wgpu::NsaInputs<'a>, b: &'a [Vec<f32>]) {
    i.k_cmp = Some(&b[0]);
    i.v_cmp = Some(&b[1]);
    i.k_slc = Some(&b[2]);
    i.v_slc = Some(&b[3]);
    i.k_win = Some(&b[4]);
    i.v_win = Some(&b[5]);
}

/// Whether `got` and `want` hold the same f32 values bit for bit (NaNs included).
pub fn bit_equal(got: &[f32], want: &[f32]) -> bool {
    got.len() == want.len()
        && got
            .iter()
            .zip(want)
            .all(|(a, b)| a.to_bits() == b.to_bits())
}

/// Asserts `got` matches `want` within `tol` max abs error; reports the worst element, its
/// index, the RMS error ratio and any NaN.
pub fn assert_close<T: Copy + Into<f64>>(what: &str, got: &[f32], want: &[T], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    let (mut err2, mut ref2) = (0.0f64, 0.0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (*g as f64, (*w).into());
        assert!(
            !g.is_nan(),
            "{what}: NaN at index {i} (want {w}): unwritten or broken"
        );
        let e = (g - w).abs();
        if e > worst.0 {
            worst = (e, i);
        }
        err2 += e * e;
        ref2 += w * w;
    }
    let rms = (err2 / ref2.max(1e-300)).sqrt();
    assert!(
        worst.0 <= tol,
        "{what}: max abs error {:.3e} at index {} (got {}, want {}), rms ratio {:.3e}",
        worst.0,
        worst.1,
        got[worst.1],
        want[worst.1].into(),
        rms
    );
}

/// The config called "small" in the shape tables: l=16, d=8, l'=32, n=5 (2 free slots), w=40.
pub fn small() -> NsaConfig {
    NsaConfig {
        cmp_block: 16,
        cmp_stride: 8,
        sel_block: 32,
        top_n: 5,
        window: 40,
        ..NsaConfig::default()
    }
}

/// Compares selections row by row; a block may differ only as a near tie (SPEC: scores within
/// 1e-6 relative, here plus 1e-12 for scores that f32 cannot tell apart from 0). Returns the
/// rows whose selection differs from the reference.
pub fn check_selection(
    cfg: &NsaConfig,
    got: &[i32],
    naive: &nsa_wgpu::cpu::naive::NaiveOutputs,
) -> Vec<usize> {
    check_selection_within(cfg, got, naive, 1e-6, 1e-12)
}

/// The near-tie margin of selections with f16 storage, relative: the compressed keys and
/// values are stored as f16 too (rounded by up to 2^-11 of their size), which moves each
/// score by a few parts in 10^4 of its size, so blocks whose scores lie that close may swap.
pub const F16_TIE: f64 = 1e-2;

/// check_selection with `rel` and `slack` as the relative and absolute parts of the near-tie
/// rule.
pub fn check_selection_within(
    cfg: &NsaConfig,
    got: &[i32],
    naive: &nsa_wgpu::cpu::naive::NaiveOutputs,
    rel: f64,
    slack: f64,
) -> Vec<usize> {
    let n = cfg.top_n;
    let mut differing = Vec::new();
    for (row, (g, w)) in got.chunks(n).zip(naive.block_indices.chunks(n)).enumerate() {
        assert!(
            g.iter().all(|j| *j >= -1),
            "row {row}: unwritten index in {g:?}"
        );
        // SPEC: the chosen blocks ascending (so each once), then -1 padding. A row in another
        // order would otherwise pass below as a near tie with nothing extra or missing.
        let chosen = g.iter().take_while(|j| **j >= 0).count();
        assert!(
            g[..chosen].windows(2).all(|p| p[0] < p[1]) && g[chosen..].iter().all(|j| *j == -1),
            "row {row}: not ascending blocks then -1 padding: {g:?}"
        );
        if g == w {
            continue;
        }
        let sc = &naive.block_scores[row];
        let extra: Vec<i32> = g.iter().filter(|j| !w.contains(j)).cloned().collect();
        let missing: Vec<i32> = w.iter().filter(|j| !g.contains(j)).cloned().collect();
        assert_eq!(
            extra.len(),
            missing.len(),
            "row {row}: got {g:?}, want {w:?}"
        );
        for (a, b) in extra.iter().zip(&missing) {
            let (sa, sb) = (sc[*a as usize], sc[*b as usize]);
            assert!(
                (sa - sb).abs() <= rel * sa.abs().max(sb.abs()) + slack,
                "row {row}: got {g:?}, want {w:?}; block {a} scores {sa}, block {b} scores {sb}"
            );
        }
        differing.push(row);
    }
    differing
}

/// `x` as f16 stores it.
pub fn f16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect()
}

/// Rows held against the naive NSA (check_rows): how many selections were equal, of how
/// many, and the worst output error on the equal ones.
#[derive(Default)]
pub struct RowTally {
    pub same: usize,
    pub rows: usize,
    pub worst: f64,
}

impl RowTally {
    /// Prints the tally and asserts at least 95% (f32) or 80% (f16: compressed keys stored
    /// as f16 move near ties) of the selections equal and the outputs within `tol`.
    pub fn assert_within(&self, name: &str, f16: bool, tol: f64) {
        let RowTally { same, rows, worst } = *self;
        println!("{name}: {same} of {rows} selections equal, max abs error {worst:.2e}");
        assert!(rows > 0, "{name}: no rows checked");
        let share = if f16 { 80 } else { 95 };
        assert!(
            same * 100 >= rows * share,
            "{name}: {same} of {rows} selections equal"
        );
        assert!(worst <= tol, "{name}: max abs error {worst:.3e}");
    }
}

/// Adds to `tally` the rows a call computed for the last `part.tq` positions of one
/// sequence (`out` `[tq, Hq, Dv]`, `idx` `[tq, Hkv, n]`) against the naive NSA on `inputs`
/// (shaped `part`: those queries and the keys up to them, as the call stored them): every
/// selection equal up to near ties (check_selection, or with `f16` at f16's precision,
/// F16_TIE), and on the rows whose selections are equal, the outputs.
pub fn check_rows(
    tally: &mut RowTally,
    cfg: &NsaConfig,
    part: &Shape,
    naive: &nsa_wgpu::cpu::naive::NaiveOutputs,
    (out, idx): (&[f32], &[i32]),
    f16: bool,
) {
    let differing = if f16 {
        check_selection_within(cfg, idx, naive, F16_TIE, 1e-12)
    } else {
        check_selection(cfg, idx, naive)
    };
    let (hq, hkv, g, dv) = (part.hq, part.hkv, part.group(), part.dv);
    let rows = idx.len() / cfg.top_n;
    for row in (0..rows).filter(|r| !differing.contains(r)) {
        // Selection row `row` is query t's kv head h: its g query heads.
        let (t, h) = (row / hkv, row % hkv);
        for head in h * g..(h + 1) * g {
            let at = (t * hq + head) * dv;
            for (x, y) in out[at..at + dv].iter().zip(&naive.out[at..at + dv]) {
                tally.worst = tally.worst.max((*x as f64 - y).abs());
            }
        }
    }
    tally.same += rows - differing.len();
    tally.rows += rows;
}
