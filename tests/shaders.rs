//! Every shader parses, validates and translates to SPIR-V, MSL and HLSL (how Metal and DX12
//! portability is checked without those GPUs), and the `Params` struct matches naga's layout.

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use nsa_wgpu::kernels::{KernelId, Params, Specialization};
use nsa_wgpu::shaders::{self, Kept};
use nsa_wgpu::Precision;

fn module(name: &str) -> (naga::Module, naga::valid::ModuleInfo) {
    module_for(name, Precision::F32, false)
}

fn module_for(
    name: &str,
    precision: Precision,
    subgroups: bool,
) -> (naga::Module, naga::valid::ModuleInfo) {
    module_variant(
        name,
        &shaders::Variant {
            precision,
            subgroups,
            tensor_cores: false,
            kept: Kept::Nothing,
        },
    )
}

/// `m` with `spec`'s overrides applied, as a pipeline compiles it (a kernel without
/// [`Specialization`] overrides gets none).
fn specialize(
    id: KernelId,
    m: &naga::Module,
    info: &naga::valid::ModuleInfo,
    spec: &Specialization,
) -> (naga::Module, naga::valid::ModuleInfo) {
    let constants: naga::back::PipelineConstants = spec
        .constants_for(id)
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
    let (m, info) = naga::back::pipeline_constants::process_overrides(
        m,
        info,
        Some((naga::ShaderStage::Compute, "main")),
        &constants,
    )
    .unwrap_or_else(|e| panic!("{} {spec:?}: {e}", id.name()));
    (m.into_owned(), info.into_owned())
}

/// The bytes of every workgroup array of a specialized module.
fn workgroup_bytes(m: &naga::Module) -> u32 {
    m.global_variables
        .iter()
        .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
        .map(|(_, g)| m.types[g.ty].inner.size(m.to_ctx()))
        .sum()
}

/// Compressed attention and the selection also compile with kept scores.
fn keeps(id: KernelId) -> bool {
    matches!(id, KernelId::CmpAttn | KernelId::Select)
}

/// What kernel `id` can keep as `kept` asks: nothing for the kernels that keep nothing.
fn kept_for(id: KernelId, kept: Kept) -> Kept {
    if keeps(id) {
        kept
    } else {
        Kept::Nothing
    }
}

fn module_variant(
    name: &str,
    variant: &shaders::Variant,
) -> (naga::Module, naga::valid::ModuleInfo) {
    let (precision, subgroups) = (variant.precision, variant.subgroups);
    let src = shaders::source_variant(name, variant).expect("known kernel");
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
    let mut caps = match precision {
        Precision::F32 => Capabilities::empty(),
        Precision::F16 => Capabilities::SHADER_FLOAT16 | Capabilities::SHADER_FLOAT16_IN_FLOAT32,
    };
    if subgroups {
        caps |= Capabilities::SUBGROUP;
    }
    let mut validator = Validator::new(ValidationFlags::all(), caps);
    if subgroups {
        validator
            .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
            .subgroup_operations(naga::valid::SubgroupOperationSet::all());
    }
    let info = validator
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name} {precision:?}: {}", e.emit_to_string(&src)));
    (module, info)
}

#[test]
fn every_kernel_has_a_shader_and_a_main() {
    for id in KernelId::ALL {
        let (m, _) = module(id.name());
        assert_eq!(m.entry_points.len(), 1, "{}", id.name());
        assert_eq!(m.entry_points[0].name, "main");
        assert_eq!(m.entry_points[0].stage, naga::ShaderStage::Compute);
    }
    assert_eq!(shaders::KERNELS.len(), KernelId::ALL.len());
}

