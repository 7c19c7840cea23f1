//! The crate's one error type.

use thiserror::Error;

/// Everything that can go wrong in nsa-wgpu, with the offending values attached.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum NsaError {
    /// A configuration field breaks one of SPEC's rules.
    #[error("invalid config: {field} = {value} breaks the rule `{rule}`")]
    InvalidConfig {
        /// The field's name, as in [`crate::NsaConfig`].
        field: &'static str,
        /// The value it had.
        value: String,
        /// The rule it broke.
        rule: &'static str,
    },
    /// A tensor does not have the shape the call expects.
    #[error(
        "shape mismatch for `{tensor}`: expected {expected:?} ({} elements), got {got} elements",
        element_count(expected)
    )]
    ShapeMismatch {
        /// Which tensor.
        tensor: &'static str,
        /// The shape it must have.
        expected: Vec<usize>,
        /// How many elements it has.
        got: usize,
    },
    /// The shapes themselves are inconsistent (e.g. `Hq` not a multiple of `Hkv`).
    #[error("invalid shape: {what} = {value} breaks the rule `{rule}`")]
    InvalidShape {
        /// The dimension's name.
        what: &'static str,
        /// Its value.
        value: usize,
        /// The rule it broke.
        rule: &'static str,
    },
    /// A tensor holds NaN or infinity.
    #[error("`{tensor}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        /// Which tensor.
        tensor: &'static str,
        /// The first bad flat index.
        index: usize,
        /// The bad value.
        value: f32,
    },
    /// A finite value that the storage precision cannot hold: beyond f16's largest finite
    /// value (65504) for f16 storage, where it would become infinite.
    #[error("`{tensor}` holds {value} at flat index {index}, too large for {precision} storage (largest finite value {limit})")]
    OutOfRange {
        /// Which tensor.
        tensor: &'static str,
        /// The first bad flat index.
        index: usize,
        /// The bad value.
        value: f32,
        /// The storage precision.
        precision: &'static str,
        /// Its largest finite value.
        limit: f32,
    },
    /// A tensor needed by the configuration was not given (e.g. linear compression weights).
    #[error("missing input `{tensor}`: {why}")]
    MissingInput {
        /// Which tensor.
        tensor: &'static str,
        /// Why it is needed.
        why: &'static str,
    },
    /// A size exceeds an adapter limit and splitting the work cannot help.
    #[error("{what} needs {needed}, but the adapter's limit is {limit}")]
    ExceedsLimit {
        /// The limit's name (a `wgpu::Limits` field where there is one).
        what: &'static str,
        /// The size the work needs.
        needed: u64,
        /// The adapter's limit.
        limit: u64,
    },
    /// A caller's `wgpu::Buffer` is too small or lacks a usage flag.
    #[error("buffer `{tensor}`: {problem}")]
    BadBuffer {
        /// Which tensor it holds.
        tensor: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The device lacks a feature the call needs.
    #[error("the adapter lacks `{feature}`, needed for {why}")]
    MissingFeature {
        /// The WebGPU / wgpu feature's name.
        feature: &'static str,
        /// What needs it.
        why: &'static str,
    },
    /// No adapter was found.
    #[error("no GPU adapter found: {0}")]
    NoAdapter(String),
    /// The device could not be created or lacks a needed feature.
    #[error("device request failed: {0}")]
    Device(String),
    /// wgpu reported a validation, out-of-memory or internal error.
    #[error("wgpu error: {0}")]
    Gpu(String),
    /// The device was lost (a driver reset, a crash, or `wgpu::Device::destroy`): make a new
    /// [`crate::GpuContext`].
    #[error("the GPU device was lost ({0})")]
    DeviceLost(String),
    /// Reading results back from the GPU failed.
    #[error("readback failed: {0}")]
    Readback(String),
}

/// Shorthand for results carrying [`NsaError`].
pub type Result<T, E = NsaError> = std::result::Result<T, E>;

/// The element count of a tensor of `dims`, for messages: "more than usize::MAX" where the
/// product overflows (a shape no slice can match).
fn element_count(dims: &[usize]) -> String {
    crate::config::elements(dims).map_or_else(|| "more than usize::MAX".into(), |n| n.to_string())
}
