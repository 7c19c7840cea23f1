//! The WGSL sources and the tiny `#import` preprocessor that assembles them.
//!
//! Every file in `shaders/` is valid WGSL apart from `#import name` lines, which pull in
//! `shaders/shared/name.wgsl` (once per shader, imports may nest). Nothing else is templated:
//! sizes that vary at run time live in the `Params` uniform. Two choices are made here: the
//! input storage type (`#import input` is `shared/input_f32.wgsl` or `shared/input_f16.wgsl`)
//! and how attention rows are reduced (`#import reduce` is `shared/reduce_subgroup.wgsl`,
//! subgroup shuffles, or `shared/reduce_shared.wgsl`, workgroup memory and a barrier).

use crate::config::Precision;

/// Kernel sources, by kernel name (the name of the file in `shaders/`).
pub const KERNELS: &[(&str, &str)] = &[
    ("compress", include_str!("../shaders/compress.wgsl")),
    ("cmp_attn", include_str!("../shaders/cmp_attn.wgsl")),
    ("select", include_str!("../shaders/select.wgsl")),
    ("slc_attn", include_str!("../shaders/slc_attn.wgsl")),
    ("win_attn", include_str!("../shaders/win_attn.wgsl")),
    ("dense_attn", include_str!("../shaders/dense_attn.wgsl")),
    ("merge", include_str!("../shaders/merge.wgsl")),
    ("select_merge", include_str!("../shaders/select_merge.wgsl")),
];

/// Shared helper sources, by import name (the file name in `shaders/shared/`).
const SHARED: &[(&str, &str)] = &[
    ("qk", include_str!("../shaders/shared/qk.wgsl")),
    (
        "input_f32",
        include_str!("../shaders/shared/input_f32.wgsl"),
    ),
    (
        "input_f16",
        include_str!("../shaders/shared/input_f16.wgsl"),
    ),
    ("params", include_str!("../shaders/shared/params.wgsl")),
    ("topn", include_str!("../shaders/shared/topn.wgsl")),
    ("partials", include_str!("../shaders/shared/partials.wgsl")),
    (
        "reduce_shared",
        include_str!("../shaders/shared/reduce_shared.wgsl"),
    ),
    (
        "reduce_subgroup",
        include_str!("../shaders/shared/reduce_subgroup.wgsl"),
    ),
    (
        "attention",
        include_str!("../shaders/shared/attention.wgsl"),
    ),
];

/// The complete WGSL of kernel `name` with f32 inputs and workgroup-memory reductions,
/// imports resolved; `None` for an unknown name.
pub fn source(name: &str) -> Option<String> {
    source_for(name, Precision::F32, false)
}

/// The complete WGSL of kernel `name` for inputs stored at `precision`, reducing attention
/// rows with subgroup operations when `subgroups` (the device must have `SUBGROUP`).
pub fn source_for(name: &str, precision: Precision, subgroups: bool) -> Option<String> {
    let (_, src) = KERNELS.iter().find(|(n, _)| *n == name)?;
    let mut out = String::new();
    let mut seen = Vec::new();
    expand(src, (precision, subgroups), &mut out, &mut seen);
    Some(out)
}

fn expand(src: &str, variant: (Precision, bool), out: &mut String, seen: &mut Vec<&'static str>) {
    for line in src.lines() {
        match line.trim().strip_prefix("#import ") {
            Some(name) => {
                let name = match (name.trim(), variant) {
                    ("input", (Precision::F32, _)) => "input_f32",
                    ("input", (Precision::F16, _)) => "input_f16",
                    ("reduce", (_, true)) => "reduce_subgroup",
                    ("reduce", (_, false)) => "reduce_shared",
                    (other, _) => other,
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