#[test]
fn shaders_translate_to_spirv_msl_hlsl() {
    // Head sizes the tests use: small, odd, the paper's Dk/Dv, the largest; 16 rows, and 32
    // for the wide steps.
    let specs = [
        (8, 8, 64, 1536, 16),
        (100, 64, 21, 1536, 16),
        (192, 128, 37, 2560, 16),
        (128, 128, 64, 2560, 16),
        (256, 256, 8, 1536, 16),
        (12, 10, 5, 63, 16),
        (8, 8, 64, 1368, 32),
        (128, 128, 42, 2392, 32),
    ]
    .map(|(dk, dv, kv_tile, smem4, rows)| Specialization {
        dk,
        dv,
        kv_tile,
        smem4,
        rows,
        few_rows: dk < 64,
        // Top lists of the paper's n, and of the most blocks a config may select.
        top_list: if dk < 100 { 16 } else { 256 },
        // Selected attention's union walk compiled in and out.
        queries: if dk < 100 { 4 } else { 1 },
        // Selected blocks walked in pieces (llvmpipe's capped key tiles) and whole.
        parts: if dk < 100 { 1 } else { 3 },
        // select_top's workgroups: 256 (its least), 1024 (its most).
        invocations: if dk < 100 { 256 } else { 1024 },
    });
    // Subgroup reductions need MSL 2.1 and HLSL shader model 6.0, which every adapter that
    // reports SUBGROUP has.
    let msl_opts = msl::Options {
        lang_version: (2, 1),
        ..Default::default()
    };
    let hlsl_opts = hlsl::Options {
        shader_model: hlsl::ShaderModel::V6_0,
        ..Default::default()
    };
    // Without kept scores, with them, and with kept block sums.
    let kept_modes =
        |id: KernelId| [Kept::Nothing, Kept::Scores, Kept::BlockSums].map(|k| kept_for(id, k));
    for (((id, precision, spec), subgroups), kept) in KernelId::ALL
        .iter()
        .flat_map(|id| {
            [Precision::F32, Precision::F16]
                .into_iter()
                .flat_map(move |p| specs.map(move |s| (*id, p, s)))
        })
        .flat_map(|k| [(k, false), (k, true)])
        .flat_map(|k| kept_modes(k.0 .0).map(move |m| (k, m)))
    {
        let variant = shaders::Variant {
            precision,
            subgroups,
            tensor_cores: false,
            kept,
        };
        let (m, info) = module_variant(id.name(), &variant);
        let (m, info) = specialize(id, &m, &info, &spec);
        let (m, info) = (&m, &info);
        spv::write_vec(m, info, &spv::Options::default(), None)
            .unwrap_or_else(|e| panic!("{} spv: {e}", id.name()));
        let pipeline = msl::PipelineOptions::default();
        msl::write_string(m, info, &msl_opts, &pipeline)
            .unwrap_or_else(|e| panic!("{} msl: {e}", id.name()));
        let mut out = String::new();
        let popts = hlsl::PipelineOptions::default();
        let mut w = hlsl::Writer::new(&mut out, &hlsl_opts, &popts);
        w.write(m, info, None)
            .unwrap_or_else(|e| panic!("{} hlsl: {e}", id.name()));
        assert!(out.contains("main"), "{}", id.name());
    }
}

#[test]
fn bindings_match_the_binding_table() {
    // With kept scores or block sums, every binding of the table; without, the selection
    // leaves out its last (the kept scores).
    for (id, kept) in KernelId::ALL
        .into_iter()
        .flat_map(|id| [Kept::Scores, Kept::BlockSums].map(|k| (id, kept_for(id, k))))
    {
        let variant = shaders::Variant {
            precision: Precision::F32,
            subgroups: false,
            tensor_cores: false,
            kept,
        };
        let expect_plain = match id {
            KernelId::Select => id.bindings().len() - 1,
            _ => id.bindings().len(),
        };
        let declared = |m: &naga::Module| {
            m.global_variables
                .iter()
                .filter(|(_, g)| g.binding.is_some())
                .count()
        };
        assert_eq!(
            declared(&module(id.name()).0),
            expect_plain,
            "{} without kept scores",
            id.name()
        );
        let (m, _) = module_variant(id.name(), &variant);
        let mut found: Vec<(u32, naga::AddressSpace)> = m
            .global_variables
            .iter()
            .filter_map(|(_, g)| g.binding.as_ref().map(|b| (b.binding, g.space)))
            .collect();
        found.sort_by_key(|f| f.0);
        let want = id.bindings();
        assert_eq!(found.len(), want.len(), "{}", id.name());
        for ((binding, space), (i, access)) in found.iter().zip(want.iter().enumerate()) {
            assert_eq!(*binding as usize, i, "{}", id.name());
            let ok = match access {
                nsa_wgpu::kernels::Access::Uniform => *space == naga::AddressSpace::Uniform,
                nsa_wgpu::kernels::Access::Read => {
                    matches!(space, naga::AddressSpace::Storage { access } if !access.contains(naga::StorageAccess::STORE))
                }
                nsa_wgpu::kernels::Access::ReadWrite => {
                    matches!(space, naga::AddressSpace::Storage { access } if access.contains(naga::StorageAccess::STORE))
                }
            };
            assert!(
                ok,
                "{} binding {binding}: {space:?} vs {access:?}",
                id.name()
            );
        }
    }
}

