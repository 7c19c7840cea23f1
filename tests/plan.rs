//! Config validation and the pure plan: no GPU needed.

mod common;

use common::{random_long_config, step_shape};
use nsa_wgpu::kernels::KernelId;
use nsa_wgpu::{Compression, DeviceLimits, NsaConfig, NsaError, Plan, Precision, Shape, Tensor};

fn field_of(r: Result<(), NsaError>) -> &'static str {
    match r {
        Err(NsaError::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

/// The first step of `plan` that runs kernel `id` (the test fails where none does).
fn step_of(plan: &Plan, id: KernelId) -> &nsa_wgpu::plan::Step {
    plan.steps
        .iter()
        .find(|s| s.kernel == id)
        .unwrap_or_else(|| panic!("no {id:?} step"))
}

#[test]
fn paper_defaults() {
    let c = NsaConfig::default();
    assert_eq!(
        (c.cmp_block, c.cmp_stride, c.sel_block, c.top_n),
        (32, 16, 64, 16)
    );
    assert_eq!((c.init_blocks, c.local_blocks, c.window), (1, 2, 512));
    assert_eq!(c.scale_for(64), 0.125);
    c.validate().unwrap();
}

#[test]
fn every_config_rule_is_checked() {
    let c = NsaConfig::default();
    assert_eq!(
        field_of(NsaConfig { cmp_stride: 0, ..c }.validate()),
        "cmp_stride"
    );
    assert_eq!(
        field_of(NsaConfig { cmp_block: 8, ..c }.validate()),
        "cmp_block"
    );
    assert_eq!(
        field_of(NsaConfig { cmp_block: 40, ..c }.validate()),
        "cmp_block"
    );
    assert_eq!(
        field_of(NsaConfig { sel_block: 72, ..c }.validate()),
        "sel_block"
    );
    assert_eq!(field_of(NsaConfig { top_n: 2, ..c }.validate()), "top_n");
    assert_eq!(field_of(NsaConfig { window: 0, ..c }.validate()), "window");
    assert_eq!(
        field_of(
            NsaConfig {
                scale: Some(f32::NAN),
                ..c
            }
            .validate()
        ),
        "scale"
    );
    let msg = NsaConfig { cmp_block: 40, ..c }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cmp_block") && msg.contains("40") && msg.contains("l % d == 0"),
        "{msg}"
    );
}

#[test]
fn compressed_token_counts() {
    let c = NsaConfig::default();
    assert_eq!(c.num_compressed(31), 0);
    assert_eq!(c.num_compressed(32), 1);
    assert_eq!(c.num_compressed(47), 1);
    assert_eq!(c.num_compressed(48), 2);
    assert_eq!(c.visible_compressed(30, 100), 0);
    assert_eq!(c.visible_compressed(31, 100), 1);
    assert_eq!(c.visible_compressed(47, 100), 2);
    assert_eq!(c.visible_compressed(1000, 3), 3);
}

#[test]
fn small_shapes_plan_one_chunk() {
    let shape = Shape::prefill(2, 700, 8, 2, 64, 64);
    let plan = Plan::new(&NsaConfig::default(), &shape, &DeviceLimits::default()).unwrap();
    let kinds: Vec<KernelId> = plan.steps.iter().map(|s| s.kernel).collect();
    use KernelId::*;
    // 700 window workgroups (2 x 700 / 4 queries x 2 heads) are below the split target (768):
    // the window's keys are split in two and merged.
    assert_eq!(
        kinds,
        [Compress, Compress, CmpAttn, Select, SlcAttn, WinAttn, Merge]
    );
    assert_eq!(plan.n_cmp, 42);
    assert!(plan.steps.iter().all(|s| s.params.head_chunks == 1));
    check_coverage(&plan);
}

/// The kernels' fixed capacities every step of `plan` must respect: select.wgsl's token tile
/// (PBUF = 512 tokens, BCHUNK = 128 blocks per chunk; one block per chunk where a block's
/// tokens alone overflow it), select_merge.wgsl's 768 candidates, 64 lists and n <= 256,
/// merge.wgsl's 64 splits per branch, the attention core's 64 keys per tile, and the
/// dispatch grid (65535 per dimension, covering every workgroup).
fn check_capacities(plan: &Plan, case: &str) {
    let c = &plan.config;
    let (m, u) = (c.sel_block / c.cmp_stride, c.cmp_block / c.cmp_stride);
    let merged = plan.steps.iter().any(|s| s.kernel == KernelId::SelectMerge);
    for step in &plan.steps {
        let p = &step.params;
        let [x, y] = step.grid;
        assert!(
            x <= 65535 && y <= 65535,
            "{case}: {:?} grid {x} x {y}",
            step.kernel
        );
        assert!(
            x as u64 * y as u64 >= p.total_wg as u64,
            "{case}: {:?}",
            step.kernel
        );
        match step.kernel {
            KernelId::Select => {
                let chunk = p.sel_chunk as usize;
                assert!((1..=128).contains(&chunk), "{case}: chunk {chunk}");
                assert!(
                    chunk * m + u - 1 <= 512 || (chunk == 1 && m + u - 1 > 512),
                    "{case}: chunk {chunk} of {m}-piece blocks"
                );
                let blocks = plan.shape.tk.div_ceil(c.sel_block);
                assert!(
                    p.splits as usize <= blocks.div_ceil(chunk),
                    "{case}: an empty split"
                );
                if p.splits > 1 {
                    assert!(merged, "{case}: split selection without select_merge");
                    assert!(p.splits <= 64, "{case}: {} lists", p.splits);
                    assert!(c.top_n <= 256, "{case}: merging lists of {}", c.top_n);
                    assert!(
                        p.splits as usize * c.top_n <= 768,
                        "{case}: {} splits",
                        p.splits
                    );
                }
            }
            KernelId::SelectTop => {
                let blocks = plan.shape.tk.div_ceil(c.sel_block);
                assert!(blocks <= 2048, "{case}: {blocks} blocks in one workgroup");
                assert!(plan.shape.hq / plan.shape.hkv <= 16, "{case}: group");
                assert!(p.kept_tile > 0, "{case}: ranked without block sums");
                assert!(!merged, "{case}: ranked and merged");
            }
            KernelId::Merge => {
                for sp in [p.splits, p.slc_splits, p.win_splits] {
                    assert!(sp <= 64, "{case}: merge of {sp} splits");
                }
            }
            KernelId::CmpAttn | KernelId::SlcAttn | KernelId::WinAttn | KernelId::Dense => {
                assert!(
                    p.splits >= 1 && p.splits <= 64,
                    "{case}: {} splits",
                    p.splits
                );
                assert!(
                    p.kv_tile >= 1 && p.kv_tile <= 64,
                    "{case}: tile {}",
                    p.kv_tile
                );
            }
            _ => {}
        }
    }
}

/// The default limits with split selections wherever calls have few rows
/// (`DeviceLimits::split_select`), which `select_top.wgsl` takes over by default where the
/// compressed branch keeps block sums.
fn split_select() -> DeviceLimits {
    DeviceLimits {
        split_select: true,
        ..DeviceLimits::default()
    }
}

#[test]
fn split_selections_fit_the_merge_and_the_token_tile() {
    // Decode steps over many blocks with a large n: where select.wgsl's token tile caps the
    // chunks, there are more chunks than splits (select_merge holds 768 candidates).
    for (sel_block, top_n, tk) in [
        (8, 256, 4500),
        (8, 256, 40000),
        (8, 64, 9000),
        (64, 256, 65536),
        (64, 16, 65536),
        (16, 100, 30000),
    ] {
        let cfg = NsaConfig {
            cmp_block: 16,
            cmp_stride: 8,
            sel_block,
            top_n,
            ..NsaConfig::default()
        };
        for batch in [1, 3] {
            let shape = step_shape(batch, tk, 4, 2, 8, 8);
            let plan = Plan::new(&cfg, &shape, &split_select()).unwrap();
            let case = format!("l'={sel_block} n={top_n} T={tk} B={batch}");
            assert!(
                step_of(&plan, KernelId::Select).params.splits > 1,
                "{case}: not split"
            );
            check_capacities(&plan, &case);
        }
    }
}

#[test]
fn random_plans_respect_the_kernels_capacities() {
    // Seeded configs (strides 1-16, blocks of 1-8 strides, n up to 256), lengths up to 70k,
    // decode steps, short chunks and whole prefills, batches, groups and head sizes, on the
    // default limits and on an H200's.
    use rand::Rng;
    let (mut rng, cases) = common::sweep("random plans", 0x706c_616e, 400);
    let h200 = DeviceLimits {
        max_storage_binding: u32::MAX as u64,
        max_buffer: 1 << 40,
        workgroup_storage: 49152,
        max_invocations: 1024,
        ..DeviceLimits::default()
    };
    let mut planned = 0;
    for i in 0..cases {
        let cfg = random_long_config(&mut rng, &[1, 2, 4, 8, 16], &[1, 64, 512, 4096], 240);
        let cfg = common::widen(&mut rng, cfg);
        let tk = rng.random_range(1..=70000);
        let tq = [1, 3, 37, tk][rng.random_range(0..4)].min(tk);
        let hkv = rng.random_range(1..=4);
        let hq = hkv * [1, 3, 16, 20][rng.random_range(0..4)];
        let (dk, dv) = (
            [8, 64, 128, 192][rng.random_range(0..4)],
            [8, 64, 128][rng.random_range(0..3)],
        );
        let shape = Shape {
            tq,
            ..Shape::prefill(rng.random_range(1..=3), tk, hq, hkv, dk, dv)
        };
        let limits = if i % 2 == 0 {
            h200
        } else {
            DeviceLimits::default()
        };
        // Configs whose selection blocks overflow the token tile, or shapes over a limit,
        // are refused with an error, never planned past a capacity.
        let Ok(plan) = Plan::new(&cfg, &shape, &limits) else {
            continue;
        };
        let case = format!("{cfg:?} {shape:?}");
        check_capacities(&plan, &case);
        planned += 1;
        // A KV cache's step or chunk for sequences of different lengths, as one ragged plan.
        if tq < tk {
            let behind: Vec<usize> = (0..shape.batch)
                .map(|_| rng.random_range(0..=tk - tq))
                .collect();
            let rows = nsa_wgpu::plan::CacheRows {
                key_row0: 0,
                cmp_row0: 0,
                cmp_done: cfg.num_compressed(tk),
                capacity: tk + 5,
                cmp_capacity: cfg.num_compressed(tk + 5).max(1),
            };
            match Plan::cached_ragged(&cfg, &shape, &limits, rows, Precision::F32, &behind) {
                Ok(ragged) => check_capacities(&ragged, &format!("{case} behind {behind:?}")),
                // A sequence's keys bound at the cache's capacity (5 rows past the prefill's)
                // may pass the binding limit that the prefill's met: refused, as it must be
                // (NSA_SWEEP_SEED 193).
                Err(NsaError::ExceedsLimit { what, .. }) if what.contains("of one sequence") => {}
                Err(e) => panic!("{case} behind {behind:?}: {e}"),
            }
        }
    }
    assert!(planned > cases / 2, "only {planned} of {cases} planned");
}

#[test]
fn decode_plans_split_every_branch_and_merge() {
    let shape = step_shape(1, 65536, 64, 4, 128, 128);
    let limits = DeviceLimits {
        max_storage_binding: 1 << 30,
        max_buffer: 1 << 32,
        ..DeviceLimits::default()
    };
    // By default one workgroup per row ranks all blocks of the selection.
    let top = Plan::new(&NsaConfig::default(), &shape, &limits).unwrap();
    let kinds = |plan: &Plan| -> Vec<KernelId> { plan.steps.iter().map(|s| s.kernel).collect() };
    use KernelId::*;
    let [_, _, _, ranked, ..] = &top.steps[..] else {
        panic!("{:?}", kinds(&top))
    };
    assert_eq!(
        kinds(&top),
        [Compress, Compress, CmpAttn, SelectTop, SlcAttn, WinAttn, Merge]
    );
    assert_eq!(ranked.params.total_wg, 4);
    check_capacities(&top, "decode, one workgroup per row");
    // The ranking takes as many invocations as the adapter allows, up to 1024 (its `WG`
    // override); the other kernels take none.
    for (max, wg) in [(256, 256), (768, 512), (1024, 1024), (2048, 1024)] {
        let plan = Plan::new(
            &NsaConfig::default(),
            &shape,
            &DeviceLimits {
                max_invocations: max,
                ..limits
            },
        )
        .unwrap();
        for step in &plan.steps {
            let (spec, _) = plan.kernel_specialization(step.kernel, step.rows, false, 1 << 15);
            let want = if step.kernel == SelectTop { wg } else { 0 };
            assert_eq!(spec.invocations, want, "{:?} at {max}", step.kernel);
            let set = spec.constants_for(step.kernel).contains(&("WG", wg as f64));
            assert_eq!(set, step.kernel == SelectTop, "{:?} at {max}", step.kernel);
        }
    }
    let limits = DeviceLimits {
        split_select: true,
        ..limits
    };
    let plan = Plan::new(&NsaConfig::default(), &shape, &limits).unwrap();
    assert_eq!(
        kinds(&plan),
        [
            Compress,
            Compress,
            CmpAttn,
            Select,
            SelectMerge,
            SlcAttn,
            WinAttn,
            Merge
        ]
    );
    let splits: Vec<u32> = plan.steps.iter().map(|s| s.params.splits).collect();
    // 4 row groups: compressed attention over 4095 tokens (103 tiles of 40) takes 32 splits
    // (ATTN_SPLITS_MAX), selection 8 splits of its 1024 blocks (each a whole chunk of 127 or
    // more, the first split also taking the ninth chunk's 8), selected attention one of its
    // 16 blocks per split, the window's 513 keys one tile per split (right after the
    // selected branch: they need no barrier between them); one merge takes the three
    // branches' partials.
    assert_eq!(splits, [1, 1, 32, 8, 8, 16, 13, 32]);
    let merge = &plan.steps.last().unwrap().params;
    assert_eq!(
        (merge.branch, merge.slc_splits, merge.win_splits),
        (1, 16, 13)
    );
    // 16 sequences (64 row groups): compressed attention aims for 512 workgroups on the
    // shader cores (CMP_SPLIT_TARGET: 8 splits; 256 on tensor cores, below), the window for
    // 768 (SPLIT_TARGET; its 513 keys have 9 tiles of 64), selected attention for 128
    // (SLC_SPLIT_TARGET: 2 splits of 8 blocks each), which made an H200's step faster.
    let b16 = Plan::new(
        &NsaConfig::default(),
        &Shape { batch: 16, ..shape },
        &DeviceLimits {
            split_select: true,
            ..limits_48k()
        },
    )
    .unwrap();
    let split_of = |k: KernelId| step_of(&b16, k).params.splits;
    assert_eq!(
        [CmpAttn, Select, SlcAttn, WinAttn].map(split_of),
        [8, 8, 2, 9]
    );
    // With an f16 cache on tensor cores, compressed attention aims for 256 workgroups
    // (CMP_SPLIT_TARGET_MMA), which made an H200's step faster, and the selection ranks its
    // block sums in one workgroup per row: 4 splits of 16 sequences' 64 row groups. With
    // Hq = 32, Hkv = 8 (128 row groups) 256 would be 2 splits of 64 tiles (32 keys each) at
    // 64k: no workgroup walks more than 32 (CMP_WALK_MMA) where 512 would split finer, so
    // 4; at 16k, 2 splits of 16 tiles.
    let mma = |shape: Shape| {
        let limits = DeviceLimits {
            tensor_cores: true,
            ..limits_48k()
        };
        let p = Plan::with_precision(&NsaConfig::default(), &shape, &limits, Precision::F16);
        let p = p.unwrap();
        let cmp = step_of(&p, CmpAttn);
        let top = p.steps.iter().any(|s| s.kernel == SelectTop);
        (cmp.params.splits, cmp.params.total_wg, top)
    };
    assert_eq!(mma(Shape { batch: 16, ..shape }), (4, 256, true));
    assert_eq!(mma(step_shape(16, 65536, 32, 8, 128, 128)), (4, 512, true));
    assert_eq!(mma(step_shape(16, 16384, 32, 8, 128, 128)), (2, 256, true));
    // Nothing the selected branch writes is bound by the window's dispatch, nor the other
    // way round, so that the two need no barrier between them.
    let (slc, win) = (&plan.steps[5], &plan.steps[6]);
    let written = |step: &nsa_wgpu::plan::Step| -> Vec<Tensor> {
        step.bindings
            .iter()
            .zip(step.kernel.bindings()[1..].iter())
            .filter(|(_, a)| **a == nsa_wgpu::kernels::Access::ReadWrite)
            .map(|((t, _), _)| *t)
            .collect()
    };
    let bound = |step: &nsa_wgpu::plan::Step| -> Vec<Tensor> {
        step.bindings.iter().map(|(t, _)| *t).collect()
    };
    for t in written(slc) {
        assert!(
            !bound(win).contains(&t),
            "{t:?} written by slc_attn, bound by win_attn"
        );
    }
    for t in written(win) {
        assert!(
            !bound(slc).contains(&t),
            "{t:?} written by win_attn, bound by slc_attn"
        );
    }
    let select = &plan.steps[3].params;
    assert_eq!(
        select.cmp_splits, 32,
        "the selection derives lse from the partials"
    );
    // Compressed attention keeps block sums for its 64 rows (4095 tokens in 103 tiles of 40:
    // 10 sums of 4 tokens, the next block's share and the max per tile); the selection reads
    // them.
    let cmp = &plan.steps[2];
    assert_eq!((cmp.params.kept_stride, select.kept_stride), (1236, 1236));
    assert_eq!((cmp.params.kept_tile, select.kept_tile), (40, 40));
    assert_eq!(cmp.bindings[5].0, Tensor::Kept);
    assert_eq!(plan.steps[3].bindings[4].0, Tensor::Kept);
    assert_eq!(plan.tensor_len(Tensor::Kept), 64 * 1236);
    assert!(plan.keeps_scores());
    // Without a budget for them, none.
    let none = DeviceLimits {
        kept_scores: 0,
        ..limits
    };
    let plain = Plan::new(&NsaConfig::default(), &shape, &none).unwrap();
    assert!(!plain.keeps_scores());
    assert!(plain.steps.iter().all(|s| s.params.kept_stride == 0));
    // A prefill keeps them too, in chunks whose block sums fit 2 GiB: at 64k, 6786 query
    // rows of 64 heads x 1236 elements (with 3 GiB bindings), 4462 in the last chunk.
    let long = Shape::prefill(1, 65536, 64, 4, 128, 128);
    let wide = DeviceLimits {
        max_storage_binding: 3 << 30,
        max_buffer: 4 << 30,
        ..limits
    };
    let prefill = Plan::new(&NsaConfig::default(), &long, &wide).unwrap();
    let cmp: Vec<_> = prefill
        .steps
        .iter()
        .filter(|s| s.kernel == CmpAttn)
        .collect();
    assert_eq!(cmp.len(), 10);
    assert!(cmp
        .iter()
        .all(|s| s.params.kept_stride == 1236 && s.params.kept_tile == 40));
    let rows: Vec<u32> = cmp.iter().map(|s| s.params.q_count).collect();
    assert_eq!((rows[0], rows[8], rows[9]), (6786, 6786, 4462));
    // Where only chunks of fewer than 256 rows would fit (9 MiB bindings: 143 rows of 255
    // scores at 4k, with selection blocks of 2 pieces, which keep scores), the prefill does
    // not chunk for it, and only its short last chunk keeps.
    let small = DeviceLimits {
        max_storage_binding: 9 << 20,
        ..limits
    };
    let shape = Shape::prefill(1, 4096, 64, 4, 128, 128);
    let halves = NsaConfig {
        sel_block: 32,
        ..NsaConfig::default()
    };
    let kept_of = |plan: &Plan| -> Vec<(u32, u32, u32)> {
        plan.steps
            .iter()
            .filter(|s| s.kernel == Select)
            .map(|s| (s.params.q_count, s.params.kept_stride, s.params.kept_tile))
            .collect()
    };
    let chunked = Plan::new(&halves, &shape, &small).unwrap();
    let kept = kept_of(&chunked);
    // 287 rows per chunk, 78 in the last.
    assert_eq!(kept[0], (287, 0, 0));
    assert_eq!(kept.last(), Some(&(78, 256, 0)));
    check_coverage(&chunked);
    // Block sums take 84 elements per row (7 tiles of 12), so every chunk keeps them.
    let sums = Plan::new(&NsaConfig::default(), &shape, &small).unwrap();
    assert!(kept_of(&sums).iter().all(|k| k.1 == 84 && k.2 == 40));
    check_coverage(&sums);
    for step in &plan.steps {
        let per_group = match step.kernel {
            Merge => 64,
            SelectMerge => 4,
            Compress => continue,
            _ => 4,
        };
        assert_eq!(
            step.params.total_wg,
            per_group
                * if step.kernel == Merge || step.kernel == SelectMerge {
                    1
                } else {
                    step.params.splits
                },
            "{:?}",
            step.kernel
        );
    }
    check_coverage(&plan);
}

/// Every query row of every batch is covered exactly once, every binding fits, every grid
/// dimension fits and covers its workgroups.
fn check_coverage(plan: &Plan) {
    let s = plan.shape;
    let lim = plan.limits;
    let mut covered = vec![0u32; s.batch * s.tq];
    for step in &plan.steps {
        let p = &step.params;
        assert!(
            step.grid[0] <= lim.max_workgroups_per_dim
                && step.grid[1] <= lim.max_workgroups_per_dim
        );
        assert!(step.grid[0] as u64 * step.grid[1] as u64 >= p.total_wg as u64);
        for (t, w) in &step.bindings {
            assert!(w.size <= lim.max_storage_binding, "{t:?}: {w:?}");
            assert_eq!(w.offset % lim.storage_align, 0);
            assert!(
                w.offset + w.size <= plan.tensor_bytes(*t).max(4),
                "{t:?}: {w:?}"
            );
        }
        if step.kernel == KernelId::WinAttn {
            let b0 =
                (step.bindings[0].1.offset / 4 + p.off_q as u64) as usize / (s.tq * s.hq * s.dk);
            for bb in 0..p.batch as usize {
                for i in p.q_start..p.q_start + p.q_count {
                    covered[(b0 + bb) * s.tq + i as usize] += 1;
                }
            }
        }
    }
    assert!(covered.iter().all(|c| *c == 1), "{covered:?}");
}

#[test]
fn plans_split_under_small_limits() {
    let limits = DeviceLimits {
        max_storage_binding: 64 << 10,
        max_workgroups_per_dim: 100,
        ..DeviceLimits::default()
    };
    for shape in [
        Shape::prefill(3, 700, 8, 1, 20, 12),
        Shape {
            batch: 5,
            tq: 33,
            tk: 90,
            hq: 4,
            hkv: 4,
            dk: 3,
            dv: 7,
        },
        Shape::prefill(1, 4000, 1, 1, 4, 4),
        Shape::prefill(2, 100, 40, 2, 16, 16),
    ] {
        let plan = Plan::new(&NsaConfig::default(), &shape, &limits).unwrap();
        check_coverage(&plan);
    }
}

#[test]
fn sizes_beyond_splitting_are_exceeds_limit() {
    let limits = DeviceLimits {
        max_storage_binding: 1 << 20,
        ..DeviceLimits::default()
    };
    // The keys of one sequence cannot be split across bindings.
    let shape = Shape::prefill(1, 5000, 4, 4, 64, 64);
    let (what, needed, limit) = exceeded(Plan::new(&NsaConfig::default(), &shape, &limits));
    assert!(what.contains("max_storage_buffer_binding_size"), "{what}");
    assert!(needed > limit);
    // A whole tensor over max_buffer_size.
    let big = DeviceLimits {
        max_buffer: 1 << 20,
        ..DeviceLimits::default()
    };
    let shape = Shape::prefill(1, 2000, 8, 1, 64, 64);
    assert!(matches!(
        Plan::new(&NsaConfig::default(), &shape, &big),
        Err(NsaError::ExceedsLimit {
            what: "max_buffer_size",
            ..
        })
    ));
    // Linear compression's weights, bound whole: W_k of 2 heads x 32 x 65 x 65 passes 1 MiB
    // (at 64 x 64 it is 1 MiB, and fits).
    let linear = NsaConfig {
        compression: nsa_wgpu::Compression::Linear,
        ..NsaConfig::default()
    };
    let shape = Shape::prefill(1, 100, 2, 2, 65, 32);
    let (what, needed, limit) = exceeded(Plan::new(&linear, &shape, &limits));
    assert!(what.contains("W_k or W_v"), "{what}");
    assert_eq!((needed, limit), (2 * 32 * 65 * 65 * 4, 1 << 20));
    let shape = Shape::prefill(1, 100, 2, 2, 64, 32);
    assert!(Plan::new(&linear, &shape, &limits).is_ok());
}

/// SPEC sets no upper bound on `n`, nor on how many strides a block spans: a config with more
/// selected blocks than the selection merge ranks plans an unsplit selection with lists
/// sized by the blocks there are, and blocks whose tokens overflow the selection's token
/// tile plan one block per chunk (tests/gpu.rs runs both against the reference).
#[test]
fn large_n_and_long_blocks_plan() {
    use nsa_wgpu::plan::list_entries;
    // A decode step over 1125 blocks with n = 600: the selection would split (one row), but
    // its merge ranks 256 at most.
    let cfg = NsaConfig {
        cmp_block: 16,
        cmp_stride: 8,
        sel_block: 8,
        top_n: 600,
        ..NsaConfig::default()
    };
    let shape = step_shape(1, 9000, 16, 1, 32, 32);
    // The selection's parameters in a plan.
    let select_of = |plan: &Plan| step_of(plan, KernelId::Select).params;
    let plan = Plan::new(&cfg, &shape, &DeviceLimits::default()).unwrap();
    assert_eq!(select_of(&plan).splits, 1);
    assert!(plan.steps.iter().all(|s| s.kernel != KernelId::SelectMerge));
    check_capacities(&plan, "n = 600");
    // With n = 16 the same step splits its selection (its blocks of one piece keep no block
    // sums for select_top.wgsl).
    let paper_n = NsaConfig { top_n: 16, ..cfg };
    let plan = Plan::new(&paper_n, &shape, &DeviceLimits::default()).unwrap();
    assert!(plan.steps.iter().any(|s| s.kernel == KernelId::SelectMerge));
    // n = 200 over 88 blocks: lists of 128, fewer than n (select.wgsl reads inside its
    // lists; tests/gpu.rs runs it), and unsplit: its chunks hold 128 blocks, and a split
    // walks one at least.
    let n200 = NsaConfig { top_n: 200, ..cfg };
    let step = step_shape(1, 700, 16, 2, 32, 32);
    let plan = Plan::new(&n200, &step, &DeviceLimits::default()).unwrap();
    assert_eq!(select_of(&plan).splits, 1);
    assert_eq!(plan.specialization(16).top_list, 128);
    // Blocks of 32 pieces take chunks of 15: 32 blocks split in two, each split writing n
    // candidates from lists of 32 (tests/gpu.rs runs it: split_selection_lists_shorter_than_n).
    let wide = NsaConfig {
        sel_block: 256,
        ..n200
    };
    let step = step_shape(1, 8000, 16, 2, 32, 32);
    let plan = Plan::new(&wide, &step, &split_select()).unwrap();
    assert_eq!(
        (select_of(&plan).splits, select_of(&plan).sel_chunk),
        (2, 15)
    );
    assert_eq!(plan.specialization(16).top_list, 32);
    check_capacities(&plan, "n = 200, l' = 256");
    // A cache's plans size the lists by its capacity, so that a decode loop keeps one
    // length of lists (and so of key tiles) while its sequences grow.
    let n64 = NsaConfig {
        top_n: 64,
        ..NsaConfig::default()
    };
    let short = step_shape(1, 300, 16, 1, 32, 32);
    let rows = nsa_wgpu::plan::CacheRows {
        key_row0: 0,
        cmp_row0: 0,
        cmp_done: n64.num_compressed(300),
        capacity: 65536,
        cmp_capacity: n64.num_compressed(65536),
    };
    let limits = DeviceLimits::default();
    let cached = Plan::cached_ragged(&n64, &short, &limits, rows, Precision::F32, &[0]).unwrap();
    assert_eq!(cached.specialization(16).top_list, 64);
    let alone = Plan::new(&n64, &short, &limits).unwrap();
    assert_eq!(alone.specialization(16).top_list, 16);
    // The lists hold the blocks there are (a power of two, at least 16), n at most.
    assert_eq!(list_entries(&cfg, 9000), 600);
    assert_eq!(list_entries(&cfg, 1000), 128);
    assert_eq!(list_entries(&cfg, 8), 16);
    assert_eq!(list_entries(&NsaConfig::default(), 65536), 16);
    let all = NsaConfig {
        top_n: 1 << 20,
        ..NsaConfig::default()
    };
    assert_eq!(list_entries(&all, 65536), 1024);
    // Selection and compression blocks spanning more strides than the selection kernel's
    // token tile (l'/d + l/d - 1 = 1024 + 2 - 1 > 512): one block per chunk.
    let cfg = NsaConfig {
        cmp_block: 2,
        cmp_stride: 1,
        sel_block: 1024,
        ..NsaConfig::default()
    };
    cfg.validate().unwrap();
    let plan = Plan::new(
        &cfg,
        &Shape::prefill(1, 5000, 2, 1, 4, 4),
        &DeviceLimits::default(),
    )
    .unwrap();
    assert_eq!(select_of(&plan).sel_chunk, 1);
    check_capacities(&plan, "l' = 1024 strides");
    // Lists longer than the workgroup memory holds (n = 4000 of 5000 blocks: 64 KiB against
    // WebGPU's default 32 KiB): an error that names them, not the queries.
    let huge_n = NsaConfig {
        top_n: 4000,
        ..paper_n
    };
    let step = step_shape(1, 40000, 1, 1, 16, 16);
    match Plan::new(&huge_n, &step, &DeviceLimits::default()) {
        Err(NsaError::ExceedsLimit {
            what,
            needed,
            limit,
        }) => {
            assert!(what.contains("top lists"), "{what}");
            assert!(needed > 64000 && limit == 32 << 10, "{needed} {limit}");
        }
        other => panic!("{other:?}"),
    }
    // 1500 of them fit.
    let fewer = NsaConfig {
        top_n: 1500,
        ..huge_n
    };
    let plan = Plan::new(&fewer, &step, &DeviceLimits::default()).unwrap();
    check_capacities(&plan, "n = 1500");
    // With the paper's blocks any n fits 32 KiB at 64k and D = 128 (lists of 1024 blocks).
    let every = NsaConfig {
        top_n: 1 << 20,
        ..NsaConfig::default()
    };
    let big = DeviceLimits {
        max_storage_binding: 1 << 31,
        max_buffer: 1 << 33,
        ..DeviceLimits::default()
    };
    let step = step_shape(1, 65536, 64, 4, 128, 128);
    let plan = Plan::new(&every, &step, &big).unwrap();
    assert_eq!(plan.specialization(16).top_list, 1024);
    // README's bounds for 8-token blocks at 64k, D = 128: the largest n per workgroup memory
    // (lists grow in steps of 16 entries).
    for (kib, most) in [(16, 240), (32, 1264), (48, 2288)] {
        let limits = DeviceLimits {
            workgroup_storage: kib << 10,
            ..big
        };
        let with_n = |top_n| Plan::new(&NsaConfig { top_n, ..paper_n }, &step, &limits);
        assert!(with_n(most).is_ok(), "{kib} KiB, n = {most}");
        match with_n(most + 1) {
            Err(NsaError::ExceedsLimit { what, .. }) => assert!(what.contains("top lists")),
            other => panic!("{kib} KiB, n = {}: {other:?}", most + 1),
        }
    }
}

#[test]
fn bad_shapes_are_rejected() {
    let cfg = NsaConfig::default();
    let l = DeviceLimits::default();
    let s = Shape::prefill(1, 10, 4, 2, 8, 8);
    let what = |s: Shape| match Plan::new(&cfg, &s, &l) {
        Err(NsaError::InvalidShape { what, .. }) => what,
        other => panic!("{other:?}"),
    };
    assert_eq!(what(Shape { hq: 3, ..s }), "hq");
    assert_eq!(what(Shape { tq: 11, ..s }), "tq");
    assert_eq!(what(Shape { dk: 257, ..s }), "dk");
    assert_eq!(what(Shape { dv: 0, ..s }), "dv");
    assert_eq!(what(Shape { batch: 0, ..s }), "batch");
    // The kernels count with 32-bit integers: a size past u32 is refused (a group of 2^64 - 1
    // heads once made a plan divide by zero).
    let past = u32::MAX as usize + 1;
    assert_eq!(
        what(Shape {
            hq: usize::MAX,
            batch: usize::MAX,
            ..s
        }),
        "batch"
    );
    assert_eq!(what(Shape { hq: past * 2, ..s }), "hq");
    assert_eq!(
        what(Shape {
            tq: 10,
            tk: past,
            ..s
        }),
        "tk"
    );
}

/// Plans of extreme shapes, configs and limits are plans or errors, never panics (the plan
/// multiplies sizes in u64 and divides by counts derived from them).
#[test]
fn extreme_sizes_plan_or_fail_without_panics() {
    let big = u32::MAX as usize;
    let limits = [
        DeviceLimits::default(),
        DeviceLimits {
            max_storage_binding: 1 << 16,
            workgroup_storage: 16384,
            ..DeviceLimits::default()
        },
        DeviceLimits {
            tensor_cores: true,
            workgroup_storage: 49152,
            max_key_tiles: 256,
            ..DeviceLimits::default()
        },
    ];
    let configs = [
        NsaConfig::default(),
        NsaConfig {
            cmp_block: 1,
            cmp_stride: 1,
            sel_block: 1,
            top_n: 1,
            init_blocks: 0,
            local_blocks: 0,
            window: 1,
            ..NsaConfig::default()
        },
        NsaConfig {
            window: big,
            top_n: 1 << 20,
            ..NsaConfig::default()
        },
        NsaConfig {
            cmp_block: big,
            cmp_stride: 1,
            sel_block: 1,
            ..NsaConfig::default()
        },
        NsaConfig {
            cmp_block: 1 << 15,
            cmp_stride: 1 << 15,
            sel_block: 1 << 30,
            top_n: 3,
            ..NsaConfig::default()
        },
    ];
    let (mut planned, mut tried) = (0, 0);
    for l in &limits {
        for batch in [1, 3, big] {
            for (tq, tk) in [(1, 1), (7, 1 << 16), (1, 1 << 31), (big, big)] {
                for (hq, hkv) in [(1, 1), (64, 4), (big, 1), (big - 2, (big - 2) / 5)] {
                    for (dk, dv) in [(1, 1), (128, 128), (255, 256)] {
                        let shape = Shape {
                            batch,
                            tq,
                            tk,
                            hq,
                            hkv,
                            dk,
                            dv,
                        };
                        for cfg in &configs {
                            for p in [Precision::F32, Precision::F16] {
                                let run = || Plan::with_precision(cfg, &shape, l, p).is_ok();
                                let ok = std::panic::catch_unwind(run)
                                    .unwrap_or_else(|_| panic!("{cfg:?} {shape:?} {p:?}"));
                                let dense =
                                    || Plan::dense_with_precision(&shape, None, l, p).is_ok();
                                std::panic::catch_unwind(dense)
                                    .unwrap_or_else(|_| panic!("dense {shape:?} {p:?}"));
                                planned += ok as usize;
                                tried += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    // Some of the table plans and some fails (with an error, as caught above).
    assert!(planned > 0 && planned < tried, "{planned} of {tried}");
    // Ordinary shapes plan: the paper's config over a 7-query chunk of 16k keys, 64 / 4
    // heads of 1, 128 and 255 / 256, under the default and the tensor-core limits.
    for l in [&limits[0], &limits[2]] {
        for (dk, dv) in [(1, 1), (128, 128), (255, 256)] {
            let shape = Shape {
                tq: 7,
                ..Shape::prefill(1, 1 << 14, 64, 4, dk, dv)
            };
            for p in [Precision::F32, Precision::F16] {
                Plan::with_precision(&configs[0], &shape, l, p)
                    .unwrap_or_else(|e| panic!("{shape:?} {p:?}: {e}"));
            }
        }
    }
}

#[test]
fn tensor_sizes() {
    let shape = Shape {
        batch: 2,
        tq: 3,
        tk: 40,
        hq: 4,
        hkv: 2,
        dk: 5,
        dv: 6,
    };
    let plan = Plan::new(&NsaConfig::default(), &shape, &DeviceLimits::default()).unwrap();
    assert_eq!(plan.tensor_len(Tensor::Q), 2 * 3 * 4 * 5);
    assert_eq!(plan.tensor_len(Tensor::Out), 2 * 3 * 4 * 6);
    assert_eq!(plan.tensor_len(Tensor::Idx), 2 * 3 * 2 * 16);
    assert_eq!(plan.tensor_len(Tensor::Kc), 2 * 2 * 5); // C = 1
    assert_eq!(plan.tensor_len(Tensor::WK), 0);
}

#[test]
fn tiles_grow_with_the_adapters_workgroup_memory() {
    let shape = Shape::prefill(1, 4096, 64, 4, 128, 128);
    let tile = |kib: u32| {
        let limits = DeviceLimits {
            workgroup_storage: kib << 10,
            ..DeviceLimits::default()
        };
        Plan::new(&NsaConfig::default(), &shape, &limits)
            .map(|p| (p.kv_tile, p.specialization(16).smem4))
    };
    // 32 KiB (lavapipe, SwiftShader): 40 keys of D = 128; 48 KiB (an H200): 64, the most.
    // WebGPU's default 16 KiB: 8 (the selection's top lists sized by the paper's n = 16, not
    // 256, and the attention kernels' score rows by the tile).
    assert_eq!(tile(32).unwrap(), (40, 1800));
    assert_eq!(tile(48).unwrap(), (64, 2560));
    assert_eq!(tile(64).unwrap(), (64, 2560));
    assert_eq!(tile(16).unwrap(), (8, 779));
    // 12 KiB holds the queries but not one key besides the fixed arrays: the selection's
    // are the largest, 3908 bytes with lists of 16 (partial 256, lse 16, token buffer 512,
    // block scores 128, four lists of 16 and a counter, in f32/u32), then 512 vec4s of
    // queries and one 32-vec4 key.
    let (what, needed, limit) = exceeded(tile(12));
    assert!(
        what.starts_with("max_compute_workgroup_storage_size"),
        "{what}"
    );
    assert_eq!((needed, limit), (3908 + 16 * (512 + 32), 12 << 10));
    // A config that selects 256 blocks needs the selection's full lists where there are that
    // many blocks (7748 bytes: four lists of 256; 16k keys hold 256 blocks of 64): 16 KiB
    // then takes no key of D = 128 either. Over 4096 keys (64 blocks) its lists hold 64.
    let many = NsaConfig {
        top_n: 256,
        ..NsaConfig::default()
    };
    let webgpu = DeviceLimits {
        workgroup_storage: 16 << 10,
        ..DeviceLimits::default()
    };
    let long = Shape::prefill(1, 16384, 64, 4, 128, 128);
    let (_, needed, _) = exceeded(Plan::new(&many, &long, &webgpu));
    assert_eq!(needed, 7748 + 16 * (512 + 32));
    let plan = Plan::new(&many, &shape, &webgpu).unwrap();
    assert_eq!(plan.specialization(16).top_list, 64);
}

#[test]
fn long_chunks_run_compressed_window_and_dense_attention_wide() {
    use KernelId::*;
    let h200 = DeviceLimits {
        workgroup_storage: 48 << 10,
        max_storage_binding: 1 << 30,
        max_buffer: 1 << 32,
        ..DeviceLimits::default()
    };
    let rows_of = |plan: &Plan, kernel: KernelId| -> Vec<(u32, u32, u32, u32)> {
        let steps = plan.steps.iter().filter(|s| s.kernel == kernel);
        steps
            .map(|s| {
                (
                    s.rows,
                    s.params.q_block,
                    s.params.head_chunks,
                    s.params.kv_tile,
                )
            })
            .collect()
    };
    // G = 16 at D = 128: two queries per wide workgroup, 32 keys per tile (64 at 16 rows).
    let shape = Shape::prefill(1, 4096, 64, 4, 128, 128);
    let plan = Plan::new(&NsaConfig::default(), &shape, &h200).unwrap();
    assert_eq!((plan.kv_tile, plan.wide_kv_tile), (64, 32));
    assert_eq!(rows_of(&plan, CmpAttn), [(32, 2, 1, 32)]);
    assert_eq!(rows_of(&plan, WinAttn), [(32, 2, 1, 32)]);
    // Selected attention keeps one query per workgroup, the selection 16 heads per pass.
    assert_eq!(rows_of(&plan, SlcAttn), [(16, 1, 1, 64)]);
    assert_eq!(rows_of(&plan, Select)[0].0, 16);
    // Every query row is covered once, with half the workgroups.
    check_coverage(&plan);
    let cmp = step_of(&plan, CmpAttn);
    assert_eq!(cmp.params.total_wg, 4096 / 2 * 4);
    let spec = plan.specialization(32);
    // Its buffer holds 32 rows of queries and 32 keys exactly (2048 vec4s; the adapter would
    // allow 2392), the 16-row kernels' as much as fits.
    assert_eq!((spec.rows, spec.kv_tile, spec.smem4), (32, 32, 2048));
    assert_eq!(plan.specialization(16).smem4, 2560);
    // G = 64: one query of 32 heads per workgroup, two workgroups per query.
    let g64 = Plan::new(
        &NsaConfig::default(),
        &Shape::prefill(1, 256, 64, 1, 64, 64),
        &h200,
    )
    .unwrap();
    assert_eq!(rows_of(&g64, WinAttn), [(32, 1, 2, 32)]);
    assert_eq!(rows_of(&g64, SlcAttn), [(16, 1, 4, 64)]);
    let dense = Plan::dense(&shape, None, &h200).unwrap();
    assert_eq!(rows_of(&dense, Dense), [(32, 2, 1, 32)]);
    // A decode step (one query) and chunks of fewer than 16 queries stay at 16 rows.
    for tq in [1, 15] {
        let short = Shape { tq, ..shape };
        let plan = Plan::new(&NsaConfig::default(), &short, &h200).unwrap();
        assert!(plan.steps.iter().all(|s| s.rows == 16), "tq {tq}");
    }
    // 32 KiB of workgroup memory holds only 10 keys of D = 128 beside 32 rows, and an
    // adapter with fewer than 256 invocations per workgroup runs no wide step.
    let small = DeviceLimits {
        workgroup_storage: 32 << 10,
        ..h200
    };
    let narrow = DeviceLimits {
        max_invocations: 128,
        ..h200
    };
    for limits in [small, narrow] {
        let plan = Plan::new(&NsaConfig::default(), &shape, &limits).unwrap();
        assert_eq!(plan.wide_kv_tile, 0);
        assert!(plan.steps.iter().all(|s| s.rows == 16));
    }
}

#[test]
fn stage_sums_file_each_merge_under_its_stage() {
    use nsa_wgpu::profile::stage_sums;
    use KernelId::*;
    // A split decode step: the window right after the compressed branch, the merge of all
    // three branches last (counted with the window and the combination).
    let split = [
        (CmpAttn, 1.0),
        (WinAttn, 2.0),
        (Select, 4.0),
        (SelectMerge, 8.0),
        (SlcAttn, 16.0),
        (Merge, 32.0),
    ];
    assert_eq!(
        stage_sums(split.into_iter()),
        [
            (CmpAttn, 1.0),
            (WinAttn, 34.0),
            (Select, 12.0),
            (SlcAttn, 16.0)
        ]
    );
    // A split dense plan: its merge counts toward dense attention.
    assert_eq!(
        stage_sums([(Dense, 1.0), (Merge, 2.0)].into_iter()),
        [(Dense, 3.0)]
    );
}

#[test]
fn a_ragged_plan_moves_each_sequence_back_and_compresses_nothing() {
    let cfg = NsaConfig::default();
    let s = Shape {
        batch: 3,
        tq: 1,
        tk: 5000,
        hq: 64,
        hkv: 4,
        dk: 128,
        dv: 128,
    };
    let rows = nsa_wgpu::plan::CacheRows {
        capacity: 8192,
        cmp_capacity: 1024,
        ..Default::default()
    };
    let limits = DeviceLimits::default();
    let plan =
        Plan::cached_ragged(&cfg, &s, &limits, rows, Precision::F32, &[0, 4000, 17]).unwrap();
    assert!(plan.steps.iter().all(|s| s.kernel != KernelId::Compress));
    assert!(plan.steps.iter().any(|s| s.kernel == KernelId::CmpAttn));
    for step in &plan.steps {
        assert_eq!(step.params.behind[0], [0, 4000, 17, 0], "{:?}", step.kernel);
        assert!(step.params.behind[1..].iter().all(|b| *b == [0; 4]));
    }
    // The equal-length plan of the same rows compresses and moves nothing back.
    let plain = Plan::cached(&cfg, &s, &limits, rows, Precision::F32).unwrap();
    assert!(plain.steps.iter().any(|s| s.kernel == KernelId::Compress));
    assert!(plain.steps.iter().all(|s| s.params.behind == [[0; 4]; 16]));
    // One entry per sequence, each sequence holding its new row, at most 64 sequences.
    let bad = |behind: &[usize], batch: usize| {
        let s = Shape { batch, ..s };
        match Plan::cached_ragged(&cfg, &s, &limits, rows, Precision::F32, behind) {
            Err(NsaError::InvalidShape { what, .. }) => what,
            other => panic!("expected InvalidShape, got {other:?}"),
        }
    };
    assert_eq!(bad(&[0, 1], 3), "behind");
    assert_eq!(bad(&[0, 5000, 1], 3), "behind");
    assert_eq!(bad(&[0; 65], 65), "behind");
    let small = nsa_wgpu::plan::CacheRows {
        capacity: 4000,
        ..rows
    };
    assert!(Plan::cached_ragged(&cfg, &s, &limits, small, Precision::F32, &[0, 1, 2]).is_err());
}

#[test]
fn f16_plans_bind_keys_and_values_at_aligned_elements() {
    // The f16 kernels read every vec4 of a key or value tile as one pair of words where the
    // head size is a multiple of 4, else as two whole words where it is even
    // (load_f16.wgsl, load_v_f16.wgsl), which is right only if every offset a plan binds
    // keys, values or compressed keys at is a multiple of 4 (of 2). And they read f16
    // tensors as pairs of words, so every binding of one must start and end on 8-byte units
    // within the tensor's bytes. Random f16 prefills, chunked by small bindings and buffers
    // at offset alignments from 4 to 256 bytes, hold both.
    use rand::Rng;
    let (mut rng, cases) = common::sweep("random f16 bindings", 0x6631_3677, 300);
    let mut checked = 0;
    for _ in 0..cases {
        let cfg = random_long_config(&mut rng, &[1, 2, 4, 8, 16], &[1, 64, 512], 60);
        let tk = rng.random_range(1..=20000);
        let hkv = rng.random_range(1..=3);
        let (dk, dv) = (
            [2, 6, 10, 64, 100, 128, 192][rng.random_range(0..7)],
            [2, 6, 14, 64, 128][rng.random_range(0..5)],
        );
        let shape = Shape {
            tq: [1, 37, tk][rng.random_range(0..3)].min(tk),
            ..Shape::prefill(
                rng.random_range(1..=3),
                tk,
                hkv * [1, 3, 16][rng.random_range(0..3)],
                hkv,
                dk,
                dv,
            )
        };
        let binding = [1u64 << 20, 3 << 20, 128 << 20][rng.random_range(0..3)];
        let limits = DeviceLimits {
            max_storage_binding: binding,
            max_buffer: binding * 2,
            storage_align: [4, 8, 16, 32, 64, 256][rng.random_range(0..6)],
            ..DeviceLimits::default()
        };
        let Ok(plan) = Plan::with_precision(&cfg, &shape, &limits, Precision::F16) else {
            continue;
        };
        for step in &plan.steps {
            use KernelId::*;
            if matches!(step.kernel, CmpAttn | SlcAttn | WinAttn | Dense | Select) {
                let p = &step.params;
                // Every vec4 a tile loads starts at an offset plus a multiple of the head size.
                let unit = |d: usize| if d % 4 == 0 { 4 } else { 2 };
                let (uk, uv) = (unit(dk), unit(dv));
                assert!(
                    p.off_k % uk == 0 && p.off_v % uv == 0 && p.off_kc % uk == 0,
                    "{cfg:?} {shape:?} {limits:?}: {:?} binds at {} / {} / {}",
                    step.kernel,
                    p.off_k,
                    p.off_v,
                    p.off_kc
                );
            }
            for &(t, w) in &step.bindings {
                if plan.elem_bytes(t) == 2 {
                    assert!(
                        w.offset % 8 == 0
                            && w.size % 8 == 0
                            && w.offset + w.size <= plan.tensor_bytes(t),
                        "{cfg:?} {shape:?} {limits:?}: {:?} binds {t:?} at {w:?}",
                        step.kernel
                    );
                }
            }
        }
        checked += 1;
    }
    assert!(checked > cases / 2, "only {checked} of {cases} planned");
}

/// Branch outputs are bound only where asked: a prefill keeps o_cmp and o_slc as its
/// combination's inputs but binds no o_win; a split step binds none of the three (its merge
/// computes the combination from the partials); `with_branch_outputs` binds all three,
/// keeps the rest of the plan, and plans a ragged cache step again as ragged.
#[test]
fn branch_outputs_are_bound_only_where_asked() {
    let cfg = NsaConfig::default();
    let scratch_has = |p: &Plan, t: Tensor| p.scratch_tensors().contains(&t);
    let branch = [Tensor::OCmp, Tensor::OSlc, Tensor::OWin];
    let prefill = Plan::new(
        &cfg,
        &Shape::prefill(1, 4096, 64, 4, 128, 128),
        &limits_48k(),
    )
    .unwrap();
    let decode = Plan::new(&cfg, &step_shape(4, 4096, 64, 4, 128, 128), &limits_48k()).unwrap();
    assert!(scratch_has(&prefill, Tensor::OCmp) && scratch_has(&prefill, Tensor::OSlc));
    assert!(!scratch_has(&prefill, Tensor::OWin));
    assert!(branch.iter().all(|t| !scratch_has(&decode, *t)));
    for plan in [&prefill, &decode] {
        let full = plan.with_branch_outputs().unwrap();
        assert!(branch.iter().all(|t| scratch_has(&full, *t)));
        let kernels = |p: &Plan| {
            p.steps
                .iter()
                .map(|s| (s.kernel, s.grid))
                .collect::<Vec<_>>()
        };
        assert_eq!(kernels(&full), kernels(plan));
        let win = |p: &Plan| step_of(p, KernelId::WinAttn).params.branch;
        let split = plan.steps.iter().any(|s| s.kernel == KernelId::Merge);
        assert_eq!((win(plan), win(&full)), (1, if split { 1 } else { 2 }));
    }
    let rows = nsa_wgpu::plan::CacheRows {
        capacity: 8192,
        cmp_capacity: 1024,
        ..Default::default()
    };
    let s = Shape {
        batch: 2,
        tq: 1,
        ..Shape::prefill(2, 5000, 64, 4, 128, 128)
    };
    let ragged =
        Plan::cached_ragged(&cfg, &s, &limits_48k(), rows, Precision::F16, &[0, 300]).unwrap();
    let full = ragged.with_branch_outputs().unwrap();
    assert_eq!(
        (full.behind.clone(), full.cache, full.precision),
        (vec![0, 300], Some(rows), Precision::F16)
    );
    assert!(full.steps.iter().all(|s| s.kernel != KernelId::Compress));
    // A cache's compression-only plan (its steps kept by the cache) and dense attention
    // have no branches: the same plan.
    let mut compress_only = decode.clone();
    compress_only
        .steps
        .retain(|s| s.kernel == KernelId::Compress);
    assert!(!compress_only.steps.is_empty());
    assert_eq!(compress_only.with_branch_outputs().unwrap(), compress_only);
    let dense = Plan::dense(&Shape::prefill(1, 300, 4, 2, 16, 16), None, &limits_48k()).unwrap();
    assert_eq!(dense.with_branch_outputs().unwrap(), dense);
}

#[test]
fn split_targets_set_each_branch_s_splits() {
    use nsa_wgpu::SplitTargets;
    use KernelId::{CmpAttn, SlcAttn, WinAttn};
    // A 16-sequence decode step at 64k (64 row groups), f16 on tensor cores: compressed
    // attention's 128 tiles of 32 keys split 4 ways by default (256 workgroups), 8 ways
    // toward 512, 16 toward 1024 (the 32-tile walk bound lies below either); selected
    // attention 2 ways (128: 2 splits of 8 blocks), the window (513 keys) one tile of 64
    // per split (768 would take 12). With every target 0 nothing splits and no merge runs.
    let shape = step_shape(16, 65536, 64, 4, 128, 128);
    let splits = |targets: SplitTargets| {
        let limits = DeviceLimits {
            tensor_cores: true,
            split_targets: targets,
            ..limits_48k()
        };
        let cfg = NsaConfig::default();
        let plan = Plan::with_precision(&cfg, &shape, &limits, Precision::F16).unwrap();
        let of = |k: KernelId| step_of(&plan, k).params.splits;
        let merged = plan.steps.iter().any(|s| s.kernel == KernelId::Merge);
        ([CmpAttn, SlcAttn, WinAttn].map(of), merged)
    };
    let default = SplitTargets::default();
    assert_eq!(splits(default), ([4, 2, 9], true));
    let mma = |n| SplitTargets {
        compressed_mma: n,
        ..default
    };
    assert_eq!(splits(mma(512)).0[0], 8);
    assert_eq!(splits(mma(1024)).0[0], 16);
    let others = SplitTargets {
        selected: 512,
        window: 128,
        ..default
    };
    assert_eq!(splits(others), ([4, 8, 2], true));
    let none = SplitTargets {
        compressed: 0,
        compressed_mma: 0,
        selected: 0,
        window: 0,
    };
    assert_eq!(splits(none), ([1, 1, 1], false));
}

#[test]
fn split_targets_name_each_field_once() {
    // `SplitTargets::named_mut`, which `nsa bench --split-target` and the JavaScript API's
    // `splitTargets` set the targets through: each name reaches its own field.
    use nsa_wgpu::SplitTargets;
    let mut targets = SplitTargets::default();
    for (i, (_, target)) in targets.named_mut().into_iter().enumerate() {
        *target = 10 + i as u64;
    }
    let want = SplitTargets {
        compressed: 10,
        compressed_mma: 11,
        selected: 12,
        window: 13,
    };
    assert_eq!(targets, want);
    // named(), which the CLI's header and the JavaScript `layout()` list, reads them back.
    assert_eq!(
        targets.named(),
        [
            ("cmp_attn", 10),
            ("cmp_attn_mma", 11),
            ("slc_attn", 12),
            ("win_attn", 13)
        ]
    );
}

/// 48 KiB of workgroup memory (an H200's), and room for long prefills in one binding.
fn limits_48k() -> DeviceLimits {
    DeviceLimits {
        workgroup_storage: 48 << 10,
        max_storage_binding: 4 << 30,
        max_buffer: u64::MAX,
        ..DeviceLimits::default()
    }
}

#[test]
fn tensor_cores_specialize_only_f16_attention_kernels_that_fit() {
    let limits = limits_48k();
    let cfg = NsaConfig::default();
    let shape = Shape::prefill(1, 2048, 64, 4, 128, 128);
    // A decode step (one query row of 16 sequences) runs compressed, window and dense
    // attention in 16-row workgroups, a long prefill in 32-row ones.
    let step = Shape {
        batch: 16,
        tq: 1,
        tk: 65536,
        ..shape
    };
    let rows = nsa_wgpu::plan::CacheRows {
        capacity: 65536,
        cmp_capacity: 4096,
        ..Default::default()
    };
    // One sequence's dense decode step: 4 row groups (DENSE_FEW_GROUPS).
    let one = Shape { batch: 1, ..step };
    let plans = |precision| {
        [
            Plan::with_precision(&cfg, &shape, &limits, precision).unwrap(),
            Plan::cached(&cfg, &step, &limits, rows, precision).unwrap(),
            Plan::dense_with_precision(&shape, None, &limits, precision).unwrap(),
            Plan::dense_with_precision(&step, None, &limits, precision).unwrap(),
            Plan::dense_with_precision(&one, None, &limits, precision).unwrap(),
        ]
    };
    let mut narrow = Vec::new();
    for (f16, f32) in plans(Precision::F16).iter().zip(&plans(Precision::F32)) {
        for step in &f16.steps {
            let (id, rows) = (step.kernel, step.rows);
            let plain = f16.specialization(rows).for_kernel(id);
            let (spec, on) = f16.kernel_specialization(id, rows, true, 48 << 10);
            assert_eq!(on, id.attention_core(), "{id:?}");
            if on {
                // 64 keys per tile fit 48 KiB at D = 128 for 16 and 32 rows; NSA's 16-row
                // kernels take 32 (MMA_NARROW_KT), and so do dense attention's in calls of
                // more than DENSE_FEW_GROUPS row groups (16 sequences), not in one
                // sequence's.
                let kt = if rows == 16 && id != KernelId::Dense {
                    narrow.push(id);
                    32
                } else if rows == 16 && f16.shape.batch > 1 {
                    32
                } else {
                    64
                };
                assert_eq!((spec.kv_tile, spec.rows, spec.few_rows), (kt, rows, false));
            } else {
                assert_eq!(spec, plain, "{id:?}");
            }
            assert_eq!(
                f16.kernel_specialization(id, rows, false, 48 << 10),
                (plain, false)
            );
            // Not where a tile does not fit (16 KiB), nor for f32 inputs.
            assert_eq!(
                f16.kernel_specialization(id, rows, true, 16 << 10),
                (plain, false)
            );
            let plain32 = f32.specialization(rows).for_kernel(id);
            assert_eq!(
                f32.kernel_specialization(id, rows, true, 48 << 10),
                (plain32, false)
            );
        }
    }
    for id in [KernelId::CmpAttn, KernelId::SlcAttn, KernelId::WinAttn] {
        assert!(
            narrow.contains(&id),
            "{id:?} never ran in 16 rows: {narrow:?}"
        );
    }
}

#[test]
fn one_sequence_steps_at_dk192_take_32_key_compressed_tiles() {
    use KernelId::*;
    // Dk = 192 on tensor cores: compressed attention's 16-row tiles hold 32 keys (12 vec4s
    // per invocation) in calls of at most CMP_FEW_GROUPS row groups, so they keep block sums
    // and select_top ranks; 16 keys (8 vec4s) in calls of more, whose selection splits.
    // Selected and window attention keep 16 either way.
    let on = DeviceLimits {
        tensor_cores: true,
        ..limits_48k()
    };
    let rows = nsa_wgpu::plan::CacheRows {
        capacity: 65536,
        cmp_capacity: 4096,
        ..Default::default()
    };
    for (batch, hkv, kt) in [(1, 4, 32), (2, 4, 16), (1, 8, 16), (4, 1, 32), (5, 1, 16)] {
        let step = Shape {
            batch,
            tq: 1,
            tk: 65536,
            hq: 16 * hkv,
            hkv,
            dk: 192,
            dv: 128,
        };
        let plan = Plan::cached(&NsaConfig::default(), &step, &on, rows, Precision::F16).unwrap();
        let tile = |id| {
            let (spec, mma) = plan.kernel_specialization(id, 16, true, 48 << 10);
            assert!(mma, "{id:?}");
            spec.kv_tile
        };
        let what = format!("{batch} x {hkv} kv heads");
        assert_eq!(tile(CmpAttn), kt, "{what}");
        assert_eq!((tile(SlcAttn), tile(WinAttn)), (16, 16), "{what}");
        let top = plan.steps.iter().any(|s| s.kernel == SelectTop);
        assert_eq!(top, kt == 32, "{what}: {:?}", plan.steps);
    }
}

#[test]
fn large_heads_run_wide_only_on_tensor_cores() {
    // Dk = 192 against 48 KiB: 32 query rows and a plain tile of 32 keys (f32) do not fit,
    // 32 rows and an f16 tile of 32 keys on tensor cores do.
    let limits = limits_48k();
    let on = DeviceLimits {
        tensor_cores: true,
        ..limits
    };
    let (cfg, shape) = (
        NsaConfig::default(),
        Shape::prefill(1, 2048, 64, 4, 192, 128),
    );
    let wide_kernels = |plan: &Plan| {
        let mut ids: Vec<KernelId> = plan
            .steps
            .iter()
            .filter(|s| s.rows == 32)
            .map(|s| s.kernel)
            .collect();
        ids.dedup();
        ids
    };
    for (limits, precision, wide) in [
        (limits, Precision::F16, false),
        (on, Precision::F32, false),
        (on, Precision::F16, true),
    ] {
        let plan = Plan::with_precision(&cfg, &shape, &limits, precision).unwrap();
        let dense = Plan::dense_with_precision(&shape, None, &limits, precision).unwrap();
        assert_eq!(plan.wide_kv_tile > 0, wide, "{precision:?}, {limits:?}");
        let want = if wide {
            vec![KernelId::CmpAttn, KernelId::WinAttn]
        } else {
            vec![]
        };
        assert_eq!(wide_kernels(&plan), want, "{precision:?}");
        assert_eq!(wide_kernels(&dense).len(), usize::from(wide));
        for step in plan.steps.iter().chain(&dense.steps) {
            if step.rows == 32 {
                // On tensor cores: 32 keys per f16 tile, within 48 KiB.
                let (spec, mma) = plan.kernel_specialization(step.kernel, 32, true, 48 << 10);
                assert!(mma, "{:?}", step.kernel);
                assert_eq!((spec.kv_tile, spec.rows, spec.dk), (32, 32, 192));
            } else if step.kernel == KernelId::SlcAttn && precision == Precision::F16 {
                // 16 keys per tile in 16 rows (MMA_NARROW_LOADS).
                let (spec, mma) = plan.kernel_specialization(step.kernel, 16, true, 48 << 10);
                assert!(mma);
                assert_eq!(spec.kv_tile, 16);
            }
        }
    }
    // Dk = 128 runs wide either way.
    let d128 = Shape::prefill(1, 2048, 64, 4, 128, 128);
    let plain = Plan::with_precision(&cfg, &d128, &limits, Precision::F16).unwrap();
    assert_eq!(plain.wide_kv_tile, 32);
}

#[test]
fn a_key_tile_cap_splits_long_ranges_or_says_why_not() {
    use KernelId::*;
    // llvmpipe stops an invocation's loops after 65,535 iterations: its pipeline caps the key
    // tiles one attention workgroup walks, and plans split longer ranges as decode steps do.
    let capped = DeviceLimits {
        max_key_tiles: 4,
        ..DeviceLimits::default()
    };
    // Enough row groups that nothing splits for want of workgroups.
    let shape = Shape::prefill(1, 3000, 64, 4, 16, 16);
    let dense = Plan::dense(&shape, None, &capped).unwrap();
    let tiles = 3000usize.div_ceil(dense.kv_tile as usize);
    let step = step_of(&dense, Dense);
    assert!(tiles > 4, "{tiles} tiles: the cap must bite");
    assert!(
        tiles.div_ceil(step.params.splits as usize) <= 4,
        "{tiles} tiles over {} splits",
        step.params.splits
    );
    assert!(dense.steps.iter().any(|s| s.kernel == Merge));
    let uncapped = Plan::dense(&shape, None, &DeviceLimits::default()).unwrap();
    assert!(uncapped.steps.iter().all(|s| s.params.splits == 1));
    // NSA: every branch whose range is longer than the cap splits.
    let cfg = NsaConfig {
        cmp_stride: 8,
        cmp_block: 16,
        sel_block: 8,
        ..NsaConfig::default()
    };
    let plan = Plan::new(&cfg, &shape, &capped).unwrap();
    for kernel in [CmpAttn, SlcAttn, WinAttn] {
        let step = step_of(&plan, kernel);
        assert!(step.params.splits > 1, "{kernel:?} not split");
    }
    // Selected attention walks n blocks of l' = 8 keys: 16 tiles, at most 4 per split.
    let slc = step_of(&plan, SlcAttn);
    assert!(slc.params.splits >= 4, "{} splits", slc.params.splits);
    // Where the merge cannot take enough splits, the plan says which limit and by how much.
    let one = DeviceLimits {
        max_key_tiles: 1,
        ..DeviceLimits::default()
    };
    let long = Shape::prefill(1, 100 * 64, 1, 1, 16, 16);
    let (what, needed, limit) = exceeded(Plan::dense(&long, None, &one));
    assert!(what.starts_with("max_key_tiles"), "{what}");
    assert!(needed > limit && limit == 1, "{needed} {limit}");
}

#[test]
fn capped_selection_blocks_walk_in_pieces_within_the_cap() {
    // Under a key-tile cap, selected attention splits by whole list entries, every
    // splits-th to one workgroup; a block of more tiles than the cap is walked in pieces
    // (Plan::slc_parts), which split the same way. The walk a split takes (its entries
    // times an entry's tiles, the entries counted only where Tk has blocks) stays within
    // the cap however the entries divide among the splits.
    let capped = DeviceLimits {
        max_key_tiles: 4,
        ..DeviceLimits::default()
    };
    for (sel_block, top_n, tk, hq) in [
        (8, 16, 3000, 64),
        (40, 5, 3000, 64),
        // Three tiles per block (64-key tiles): one entry per split, five splits, where
        // dividing the 15 tiles evenly would take four (a walk of two entries, 6 tiles).
        (192, 5, 3000, 64),
        (200, 3, 3000, 8),
        (1600, 16, 3000, 4),
        (4000, 3, 3000, 4),
    ] {
        let cfg = NsaConfig {
            cmp_stride: 8,
            cmp_block: 16,
            sel_block,
            top_n,
            ..NsaConfig::default()
        };
        let shape = Shape::prefill(1, tk, hq, 4, 16, 16);
        let plan = Plan::new(&cfg, &shape, &capped).unwrap();
        let kt = plan.kv_tile as usize;
        assert_eq!(kt, 64);
        let parts = plan.slc_parts() as usize;
        let tiles = sel_block.div_ceil(kt);
        assert_eq!(
            parts,
            tiles.div_ceil(4).max(1),
            "{sel_block}: {tiles} tiles"
        );
        assert_eq!(plan.specialization(16).parts as usize, parts);
        if parts > 1 {
            assert_eq!(plan.slc_queries(), 1, "{sel_block}: pieces take one query");
        }
        let slc = step_of(&plan, KernelId::SlcAttn);
        let entries = top_n.min(tk.div_ceil(sel_block)) * parts;
        let walk =
            entries.div_ceil(slc.params.splits as usize) * sel_block.div_ceil(parts).div_ceil(kt);
        assert!(
            walk <= 4,
            "{sel_block}: {entries} entries over {} splits walk {walk} tiles",
            slc.params.splits
        );
    }
    // Uncapped, blocks are walked whole.
    let cfg = NsaConfig {
        sel_block: 4096,
        ..NsaConfig::default()
    };
    let plan = Plan::new(
        &cfg,
        &Shape::prefill(1, 8192, 16, 1, 16, 16),
        &DeviceLimits::default(),
    )
    .unwrap();
    assert_eq!((plan.slc_parts(), plan.specialization(16).parts), (1, 1));
}

#[test]
fn a_key_tile_cap_holds_in_the_tensor_cores_tiles() {
    // A cap set on a device with tensor cores (NsaPipeline::set_max_key_tiles): the 16-row
    // tensor-core kernels take 32-key tiles where the plain ones take 64 at D = 128, so the
    // splits must bound each workgroup's walk in the shorter tiles (compressed attention's
    // 186 tokens are 3 plain tiles but 6 of the kernel's, its window of 516 keys 9 and 17).
    let limits = DeviceLimits {
        tensor_cores: true,
        workgroup_storage: 48 << 10,
        max_key_tiles: 4,
        ..DeviceLimits::default()
    };
    let cfg = NsaConfig::default();
    // Enough row groups (64 sequences of 4 queries, 4 kv heads) that only the cap splits.
    let shape = Shape {
        tq: 4,
        ..Shape::prefill(64, 3000, 64, 4, 128, 128)
    };
    let plan = Plan::with_precision(&cfg, &shape, &limits, Precision::F16).unwrap();
    let q_block = plan.steps[0].params.q_block as usize;
    for step in &plan.steps {
        let id = step.kernel;
        let keys = match id {
            KernelId::CmpAttn => cfg.num_compressed(shape.tk),
            KernelId::WinAttn => (cfg.window + q_block).min(shape.tk),
            _ => continue,
        };
        let (spec, mma) = plan.kernel_specialization(id, step.rows, true, limits.workgroup_storage);
        assert!(mma, "{id:?} on tensor cores");
        let per = keys.div_ceil(step.params.splits as usize);
        let walk = per.div_ceil(spec.kv_tile as usize);
        assert!(
            walk <= 4,
            "{id:?}: {keys} keys over {} splits walk {walk} tiles of {}",
            step.params.splits,
            spec.kv_tile
        );
    }
    let slc = step_of(&plan, KernelId::SlcAttn);
    let (spec, _) = plan.kernel_specialization(KernelId::SlcAttn, 16, true, 48 << 10);
    let entry = cfg.sel_block.div_ceil(spec.kv_tile as usize);
    let walk = cfg.top_n.div_ceil(slc.params.splits as usize) * entry;
    assert!(walk <= 4, "selected attention walks {walk} tiles");
}

#[test]
fn a_loop_cap_bounds_linear_compression_blocks() {
    // llvmpipe ends an invocation's loops after 65,535 iterations: Linear compression takes
    // 12 + l * (3 + ceil(4 * D / 128) + 2 * (D / 8 + D % 8)) of them, 75 per row at D = 256,
    // so l = 864 fits and l = 880 does not. Elsewhere (no cap) any l plans. (Bindings of
    // 1 GiB hold W_k, 220 MiB at l = 880; lavapipe's 128 MiB would not.)
    let wide = DeviceLimits {
        max_storage_binding: 1 << 30,
        ..DeviceLimits::default()
    };
    let capped = DeviceLimits {
        loop_iterations: nsa_wgpu::LLVMPIPE_LOOP_ITERATIONS,
        ..wide
    };
    let linear = |l: usize| NsaConfig {
        cmp_block: l,
        cmp_stride: 16,
        sel_block: 64,
        compression: Compression::Linear,
        ..NsaConfig::default()
    };
    let shape = Shape::prefill(1, 1024, 2, 1, 256, 16);
    let fits = Plan::new(&linear(864), &shape, &capped).unwrap();
    assert_eq!(fits.compress_iterations(256), 12 + 864 * 75);
    let (what, needed, limit) = exceeded(Plan::new(&linear(880), &shape, &capped));
    assert!(what.starts_with("loop_iterations (compression"), "{what}");
    assert_eq!((needed, limit), (12 + 880 * 75, 65_535));
    Plan::new(&linear(880), &shape, &wide).unwrap();
    // Blocks longer than the keys compress nothing (C = 0): no loop to bound, even far past
    // the cap (Mean blocks of 2^32 - 16 tokens took 1.3e10 iterations).
    let short = Shape::prefill(1, 879, 2, 1, 256, 16);
    let plan = Plan::new(&linear(880), &short, &capped).unwrap();
    assert!(plan.steps.iter().all(|s| s.kernel != KernelId::Compress));
    let mean = NsaConfig {
        cmp_block: u32::MAX as usize - 15,
        sel_block: u32::MAX as usize - 15,
        ..NsaConfig::default()
    };
    Plan::new(&mean, &short, &capped).unwrap();
    // The widest head counts (Dv here), and D % 8 adds its single steps.
    let wide_v = Shape::prefill(1, 1024, 2, 1, 16, 252);
    let (_, needed, _) = exceeded(Plan::new(&linear(880), &wide_v, &capped));
    assert_eq!(needed, 12 + 880 * (3 + 8 + 2 * (31 + 4)));
}

#[test]
fn block_sums_are_kept_where_the_tiles_take_them() {
    // f16 on tensor cores (48 KiB of workgroup memory): compressed attention at D = 128 runs
    // 64-key tiles and keeps block sums; at Dk = 192 its tiles hold 32 keys, and it keeps
    // every score (block sums measured slower there). Its 16-row steps (decode) keep block
    // sums in 32-key tiles, so that one workgroup per row ranks (SelectTop). The shader
    // cores keep block sums in 32-key tiles. Selection blocks of 2 pieces keep scores
    // anywhere.
    let limits = DeviceLimits {
        workgroup_storage: 48 << 10,
        max_storage_binding: 4 << 30,
        max_buffer: u64::MAX,
        tensor_cores: true,
        ..DeviceLimits::default()
    };
    let tiles = |cfg: &NsaConfig, dk: usize, precision: Precision| -> Vec<u32> {
        let shape = Shape::prefill(1, 4096, 64, 4, dk, 128);
        Plan::with_precision(cfg, &shape, &limits, precision)
            .unwrap()
            .steps
            .iter()
            .filter(|s| s.kernel == KernelId::CmpAttn)
            .map(|s| s.params.kept_tile)
            .collect()
    };
    let paper = NsaConfig::default();
    assert_eq!(tiles(&paper, 128, Precision::F16), [64]);
    // At 64k a chunk's block sums (64 heads x 1152 elements) fit 2 GiB for 7281 rows, where
    // scores (4096 elements) fit 2048: nine chunks, and a tenth of 7 rows (README's 10
    // chains).
    let long = Shape::prefill(1, 65536, 64, 4, 128, 128);
    let plan = Plan::with_precision(&paper, &long, &limits, Precision::F16).unwrap();
    let cmp: Vec<_> = plan
        .steps
        .iter()
        .filter(|s| s.kernel == KernelId::CmpAttn)
        .map(|s| (s.params.kept_stride, s.params.q_count))
        .collect();
    assert_eq!((cmp[0], cmp.len(), cmp[9].1), ((1152, 7281), 10, 7));
    assert_eq!(plan.chains(), 10);
    assert_eq!(tiles(&paper, 192, Precision::F16), [0]);
    assert_eq!(tiles(&paper, 128, Precision::F32), [32]);
    let halves = NsaConfig {
        sel_block: 32,
        ..NsaConfig::default()
    };
    assert_eq!(tiles(&halves, 128, Precision::F16), [0]);
    assert_eq!(tiles(&halves, 128, Precision::F32), [0]);
    let step = step_shape(16, 65536, 64, 4, 128, 128);
    let plan = Plan::with_precision(&paper, &step, &limits, Precision::F16).unwrap();
    let kinds: Vec<_> = plan
        .steps
        .iter()
        .map(|s| (s.kernel, s.rows, s.params.kept_tile))
        .filter(|s| matches!(s.0, KernelId::CmpAttn | KernelId::SelectTop))
        .collect();
    assert_eq!(
        kinds,
        [(KernelId::CmpAttn, 16, 32), (KernelId::SelectTop, 16, 32)]
    );
}

/// The limit an `ExceedsLimit` error names, and what was needed of it; panics on any other
/// result.
fn exceeded<T: std::fmt::Debug>(r: Result<T, NsaError>) -> (&'static str, u64, u64) {
    match r {
        Err(NsaError::ExceedsLimit {
            what,
            needed,
            limit,
        }) => (what, needed, limit),
        other => panic!("expected ExceedsLimit, got {other:?}"),
    }
}

/// A batch shares a binding as its keys' bytes allow: 16 cached sequences of 65575 rows (the
/// decode benchmark's 64k cache) at Hkv = 4, D = 128 are 1.07 GB of f16 keys, one binding of
/// 2 GiB, so one chain of dispatches; stored as f32 (2.15 GB) they take two. Every binding
/// fits, and one sequence too large for a binding is an error that counts its bytes.
#[test]
fn f16_keys_share_a_binding_by_their_bytes() {
    let cfg = NsaConfig::default();
    let capacity = 65575;
    let rows = nsa_wgpu::plan::CacheRows {
        capacity,
        cmp_capacity: cfg.num_compressed(capacity),
        cmp_done: cfg.num_compressed(65536),
        ..Default::default()
    };
    let shape = step_shape(16, 65536, 64, 4, 128, 128);
    let limits = DeviceLimits {
        max_storage_binding: 2 << 30,
        ..limits_48k()
    };
    let count = |plan: &Plan, k: KernelId| plan.steps.iter().filter(|s| s.kernel == k).count();
    // Chains as the benchmarks count them; each with its window and merge.
    for (precision, chains) in [(Precision::F16, 1), (Precision::F32, 2)] {
        let plan = Plan::cached(&cfg, &shape, &limits, rows, precision).unwrap();
        assert_eq!(
            [
                plan.chains(),
                count(&plan, KernelId::WinAttn),
                count(&plan, KernelId::Merge)
            ],
            [chains; 3],
            "{precision:?}"
        );
        for step in &plan.steps {
            for (t, w) in &step.bindings {
                assert!(w.size <= limits.max_storage_binding, "{t:?}: {w:?}");
            }
        }
        let dense = Plan::dense_with_precision(&shape, None, &limits, precision).unwrap();
        assert_eq!(dense.chains(), chains, "{precision:?}");
    }
    // One sequence of 2^21 rows: 2 GiB of f16 keys, over a 2 GiB binding by the alignment.
    let long = step_shape(1, 1 << 21, 64, 4, 128, 128);
    let (what, needed, limit) =
        exceeded(Plan::with_precision(&cfg, &long, &limits, Precision::F16));
    assert!(what.contains("keys or values of one sequence"), "{what}");
    assert_eq!((needed, limit), ((2 << 30) + 256, 2 << 30));
}

#[test]
fn selected_attention_takes_consecutive_queries_of_small_groups() {
    // Groups of fewer than 16 heads: as many consecutive queries per workgroup as 16 rows
    // hold, at most SLC_QUERIES_MAX (4), compiled in as QUERIES (the union walk) on both
    // cores; 16 heads or more: one query, QUERIES = 1 (the walk compiled out).
    let limits = limits_48k();
    let cfg = NsaConfig::default();
    assert_eq!(nsa_wgpu::plan::SLC_QUERIES_MAX, 4);
    for (hq, hkv, queries) in [
        (64, 4, 1),
        (32, 1, 1),
        (32, 8, 4),
        (16, 2, 2),
        (12, 4, 4),
        (20, 4, 3),
        (6, 6, 4),
        (12, 1, 1),
    ] {
        for tq in [1, 2, 37, 2048] {
            let shape = Shape {
                tk: 2048,
                ..Shape::prefill(2, tq, hq, hkv, 128, 128)
            };
            let plan = Plan::with_precision(&cfg, &shape, &limits, Precision::F16).unwrap();
            // No more queries than the call has: a decode step compiles the walk out.
            let queries = queries.min(tq as u32);
            assert_eq!(plan.slc_queries(), queries, "{hq}/{hkv} {tq}");
            let step = step_of(&plan, KernelId::SlcAttn);
            let p = &step.params;
            assert_eq!(p.q_block, queries, "{hq}/{hkv}");
            // One workgroup per (batch, query block, kv head, head chunk) and split.
            let chunks = (hq / hkv).div_ceil(16) as u32;
            let blocks = (tq as u32).div_ceil(queries);
            assert_eq!(p.total_wg, 2 * blocks * hkv as u32 * chunks * p.splits);
            for tensor_cores in [false, true] {
                let (spec, _) = plan.kernel_specialization(
                    KernelId::SlcAttn,
                    step.rows,
                    tensor_cores,
                    48 << 10,
                );
                assert_eq!(spec.queries, queries, "{hq}/{hkv} {tensor_cores}");
                // The union walk reads its tiles in the general form (ROW_STEPS off).
                let constants = spec.constants_for(KernelId::SlcAttn);
                let steps = constants.iter().find(|(name, _)| *name == "ROW_STEPS");
                assert_eq!(
                    steps,
                    Some(&("ROW_STEPS", f64::from(u8::from(queries == 1))))
                );
                let (other, _) =
                    plan.kernel_specialization(KernelId::CmpAttn, 16, tensor_cores, 48 << 10);
                assert_eq!(other.queries, 1);
            }
        }
    }
}

#[test]
fn an_adapter_is_described_without_empty_driver_fields() {
    // Browsers report no driver, software adapters sometimes only a name: the line names
    // what is there and no empty "driver" part.
    let mut info = wgpu::AdapterInfo::new(wgpu::DeviceType::Cpu, wgpu::Backend::BrowserWebGpu);
    info.name = "swiftshader".into();
    assert_eq!(
        nsa_wgpu::GpuContext::describe_adapter(&info),
        "swiftshader (BrowserWebGpu, Cpu)"
    );
    info.driver = "llvmpipe".into();
    assert_eq!(
        nsa_wgpu::GpuContext::describe_adapter(&info),
        "swiftshader (BrowserWebGpu, Cpu, driver llvmpipe)"
    );
    info.driver_info = " Mesa 25.0.7 ".into();
    assert_eq!(
        nsa_wgpu::GpuContext::describe_adapter(&info),
        "swiftshader (BrowserWebGpu, Cpu, driver llvmpipe Mesa 25.0.7)"
    );
}
