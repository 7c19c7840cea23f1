//! End-to-end tests of the `nsa` binary on files they write.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nsa_wgpu::data::sample_values;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

fn nsa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nsa"))
        .args(args)
        .output()
        .expect("the nsa binary runs")
}

/// A tensor to write: name, shape, f32 data, stored as F32 or F16.
struct T {
    name: &'static str,
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn t(name: &'static str, shape: &[usize], seed: u64) -> T {
    let n = shape.iter().product();
    let mut data = sample_values(n, seed);
    if name == "gates" {
        data.iter_mut().for_each(|x| *x = 0.5 + 0.5 * *x);
    }
    T {
        name,
        shape: shape.to_vec(),
        data,
    }
}

fn write(path: &Path, tensors: &[T], f16: bool) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| {
            if f16 {
                t.data
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect()
            } else {
                t.data.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        })
        .collect();
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            (
                t.name,
                TensorView::new(
                    if f16 { Dtype::F16 } else { Dtype::F32 },
                    t.shape.clone(),
                    b,
                )
                .unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn standard(b: usize, tq: usize, tk: usize, hq: usize, hkv: usize, dk: usize, dv: usize) -> Vec<T> {
    vec![
        t("q", &[b, tq, hq, dk], 1),
        t("k", &[b, tk, hkv, dk], 2),
        t("v", &[b, tk, hkv, dv], 3),
        t("gates", &[b, tq, hq, 3], 4),
    ]
}

fn read(path: &Path) -> Vec<(String, Vec<usize>, Dtype, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.dtype(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

struct Dir(tempfile::TempDir);
impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().unwrap())
    }
    fn p(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.p(name).display().to_string()
    }
}

const SMALL: [&str; 8] = [
    "--cmp-block",
    "16",
    "--cmp-stride",
    "8",
    "--sel-block",
    "32",
    "--top-n",
    "5",
];

fn assert_same(a: &Path, b: &Path, tol: f32) {
    let (x, y) = (read(a), read(b));
    assert_eq!(x.len(), y.len());
    for ((n1, s1, d1, b1), (n2, s2, d2, b2)) in x.iter().zip(&y) {
        assert_eq!((n1, s1, d1), (n2, s2, d2));
        if *d1 == Dtype::I32 {
            assert_eq!(b1, b2, "{n1}");
        } else {
            let worst = f32s(b1)
                .iter()
                .zip(f32s(b2))
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= tol, "{n1}: max abs difference {worst}");
        }
    }
}

#[test]
fn gpu_matches_cpu_with_branches() {
    let d = Dir::new();
    write(
        &d.p("in.safetensors"),
        &standard(2, 90, 90, 4, 2, 20, 12),
        false,
    );
    let input = d.s("in.safetensors");
    let mut gpu = vec!["run", "--input", &input];
    let o1 = d.s("gpu.safetensors");
    gpu.extend(["--output", &o1, "--branches", "--window", "40"]);
    gpu.extend(SMALL);
    let r = nsa(&gpu);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("ran on:") && err.contains("time:"), "{err}");
    let o2 = d.s("cpu.safetensors");
    let mut cpu = gpu.clone();
    cpu[4] = &o2;
    cpu.push("--cpu");
    let r = nsa(&cpu);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_same(&d.p("gpu.safetensors"), &d.p("cpu.safetensors"), 1e-4);
    let names: Vec<String> = read(&d.p("gpu.safetensors"))
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(names, ["block_indices", "o_cmp", "o_slc", "o_win", "out"]);
    let out = read(&d.p("gpu.safetensors"));
    assert_eq!(out[4].1, vec![2, 90, 4, 12]);
    assert_eq!(out[0].1, vec![2, 90, 2, 5]);
}