#[test]
fn params_size_matches_wgsl() {
    let (m, _) = module("compress");
    let (_, ty) = m
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some("Params"))
        .expect("Params");
    let size = ty.inner.size(m.to_ctx());
    assert_eq!(size as usize, std::mem::size_of::<Params>());
}

#[test]
fn workgroup_memory_matches_the_declared_budget() {
    for (id, rows, subgroups, (top_list, kv_tile)) in KernelId::ALL
        .into_iter()
        .flat_map(|id| [16, 32].map(move |rows| (id, rows)))
        .flat_map(|(id, rows)| [false, true].map(move |sg| (id, rows, sg)))
        .flat_map(|(id, rows, sg)| {
            [(16, 5), (48, 8), (256, 64), (16, 37)].map(move |n| (id, rows, sg, n))
        })
    {
        let (m, info) = module_for(id.name(), Precision::F32, subgroups);
        let smem = m
            .global_variables
            .iter()
            .find(|(_, g)| g.name.as_deref() == Some("smem"));
        assert_eq!(smem.is_some(), id.specialized(), "{}", id.name());
        if let Some((_, g)) = smem {
            assert!(
                matches!(
                    m.types[g.ty].inner,
                    naga::TypeInner::Array {
                        size: naga::ArraySize::Pending(_),
                        ..
                    }
                ),
                "{}: smem is override-sized",
                id.name()
            );
        }
        // Every workgroup array as compiled for `rows` rows: the fixed ones, and `smem` as
        // sized by the SMEM4 override.
        let spec = Specialization {
            dk: 128,
            dv: 128,
            kv_tile,
            smem4: 100,
            rows,
            few_rows: false,
            top_list,
            queries: 4,
            parts: 1,
            // select_top's most invocations (its least, 256, where the override is unset):
            // its workgroup memory is the same.
            invocations: if id == KernelId::SelectTop && rows == 32 {
                1024
            } else {
                0
            },
        };
        let bytes = workgroup_bytes(&specialize(id, &m, &info, &spec).0);
        let smem = if id.specialized() { 16 * spec.smem4 } else { 0 };
        // With subgroups the attention core declares no reduction arrays (red_max, red_sum:
        // one f32 per invocation each); the budget counts them anyway.
        let budget = id.fixed_workgroup_bytes(rows, kv_tile, top_list) + smem;
        let shared = if subgroups && id.attention_core() {
            2 * 4 * 8 * rows
        } else {
            0
        };
        assert_eq!(
            bytes + shared,
            budget,
            "{} rows {rows} subgroups {subgroups} top list {top_list} tile {kv_tile}",
            id.name()
        );
    }
}

/// Every attention kernel's tensor-core variant (compressed attention also keeping block
/// sums), parsed and validated with the capabilities it needs.
fn tensor_core_modules() -> Vec<(KernelId, naga::Module, naga::valid::ModuleInfo)> {
    KernelId::ALL
        .into_iter()
        .filter(|k| k.attention_core())
        .flat_map(|id| {
            std::iter::once((id, kept_for(id, Kept::Scores)))
                .chain(keeps(id).then_some((id, Kept::BlockSums)))
        })
        .map(|(id, kept)| {
            let variant = shaders::Variant {
                precision: Precision::F16,
                subgroups: true,
                tensor_cores: true,
                kept,
            };
            let src = shaders::source_variant(id.name(), &variant).expect("known kernel");
            assert!(
                src.contains("coopMultiplyAdd"),
                "{}: not the tensor-core core",
                id.name()
            );
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{}: {}", id.name(), e.emit_to_string(&src)));
            let caps = Capabilities::SHADER_FLOAT16
                | Capabilities::SHADER_FLOAT16_IN_FLOAT32
                | Capabilities::SUBGROUP
                | Capabilities::COOPERATIVE_MATRIX;
            let info = Validator::new(ValidationFlags::all(), caps)
                .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
                .subgroup_operations(naga::valid::SubgroupOperationSet::all())
                .validate(&module)
                .unwrap_or_else(|e| panic!("{}: {}", id.name(), e.emit_to_string(&src)));
            (id, module, info)
        })
        .collect()
}

