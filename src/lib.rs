//! # nsa-wgpu
//!
//! DeepSeek's Native Sparse Attention (NSA, arXiv 2502.11089) as WGSL compute shaders on
//! wgpu: Vulkan, Metal, DX12 and WebGPU. Each query attends to three small key sets —
//! compressed blocks, its top-n selected blocks and a sliding window — mixed by per-head
//! gates. The exact semantics are in `SEMANTICS.md`.
//!
//! ```no_run
//! use nsa_wgpu::{GpuContext, NsaConfig, NsaInputs, NsaPipeline, OutputRequest, Shape};
//! # fn main() -> Result<(), nsa_wgpu::NsaError> {
//! let ctx = pollster::block_on(GpuContext::new())?;
//! let nsa = pollster::block_on(NsaPipeline::new(&ctx))?;
//! let shape = Shape::prefill(1, 1024, 8, 2, 64, 64); // B, T, Hq, Hkv, Dk, Dv
//! let q = vec![0.1f32; 1024 * 8 * 64];
//! let kv = vec![0.2f32; 1024 * 2 * 64];
//! let gates = vec![0.5f32; 1024 * 8 * 3];
//! let inputs = NsaInputs::new(&q, &kv, &kv, &gates);
//! let res = nsa.run_blocking(&NsaConfig::default(), &shape, &inputs, OutputRequest::all())?;
//! println!("{} outputs on {}", res.out.len(), ctx.describe());
//! # Ok(()) }
//! ```
//!
//! Design:
//! - one WGSL file per kernel in `shaders/` (`compress`, `cmp_attn`, `select`, `slc_attn`,
//!   `win_attn`), shared helpers pulled in by a tiny `#import` preprocessor ([`shaders`]);
//! - a pure [`Plan`] sizes every buffer and dispatch from the config, shapes and adapter
//!   limits, splitting work so no binding or grid exceeds them;
//! - [`NsaPipeline::encode`] records into the caller's encoder on the caller's buffers;
//!   [`NsaPipeline::run`] adds upload and readback;
//! - [`NsaCache`] keeps keys, values and compressed tokens on the GPU for decode, chunked
//!   prefill and variable-length batches ([`NsaPipeline::extend`], [`NsaPipeline::run_varlen`];
//!   packed chunks and decode steps with [`NsaPipeline::run_varlen_qk`]),
//!   and [`NsaPipeline::encode_extend`] records a step from the caller's GPU buffers into its
//!   encoder ([`DeviceStep`]), with no host round trip;
//! - inputs and the KV cache can be stored as f16 on adapters with `shader-f16`
//!   ([`Precision`], [`NsaPipeline::run_with`], [`CacheOptions::precision`]); arithmetic is
//!   f32 throughout;
//! - [`cpu`] holds a twin of every kernel and a line-by-line f64 reference ([`cpu::naive`]).

#![warn(missing_docs)]

pub mod cache;
pub mod config;
pub mod cpu;
pub mod data;
pub mod error;
pub mod inputs;
pub mod kernels;
pub mod pipeline;
pub mod plan;
pub mod profile;
pub mod shaders;
mod split;

pub use cache::{CacheOptions, DeviceStep, NsaCache, SeqChunk};
pub use config::{Compression, NsaConfig, Precision, Shape};
pub use error::{NsaError, Result};
pub use inputs::{BranchOutputs, LinearWeights, NsaInputs, NsaOutputs, OutputRequest};
pub use pipeline::{AdapterOptions, GpuBuffers, GpuContext, NsaPipeline, NsaScratch};
pub use plan::{
    DeviceLimits, Plan, SplitTargets, Tensor, DEFAULT_KEPT_SCORES, LLVMPIPE_KEY_TILES,
    LLVMPIPE_LOOP_ITERATIONS, RAGGED_MAX,
};
