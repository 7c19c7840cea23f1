//! NSA prefill against dense causal attention on the best adapter, timed with GPU timestamps
//! (medians over rotating input sets), per stage, with f16 inputs where the adapter has
//! shader-f16 (else f32), as `nsa bench` by default. The full table with every option is
//! `nsa bench`; this is the same loop (`nsa_wgpu::profile::time_plan`) as a cargo bench.
//!
//! cargo bench --bench prefill [-- T ...]   (default: 2048 4096; Hq=16, Hkv=1, D=64)

use nsa_wgpu::profile::{sample_input_sets, time_plan, Warmer, STAGES};
use nsa_wgpu::{
    GpuBuffers, GpuContext, NsaConfig, NsaError, NsaPipeline, Plan, Precision, Shape, Tensor,
};

fn main() -> Result<(), NsaError> {
    // cargo passes --bench; lengths are the numeric arguments.
    let mut lengths: Vec<usize> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    if lengths.is_empty() {
        lengths = vec![2048, 4096];
    }
    let ctx = pollster::block_on(GpuContext::new())?;
    let pipe = pollster::block_on(NsaPipeline::new(&ctx))?;
    let cfg = NsaConfig::default();
    println!("adapter: {}", ctx.describe());
    let precision = match pipe.supports(Precision::F16) {
        true => Precision::F16,
        false => Precision::F32,
    };
    println!("input storage: {precision:?}");
    // Each timed run follows 20 ms of other GPU work and a cache flush (not on software
    // adapters): see `Warmer`.
    let warm = match Warmer::needed(&ctx) {
        true => Some(Warmer::new(&pipe, std::time::Duration::from_millis(20))?),
        false => None,
    };
    println!(
        "| T | compress | cmp_attn | select | slc_attn | win+combine | NSA | dense | dense/NSA | chains (NSA / dense) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for t in lengths {
        let shape = Shape::prefill(1, t, 16, 1, 64, 64);
        let plan = Plan::with_precision(&cfg, &shape, &pipe.limits(), precision)?;
        let sets = sample_input_sets(&ctx.device, &plan, 2);
        let out = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench.out"),
            size: plan.tensor_bytes(Tensor::Out),
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let nsa_sets: Vec<GpuBuffers> = sets
            .iter()
            .map(|[q, k, v, g]| GpuBuffers::new(q, k, v, g, &out))
            .collect();
        let (stages, nsa) = time_plan(&pipe, &plan, &nsa_sets, 5, 1, warm.as_ref())?;
        let dense_plan = Plan::dense_with_precision(&shape, None, &pipe.limits(), precision)?;
        let dense_sets: Vec<GpuBuffers> = sets
            .iter()
            .map(|[q, k, v, _]| NsaPipeline::dense_buffers(q, k, v, &out))
            .collect();
        let dense = time_plan(&pipe, &dense_plan, &dense_sets, 5, 1, warm.as_ref())?.1;
        let cells: Vec<String> = STAGES
            .iter()
            .map(|k| {
                stages
                    .iter()
                    .find(|(x, _)| x == k)
                    .map_or("-".into(), |(_, ms)| format!("{ms:.3}"))
            })
            .collect();
        println!(
            "| {t} | {} | {nsa:.3} | {dense:.3} | {:.2}x | {} / {} |",
            cells.join(" | "),
            dense / nsa,
            plan.chains(),
            dense_plan.chains(),
        );
    }
    println!("times in ms");
    Ok(())
}
