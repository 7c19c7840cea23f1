//! `nsa`: run NSA on safetensors files, list adapters, benchmark.
//!
//! Every failure ends with one line on stderr and exit status 2; outputs are written to a
//! temporary file and renamed into place, so a failed run never leaves a partial file.

mod bench;
mod cached;
mod io;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nsa_wgpu::{AdapterOptions, Compression, GpuContext, NsaConfig, NsaPipeline, OutputRequest};

#[derive(Parser)]
#[command(
    name = "nsa",
    version,
    about = "Native Sparse Attention on wgpu: run, inspect adapters, benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run NSA on the tensors of a safetensors file and write the results to another.
    Run(RunArgs),
    /// List every adapter with its backend, type, driver, features and limits.
    Info(AdapterArgs),
    /// Time NSA per stage against dense causal attention at several lengths.
    Bench(bench::BenchArgs),
}

/// Which adapter to run on.
#[derive(Args, Clone, Default)]
pub struct AdapterArgs {
    /// Use the first adapter whose name contains this (case-insensitive).
    #[arg(long)]
    adapter: Option<String>,
    /// Restrict to one backend.
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Cap the device's limits at WebGPU's defaults (128 MiB storage bindings, 16 KiB of
    /// workgroup memory, ...), so that work is planned as a browser would plan it.
    #[arg(long)]
    webgpu_limits: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl AdapterArgs {
    fn options(&self) -> AdapterOptions {
        AdapterOptions {
            backends: self.backend.map(|b| match b {
                Backend::Vulkan => wgpu::Backends::VULKAN,
                Backend::Metal => wgpu::Backends::METAL,
                Backend::Dx12 => wgpu::Backends::DX12,
                Backend::Gl => wgpu::Backends::GL,
            }),
            name: self.adapter.clone(),
            limits: self.webgpu_limits.then(wgpu::Limits::default),
        }
    }

    /// Whose limits the device has: "WebGPU's defaults" or "the adapter's".
    pub fn limits_note(&self) -> &'static str {
        if self.webgpu_limits {
            "WebGPU's defaults"
        } else {
            "the adapter's"
        }
    }

    /// Opens the chosen adapter and compiles the kernels on it.
    pub fn pipeline(&self) -> Result<NsaPipeline, String> {
        let ctx = pollster::block_on(GpuContext::with_options(&self.options()))
            .map_err(|e| e.to_string())?;
        pollster::block_on(NsaPipeline::new(&ctx)).map_err(|e| e.to_string())
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum CompressionArg {
    Mean,
    Linear,
}

/// Storage precision on the GPU (`--precision`).
#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum Precision {
    /// f16 where the adapter has shader-f16 (on its tensor cores where it has them), else
    /// f32.
    Auto,
    /// Exact to f32 arithmetic, on the shader cores.
    F32,
    /// Needs shader-f16; accumulates in f32.
    F16,
}

impl Precision {
    /// The library's precision for this choice on `pipe`'s adapter, or an error naming the
    /// adapter where it lacks shader-f16 for `f16`.
    pub fn resolve(self, pipe: &NsaPipeline) -> Result<nsa_wgpu::Precision, String> {
        let f16 = nsa_wgpu::Precision::F16;
        match self {
            Precision::F16 | Precision::Auto if pipe.supports(f16) => Ok(f16),
            Precision::F16 => Err(format!(
                "--precision f16: the adapter {} lacks shader-f16; run with --precision f32",
                pipe.context().adapter_info.name
            )),
            Precision::Auto | Precision::F32 => Ok(nsa_wgpu::Precision::F32),
        }
    }
}

/// NSA's configuration (`--cmp-block` ... `--compression`): the paper's defaults.
#[derive(Args)]
pub struct ConfigArgs {
    /// Compression block length l.
    #[arg(long, default_value_t = 32)]
    cmp_block: usize,
    /// Compression stride d.
    #[arg(long, default_value_t = 16)]
    cmp_stride: usize,
    /// Selection block length l'.
    #[arg(long, default_value_t = 64)]
    sel_block: usize,
    /// Selected blocks per query n (forced blocks included).
    #[arg(long, default_value_t = 16)]
    top_n: usize,
    /// Forced initial blocks.
    #[arg(long, default_value_t = 1)]
    init_blocks: usize,
    /// Forced local blocks.
    #[arg(long, default_value_t = 2)]
    local_blocks: usize,
    /// Sliding window, in keys (the query's own included).
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Softmax scale (default 1/sqrt(Dk)).
    #[arg(long)]
    scale: Option<f32>,
    /// Compression function.
    #[arg(long, value_enum, default_value = "mean")]
    compression: CompressionArg,
}

impl ConfigArgs {
    /// The configuration, validated.
    pub fn config(&self) -> Result<NsaConfig, String> {
        let config = NsaConfig {
            cmp_block: self.cmp_block,
            cmp_stride: self.cmp_stride,
            sel_block: self.sel_block,
            top_n: self.top_n,
            init_blocks: self.init_blocks,
            local_blocks: self.local_blocks,
            window: self.window,
            scale: self.scale,
            compression: match self.compression {
                CompressionArg::Mean => Compression::Mean,
                CompressionArg::Linear => Compression::Linear,
            },
        };
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

#[derive(Args)]
struct RunArgs {
    /// Input safetensors file: q, k, v, gates (+ optional k_cmp … v_win, w_k, pe_k, w_v, pe_v),
    /// as F32, F16, BF16 or F64. With `cu_seqlens` (integers, [B + 1]) the tensors pack
    /// sequences of different lengths along T (FlashAttention's convention: q [total, Hq,
    /// Dk], ...), each run as a sequence of its own; with `cu_seqlens_q` and `cu_seqlens_k`
    /// instead, q and gates pack each sequence's last queries (a chunk or a decode step) by
    /// the first, the keys and values all its keys by the second.
    #[arg(long)]
    input: std::path::PathBuf,
    /// Output safetensors file: out, block_indices (+ o_cmp, o_slc, o_win with --branches);
    /// packed like the input's queries where it packs sequences ([total_q, Hq, Dv],
    /// [total_q, Hkv, n]).
    #[arg(long)]
    output: std::path::PathBuf,
    #[command(flatten)]
    config: ConfigArgs,
    /// Storage precision on the GPU: of the inputs, or of the KV cache with --decode-from or
    /// --chunk.
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
    /// Also write the branch outputs o_cmp, o_slc, o_win.
    #[arg(long)]
    branches: bool,
    /// Use the CPU reference instead of the GPU (same outputs).
    #[arg(long)]
    cpu: bool,
    /// Prefill positions [0, P) at once, then decode each later position one step at a time
    /// through the KV cache (needs Tq == Tk). Writes the same outputs as a plain run.
    #[arg(long, value_name = "P")]
    decode_from: Option<usize>,
    /// Chunked prefill through the KV cache, N positions per chunk (needs Tq == Tk).
    #[arg(long, value_name = "N", conflicts_with = "decode_from")]
    chunk: Option<usize>,
    #[command(flatten)]
    adapter: AdapterArgs,
}

fn run(args: &RunArgs) -> Result<(), String> {
    let config = args.config.config()?;
    let loaded = io::Loaded::read(&args.input)?;
    let problem = loaded.problem(&config)?;
    let inputs = problem.inputs();
    let request = OutputRequest {
        block_indices: true,
        branches: args.branches,
    };
    let start = Instant::now();
    let seqs = problem.sequences();
    let packed = problem.packed.as_ref().map(|p| (&p.q[..], &p.k[..]));
    let s = &problem.shape;
    let (res, device) = if args.cpu {
        let heads = (s.hq, s.hkv, s.dk, s.dv);
        let r = match packed {
            Some((q, k)) => {
                nsa_wgpu::cpu::forward_varlen_qk(&config, q, k, heads, &inputs, request)
            }
            None => nsa_wgpu::cpu::forward(&config, s, &inputs, request),
        }
        .map_err(|e| e.to_string())?;
        (r, "CPU reference".to_string())
    } else {
        let pipe = args.adapter.pipeline()?;
        let precision = args.precision.resolve(&pipe)?;
        let r = match (args.decode_from, args.chunk, packed) {
            (None, None, None) => {
                pollster::block_on(pipe.run_with(&config, s, &inputs, request, precision))
            }
            (None, None, Some((cu_q, cu_k))) => pollster::block_on(pipe.run_varlen_qk(
                &config,
                cu_q,
                cu_k,
                (s.hq, s.hkv, s.dk, s.dv),
                &inputs,
                request,
                precision,
            )),
            (p, n, _) => {
                if s.tq != s.tk {
                    return Err(format!(
                        "--decode-from/--chunk need Tq == Tk, got Tq = {} and Tk = {}",
                        s.tq, s.tk
                    ));
                }
                // The first call covers [0, first) of each sequence, every later one `step`
                // positions.
                let (first, step) = match (p, n) {
                    (Some(p), _) => (p, 1),
                    (_, Some(0)) => return Err("--chunk must be at least 1".into()),
                    (_, Some(n)) => (n, n),
                    (None, None) => unreachable!("handled above"),
                };
                cached::run(
                    &pipe,
                    &config,
                    s,
                    &seqs,
                    &inputs,
                    request,
                    precision,
                    (first, step),
                )
            }
        }
        .map_err(|e| e.to_string())?;
        let core = if precision == nsa_wgpu::Precision::F16 && pipe.tensor_cores() {
            "tensor cores"
        } else {
            "shader cores"
        };
        let limits = args.adapter.limits_note();
        (
            r,
            format!("{} ({core}; limits: {limits})", pipe.context().describe()),
        )
    };
    let took = start.elapsed();
    io::write_outputs(
        &args.output,
        &problem.shape,
        config.top_n,
        &res,
        packed.is_some(),
    )?;
    eprintln!("ran on: {device}");
    eprintln!(
        "time: {:.3} ms (including upload and readback)",
        took.as_secs_f64() * 1e3
    );
    Ok(())
}

fn info(args: &AdapterArgs) -> Result<(), String> {
    let opts = args.options();
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if let Some(b) = opts.backends {
        desc.backends = b;
    }
    let backends = desc.backends;
    let instance = wgpu::Instance::new(desc);
    let adapters = pollster::block_on(instance.enumerate_adapters(backends));
    if adapters.is_empty() {
        return Err(format!("no adapter found (backends {backends:?})"));
    }
    for a in adapters {
        let i = a.get_info();
        if let Some(n) = &opts.name {
            if !i.name.to_lowercase().contains(&n.to_lowercase()) {
                continue;
            }
        }
        let f = a.features();
        let l = match &opts.limits {
            Some(cap) => a.limits().or_worse_values_from(cap),
            None => a.limits(),
        };
        println!("{}", nsa_wgpu::GpuContext::describe_adapter(&i));
        let yes = |x: wgpu::Features| if f.contains(x) { "yes" } else { "no" };
        // One subgroup size is what the tensor-core kernels compile in.
        let sizes = match nsa_wgpu::GpuContext::one_subgroup_size(&i) {
            Some(n) => n.to_string(),
            None => format!("{}-{}", i.subgroup_min_size, i.subgroup_max_size),
        };
        println!(
            "  features: shader-f16 {}, subgroups {} (of {sizes}), timestamps {} (inside passes {}), cooperative matrix {}",
            yes(wgpu::Features::SHADER_F16),
            yes(wgpu::Features::SUBGROUP),
            yes(wgpu::Features::TIMESTAMP_QUERY),
            yes(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES),
            yes(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
        );
        let coop: Vec<String> = a
            .cooperative_matrix_properties()
            .iter()
            .map(|p| {
                format!(
                    "{}x{}x{} {:?}->{:?}",
                    p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type
                )
            })
            .collect();
        if !coop.is_empty() {
            // 16x16x16 F16->F32 is what the tensor-core attention core uses.
            println!("  cooperative matrices (MxNxK A,B->C): {}", coop.join(", "));
        }
        println!(
            "  limits ({}): storage binding {} B, buffer {} B, workgroup storage {} B, \
             invocations/workgroup {}, workgroups/dimension {}, storage buffers/stage {}, \
             storage offset alignment {}",
            args.limits_note(),
            l.max_storage_buffer_binding_size,
            l.max_buffer_size,
            l.max_compute_workgroup_storage_size,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroups_per_dimension,
            l.max_storage_buffers_per_shader_stage,
            l.min_storage_buffer_offset_alignment,
        );
        println!("  {}", key_tiles(&l));
    }
    Ok(())
}

/// What the paper's configuration plans on `limits` for a few head sizes (Hq = 64, Hkv = 4,
/// 4k tokens, f32): keys per tile of the 16-row kernels, and whether long chunks run in
/// 32-row (wide) steps; or which limit a head size exceeds. On tensor cores f16 attention
/// kernels hold tiles of their own (`nsa bench` says when they run).
fn key_tiles(limits: &wgpu::Limits) -> String {
    let limits = nsa_wgpu::pipeline::device_limits(limits);
    let heads = [(64, 64), (128, 128), (192, 128), (256, 256)].map(|(dk, dv)| {
        let shape = nsa_wgpu::Shape::prefill(1, 4096, 64, 4, dk, dv);
        let name = if dk == dv {
            format!("D={dk}")
        } else {
            format!("Dk={dk}/Dv={dv}")
        };
        match nsa_wgpu::Plan::new(&NsaConfig::default(), &shape, &limits) {
            Ok(p) if p.wide_kv_tile > 0 => format!("{name} {} (wide steps)", p.kv_tile),
            Ok(p) => format!("{name} {}", p.kv_tile),
            Err(nsa_wgpu::NsaError::ExceedsLimit { what, .. }) => {
                format!("{name} none ({})", what.split(' ').next().unwrap_or(what))
            }
            Err(e) => format!("{name} none ({e})"),
        }
    });
    format!("key tiles (the paper's config): {}", heads.join(", "))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(a) => run(a),
        Command::Info(a) => info(a),
        Command::Bench(a) => bench::bench(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