#[test]
fn rank3_linear_and_branch_kv() {
    let d = Dir::new();
    let (t, hq, hkv, dk, dv, l) = (70, 2, 1, 8, 6, 16);
    let mut ts = vec![
        t_("q", &[t, hq, dk], 1),
        t_("k", &[t, hkv, dk], 2),
        t_("v", &[t, hkv, dv], 3),
        t_("gates", &[t, hq, 3], 4),
        t_("k_slc", &[t, hkv, dk], 5),
        t_("v_win", &[t, hkv, dv], 6),
        t_("w_k", &[hkv, l, dk, dk], 7),
        t_("pe_k", &[hkv, l, dk], 8),
        t_("w_v", &[hkv, l, dv, dv], 9),
        t_("pe_v", &[hkv, l, dv], 10),
    ];
    ts.iter_mut()
        .filter(|x| x.name.starts_with("w_"))
        .for_each(|x| x.data.iter_mut().for_each(|v| *v *= 0.1));
    write(&d.p("in.safetensors"), &ts, false);
    let (a, b) = (d.s("a.safetensors"), d.s("b.safetensors"));
    let input = d.s("in.safetensors");
    let base = [
        "run",
        "--input",
        &input,
        "--compression",
        "linear",
        "--window",
        "20",
    ];
    let run = |out: &str, cpu: bool| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--output", out]);
        args.extend(SMALL);
        if cpu {
            args.push("--cpu");
        }
        let r = nsa(&args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    };
    run(&a, false);
    run(&b, true);
    assert_same(Path::new(&a), Path::new(&b), 1e-4);
    assert_eq!(read(Path::new(&a))[1].1, vec![1, t, hq, dv]);
}

fn t_(name: &'static str, shape: &[usize], seed: u64) -> T {
    t(name, shape, seed)
}