#[test]
fn tensor_core_variant_validates_and_translates_to_spirv() {
    use nsa_wgpu::kernels::{
        mma_max_kt, mma_specialization, mma_workgroup_bytes, CMP_FEW_GROUPS, DENSE_FEW_GROUPS,
        MMA_FEW_GROUPS_LOADS, MMA_NARROW_KT, MMA_NARROW_LOADS, TILE_LOADS,
    };
    let qk = shaders::SHARED
        .iter()
        .find(|(n, _)| *n == "qk")
        .expect("qk.wgsl")
        .1;
    assert!(qk.contains(&format!("const LOADS: u32 = {TILE_LOADS}u;")));
    let mut checked = 0;
    for (id, module, info) in tensor_core_modules() {
        for (dk, dv, limit) in [
            (8, 8, 32768),
            (100, 64, 32768),
            (192, 128, 49152),
            // Wide tiles of 48 keys would fit here: they must be 32 (mma_specialization).
            (192, 64, 49152),
            (128, 128, 49152),
            (128, 128, 32768),
            (12, 10, 16384),
        ] {
            // Calls of many row groups, and for 16 rows of few where that changes the tile
            // (compressed attention at heads of 192, dense attention).
            let dense = id == KernelId::Dense;
            let few_groups = if dense {
                DENSE_FEW_GROUPS
            } else {
                CMP_FEW_GROUPS
            };
            let few = (mma_max_kt(id, 16, dk, dv, few_groups)
                != mma_max_kt(id, 16, dk, dv, u64::MAX))
            .then_some((16, few_groups));
            for (rows, groups) in [(16, u64::MAX), (32, u64::MAX)].into_iter().chain(few) {
                // NSA's 16-row kernels' tiles stop at MMA_NARROW_KT keys (16 for heads
                // of 192, whose 32 keys would take 12 vec4s per invocation, but where
                // compressed attention has few row groups), dense attention's 16-row ones
                // too where calls have more than DENSE_FEW_GROUPS row groups, the others'
                // at 64.
                let max_kt = mma_max_kt(id, rows, dk, dv, groups);
                let narrow = rows == 16 && !dense;
                let few = narrow && groups <= CMP_FEW_GROUPS;
                let want = match (narrow, few, dk) {
                    _ if rows == 16 && dense && groups > DENSE_FEW_GROUPS => MMA_NARROW_KT,
                    (true, false, 192) => 16,
                    (true, _, _) => MMA_NARROW_KT,
                    (false, _, _) => 64,
                };
                assert_eq!(max_kt, want, "{id:?} {dk} {dv} {rows} {groups}");
                let loads = if few {
                    MMA_FEW_GROUPS_LOADS
                } else {
                    MMA_NARROW_LOADS
                };
                assert!(!narrow || max_kt * dk.max(dv).div_ceil(4) <= loads * 128);
                let Some(spec) = mma_specialization(dk, dv, limit, rows, max_kt) else {
                    // Only where not even 16 keys per tile fit.
                    assert!(mma_workgroup_bytes(dk, dv, 16, rows) > limit);
                    continue;
                };
                // The tile loop's softmax takes a kept tile's keys in quads of 32.
                assert!([16, 32, 64].contains(&spec.kv_tile), "{spec:?}");
                assert!(spec.kv_tile <= max_kt);
                assert_eq!(spec.rows, rows);
                // Each invocation's share of a tile fits its prefetch array (qk.wgsl's LOADS).
                let d4 = dk.max(dv).div_ceil(4);
                assert!(spec.kv_tile * d4 <= TILE_LOADS * 8 * rows, "{spec:?}");
                let (m, info) = specialize(id, &module, &info, &spec);
                // Every workgroup array, as sized for this specialization, within the budget.
                let bytes = workgroup_bytes(&m);
                assert!(
                    bytes <= mma_workgroup_bytes(dk, dv, spec.kv_tile, rows) && bytes <= limit,
                    "{} {spec:?}: {bytes} bytes",
                    id.name()
                );
                spv::write_vec(&m, &info, &spv::Options::default(), None)
                    .unwrap_or_else(|e| panic!("{} spv: {e}", id.name()));
                checked += 1;
            }
        }
    }
    // 16 rows fit every case; 32 rows all but (128, 128) in 32 KiB and (12, 10) in 16 KiB;
    // compressed attention twice (keeping scores, and block sums), and its 16 rows again for
    // few row groups at Dk = 192 (two cases); dense attention's 16 rows again for few row
    // groups (seven cases).
    assert_eq!(checked, 71);
    // Every head size and workgroup memory: tiles of 16, 32 or 64 keys, never 48.
    for dk in 1..=256 {
        for dv in 1..=256 {
            for (limit, rows) in [(49152, 32), (49152, 16), (32768, 16), (65536, 32)] {
                if let Some(spec) = mma_specialization(dk, dv, limit, rows, 64) {
                    assert!([16, 32, 64].contains(&spec.kv_tile), "{dk} {dv} {spec:?}");
                }
            }
        }
    }
}

