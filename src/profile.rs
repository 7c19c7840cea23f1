//! GPU timing with timestamp queries: one timestamp before and after each step's pass.

use crate::error::{NsaError, Result};
use crate::pipeline::{read_staging, GpuContext};

/// Timestamps for the passes of up to `steps` plan steps (see
/// [`crate::NsaPipeline::encode_timed`]).
#[derive(Debug)]
pub struct StepTimer {
    query_set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    steps: usize,
}

impl StepTimer {
    /// A timer for `steps` steps; `None` when the device lacks `TIMESTAMP_QUERY`.
    pub fn new(ctx: &GpuContext, steps: usize) -> Option<Self> {
        if !ctx
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            || steps == 0
        {
            return None;
        }
        let count = 2 * steps as u32;
        let query_set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("nsa.timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("nsa.timestamps.resolve"),
            size: count as u64 * 8,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Some(Self {
            query_set,
            resolve,
            steps,
        })
    }

    /// How many steps the timer holds.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The query set passes write into.
    pub fn query_set(&self) -> &wgpu::QuerySet {
        &self.query_set
    }

    /// Records the resolve of the first `steps` steps' timestamps and a copy to a readable
    /// buffer; returns that buffer for [`Self::read`].
    pub fn resolve(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        steps: usize,
    ) -> wgpu::Buffer {
        let n = 2 * steps.min(self.steps) as u32;
        encoder.resolve_query_set(&self.query_set, 0..n, &self.resolve, 0);
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("nsa.timestamps.readback"),
            size: n as u64 * 8,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &staging, 0, n as u64 * 8);
        staging
    }

    /// Reads a resolved buffer (after submit): the duration of each step's pass in
    /// milliseconds.
    pub async fn read(ctx: &GpuContext, staging: wgpu::Buffer) -> Result<Vec<f64>> {
        let bytes = read_staging(&ctx.device, std::slice::from_ref(&staging)).await?;
        let ticks: &[u64] = bytemuck::cast_slice(&bytes[0]);
        let period = ctx.queue.get_timestamp_period() as f64;
        if ticks.len() % 2 != 0 {
            return Err(NsaError::Readback("odd number of timestamps".into()));
        }
        Ok(ticks
            .chunks(2)
            .map(|t| t[1].saturating_sub(t[0]) as f64 * period / 1e6)
            .collect())
    }
}