#[test]
fn f16_inputs_round_trip() {
    let d = Dir::new();
    let ts = standard(1, 50, 64, 4, 1, 16, 16);
    write(&d.p("f16.safetensors"), &ts, true);
    // The same values, rounded to f16, stored as f32.
    let rounded: Vec<T> = ts
        .iter()
        .map(|x| T {
            name: x.name,
            shape: x.shape.clone(),
            data: x
                .data
                .iter()
                .map(|v| half::f16::from_f32(*v).to_f32())
                .collect(),
        })
        .collect();
    write(&d.p("f32.safetensors"), &rounded, false);
    for (i, o) in [
        ("f16.safetensors", "a.safetensors"),
        ("f32.safetensors", "b.safetensors"),
    ] {
        let r = nsa(&[
            "run",
            "--input",
            &d.s(i),
            "--output",
            &d.s(o),
            "--window",
            "30",
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    assert_same(&d.p("a.safetensors"), &d.p("b.safetensors"), 0.0);
}

/// Runs a failing command: exit status 2, one line on stderr containing `want`, no output file.
fn fails(d: &Dir, input: &str, extra: &[&str], want: &str) {
    let out = d.s("never.safetensors");
    let mut args = vec!["run", "--input", input, "--output", &out];
    args.extend(extra);
    let r = nsa(&args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("XDG_RUNTIME_DIR"))
        .collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(
        lines[0].contains(want),
        "{args:?}: `{}` lacks `{want}`",
        lines[0]
    );
    assert!(!d.p("never.safetensors").exists(), "partial output written");
    assert!(!d.p("never.safetensors.partial").exists());
}

#[test]
fn bad_input_is_a_one_line_error_with_status_2() {
    let d = Dir::new();
    let good = standard(1, 20, 20, 4, 2, 8, 8);
    let file = |name: &str, ts: &[T]| {
        write(&d.p(name), ts, false);
        d.s(name)
    };
    // Missing tensor.
    let f = file("missing.safetensors", &good[..3]);
    fails(&d, &f, &[], "missing tensor `gates`");
    // Hq not a multiple of Hkv.
    let mut ts = standard(1, 20, 20, 3, 2, 8, 8);
    ts[3] = t("gates", &[1, 20, 3, 3], 4);
    let f = file("hq.safetensors", &ts);
    fails(&d, &f, &[], "not a multiple of Hkv");
    // Gates of the wrong shape.
    let mut ts = standard(1, 20, 20, 4, 2, 8, 8);
    ts[3] = t("gates", &[1, 20, 4, 2], 4);
    let f = file("gates.safetensors", &ts);
    fails(
        &d,
        &f,
        &[],
        "tensor `gates` has shape [1, 20, 4, 2]; expected [1, 20, 4, 3]",
    );
    // Tq > Tk.
    let f = file("tq.safetensors", &standard(1, 30, 20, 4, 2, 8, 8));
    fails(&d, &f, &[], "exceeds Tk");
    // Wrong dtype.
    let bytes: Vec<u8> = vec![0; 20 * 4 * 8 * 8];
    let mut tensors: Vec<(&str, TensorView)> = Vec::new();
    let qb: Vec<u8> = vec![0; 20 * 4 * 8 * 8];
    tensors.push((
        "q",
        TensorView::new(Dtype::I64, vec![1, 20, 4, 8], &qb).unwrap(),
    ));
    tensors.push((
        "k",
        TensorView::new(Dtype::F32, vec![1, 20, 2, 8], &bytes[..20 * 2 * 8 * 4]).unwrap(),
    ));
    std::fs::write(
        d.p("dtype.safetensors"),
        safetensors::serialize(tensors, None).unwrap(),
    )
    .unwrap();
    fails(&d, &d.s("dtype.safetensors"), &[], "dtype I64");
    // Unreadable and truncated files.
    fails(&d, &d.s("does-not-exist.safetensors"), &[], "cannot read");
    let full = std::fs::read(d.p("tq.safetensors")).unwrap();
    std::fs::write(d.p("cut.safetensors"), &full[..full.len() / 2]).unwrap();
    fails(
        &d,
        &d.s("cut.safetensors"),
        &[],
        "not a valid safetensors file",
    );
    // Invalid config.
    let f = file("good.safetensors", &good);
    fails(&d, &f, &["--cmp-block", "20"], "cmp_block = 20");
    // Past the kernels' 32-bit integers (a window may be any size: every key).
    fails(&d, &f, &["--top-n", "4294967296"], "top_n = 4294967296");
    let (a, b) = (d.s("w_all.safetensors"), d.s("w_max.safetensors"));
    for (out, w) in [(&a, "20"), (&b, "18446744073709551615")] {
        let r = nsa(&["run", "--input", &f, "--output", out, "--window", w]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    assert_same(&d.p("w_all.safetensors"), &d.p("w_max.safetensors"), 0.0);
    // Linear compression without weights.
    fails(&d, &f, &["--compression", "linear"], "missing tensor `w_k`");
    // NaN in an input.
    let mut ts = standard(1, 20, 20, 4, 2, 8, 8);
    ts[1].data[7] = f32::NAN;
    let f = file("nan.safetensors", &ts);
    fails(&d, &f, &[], "`k` holds a non-finite value");
}

#[test]
fn info_lists_adapters() {
    let r = nsa(&["info"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout);
    // Each adapter's line names its backend (GpuContext::describe_adapter).
    let backend = ["(Vulkan, ", "(Metal, ", "(Dx12, ", "(Gl, "];
    assert!(backend.iter().any(|b| out.contains(b)), "{out}");
    assert!(
        out.contains("shader-f16") && out.contains("storage binding"),
        "{out}"
    );
    // The subgroup sizes: one (lavapipe's 8, NVIDIA's 32) or a range.
    assert!(out.contains(" (of "), "{out}");
}

#[test]
fn webgpu_limits_plan_as_a_browser_and_write_the_same_outputs() {
    // Dk = 100: at WebGPU's 16 KiB of workgroup memory the key tiles are shorter than on
    // the adapter's own limits, so the two runs plan differently.
    let d = Dir::new();
    write(
        &d.p("in.safetensors"),
        &standard(1, 150, 150, 4, 2, 100, 24),
        false,
    );
    let input = d.s("in.safetensors");
    let (plain, capped) = (d.s("plain.safetensors"), d.s("capped.safetensors"));
    let mut args = vec!["run", "--input", &input, "--output", &plain];
    args.extend(SMALL);
    let r = nsa(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    args[4] = &capped;
    args.push("--webgpu-limits");
    let r = nsa(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("limits: WebGPU's defaults"), "{err}");
    assert_same(&d.p("plain.safetensors"), &d.p("capped.safetensors"), 1e-4);
    let r = nsa(&["info", "--webgpu-limits"]);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        out.contains("limits (WebGPU's defaults)") && out.contains("workgroup storage 16384 B"),
        "{out}"
    );
    // What plans there: D = 128 on 8-key tiles, Dk = 192 not at all.
    assert!(
        out.contains("key tiles (the paper's config): D=64 ")
            && out.contains("D=128 8, Dk=192/Dv=128 none (max_compute_workgroup_storage_size)"),
        "{out}"
    );
}

#[test]
fn bench_quick_prints_a_table() {
    let r = nsa(&["bench", "--quick"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        out.contains("| 256 |") && out.contains("| 700 |") && out.contains("dense/NSA"),
        "{out}"
    );
    // Each row ends with its chains of dispatches: one each at these sizes.
    assert!(out.contains("chains (NSA / dense)"), "{out}");
    for row in out
        .lines()
        .filter(|l| l.starts_with("| 256 |") || l.starts_with("| 700 |"))
    {
        assert!(row.ends_with("| 1 / 1 |"), "{row}");
    }
    // The growth of the NSA total from 256 to 700 tokens, from the rows' totals.
    let total = |t: &str| -> f64 {
        let row = out.lines().find(|l| l.starts_with(t)).expect("row");
        row.split('|')
            .nth(7)
            .unwrap()
            .trim()
            .parse()
            .expect("NSA total")
    };
    let printed: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("NSA growth: time(700) / time(256) = "))
        .expect("growth line")
        .parse()
        .expect("growth");
    let expected = total("| 700 |") / total("| 256 |");
    assert!(
        (printed - expected).abs() <= 0.0051,
        "{printed} against {expected}\n{out}"
    );
    // By default f16 storage, unless the adapter lacks it.
    if !out.contains("input storage: F16") {
        assert!(out.contains("input storage: F32"), "{out}");
        let f16 = nsa(&["bench", "--quick", "--precision", "f16"]);
        assert!(String::from_utf8_lossy(&f16.stderr).contains("lacks shader-f16"));
    }
}

#[test]
fn bench_with_bounds_checks_says_so() {
    let r = nsa(&["bench", "--quick", "--bounds-checks"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        out.contains("bounds checks: on") && out.contains("| 700 |"),
        "{out}"
    );
    let plain = nsa(&["bench", "--quick"]);
    assert!(String::from_utf8_lossy(&plain.stdout).contains("bounds checks: off"));
}

#[test]
fn bench_leaves_out_the_named_dispatches_and_says_so() {
    let r = nsa(&[
        "bench",
        "--decode",
        "--quick",
        "--leave-out",
        "slc_attn,merge",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        out.contains("timed passes leave out: slc_attn, merge (their outputs are wrong")
            && out.contains("| 2 | 700 |"),
        "{out}"
    );
    // The cache's appends run outside the timed passes, and unknown names are no kernel.
    for bad in ["append", "slc"] {
        let r = nsa(&["bench", "--quick", "--leave-out", bad]);
        assert_eq!(r.status.code(), Some(2));
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            err.contains(&format!("no kernel `{bad}` in the timed passes"))
                && err.contains("slc_attn"),
            "{err}"
        );
    }
}

#[test]
fn bench_takes_split_targets_and_says_so() {
    let r = nsa(&[
        "bench",
        "--decode",
        "--quick",
        "--split-target",
        "cmp_attn=3,cmp_attn_mma=5,win_attn=0",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        out.contains(
            "split targets (workgroups): cmp_attn 3, cmp_attn_mma 5, slc_attn 128, win_attn 0"
        ) && out.contains("| 2 | 700 |"),
        "{out}"
    );
    // Only the attention branches split toward a target; a target is a number.
    for (bad, says) in [
        (
            "merge=4",
            "`merge`: split targets are for cmp_attn, cmp_attn_mma, slc_attn, win_attn",
        ),
        ("cmp_attn", "`cmp_attn`: expected NAME=N"),
        ("slc_attn=-1", "`-1` (the workgroups slc_attn aims for)"),
    ] {
        let r = nsa(&["bench", "--quick", "--split-target", bad]);
        assert_eq!(r.status.code(), Some(2));
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn ragged_decode_bench_times_sequences_of_different_lengths() {
    let r = nsa(&[
        "bench",
        "--decode",
        "--quick",
        "--ragged",
        "16",
        "--kept-mib",
        "0",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout);
    // B=2: the second sequence holds 16 tokens fewer.
    assert!(
        out.contains("| 2 | 300 .. 284 |") && out.contains("| 2 | 700 .. 684 |"),
        "{out}"
    );
    assert!(out.contains("kept scores: 0 MiB per chunk"), "{out}");
    assert!(!out.contains("-0.000"), "{out}");
}

#[test]
fn decode_bench_with_an_f16_cache_says_so() {
    let r = nsa(&["bench", "--decode", "--quick", "--precision", "f16"]);
    let err = String::from_utf8_lossy(&r.stderr);
    if err.contains("lacks shader-f16") {
        assert_eq!(r.status.code(), Some(2));
        return;
    }
    assert!(r.status.success(), "{err}");
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        out.contains("F16 cache") && out.contains("| 2 | 700 |"),
        "{out}"
    );
    // One chain of dispatches for the step and for the dense baseline.
    let row = out.lines().find(|l| l.starts_with("| 2 | 700 |")).unwrap();
    assert!(row.ends_with("| 1 / 1 |"), "{row}");
    // Steps that compress nothing print 0, not a float sum's -0.
    assert!(!out.contains("-0.000"), "{out}");
}

#[test]
fn decode_bench_measures_the_copy_bandwidth_unless_given() {
    // Without --copy-gbps the header gives the copy bandwidth measured in the run (16 MiB
    // with --quick) where the adapter times copies, and every row its share of it; with
    // it, the given figure.
    let share_cells = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.starts_with("| 1 |") || l.starts_with("| 2 |"))
            .map(|l| l.split('|').nth(9).unwrap().trim().to_string())
            .collect()
    };
    let r = nsa(&["bench", "--decode", "--quick"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout);
    let cells = share_cells(&out);
    assert_eq!(cells.len(), 4, "{out}");
    if out.contains("copy bandwidth not measured (") {
        assert!(cells.iter().all(|c| c == "-"), "{out}");
    } else {
        let gbps: f64 = out
            .split("copy bandwidth ")
            .nth(1)
            .and_then(|t| {
                t.split(" GB/s (measured: the faster of a copy kernel")
                    .next()
            })
            .and_then(|g| g.parse().ok())
            .unwrap_or_else(|| panic!("no measured copy bandwidth:\n{out}"));
        assert!(gbps > 0.0, "{out}");
        assert!(out.contains("; 16 MiB, median of 3; --copy-gbps"), "{out}");
        assert!(cells.iter().all(|c| c.ends_with('%')), "{out}");
    }
    let r = nsa(&["bench", "--decode", "--quick", "--copy-gbps", "123"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("copy bandwidth 123 GB/s (given)"), "{out}");
    assert!(share_cells(&out).iter().all(|c| c.ends_with('%')), "{out}");
}

/// `nsa run` with the branch outputs, SMALL's blocks and a 24-key window.
fn small_run(input: &str, out: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "--input",
        input,
        "--output",
        out,
        "--branches",
        "--window",
        "24",
    ];
    args.extend(SMALL);
    args.extend(extra);
    nsa(&args)
}

/// [`small_run`], which must succeed.
fn small_ok(input: &str, out: &str, extra: &[&str]) {
    let r = small_run(input, out, extra);
    assert!(
        r.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn decode_from_and_chunk_write_what_a_plain_run_writes() {
    let d = Dir::new();
    write(
        &d.p("in.safetensors"),
        &standard(2, 75, 75, 4, 2, 8, 8),
        false,
    );
    let input = d.s("in.safetensors");
    let attempt = |out: &str, extra: &[&str]| small_run(&input, out, extra);
    let go = |out: &str, extra: &[&str]| small_ok(&input, out, extra);
    let (plain, dec, chk) = (
        d.s("plain.safetensors"),
        d.s("dec.safetensors"),
        d.s("chunk.safetensors"),
    );
    go(&plain, &[]);
    go(&dec, &["--decode-from", "30"]);
    go(&chk, &["--chunk", "7"]);
    assert_same(Path::new(&plain), Path::new(&dec), 1e-4);
    assert_same(Path::new(&plain), Path::new(&chk), 1e-4);
    // With an f16 cache: what a plain f16 run writes (the same stored inputs), where the
    // adapter has shader-f16.
    let (plain16, dec16) = (d.s("plain16.safetensors"), d.s("dec16.safetensors"));
    let r = attempt(&plain16, &["--precision", "f16"]);
    if !String::from_utf8_lossy(&r.stderr).contains("lacks shader-f16") {
        assert!(r.status.success());
        go(&dec16, &["--precision", "f16", "--decode-from", "30"]);
        assert_same(Path::new(&plain16), Path::new(&dec16), 5e-3);
    }
    // Tq != Tk is refused.
    let f = d.s("tq.safetensors");
    write(Path::new(&f), &standard(1, 20, 30, 4, 2, 8, 8), false);
    fails(&d, &f, &["--decode-from", "5"], "need Tq == Tk");
}

#[test]
fn precision_f16_is_within_f16_tolerance_of_f32() {
    let d = Dir::new();
    write(
        &d.p("in.safetensors"),
        &standard(1, 90, 90, 4, 2, 16, 16),
        false,
    );
    let input = d.s("in.safetensors");
    let run = |out: &str, p: &str| {
        let mut args = vec![
            "run",
            "--input",
            &input,
            "--output",
            out,
            "--precision",
            p,
            "--window",
            "30",
        ];
        args.extend(SMALL);
        nsa(&args)
    };
    let (a, b) = (d.s("f32.safetensors"), d.s("f16.safetensors"));
    assert!(run(&a, "f32").status.success());
    // `auto` is f16 where the adapter has it, else f32: the same outputs as that run.
    let auto = d.s("auto.safetensors");
    assert!(run(&auto, "auto").status.success());
    let r = run(&b, "f16");
    let err = String::from_utf8_lossy(&r.stderr);
    if err.contains("lacks shader-f16") {
        assert_eq!(r.status.code(), Some(2));
        assert_same(Path::new(&a), Path::new(&auto), 0.0);
        return;
    }
    assert!(r.status.success(), "{err}");
    assert_same(Path::new(&b), Path::new(&auto), 0.0);
    let (x, y) = (read(Path::new(&a)), read(Path::new(&b)));
    let out = |t: &[(String, Vec<usize>, Dtype, Vec<u8>)]| {
        f32s(&t.iter().find(|e| e.0 == "out").unwrap().3)
    };
    let worst = out(&x)
        .iter()
        .zip(out(&y))
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= 2e-2 && worst > 0.0,
        "f16 vs f32 max abs difference {worst}"
    );
}

/// Writes tensors given as raw little-endian bytes with their dtypes.
fn write_raw(path: &Path, tensors: &[Raw]) {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

type Raw = (&'static str, Dtype, Vec<usize>, Vec<u8>);

/// `ts` as F32 tensors for write_raw.
fn raw_f32(ts: &[T]) -> Vec<Raw> {
    ts.iter()
        .map(|t| (t.name, Dtype::F32, t.shape.clone(), f32_bytes(&t.data)))
        .collect()
}

/// A packed file: `ts` (rank 3, [total, H, D]) and `cu_seqlens` as I64.
fn write_packed(path: &Path, ts: &[T], cu: &[i64]) {
    let mut raw = raw_f32(ts);
    let cu_bytes = cu.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw.push(("cu_seqlens", Dtype::I64, vec![cu.len()], cu_bytes));
    write_raw(path, &raw);
}

/// Asserts that every output of the batch of one in `alone` is rows `rows` of the same output
/// in `packed` (read from a packed run's file): block indices equal, the rest within 1e-4.
fn assert_packed_rows(
    packed: &[(String, Vec<usize>, Dtype, Vec<u8>)],
    alone: &Path,
    rows: std::ops::Range<usize>,
    what: &str,
) {
    for (name, shape, dtype, bytes) in read(alone) {
        let (_, pshape, _, pbytes) = packed.iter().find(|x| x.0 == name).expect("an output");
        let w = 4 * pshape[1..].iter().product::<usize>();
        assert_eq!(&shape[2..], &pshape[1..], "{name}");
        let mine = &pbytes[rows.start * w..rows.end * w];
        if dtype == Dtype::I32 {
            assert_eq!(mine, &bytes[..], "{what}: {name}");
        } else {
            let worst = f32s(mine)
                .iter()
                .zip(f32s(&bytes))
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-4, "{what}: {name} differs by {worst}");
        }
    }
}

#[test]
fn packed_sequences_write_what_each_sequence_alone_writes() {
    let d = Dir::new();
    // Awkward lengths: a one-token sequence, one under a compression block, one crossing
    // many selection blocks and the window.
    let lens = [37usize, 1, 150, 6, 20];
    let (hq, hkv, dk, dv) = (4, 2, 12, 8);
    let total: usize = lens.iter().sum();
    let packed = [
        t("q", &[total, hq, dk], 11),
        t("k", &[total, hkv, dk], 12),
        t("v", &[total, hkv, dv], 13),
        t("gates", &[total, hq, 3], 14),
    ];
    let mut cu = vec![0i64];
    for l in lens {
        cu.push(cu.last().unwrap() + l as i64);
    }
    write_packed(&d.p("packed.safetensors"), &packed, &cu);
    let run = small_ok;
    let input = d.s("packed.safetensors");
    let outs = ["gpu", "cpu", "chunk", "dec"].map(|n| d.s(&format!("{n}.safetensors")));
    run(&input, &outs[0], &[]);
    run(&input, &outs[1], &["--cpu"]);
    run(&input, &outs[2], &["--chunk", "7"]);
    run(&input, &outs[3], &["--decode-from", "30"]);
    for o in &outs[1..] {
        assert_same(Path::new(&outs[0]), Path::new(o), 1e-4);
    }
    // Packed outputs: [total, Hq, Dv] and [total, Hkv, n].
    let got = read(Path::new(&outs[0]));
    let find = |name: &str| got.iter().find(|x| x.0 == name).unwrap();
    assert_eq!(find("out").1, vec![total, hq, dv]);
    assert_eq!(find("block_indices").1, vec![total, hkv, 5]);
    // Each sequence alone, as a batch of one: the same rows.
    let mut a = 0;
    for (i, len) in lens.into_iter().enumerate() {
        let alone: Vec<T> = packed
            .iter()
            .map(|p| {
                let w: usize = p.shape[1..].iter().product();
                T {
                    name: p.name,
                    shape: [&[1, len][..], &p.shape[1..]].concat(),
                    data: p.data[a * w..(a + len) * w].to_vec(),
                }
            })
            .collect();
        let (inp, out) = (
            d.s(&format!("in{i}.safetensors")),
            d.s(&format!("o{i}.safetensors")),
        );
        write(Path::new(&inp), &alone, false);
        run(&inp, &out, &[]);
        assert_packed_rows(&got, Path::new(&out), a..a + len, &format!("sequence {i}"));
        a += len;
    }
}

/// The bytes of offsets as I64.
fn i64_bytes(cu: &[i64]) -> Vec<u8> {
    cu.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A packed file of chunks: `ts` (rank 3) and the offsets `cu_seqlens_q`, `cu_seqlens_k`
/// where given, as I64.
fn write_packed_qk(path: &Path, ts: &[T], cu_q: Option<&[i64]>, cu_k: Option<&[i64]>) {
    let mut raw = raw_f32(ts);
    for (name, cu) in [("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)] {
        if let Some(cu) = cu {
            raw.push((name, Dtype::I64, vec![cu.len()], i64_bytes(cu)));
        }
    }
    write_raw(path, &raw);
}

#[test]
fn packed_chunks_write_what_each_chunk_alone_writes() {
    // cu_seqlens_q and cu_seqlens_k: a decode step at position 99, a prefill of 37, a chunk
    // of 20 after 70 keys and a sequence of one token. The outputs pack like q; each
    // sequence's rows are those of its chunk alone ([1, tq, ...] queries, [1, tk, ...] keys),
    // on the GPU and the CPU. Offsets that do not pair up are errors naming them.
    let d = Dir::new();
    let seqs = [(1usize, 100usize), (37, 37), (20, 90), (1, 1)];
    let (hq, hkv, dk, dv) = (4, 2, 12, 8);
    let total_q: usize = seqs.iter().map(|s| s.0).sum();
    let total_k: usize = seqs.iter().map(|s| s.1).sum();
    let packed = [
        t("q", &[total_q, hq, dk], 31),
        t("k", &[total_k, hkv, dk], 32),
        t("v", &[total_k, hkv, dv], 33),
        t("gates", &[total_q, hq, 3], 34),
    ];
    let offsets = |i: usize| -> Vec<i64> {
        let mut cu = vec![0i64];
        for s in seqs {
            cu.push(cu.last().unwrap() + [s.0, s.1][i] as i64);
        }
        cu
    };
    let (cu_q, cu_k) = (offsets(0), offsets(1));
    write_packed_qk(
        &d.p("chunks.safetensors"),
        &packed,
        Some(&cu_q),
        Some(&cu_k),
    );
    let input = d.s("chunks.safetensors");
    let (gpu, cpu) = (d.s("gpu.safetensors"), d.s("cpu.safetensors"));
    small_ok(&input, &gpu, &[]);
    small_ok(&input, &cpu, &["--cpu"]);
    assert_same(Path::new(&gpu), Path::new(&cpu), 1e-4);
    let got = read(Path::new(&gpu));
    let find = |name: &str| got.iter().find(|x| x.0 == name).unwrap();
    assert_eq!(find("out").1, vec![total_q, hq, dv]);
    assert_eq!(find("block_indices").1, vec![total_q, hkv, 5]);
    for (i, (tq, tk)) in seqs.into_iter().enumerate() {
        let (q0, k0) = (cu_q[i] as usize, cu_k[i] as usize);
        let alone: Vec<T> = packed
            .iter()
            .map(|p| {
                let w: usize = p.shape[1..].iter().product();
                let (a, n) = if p.name == "q" || p.name == "gates" {
                    (q0, tq)
                } else {
                    (k0, tk)
                };
                T {
                    name: p.name,
                    shape: [&[1, n][..], &p.shape[1..]].concat(),
                    data: p.data[a * w..(a + n) * w].to_vec(),
                }
            })
            .collect();
        let (inp, out) = (d.s(&format!("in{i}.st")), d.s(&format!("o{i}.st")));
        write(Path::new(&inp), &alone, false);
        small_ok(&inp, &out, &[]);
        assert_packed_rows(&got, Path::new(&out), q0..q0 + tq, &format!("sequence {i}"));
    }
    // Offsets that do not pair up, and chunks through the cache's own chunking.
    let bad =
        |name: &str, cu_q: Option<&[i64]>, cu_k: Option<&[i64]>, extra: &[&str], want: &str| {
            write_packed_qk(&d.p(name), &packed, cu_q, cu_k);
            fails(&d, &d.s(name), extra, want);
        };
    let one = "both cu_seqlens_q and cu_seqlens_k";
    bad("q.st", Some(&cu_q), None, &[], one);
    bad("k.st", None, Some(&cu_k), &[], one);
    let more = [0i64, 1, 38, 57, 59];
    bad(
        "more.st",
        Some(&more),
        Some(&cu_k),
        &[],
        "sequence 3 has 2 queries but 1 keys",
    );
    bad(
        "pairs.st",
        Some(&[0, 59]),
        Some(&cu_k),
        &[],
        "cu_seqlens_q has 2 entries and cu_seqlens_k 5",
    );
    bad(
        "totk.st",
        Some(&cu_q),
        Some(&[0, 100, 137, 227, 229]),
        &[],
        "cu_seqlens_k ends at 229, but the tensors hold 228 rows",
    );
    bad(
        "chunk.st",
        Some(&cu_q),
        Some(&cu_k),
        &["--chunk", "7"],
        "need Tq == Tk",
    );
}

#[test]
fn packed_and_f64_inputs_are_checked_and_read() {
    let d = Dir::new();
    let packed = [
        t("q", &[30, 4, 8], 21),
        t("k", &[30, 2, 8], 22),
        t("v", &[30, 2, 8], 23),
        t("gates", &[30, 4, 3], 24),
    ];
    let bad = |name: &str, cu: &[i64], want: &str| {
        let f = d.s(name);
        write_packed(Path::new(&f), &packed, cu);
        fails(&d, &f, &[], want);
    };
    bad(
        "short.safetensors",
        &[0, 10, 29],
        "ends at 29, but the tensors hold 30",
    );
    bad(
        "falling.safetensors",
        &[0, 10, 5, 30],
        "cu_seqlens[2] = 5 is below cu_seqlens[1] = 10",
    );
    bad("start.safetensors", &[3, 10, 30], "cu_seqlens[0] = 3");
    bad("one.safetensors", &[0], "expected B + 1 >= 2");
    bad("negative.safetensors", &[0, -4, 30], "must be non-negative");
    let bad_raw = |name: &str, raw: &[Raw], want: &str| {
        write_raw(&d.p(name), raw);
        fails(&d, &d.s(name), &[], want);
    };
    // Offsets as floats, and floats as integers.
    let mut raw = raw_f32(&packed);
    raw.push(("cu_seqlens", Dtype::F32, vec![2], f32_bytes(&[0.0, 30.0])));
    bad_raw("fcu.safetensors", &raw, "expected I32, I64, U32 or U64");
    raw.pop();
    raw[0].1 = Dtype::I32;
    bad_raw(
        "iq.safetensors",
        &raw,
        "only `cu_seqlens`, `cu_seqlens_q` and `cu_seqlens_k` hold integers",
    );
    // A batch of two with offsets.
    let mut raw = raw_f32(&standard(2, 15, 15, 4, 2, 8, 8));
    let cu = [0i32, 15].iter().flat_map(|v| v.to_le_bytes()).collect();
    raw.push(("cu_seqlens", Dtype::I32, vec![2], cu));
    bad_raw("b2.safetensors", &raw, "got B = 2");
    // F64 inputs: the values as f32 holds them, the same outputs bit for bit.
    let ts = standard(1, 40, 40, 4, 2, 8, 8);
    write(&d.p("f32.safetensors"), &ts, false);
    let raw: Vec<Raw> = ts
        .iter()
        .map(|t| {
            let b = t
                .data
                .iter()
                .flat_map(|&v| (v as f64).to_le_bytes())
                .collect();
            (t.name, Dtype::F64, t.shape.clone(), b)
        })
        .collect();
    write_raw(&d.p("f64.safetensors"), &raw);
    for name in ["f32", "f64"] {
        let (i, o) = (
            d.s(&format!("{name}.safetensors")),
            d.s(&format!("{name}.out")),
        );
        let r = nsa(&["run", "--input", &i, "--output", &o]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    assert_same(&d.p("f32.out"), &d.p("f64.out"), 0.0);
}