/// NSA's 16-row tensor-core kernels (selected attention; compressed and window attention in
/// decode steps and short chunks) as compiled for D = 128 (32-key tiles) and the paper's
/// Dk = 192, Dv = 128 (16-key tiles), and dense attention's in batched decode steps at D =
/// 128 (32-key tiles), stay within 24 KiB of workgroup memory: on the H200
/// 29.9 KiB made selected attention 1.7x slower (BENCHMARKS.md, fiftieth session). Not a
/// timing: a layout that grows past it should come with a measurement that it pays.
#[test]
fn narrow_tensor_core_kernels_stay_within_24_kib() {
    use nsa_wgpu::kernels::{mma_max_kt, mma_specialization, ROWS};
    let mut checked = 0;
    for (id, module, info) in tensor_core_modules() {
        // Calls of many row groups: at Dk = 192 one sequence's compressed attention (few
        // workgroups, CMP_FEW_GROUPS) takes 32-key tiles of 29.9 KiB, measured faster there.
        // Dense attention's 16-row steps of many row groups (decode steps of two sequences
        // or more) at D = 128; at Dk = 192 they hold 32 keys (29.6 KiB) in calls of any
        // size, as each invocation's prefetch (TILE_LOADS) holds no more, and are left out.
        let heads: &[(u32, u32)] = if id == KernelId::Dense {
            &[(128, 128)]
        } else {
            &[(128, 128), (192, 128)]
        };
        for &(dk, dv) in heads {
            let max_kt = mma_max_kt(id, ROWS, dk, dv, u64::MAX);
            let spec = mma_specialization(dk, dv, 49152, ROWS, max_kt).expect("fits 48 KiB");
            let bytes = workgroup_bytes(&specialize(id, &module, &info, &spec).0);
            assert!(
                bytes <= 24 * 1024,
                "{} {spec:?}: {bytes} bytes of workgroup memory",
                id.name()
            );
            checked += 1;
        }
    }
    // Compressed attention twice (keeping scores, and block sums), selected and window
    // attention once, at two head sizes; dense attention at one.
    assert_eq!(checked, 9);
}

#[test]
fn compress_tokens_match_the_plan() {
    // compress.wgsl's tokens per workgroup (TOKENS, and a field of `Sums` for each) are the
    // plan's COMPRESS_TOKENS, by which it sizes the compression's grid, its workgroup memory
    // and its loop bound.
    let (m, _) = module("compress");
    assert_eq!(
        u32_constant(&m, "TOKENS") as usize,
        nsa_wgpu::plan::COMPRESS_TOKENS
    );
    let (_, sums) = m
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some("Sums"))
        .expect("Sums");
    match &sums.inner {
        naga::TypeInner::Struct { members, .. } => {
            assert_eq!(members.len(), nsa_wgpu::plan::COMPRESS_TOKENS)
        }
        other => panic!("Sums is {other:?}"),
    }
}

