//! The WGSL sources and the tiny `#import` preprocessor that assembles them.
//!
//! Every file in `shaders/` is valid WGSL apart from `#import name` lines, which pull in
//! `shaders/shared/name.wgsl` (once per shader, imports may nest). Nothing else is templated:
//! sizes that vary at run time live in the `Params` uniform. The choices made here: the
//! input storage type (`#import input` is `shared/input_f32.wgsl` or `shared/input_f16.wgsl`,
//! and the loads from it, `#import load` / `load_v`, `shared/load_f32.wgsl` or
//! `shared/load_f16.wgsl` / `shared/load_v_*.wgsl`),
//! how attention rows are reduced (`#import reduce` is `shared/reduce_subgroup.wgsl`,
//! subgroup shuffles, or `shared/reduce_shared.wgsl`, workgroup memory and a barrier),
//! whether compressed attention keeps its scores or block sums for the selection
//! (`#import keep`, `shared/keep_on.wgsl`, `shared/keep_sums.wgsl` or `shared/keep_off.wgsl`,
//! and `#import select_scores`, `shared/select_kept.wgsl`, `shared/select_sums.wgsl` or
//! `shared/select_qk.wgsl`), and
//! where the attention core multiplies (`#import attn_tiles` is `shared/attn_simt.wgsl`, the
//! shader cores, or `shared/attn_mma.wgsl`, tensor cores through cooperative matrices).

use crate::config::Precision;
use crate::kernels::Params;

/// `(name, source)` pairs of the WGSL files `name.wgsl` in a folder under `shaders/`.
macro_rules! sources {
    ($dir:literal: $($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../shaders/", $dir, $name, ".wgsl")))),*]
    };
}

/// Kernel sources, by kernel name (the name of the file in `shaders/`).
pub const KERNELS: &[(&str, &str)] = sources!["":
    "compress", "cmp_attn", "select", "slc_attn", "win_attn", "dense_attn", "merge",
    "select_merge", "append", "select_top",
];

/// The copy kernel that `profile::copy_bandwidth` times (`shaders/copy.wgsl`; not a stage
/// of NSA, and not assembled: it imports nothing).
pub const COPY: &str = include_str!("../shaders/copy.wgsl");

/// Shared helper sources, by import name (the file name in `shaders/shared/`).
pub const SHARED: &[(&str, &str)] = sources!["shared/":
    "qk", "input_f32", "input_f16", "params", "load_f32", "load_f16", "load_v_f32",
    "load_v_f16", "topn", "partials", "reduce_shared", "reduce_subgroup", "attention",
    "attn_simt", "attn_mma", "keep_on", "keep_off", "keep_sums", "select_qk", "select_kept",
    "select_sums", "select_lse", "block_sums",
];

/// Which variant of a kernel to assemble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Variant {
    /// How the inputs are stored.
    pub precision: Precision,
    /// Row reductions by subgroup shuffles (the device needs `SUBGROUP`).
    pub subgroups: bool,
    /// The attention core on tensor cores: 16x16x16 cooperative matrices with f16 operands
    /// and f32 accumulators (the device needs `EXPERIMENTAL_COOPERATIVE_MATRIX`, `SUBGROUP`
    /// and `SHADER_F16`). Only with f16 storage and subgroups; ignored otherwise.
    pub tensor_cores: bool,
    /// What compressed attention keeps for the selection, and the selection reads (for the
    /// other kernels, [`Kept::Nothing`]).
    pub kept: Kept,
}

/// What compressed attention keeps for the selection, and so which sources the two kernels
/// import for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Kept {
    /// Nothing: the selection multiplies q.k over the compressed keys itself
    /// (`shared/keep_off.wgsl`, `shared/select_qk.wgsl`).
    #[default]
    Nothing,
    /// Every scaled score (`shared/keep_on.wgsl`, `shared/select_kept.wgsl`).
    Scores,
    /// Per-tile sums of the probabilities over each selection block
    /// (`shared/keep_sums.wgsl`, `shared/select_sums.wgsl`).
    BlockSums,
}

impl Kept {
    /// What a step with `params` keeps: scores where its plan keeps them
    /// (`Params::kept_stride` > 0), as block sums where it lays those out
    /// (`Params::kept_tile` > 0 too).
    pub fn of(params: &Params) -> Kept {
        match (params.kept_stride > 0, params.kept_tile > 0) {
            (false, _) => Kept::Nothing,
            (true, false) => Kept::Scores,
            (true, true) => Kept::BlockSums,
        }
    }
}

impl Variant {
    /// Whether the attention core runs on tensor cores (`shared/attn_mma.wgsl`): tensor
    /// cores asked for, with subgroups and f16 storage.
    pub fn mma(&self) -> bool {
        self.tensor_cores && self.subgroups && self.precision == Precision::F16
    }
}

/// The complete WGSL of kernel `name` with f32 inputs and workgroup-memory reductions,
/// imports resolved; `None` for an unknown name.
pub fn source(name: &str) -> Option<String> {
    source_for(name, Precision::F32, false)
}

/// The complete WGSL of kernel `name` for inputs stored at `precision`, reducing attention
/// rows with subgroup operations when `subgroups` (the device must have `SUBGROUP`).
pub fn source_for(name: &str, precision: Precision, subgroups: bool) -> Option<String> {
    source_variant(
        name,
        &Variant {
            precision,
            subgroups,
            tensor_cores: false,
            kept: Kept::Nothing,
        },
    )
}

/// The complete WGSL of kernel `name` in `variant`; `None` for an unknown name.
pub fn source_variant(name: &str, variant: &Variant) -> Option<String> {
    let (_, src) = KERNELS.iter().find(|(n, _)| *n == name)?;
    let mut out = String::new();
    if variant.mma() && src.contains("#import attention") {
        // Directives come before any declaration. The subgroup-uniform loops that hand out
        // matrix blocks are not workgroup-uniform, which naga's uniformity analysis (made
        // for derivatives) would reject; cooperative matrices need subgroup uniformity only.
        out.push_str("enable wgpu_cooperative_matrix;\ndiagnostic(off, derivative_uniformity);\n");
    }
    let mut seen = Vec::new();
    expand(src, variant, &mut out, &mut seen);
    Some(out)
}

fn expand(src: &str, variant: &Variant, out: &mut String, seen: &mut Vec<&'static str>) {
    for line in src.lines() {
        match line.trim().strip_prefix("#import ") {
            Some(name) => {
                let name = match name.trim() {
                    "input" if variant.precision == Precision::F32 => "input_f32",
                    "input" => "input_f16",
                    "reduce" if variant.subgroups => "reduce_subgroup",
                    "reduce" => "reduce_shared",
                    "load" if variant.precision == Precision::F32 => "load_f32",
                    "load" => "load_f16",
                    "load_v" if variant.precision == Precision::F32 => "load_v_f32",
                    "load_v" => "load_v_f16",
                    "attn_tiles" if variant.mma() => "attn_mma",
                    "attn_tiles" => "attn_simt",
                    "keep" => match variant.kept {
                        Kept::Nothing => "keep_off",
                        Kept::Scores => "keep_on",
                        Kept::BlockSums => "keep_sums",
                    },
                    "select_scores" => match variant.kept {
                        Kept::Nothing => "select_qk",
                        Kept::Scores => "select_kept",
                        Kept::BlockSums => "select_sums",
                    },
                    other => other,
                };
                let Some((key, text)) = SHARED.iter().find(|(n, _)| *n == name) else {
                    panic!("shader imports unknown module `{name}`");
                };
                if !seen.contains(key) {
                    seen.push(key);
                    expand(text, variant, out, seen);
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
}