#[test]
fn select_top_capacities_match_the_plan() {
    // select_top.wgsl ranks TOP_BLOCKS blocks of a group of at most ROWS heads: the bounds
    // the plan checks before it chooses the kernel.
    let (m, _) = module("select_top");
    assert_eq!(
        u32_constant(&m, "TOP_BLOCKS") as usize,
        nsa_wgpu::plan::TOP_BLOCKS
    );
    assert_eq!(u32_constant(&m, "ROWS"), nsa_wgpu::kernels::ROWS);
}

/// The value of the module's `const name: u32`.
fn u32_constant(m: &naga::Module, name: &str) -> u32 {
    let (_, c) = m
        .constants
        .iter()
        .find(|(_, c)| c.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{name}"));
    match m.global_expressions[c.init] {
        naga::Expression::Literal(naga::Literal::U32(n)) => n,
        ref e => panic!("{name} is {e:?}"),
    }
}

#[test]
fn copy_kernel_translates_to_spirv_msl_hlsl() {
    // profile::copy_bandwidth's kernel (not a stage: no imports, no Params), with its
    // overrides as that sets them.
    let m = naga::front::wgsl::parse_str(shaders::COPY).expect("copy.wgsl parses");
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&m)
        .expect("copy.wgsl validates");
    let constants: naga::back::PipelineConstants =
        [("WG".to_string(), 256.0), ("WORDS".to_string(), 1000.0)].into();
    let (m, info) = naga::back::pipeline_constants::process_overrides(&m, &info, None, &constants)
        .expect("overrides");
    let (m, info) = (m.as_ref(), &info);
    spv::write_vec(m, info, &spv::Options::default(), None).expect("spv");
    msl::write_string(m, info, &Default::default(), &Default::default()).expect("msl");
    let mut out = String::new();
    let (opts, popts) = (hlsl::Options::default(), hlsl::PipelineOptions::default());
    hlsl::Writer::new(&mut out, &opts, &popts)
        .write(m, info, None)
        .expect("hlsl");
    assert_eq!(m.entry_points[0].workgroup_size, [256, 1, 1]);
}

#[test]
fn tensor_core_kernels_take_a_fixed_subgroup_size() {
    // Where the adapter has one subgroup size (NVIDIA's 32), the tensor-core kernels take it
    // as a constant (kernels::variant_constants); they still specialize and translate, and
    // no other kernel or variant is given it (naga refuses constants a module lacks).
    use nsa_wgpu::kernels::{mma_specialization, variant_constants};
    let mma = shaders::Variant {
        precision: Precision::F16,
        subgroups: true,
        tensor_cores: true,
        kept: Kept::Nothing,
    };
    for (id, module, info) in tensor_core_modules() {
        for rows in [16, 32] {
            let spec = mma_specialization(128, 128, 49152, rows, 32).expect("fits");
            let constants: naga::back::PipelineConstants = spec
                .constants_for(id)
                .into_iter()
                .chain(variant_constants(id, &mma, 32))
                .map(|(name, value)| (name.to_string(), value))
                .collect();
            assert!(constants.contains_key("SUBGROUP_SIZE"), "{}", id.name());
            let (m, info) = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((naga::ShaderStage::Compute, "main")),
                &constants,
            )
            .unwrap_or_else(|e| panic!("{} {spec:?}: {e}", id.name()));
            spv::write_vec(&m, &info, &spv::Options::default(), None)
                .unwrap_or_else(|e| panic!("{} spv: {e}", id.name()));
        }
    }
    let plain = shaders::Variant {
        tensor_cores: false,
        ..mma
    };
    for id in KernelId::ALL {
        assert_eq!(variant_constants(id, &plain, 32), None, "{}", id.name());
        assert_eq!(variant_constants(id, &mma, 0), None, "{}", id.name());
        assert_eq!(
            variant_constants(id, &mma, 32).is_some(),
            id.attention_core()
        );
    }
}
