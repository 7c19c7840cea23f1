//! Decode, chunked prefill and variable-length batches through the KV cache, held against
//! the plain prefill on the GPU (itself held against the reference in tests/gpu.rs).

mod common;

use common::{
    assert_close, bit_equal, f16_pipelines, pick, pipeline, pipeline_with_limits, random_config,
    random_long_config, small, Data,
};
use nsa_wgpu::kernels::KernelId;
use nsa_wgpu::{
    CacheOptions, Compression, DeviceStep, NsaCache, NsaConfig, NsaError, NsaOutputs, NsaPipeline,
    OutputRequest, Plan, Precision, SeqChunk, Shape,
};

fn opts(s: &Shape, capacity: usize, independent_kv: bool) -> CacheOptions {
    CacheOptions {
        seqs: s.batch,
        hq: s.hq,
        hkv: s.hkv,
        dk: s.dk,
        dv: s.dv,
        capacity,
        max_capacity: s.tk,
        independent_kv,
        precision: Precision::F32,
    }
}

/// Rows `[a, b)` of sequence `bi` of a `[B, T, H, D]` tensor, flattened.
fn rows(t: &[f32], s: &Shape, bi: usize, a: usize, b: usize, width: usize) -> Vec<f32> {
    t[(bi * s.tk + a) * width..(bi * s.tk + b) * width].to_vec()
}

/// Positions `[a, b)` of sequence 0 of `data` (shaped `s`): q, k, v and gates rows.
fn seq_rows(data: &Data, s: &Shape, a: usize, b: usize) -> [Vec<f32>; 4] {
    seq_rows_at(data, s, 0, a, b)
}

/// [`seq_rows`] of sequence `bi`.
fn seq_rows_at(data: &Data, s: &Shape, bi: usize, a: usize, b: usize) -> [Vec<f32>; 4] {
    [
        rows(&data.q, s, bi, a, b, s.hq * s.dk),
        rows(&data.k, s, bi, a, b, s.hkv * s.dk),
        rows(&data.v, s, bi, a, b, s.hkv * s.dv),
        rows(&data.gates, s, bi, a, b, s.hq * 3),
    ]
}

/// The chunk of sequence 0 that appends and computes `rows` (from [`seq_rows`]).
fn rows_chunk(rows: &[Vec<f32>; 4]) -> SeqChunk<'_> {
    SeqChunk::new(0, &rows[0], &rows[1], &rows[2], &rows[3])
}

/// Sequence i's rows `owned[i]` (from [`seq_rows_at`]) as its chunk, for every i.
fn seq_chunks_of(owned: &[[Vec<f32>; 4]]) -> Vec<SeqChunk<'_>> {
    owned
        .iter()
        .enumerate()
        .map(|(i, r)| SeqChunk::new(i, &r[0], &r[1], &r[2], &r[3]))
        .collect()
}

/// A plain prefill of positions `[a, b)` of sequence 0 of `data` (shaped `s`) on their own.
fn run_alone(cfg: &NsaConfig, data: &Data, s: &Shape, a: usize, b: usize) -> NsaOutputs {
    run_alone_at(pipeline(), Precision::F32, (cfg, data, s), a, b)
}

/// [`run_alone`] on `pipe` with the inputs stored at `precision`.
fn run_alone_at(
    pipe: &NsaPipeline,
    precision: Precision,
    (cfg, data, s): (&NsaConfig, &Data, &Shape),
    a: usize,
    b: usize,
) -> NsaOutputs {
    let [q, k, v, g] = seq_rows(data, s, a, b);
    let shape = Shape::prefill(1, b - a, s.hq, s.hkv, s.dk, s.dv);
    let inputs = nsa_wgpu::NsaInputs::new(&q, &k, &v, &g);
    pollster::block_on(pipe.run_with(cfg, &shape, &inputs, OutputRequest::all(), precision))
        .unwrap()
}

/// Appends positions `[0, len)` of sequence 0's keys and values to `cache` through `pipe`,
/// without rows.
fn append_context(pipe: &NsaPipeline, cache: &mut NsaCache, data: &Data, s: &Shape, len: usize) {
    let k = rows(&data.k, s, 0, 0, len, s.hkv * s.dk);
    let v = rows(&data.v, s, 0, 0, len, s.hkv * s.dv);
    let c = SeqChunk::keys_values(0, &k, &v);
    pollster::block_on(pipe.append(cache, &[c])).unwrap();
}

/// Decodes position `t` of sequence 0 through `cache` on `pipe` (whose plans, and so
/// settings, the step takes).
fn decode_step(
    pipe: &NsaPipeline,
    cache: &mut NsaCache,
    data: &Data,
    s: &Shape,
    t: usize,
    request: OutputRequest,
) -> NsaOutputs {
    let r = seq_rows(data, s, t, t + 1);
    let mut r = pollster::block_on(pipe.extend(cache, &[rows_chunk(&r)], request)).unwrap();
    r.remove(0)
}

/// Feeds every sequence of `data` through a cache on `pipe` stored at `precision`, in chunks
/// of `chunk` tokens (all sequences in each call), and reassembles `[B, T, ...]` outputs.
fn through_cache(
    pipe: &NsaPipeline,
    (cfg, s, data): (&NsaConfig, &Shape, &Data),
    chunk: usize,
    capacity: usize,
    precision: Precision,
) -> (NsaOutputs, NsaCache) {
    let inputs = data.inputs();
    let o = CacheOptions {
        precision,
        ..opts(s, capacity, data.branch.is_some())
    };
    let mut cache = NsaCache::new(pipe, cfg, o, inputs.linear).expect("cache");
    let req = OutputRequest::all();
    let mut per_seq: Vec<Vec<NsaOutputs>> = (0..s.batch).map(|_| Vec::new()).collect();
    let mut pos = 0;
    while pos < s.tk {
        let end = (pos + chunk).min(s.tk);
        let owned: Vec<_> = (0..s.batch)
            .map(|b| {
                let kw = s.hkv * s.dk;
                let vw = s.hkv * s.dv;
                let branch: Option<Vec<Vec<f32>>> = data.branch.as_ref().map(|br| {
                    br.iter()
                        .enumerate()
                        .map(|(j, t)| rows(t, s, b, pos, end, if j % 2 == 0 { kw } else { vw }))
                        .collect()
                });
                (
                    rows(&data.q, s, b, pos, end, s.hq * s.dk),
                    rows(&data.k, s, b, pos, end, kw),
                    rows(&data.v, s, b, pos, end, vw),
                    rows(&data.gates, s, b, pos, end, s.hq * 3),
                    branch,
                )
            })
            .collect();
        let chunks: Vec<SeqChunk> = owned
            .iter()
            .enumerate()
            .map(|(b, (q, k, v, g, br))| SeqChunk {
                seq: b,
                q,
                k,
                v,
                gates: g,
                branch_kv: br
                    .as_ref()
                    .map(|x| [&x[0][..], &x[1], &x[2], &x[3], &x[4], &x[5]]),
            })
            .collect();
        let res = pollster::block_on(pipe.extend(&mut cache, &chunks, req)).expect("extend");
        for (b, r) in res.into_iter().enumerate() {
            per_seq[b].push(r);
        }
        pos = end;
    }
    let parts: Vec<NsaOutputs> = per_seq.into_iter().flatten().collect();
    (nsa_wgpu::cache::concat(parts, req), cache)
}

fn check(name: &str, cfg: NsaConfig, s: Shape, chunk: usize, branch: bool) {
    check_at(
        pipeline(),
        Precision::F32,
        1e-4,
        (name, cfg, s, chunk, branch),
    );
}

/// [`check`] on `pipe` with inputs and cache stored at `precision`: the cache's rows within
/// `tol` of the prefill's at the same precision (the same stored inputs; only the order of
/// the softmax's sums differs), the same selections.
fn check_at(
    pipe: &NsaPipeline,
    precision: Precision,
    tol: f64,
    (name, cfg, s, chunk, branch): (&str, NsaConfig, Shape, usize, bool),
) {
    let data = Data::new(&cfg, &s, branch, 11 + chunk as u64);
    let full = pollster::block_on(pipe.run_with(
        &cfg,
        &s,
        &data.inputs(),
        OutputRequest::all(),
        precision,
    ))
    .expect("prefill");
    let (got, cache) = through_cache(pipe, (&cfg, &s, &data), chunk, 8, precision);
    assert_close(&format!("{name} out"), &got.out, &full.out, tol);
    assert_eq!(
        got.block_indices, full.block_indices,
        "{name} block_indices"
    );
    let (a, b) = (got.branches.unwrap(), full.branches.unwrap());
    assert_close(&format!("{name} o_cmp"), &a.o_cmp, &b.o_cmp, tol);
    assert_close(&format!("{name} o_slc"), &a.o_slc, &b.o_slc, tol);
    // Each compressed token was computed exactly once.
    assert_eq!(
        cache.compressed_tokens(),
        (s.batch * cfg.num_compressed(s.tk)) as u64,
        "{name}"
    );
    assert!(cache.lens().iter().all(|l| *l == s.tk));
    assert_eq!(cache.independent_kv(), branch, "{name}");
    assert_eq!(cache.key_value_buffers().len(), if branch { 6 } else { 2 });
}

#[test]
fn decode_g1_small() {
    check(
        "decode g1",
        small(),
        Shape::prefill(1, 150, 2, 2, 16, 8),
        1,
        false,
    );
}

#[test]
fn decode_g4_paper() {
    check(
        "decode g4",
        NsaConfig {
            window: 100,
            ..NsaConfig::default()
        },
        Shape::prefill(2, 200, 4, 1, 8, 8),
        1,
        false,
    );
}

#[test]
fn decode_g16_small_linear() {
    let cfg = NsaConfig {
        compression: Compression::Linear,
        ..small()
    };
    check(
        "decode g16 linear",
        cfg,
        Shape::prefill(1, 120, 16, 1, 8, 12),
        1,
        false,
    );
}

#[test]
fn decode_independent_kv() {
    check(
        "decode branch kv",
        small(),
        Shape::prefill(2, 100, 4, 2, 8, 8),
        1,
        true,
    );
}

#[test]
fn chunked_prefill_matches_prefill() {
    for chunk in [1, 7, 64, 100] {
        check(
            &format!("chunk {chunk}"),
            small(),
            Shape::prefill(2, 230, 6, 2, 12, 10),
            chunk,
            false,
        );
    }
}

#[test]
fn f16_cache_steps_and_chunks_equal_the_f16_prefill() {
    let linear = NsaConfig {
        compression: Compression::Linear,
        ..small()
    };
    let paper = NsaConfig {
        window: 100,
        ..NsaConfig::default()
    };
    let top5 = NsaConfig { top_n: 5, ..paper };
    for pipe in f16_pipelines() {
        let core = common::core_of(pipe);
        for (name, cfg, s, chunk) in [
            ("g1 steps", small(), Shape::prefill(1, 150, 2, 2, 16, 8), 1),
            (
                "g4 paper steps",
                paper,
                Shape::prefill(2, 200, 4, 1, 64, 32),
                1,
            ),
            (
                "g16 linear chunks of 7",
                linear,
                Shape::prefill(1, 120, 16, 1, 8, 12),
                7,
            ),
            (
                "g16 d128 chunks of 64",
                small(),
                Shape::prefill(1, 300, 16, 1, 128, 128),
                64,
            ),
            (
                "g3 chunks of 100",
                small(),
                Shape::prefill(2, 230, 6, 2, 12, 10),
                100,
            ),
            // One sequence at Dk = 192: on tensor cores compressed attention's 16-row tiles
            // hold 32 keys (few row groups, MMA_FEW_GROUPS_LOADS) and keep block sums, which
            // select_top ranks (2 of 5 slots free); two tiles, the second short.
            (
                "g16 dk192 paper steps",
                top5,
                Shape::prefill(1, 560, 16, 1, 192, 128),
                1,
            ),
        ] {
            let name = format!("f16 cache {name} ({core})");
            check_at(pipe, Precision::F16, 5e-3, (&name, cfg, s, chunk, false));
        }
    }
}

#[test]
fn random_f16_caches_equal_the_f16_prefill() {
    // Seeded configs (Mean and Linear), groups and head sizes up to 256 (192 and Dk != Dv
    // among them: the tensor cores' narrow and wide tiles of every size) through an f16 cache
    // in decode steps or chunks, on the shader cores and (where the adapter has them) the
    // tensor cores, as f16_cache_steps_and_chunks_equal_the_f16_prefill holds its table.
    use rand::Rng;
    let pipes = f16_pipelines();
    let (mut rng, cases) = common::sweep("random f16 cache", 0x6631_3663, 3);
    for case in 0..cases {
        let cfg = random_config(&mut rng, &[1, 2, 4, 8, 16], &[1, 16, 64, 512]);
        let hkv = rng.random_range(1..=2);
        let g = pick(&mut rng, &[1, 3, 16]);
        let dims = [16, 64, 100, 128, 192, 256];
        let (dk, dv) = (pick(&mut rng, &dims), pick(&mut rng, &dims));
        let tk = rng.random_range(20..=90);
        let s = Shape::prefill(rng.random_range(1..=2), tk, hkv * g, hkv, dk, dv);
        let chunk = pick(&mut rng, &[1, 7, 40]);
        for pipe in &pipes {
            let name = format!("random f16 cache {case}: {cfg:?} {s:?} chunks of {chunk}");
            check_at(pipe, Precision::F16, 5e-3, (&name, cfg, s, chunk, false));
        }
    }
}

#[test]
fn f16_cache_rejects_odd_rows_and_values_out_of_range() {
    let pipe = pipeline();
    let cfg = small();
    let odd = Shape::prefill(1, 40, 2, 1, 5, 4);
    let o = CacheOptions {
        precision: Precision::F16,
        ..opts(&odd, 16, false)
    };
    let r = NsaCache::new(pipe, &cfg, o, None);
    if !pipe.supports(Precision::F16) {
        assert!(matches!(r, Err(NsaError::MissingFeature { .. })), "{r:?}");
        return;
    }
    assert!(
        matches!(
            r,
            Err(NsaError::InvalidShape {
                what: "hkv * dk",
                value: 5,
                ..
            })
        ),
        "{r:?}"
    );
    let s = Shape::prefill(1, 40, 2, 1, 4, 4);
    let o = CacheOptions {
        precision: Precision::F16,
        ..opts(&s, 16, false)
    };
    let mut cache = NsaCache::new(pipe, &cfg, o, None).unwrap();
    let data = Data::new(&cfg, &s, false, 3);
    let mut rows = seq_rows(&data, &s, 0, 10);
    rows[1][7] = 1e6;
    let extend = |cache: &mut NsaCache, rows: &[Vec<f32>; 4]| {
        pollster::block_on(pipe.extend(cache, &[rows_chunk(rows)], OutputRequest::default()))
    };
    // The tensor and index an OutOfRange error names.
    let out_of_range = |r| match r {
        Err(NsaError::OutOfRange { tensor, index, .. }) => (tensor, index),
        other => panic!("expected OutOfRange, got {other:?}"),
    };
    assert_eq!(out_of_range(extend(&mut cache, &rows)), ("k", 7));
    rows[1][7] = 0.5;
    rows[0][3] = -1e6;
    assert_eq!(out_of_range(extend(&mut cache, &rows)), ("q", 3));
    assert_eq!(cache.lens(), &[0], "a failed append changes nothing");
    rows[0][3] = 0.5;
    let r = extend(&mut cache, &rows);
    assert_eq!(r.unwrap()[0].out.len(), 10 * 2 * 4);
    assert_eq!(cache.lens(), &[10]);
}

#[test]
fn prefix_invariance() {
    let pipe = pipeline();
    let cfg = small();
    let long = Shape::prefill(1, 260, 4, 2, 16, 16);
    let data = Data::new(&cfg, &long, false, 21);
    let full = pipe
        .run_blocking(&cfg, &long, &data.inputs(), OutputRequest::all())
        .unwrap();
    let t = 173;
    let part = run_alone(&cfg, &data, &long, 0, t);
    assert_close("prefix", &part.out, &full.out[..t * 64], 1e-5);
    assert_eq!(
        part.block_indices.unwrap()[..],
        full.block_indices.unwrap()[..t * 2 * cfg.top_n]
    );
}

#[test]
fn varlen_batch_equals_each_sequence_alone() {
    let f16 = f16_pipelines()
        .into_iter()
        .map(|p| (p, Precision::F16, 5e-3));
    for (pipe, precision, tol) in std::iter::once((pipeline(), Precision::F32, 1e-5)).chain(f16) {
        check_varlen(pipe, precision, tol);
    }
}

/// A packed batch on `pipe` at `precision`: each sequence's rows within `tol` of its own
/// prefill at that precision, the same selections.
fn check_varlen(pipe: &NsaPipeline, precision: Precision, tol: f64) {
    let cfg = small();
    let lens = [37usize, 150, 1, 90];
    let cu: Vec<usize> = std::iter::once(0)
        .chain(lens.iter().scan(0, |a, l| {
            *a += l;
            Some(*a)
        }))
        .collect();
    let total = *cu.last().unwrap();
    let all = Shape::prefill(1, total, 4, 2, 8, 8);
    let data = Data::new(&cfg, &all, false, 5);
    let got = pollster::block_on(pipe.run_varlen_with(
        &cfg,
        &cu,
        (4, 2, 8, 8),
        &data.inputs(),
        OutputRequest::all(),
        precision,
    ))
    .unwrap();
    let idx = got.block_indices.as_ref().unwrap();
    for (i, w) in cu.windows(2).enumerate() {
        let (a, b) = (w[0], w[1]);
        let alone = run_alone_at(pipe, precision, (&cfg, &data, &all), a, b);
        assert_close(
            &format!("varlen {precision:?} seq {i}"),
            &got.out[a * 32..b * 32],
            &alone.out,
            tol,
        );
        assert_eq!(
            &idx[a * 2 * cfg.top_n..b * 2 * cfg.top_n],
            &alone.block_indices.unwrap()[..],
            "seq {i}"
        );
    }
    if precision == Precision::F32 {
        // The CPU reference's packed call: the same rows and selections.
        let cpu = nsa_wgpu::cpu::forward_varlen(
            &cfg,
            &cu,
            (4, 2, 8, 8),
            &data.inputs(),
            OutputRequest::all(),
        )
        .unwrap();
        assert_close("varlen cpu", &got.out, &cpu.out, tol);
        assert_eq!(idx, cpu.block_indices.as_ref().unwrap(), "varlen cpu");
    }
}

#[test]
fn varlen_with_some_branches_keys_and_bad_offsets() {
    // Only the selection branch has keys and values of its own: the packed call stores all
    // three branches' (the others' are k, v), as the CPU reference computes them; offsets
    // that break FlashAttention's convention are errors on both.
    let pipe = pipeline();
    let cfg = small();
    let cu = [0usize, 45, 46, 160];
    let all = Shape::prefill(1, 160, 4, 2, 8, 8);
    let data = Data::new(&cfg, &all, true, 9);
    let b = data.branch.as_ref().unwrap();
    let mut inputs = nsa_wgpu::NsaInputs::new(&data.q, &data.k, &data.v, &data.gates);
    (inputs.k_slc, inputs.v_slc) = (Some(&b[2][..]), Some(&b[3][..]));
    let heads = (4, 2, 8, 8);
    let req = OutputRequest::all();
    let got = pollster::block_on(pipe.run_varlen(&cfg, &cu, 4, 2, 8, 8, &inputs, req)).unwrap();
    let cpu = nsa_wgpu::cpu::forward_varlen(&cfg, &cu, heads, &inputs, req).unwrap();
    assert_close("varlen slc kv", &got.out, &cpu.out, 1e-4);
    assert_eq!(got.block_indices, cpu.block_indices);
    // The selection branch's own keys matter: with k, v for it the rows differ.
    let shared = nsa_wgpu::NsaInputs::new(&data.q, &data.k, &data.v, &data.gates);
    let plain = nsa_wgpu::cpu::forward_varlen(&cfg, &cu, heads, &shared, req).unwrap();
    let moved = cpu
        .out
        .iter()
        .zip(&plain.out)
        .filter(|(a, b)| (*a - *b).abs() > 1e-3);
    assert!(moved.count() > 0, "k_slc, v_slc ignored");
    for bad in [&[0usize, 45, 44, 160][..], &[1, 160], &[0]] {
        let r = pollster::block_on(pipe.run_varlen(&cfg, bad, 4, 2, 8, 8, &inputs, req));
        assert!(
            matches!(
                r,
                Err(NsaError::InvalidShape {
                    what: "cu_seqlens",
                    ..
                })
            ),
            "{bad:?}: {r:?}"
        );
        let r = nsa_wgpu::cpu::forward_varlen(&cfg, bad, heads, &inputs, req);
        assert!(
            matches!(
                r,
                Err(NsaError::InvalidShape {
                    what: "cu_seqlens",
                    ..
                })
            ),
            "{bad:?}: {r:?}"
        );
    }
}

/// Offsets of consecutive sequences of `lens` (FlashAttention's `cu_seqlens`).
fn offsets(lens: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut cu = vec![0];
    for l in lens {
        cu.push(cu[cu.len() - 1] + l);
    }
    cu
}

#[test]
fn packed_chunks_equal_each_sequence_alone() {
    // A packed batch with queries and keys apart (cu_seqlens_q, cu_seqlens_k): a prefill, a
    // decode step at position 149, a chunk crossing blocks, a sequence of one token, a long
    // chunk and one whose context is a single key. Each sequence's rows equal its own call
    // with Tq < Tk (no cache), at f32 and f16, Mean, and Linear with every branch's own
    // keys; the CPU reference's packed call gives the same rows and selections.
    for_cache_cases(check_packed_chunks);
}

/// [`packed_chunks_equal_each_sequence_alone`] for `cfg` on `pipe` at `precision`, within
/// `tol` of each sequence's own call (every branch's own keys and values with Linear).
fn check_packed_chunks(pipe: &NsaPipeline, precision: Precision, tol: f64, cfg: NsaConfig) {
    let seqs = [
        (37usize, 37usize),
        (1, 150),
        (20, 90),
        (1, 1),
        (64, 300),
        (100, 101),
    ];
    let cu_q = offsets(seqs.iter().map(|s| s.0));
    let cu_k = offsets(seqs.iter().map(|s| s.1));
    let heads = (8, 2, 12, 8);
    let all = Shape::packed(&cu_q, &cu_k, heads);
    let branch = cfg.compression == Compression::Linear;
    let data = Data::new(&cfg, &all, branch, 17);
    let inputs = data.inputs();
    let req = OutputRequest::all();
    let name = format!("{:?} branch {branch} {precision:?}", cfg.compression);
    let run = pipe.run_varlen_qk(&cfg, &cu_q, &cu_k, heads, &inputs, req, precision);
    let got = pollster::block_on(run).expect(&name);
    let (n, w) = (cfg.top_n, all.hq * all.dv);
    let idx = got.block_indices.as_ref().unwrap();
    let br = got.branches.as_ref().unwrap();
    for (i, (q, k)) in cu_q.windows(2).zip(cu_k.windows(2)).enumerate() {
        let shape = Shape::packed(q, k, heads);
        let rows = inputs.query_key_rows(&all, q[0]..q[1], k[0]..k[1]);
        let alone =
            pollster::block_on(pipe.run_with(&cfg, &shape, &rows, req, precision)).expect(&name);
        let at = q[0] * w..q[1] * w;
        let what = format!("{name} seq {i} {shape:?}");
        assert_close(&what, &got.out[at.clone()], &alone.out, tol);
        let alone_br = alone.branches.as_ref().unwrap();
        assert_close(&what, &br.o_slc[at.clone()], &alone_br.o_slc, tol);
        assert_close(&what, &br.o_win[at], &alone_br.o_win, tol);
        let sel = q[0] * all.hkv * n..q[1] * all.hkv * n;
        assert_eq!(&idx[sel], &alone.block_indices.unwrap()[..], "{what}");
    }
    if precision == Precision::F32 {
        let cpu = nsa_wgpu::cpu::forward_varlen_qk(&cfg, &cu_q, &cu_k, heads, &inputs, req);
        let cpu = cpu.unwrap();
        assert_close(&format!("{name} cpu"), &got.out, &cpu.out, 1e-4);
        assert_eq!(idx, cpu.block_indices.as_ref().unwrap(), "{name} cpu");
    }
}

#[test]
fn random_packed_chunks_match_the_naive_nsa() {
    // Seeded packed batches of chunks: 1 to 4 sequences of 1 to 300 keys, each a prefill,
    // a decode step or a chunk of any length; the seeded sweep's configs, groups of 1 to 16,
    // per-branch keys and values, Mean and Linear; one case in three on a device of 32 KiB
    // bindings and 128 KiB buffers, where it runs in parts of kv heads (sequences of 210 to
    // 300 keys of 2 to 4 kv heads of 20 or 24 pass a binding) and, with groups of 16, a
    // sequence's rows in pieces. Every sequence's
    // rows against the naive NSA on its own tokens (common::check_rows: selections equal up
    // to near ties, outputs within 1e-4).
    use rand::Rng;
    let small_limits = common::small_limits_pipeline();
    let (mut rng, cases) = common::sweep("random packed chunks", 0x7170_6b31, 9);
    for case in 0..cases {
        let mut cfg = random_config(&mut rng, &[1, 2, 4, 8, 16], &[1, 5, 16, 64]);
        let small = case % 3 == 1;
        let hkv = rng.random_range(if small { 2..=4 } else { 1..=3 });
        // On the small device, groups of 16 (half its cases) pass its buffers in one kv head
        // from 86 or 103 queries on (heads of 24 or 20): the cache's call then plans its
        // rows in pieces.
        let g = pick(
            &mut rng,
            if small {
                &[1, 4, 16, 16]
            } else {
                &[1, 3, 4, 16]
            },
        );
        let dk = pick(&mut rng, if small { &[20, 24] } else { &[8, 12, 20] });
        let heads = (g * hkv, hkv, dk, pick(&mut rng, &[8, 16]));
        let seqs: Vec<(usize, usize)> = (0..rng.random_range(1..=4))
            .map(|_| {
                let tk = rng.random_range(if small { 210..=300 } else { 1..=300 });
                let tq = match rng.random_range(0..4) {
                    0 => tk,
                    1 => 1,
                    _ => rng.random_range(1..=tk),
                };
                (tq, tk)
            })
            .collect();
        let pipe = if small { &small_limits } else { pipeline() };
        // Mean where one kv head's Linear weights pass the small device's binding (the call
        // would be an ExceedsLimit naming them).
        let one = Shape::prefill(1, 1, g, 1, heads.2, heads.3);
        if pipe.plan(&cfg, &one).is_err() {
            cfg.compression = Compression::Mean;
        }
        let branch = rng.random_bool(0.3);
        let cu_q = offsets(seqs.iter().map(|s| s.0));
        let cu_k = offsets(seqs.iter().map(|s| s.1));
        let all = Shape::packed(&cu_q, &cu_k, heads);
        let data = Data::new(&cfg, &all, branch, rng.random());
        let inputs = data.inputs();
        let whole = CacheOptions {
            seqs: seqs.len(),
            hq: all.hq,
            hkv: all.hkv,
            dk: all.dk,
            dv: all.dv,
            capacity: seqs.iter().map(|s| s.1).max().unwrap(),
            max_capacity: seqs.iter().map(|s| s.1).max().unwrap(),
            independent_kv: branch,
            precision: Precision::F32,
        };
        let parts = NsaCache::new(pipe, &cfg, whole, inputs.linear).is_err();
        let name = format!("random packed {case} (in parts: {parts}): {cfg:?} {seqs:?} heads {heads:?} branch {branch}");
        let req = OutputRequest {
            block_indices: true,
            branches: false,
        };
        let run = pipe.run_varlen_qk(&cfg, &cu_q, &cu_k, heads, &inputs, req, Precision::F32);
        let got = pollster::block_on(run).expect(&name);
        let idx = got.block_indices.as_ref().unwrap();
        let (w, n) = (all.hq * all.dv, all.hkv * cfg.top_n);
        let mut tally = common::RowTally::default();
        for (q, k) in cu_q.windows(2).zip(cu_k.windows(2)) {
            let shape = Shape::packed(q, k, heads);
            let rows = inputs.query_key_rows(&all, q[0]..q[1], k[0]..k[1]);
            let naive = nsa_wgpu::cpu::naive::nsa(&cfg, &shape, &rows).expect("naive");
            let got = (&got.out[q[0] * w..q[1] * w], &idx[q[0] * n..q[1] * n]);
            common::check_rows(&mut tally, &cfg, &shape, &naive, got, false);
        }
        tally.assert_within(&name, false, 1e-4);
        assert_eq!(parts, small, "{name}");
    }
}

#[test]
fn packed_chunks_of_equal_offsets_are_the_varlen_prefill_and_bad_offsets_are_errors() {
    // cu_seqlens_q == cu_seqlens_k is run_varlen's packed prefill, on the GPU and the CPU;
    // the CPU's packed chunks are the prefill's rows at their positions; offsets that break
    // FlashAttention's convention, disagree in their sequences or give a sequence more
    // queries than keys, and tensors that do not match their totals, are errors naming them.
    let pipe = pipeline();
    let cfg = small();
    let heads = (4, 2, 8, 8);
    let req = OutputRequest::all();
    let cu = [0usize, 45, 46, 160];
    let all = Shape::packed(&cu, &cu, heads);
    let data = Data::new(&cfg, &all, false, 9);
    let inputs = data.inputs();
    let f32 = Precision::F32;
    let qk = pollster::block_on(pipe.run_varlen_qk(&cfg, &cu, &cu, heads, &inputs, req, f32));
    let varlen = pollster::block_on(pipe.run_varlen(&cfg, &cu, 4, 2, 8, 8, &inputs, req));
    let (qk, varlen) = (qk.unwrap(), varlen.unwrap());
    assert_eq!(qk.out, varlen.out, "the same cache calls");
    assert_eq!(qk.block_indices, varlen.block_indices);
    // The CPU: the last 10 positions of each sequence as chunks.
    let cu_q = [0usize, 10, 11, 21];
    let chunk_rows: Vec<usize> = cu
        .windows(2)
        .flat_map(|w| w[1] - (w[1] - w[0]).min(10)..w[1])
        .collect();
    let q: Vec<f32> = chunk_rows
        .iter()
        .flat_map(|&r| data.q[r * 32..(r + 1) * 32].to_vec())
        .collect();
    let gates: Vec<f32> = chunk_rows
        .iter()
        .flat_map(|&r| data.gates[r * 12..(r + 1) * 12].to_vec())
        .collect();
    let chunks = nsa_wgpu::NsaInputs::new(&q, &data.k, &data.v, &gates);
    let cpu = nsa_wgpu::cpu::forward_varlen_qk(&cfg, &cu_q, &cu, heads, &chunks, req).unwrap();
    let prefill = nsa_wgpu::cpu::forward_varlen(&cfg, &cu, heads, &inputs, req).unwrap();
    let want: Vec<f32> = chunk_rows
        .iter()
        .flat_map(|&r| prefill.out[r * 32..(r + 1) * 32].to_vec())
        .collect();
    assert_eq!(cpu.out, want, "chunk rows are the prefill's rows");
    let gpu = pollster::block_on(pipe.run_varlen_qk(&cfg, &cu_q, &cu, heads, &chunks, req, f32));
    assert_close("chunks on the gpu", &gpu.unwrap().out, &want, 1e-5);
    // Empty sequences (FlashAttention's equal neighbours) write no rows and change no
    // other sequence's: one inserted into the prefill's offsets, and a sequence of keys
    // without queries among the chunks (sequence 1's one query row left out).
    let cu_e = [0usize, 45, 45, 46, 160];
    let e = pollster::block_on(pipe.run_varlen(&cfg, &cu_e, 4, 2, 8, 8, &inputs, req)).unwrap();
    assert_eq!(e.out, varlen.out, "an empty sequence");
    assert_eq!(e.block_indices, varlen.block_indices);
    let cpu_e = nsa_wgpu::cpu::forward_varlen(&cfg, &cu_e, heads, &inputs, req).unwrap();
    assert_eq!(cpu_e.out, prefill.out, "an empty sequence (CPU)");
    let cu_skip = [0usize, 10, 10, 20];
    let keep: Vec<usize> = (0..21).filter(|&r| r != 10).collect();
    let pick = |x: &[f32], w: usize| -> Vec<f32> {
        keep.iter()
            .flat_map(|&r| x[r * w..(r + 1) * w].to_vec())
            .collect()
    };
    let (q_skip, gates_skip) = (pick(&q, 32), pick(&gates, 12));
    let skip = nsa_wgpu::NsaInputs::new(&q_skip, &data.k, &data.v, &gates_skip);
    let want_skip = pick(&cpu.out, 32);
    let cpu_skip =
        nsa_wgpu::cpu::forward_varlen_qk(&cfg, &cu_skip, &cu, heads, &skip, req).unwrap();
    assert_eq!(cpu_skip.out, want_skip, "a sequence without queries (CPU)");
    let gpu_skip =
        pollster::block_on(pipe.run_varlen_qk(&cfg, &cu_skip, &cu, heads, &skip, req, f32));
    assert_close(
        "a sequence without queries",
        &gpu_skip.unwrap().out,
        &want_skip,
        1e-5,
    );
    let bad: [(&[usize], &[usize], &str); 6] = [
        (&[0, 10, 9, 21], &cu, "cu_seqlens_q"),
        (&cu_q, &[0, 45, 160], "cu_seqlens_q"),
        (&cu_q, &[1, 45, 46, 160], "cu_seqlens_k"),
        (&[0, 10, 12, 22], &cu, "cu_seqlens_q"),
        (&[0], &[0], "cu_seqlens_q"),
        (&[0, 10, 11, 20], &cu, "q"),
    ];
    // On a device of 128 KiB buffers, the queries of one kv head of a sequence of 227 (16
    // query heads of 12) pass a buffer: parts of kv heads cannot help, so the cache's call
    // plans the sequence's rows in pieces, with the packed call's rows on the adapter's
    // limits. Where one kv head's values of a sequence pass a binding (600 rows of 16), not
    // even one query row plans, and the call is an ExceedsLimit.
    let heads = (64, 4, 12, 16);
    let (cu_q, cu_k) = ([0, 227, 228], [0, 227, 300]);
    let long = Shape::packed(&cu_q, &cu_k, heads);
    let data = Data::new(&cfg, &long, false, 3);
    let small = common::small_limits_pipeline();
    let one = Shape::packed(&[0, 227], &[0, 227], (16, 1, 12, 16));
    let err = small.plan(&cfg, &one).expect_err("one kv head's queries");
    assert!(
        matches!(
            err,
            NsaError::ExceedsLimit {
                what: "max_buffer_size",
                needed: 174336,
                ..
            }
        ),
        "{err}"
    );
    let long_inputs = data.inputs();
    let packed = |p: &NsaPipeline| {
        let r = p.run_varlen_qk(&cfg, &cu_q, &cu_k, heads, &long_inputs, req, f32);
        pollster::block_on(r).expect("packed")
    };
    let (got, want) = (packed(&small), packed(pipeline()));
    assert_close("rows in pieces", &got.out, &want.out, 1e-5);
    assert_eq!(got.block_indices, want.block_indices);
    let wide = (4, 4, 12, 16);
    let tall = Shape::packed(&[0, 600], &[0, 600], wide);
    let data = Data::new(&cfg, &tall, false, 4);
    let inputs = data.inputs();
    let r = small.run_varlen_qk(&cfg, &[0, 600], &[0, 600], wide, &inputs, req, f32);
    let r = pollster::block_on(r);
    assert!(matches!(r, Err(NsaError::ExceedsLimit { .. })), "{r:?}");
    let row = Shape::packed(&[0, 1], &[0, 600], (1, 1, 12, 16));
    let err = small.plan(&cfg, &row).expect_err("one row of one kv head");
    assert!(
        matches!(&err, NsaError::ExceedsLimit { what, .. } if what.starts_with("max_storage_buffer_binding_size")),
        "{err}"
    );
    let heads = (4, 2, 8, 8);
    // Offsets that span no rows make a shape that validation rejects, never a panic.
    for (q, k) in [(&[][..], &[][..]), (&[5, 2][..], &[0, 4][..])] {
        let s = Shape::packed(q, k, heads);
        assert_eq!(s.tq, 0, "{q:?}");
        assert!(s.validate().is_err(), "{q:?} {k:?}");
    }
    for (cu_q, cu_k, what) in bad {
        let gpu =
            pollster::block_on(pipe.run_varlen_qk(&cfg, cu_q, cu_k, heads, &chunks, req, f32));
        let cpu = nsa_wgpu::cpu::forward_varlen_qk(&cfg, cu_q, cu_k, heads, &chunks, req);
        for r in [gpu.map(drop), cpu.map(drop)] {
            let named = match &r {
                Err(NsaError::InvalidShape { what: w, .. }) => *w == what,
                Err(NsaError::ShapeMismatch { tensor, .. }) => *tensor == what,
                _ => false,
            };
            assert!(named, "{cu_q:?} {cu_k:?}: {r:?}");
        }
    }
}

#[test]
fn equal_chunks_past_a_buffer_run_in_smaller_plans() {
    // On a device of 128 KiB buffers, four sequences' equal chunks of 100 queries (8 heads
    // of 16) hold 200 KiB of f32 queries and as many outputs together, 50 KiB each: the
    // call plans halves of the group instead of failing (it was an ExceedsLimit naming
    // max_buffer_size). One sequence's chunk of 400 queries (16 heads of 16: 400 KiB) is
    // planned in pieces of its rows, each compressing the blocks its tokens complete. The
    // rows are the plain prefill's (f32 and, where the adapter has it, f16), and every
    // block is compressed once.
    let limited = common::small_limits_pipeline();
    let cfg = small();
    let mut precisions = vec![(Precision::F32, 1e-5)];
    if limited.supports(Precision::F16) {
        precisions.push((Precision::F16, 5e-3));
    }
    let cases = [
        (Shape::prefill(4, 200, 8, 1, 16, 16), 100),
        (Shape::prefill(1, 400, 16, 1, 16, 16), 400),
    ];
    for ((s, chunk), (precision, tol)) in cases
        .into_iter()
        .flat_map(|c| precisions.iter().map(move |p| (c, *p)))
    {
        let data = Data::new(&cfg, &s, false, 41);
        let (got, cache) = through_cache(&limited, (&cfg, &s, &data), chunk, s.tk, precision);
        let blocks = (s.batch * cfg.num_compressed(s.tk)) as u64;
        assert_eq!(cache.compressed_tokens(), blocks, "{s:?}");
        let inputs = data.inputs();
        let run = pipeline().run_with(&cfg, &s, &inputs, OutputRequest::all(), precision);
        let want = pollster::block_on(run).unwrap();
        assert_close(&format!("{s:?} {precision:?}"), &got.out, &want.out, tol);
        assert_eq!(got.block_indices, want.block_indices, "{s:?} {precision:?}");
    }
}

#[test]
fn a_window_past_every_key_is_every_key_through_the_cache() {
    // usize::MAX (and any window past u32::MAX, which the kernels' parameters once
    // truncated) through chunks and decode steps: the rows of a window of every key.
    let pipe = pipeline();
    let s = Shape::prefill(2, 150, 4, 2, 16, 16);
    let whole = NsaConfig {
        window: s.tk,
        ..small()
    };
    let data = Data::new(&whole, &s, false, 12);
    let want =
        pollster::block_on(pipe.run(&whole, &s, &data.inputs(), OutputRequest::all())).unwrap();
    for window in [usize::MAX, (1 << 32) + 8] {
        let cfg = NsaConfig { window, ..whole };
        for chunk in [1, 37] {
            let (got, _) = through_cache(pipe, (&cfg, &s, &data), chunk, s.tk, Precision::F32);
            let what = format!("window {window}, chunks of {chunk}");
            assert_close(&what, &got.out, &want.out, 1e-5);
            assert_eq!(got.block_indices, want.block_indices, "{what}");
        }
    }
}

#[test]
fn long_and_vast_compressed_tokens_through_the_cache() {
    // Compressed tokens whose strides reach far before a selection block (the selection then
    // takes a block's visible tokens in windows: 500 strides beside blocks of 20), and
    // compressed tokens of billions of strides (none visible: every block scores 0, the
    // lowest win; d = 1 with l/d + l'/d - 1 = 2^32 - 1, the most the config allows), through
    // chunks and decode steps: the prefill's rows and selections.
    let pipe = pipeline();
    let s = Shape::prefill(1, 1400, 4, 2, 8, 8);
    for (cmp_block, cmp_stride, sel_block) in [
        (1000, 2, 40),
        ((1 << 32) - 16, 8, 32),
        ((1 << 32) - 32, 1, 32),
    ] {
        let cfg = NsaConfig {
            cmp_block,
            cmp_stride,
            sel_block,
            top_n: 5,
            ..small()
        };
        let data = Data::new(&cfg, &s, false, 13);
        let inputs = data.inputs();
        let want = pollster::block_on(pipe.run(&cfg, &s, &inputs, OutputRequest::all())).unwrap();
        let cpu = nsa_wgpu::cpu::forward(&cfg, &s, &inputs, OutputRequest::all()).unwrap();
        assert_close(&format!("l = {cmp_block} (CPU)"), &want.out, &cpu.out, 1e-5);
        assert_eq!(
            want.block_indices, cpu.block_indices,
            "l = {cmp_block} (CPU)"
        );
        for chunk in [1, 300] {
            let (got, _) = through_cache(pipe, (&cfg, &s, &data), chunk, s.tk, Precision::F32);
            let what = format!("l = {cmp_block}, chunks of {chunk}");
            assert_close(&what, &got.out, &want.out, 1e-5);
            assert_eq!(got.block_indices, want.block_indices, "{what}");
        }
    }
}

#[test]
fn multi_query_decode_steps_equal_the_prefill() {
    // A group of 64 query heads on one kv head (four 16-row blocks per kv head in a decode
    // step), and heads of 4 / 6 elements (an f16 cache wants Hkv * D even): decode steps
    // and chunks of 29 give the prefill's rows and selections, f32 and f16 on every f16
    // pipeline.
    let mut pipes = vec![(pipeline(), Precision::F32, 1e-5)];
    pipes.extend(
        f16_pipelines()
            .into_iter()
            .map(|p| (p, Precision::F16, 5e-3)),
    );
    let cfg = small();
    for s in [
        Shape::prefill(1, 120, 64, 1, 64, 64),
        Shape::prefill(2, 90, 4, 2, 4, 6),
    ] {
        let data = Data::new(&cfg, &s, false, 21);
        let inputs = data.inputs();
        for &(pipe, precision, tol) in &pipes {
            let run = pipe.run_with(&cfg, &s, &inputs, OutputRequest::all(), precision);
            let want = pollster::block_on(run).unwrap();
            for chunk in [1, 29] {
                let (got, _) = through_cache(pipe, (&cfg, &s, &data), chunk, s.tk, precision);
                let what = format!("{s:?} {precision:?} chunks of {chunk}");
                assert_close(&what, &got.out, &want.out, tol);
                assert_eq!(got.block_indices, want.block_indices, "{what}");
            }
        }
    }
}

#[test]
fn cache_overflow_and_bad_chunks_are_errors() {
    let pipe = pipeline();
    let cfg = small();
    let s = Shape::prefill(1, 40, 2, 1, 4, 4);
    let data = Data::new(&cfg, &s, false, 2);
    let mut cache = NsaCache::new(
        pipe,
        &cfg,
        CacheOptions {
            max_capacity: 32,
            ..opts(&s, 16, false)
        },
        None,
    )
    .unwrap();
    let first = seq_rows(&data, &s, 0, 30);
    // Grows from 16 to 32 rows.
    pollster::block_on(pipe.extend(&mut cache, &[rows_chunk(&first)], OutputRequest::default()))
        .unwrap();
    assert_eq!(cache.capacity(), 32);
    let next = seq_rows(&data, &s, 30, 40);
    let c = rows_chunk(&next);
    let r = pollster::block_on(pipe.extend(&mut cache, &[c], OutputRequest::default()));
    assert!(
        matches!(
            r,
            Err(NsaError::ExceedsLimit {
                needed: 40,
                limit: 32,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(cache.lens(), &[30], "a failed append changes nothing");
    let bad = SeqChunk { seq: 3, ..c };
    assert!(matches!(
        pollster::block_on(pipe.extend(&mut cache, &[bad], OutputRequest::default())),
        Err(NsaError::InvalidShape { what: "seq", .. })
    ));
    let short_k = SeqChunk {
        k: &next[1][1..],
        ..c
    };
    assert!(matches!(
        pollster::block_on(pipe.extend(&mut cache, &[short_k], OutputRequest::default())),
        Err(NsaError::ShapeMismatch { tensor: "k", .. })
    ));
    // A reservation of usize::MAX rows is a limit named, not an overflow (a panic in debug
    // builds).
    let all = CacheOptions {
        capacity: usize::MAX,
        max_capacity: usize::MAX,
        ..opts(&s, 16, false)
    };
    let r = NsaCache::new(pipe, &cfg, all, None);
    assert!(
        matches!(&r, Err(NsaError::ExceedsLimit { what, .. }) if what.starts_with("max_storage_buffer_binding_size")),
        "{:?}",
        r.err()
    );
}

#[test]
fn truncated_and_reset_sequences_equal_fresh_ones() {
    // Three sequences of a cache hold `a`'s tokens; then sequence 0 rolls back into the middle
    // of a compression block (and of a selection block), sequence 1 is reset, sequence 2
    // keeps its tokens, and all three go on with `b`'s tokens. Mean and Linear, f32 and f16.
    for_cache_cases(check_truncation);
}

#[test]
fn copied_sequences_go_on_alone() {
    // Sequence 0 holds `a`'s tokens; it is copied into sequence 1 (empty) and sequence 2
    // (which held other tokens), and all three go on with `b`'s tokens. Mean and Linear, f32
    // and f16.
    for_cache_cases(check_copies);
}

/// Runs `check` for Mean and Linear compression, on f32 and on every f16 pipeline (with
/// their tolerances).
fn for_cache_cases(check: fn(&NsaPipeline, Precision, f64, NsaConfig)) {
    let linear = NsaConfig {
        compression: Compression::Linear,
        ..small()
    };
    let f16 = f16_pipelines()
        .into_iter()
        .map(|p| (p, Precision::F16, 5e-3));
    let pipes: Vec<_> = std::iter::once((pipeline(), Precision::F32, 1e-4))
        .chain(f16)
        .collect();
    for cfg in [small(), linear] {
        for &(pipe, precision, tol) in &pipes {
            check(pipe, precision, tol, cfg);
        }
    }
}

/// The shape of [`check_truncation`] and [`check_copies`], and their two input sets.
fn three_sequences(cfg: &NsaConfig) -> (Shape, Data, Data) {
    let s = Shape::prefill(3, 200, 8, 2, 16, 16);
    (
        s,
        Data::new(cfg, &s, false, 51),
        Data::new(cfg, &s, false, 52),
    )
}

/// A cache on `pipe` at `precision` for the shape `s`, with `a`'s linear weights, whose
/// sequence i holds `a`'s tokens [0, held[i]) of sequence i, the last five with rows.
fn cache_holding(
    pipe: &NsaPipeline,
    precision: Precision,
    (cfg, s, a): (&NsaConfig, &Shape, &Data),
    held: &[usize],
) -> NsaCache {
    let o = CacheOptions {
        precision,
        ..opts(s, 32, false)
    };
    let mut cache = NsaCache::new(pipe, cfg, o, a.inputs().linear).unwrap();
    let at = |i: usize| held[i].saturating_sub(5);
    let owned: Vec<_> = (0..held.len())
        .map(|i| seq_rows_at(a, s, i, 0, at(i)))
        .collect();
    let context: Vec<_> = (0..held.len())
        .map(|i| SeqChunk::keys_values(i, &owned[i][1], &owned[i][2]))
        .filter(|c| !c.k.is_empty())
        .collect();
    pollster::block_on(pipe.append(&mut cache, &context)).unwrap();
    let owned: Vec<_> = (0..held.len())
        .map(|i| seq_rows_at(a, s, i, at(i), held[i]))
        .collect();
    let chunks: Vec<_> = seq_chunks_of(&owned)
        .into_iter()
        .filter(|c| !c.k.is_empty())
        .collect();
    pollster::block_on(pipe.extend(&mut cache, &chunks, OutputRequest::default())).unwrap();
    assert_eq!(cache.lens(), held);
    cache
}

/// Appends `b`'s tokens to every sequence of `cache` from its length (a chunk of 7, then
/// three decode steps), and holds each sequence i's new rows and selections against a plain
/// prefill of what it held (`held(i)`: q, k, v, gates rows from position 0) followed by
/// those tokens; only the blocks the new tokens complete may be compressed. Returns the
/// sequences' lengths.
fn go_on_and_check(
    pipe: &NsaPipeline,
    (precision, tol, name): (Precision, f64, &str),
    (cfg, s, a, b): (&NsaConfig, &Shape, &Data, &Data),
    cache: &mut NsaCache,
    held: &dyn Fn(usize) -> [Vec<f32>; 4],
) -> Vec<usize> {
    let start = cache.lens().to_vec();
    let before = cache.compressed_tokens();
    let req = OutputRequest::all();
    let mut got: Vec<Vec<NsaOutputs>> = start.iter().map(|_| Vec::new()).collect();
    let mut at = start.clone();
    for n in [7, 1, 1, 1] {
        let owned: Vec<_> = (0..at.len())
            .map(|i| seq_rows_at(b, s, i, at[i], at[i] + n))
            .collect();
        let chunks = seq_chunks_of(&owned);
        let out = pollster::block_on(pipe.extend(cache, &chunks, req)).unwrap();
        for (i, o) in out.into_iter().enumerate() {
            got[i].push(o);
            at[i] += n;
        }
    }
    let mut compressed = 0;
    for (i, (&t, &e)) in start.iter().zip(&at).enumerate() {
        let (x, y) = (held(i), seq_rows_at(b, s, i, t, e));
        let [q, k, v, g]: [Vec<f32>; 4] = std::array::from_fn(|j| [&x[j][..], &y[j]].concat());
        let shape = Shape::prefill(1, e, s.hq, s.hkv, s.dk, s.dv);
        let mut inputs = nsa_wgpu::NsaInputs::new(&q, &k, &v, &g);
        inputs.linear = a.inputs().linear;
        let alone = pollster::block_on(pipe.run_with(cfg, &shape, &inputs, req, precision));
        let alone = alone.unwrap();
        let part = nsa_wgpu::cache::concat(std::mem::take(&mut got[i]), req);
        let ow = s.hq * s.dv;
        let name = format!("{name} {:?} {precision:?} seq {i}", cfg.compression);
        assert_close(&name, &part.out, &alone.out[t * ow..e * ow], tol);
        let iw = s.hkv * cfg.top_n;
        let idx = alone.block_indices.unwrap();
        assert_eq!(part.block_indices.unwrap(), &idx[t * iw..e * iw], "{name}");
        compressed += cfg.num_compressed(e) - cfg.num_compressed(t);
    }
    assert_eq!(
        cache.compressed_tokens() - before,
        compressed as u64,
        "{name}"
    );
    at
}

/// [`truncated_and_reset_sequences_equal_fresh_ones`] on `pipe` at `precision`.
fn check_truncation(pipe: &NsaPipeline, precision: Precision, tol: f64, cfg: NsaConfig) {
    let (s, a, b) = three_sequences(&cfg);
    let mut cache = cache_holding(pipe, precision, (&cfg, &s, &a), &[150, 90, 120]);
    // 137 is inside compressed token 16's block (128 .. 144) and selection block 4.
    let kept = [137, 0, 120];
    cache.truncate(0, kept[0]).unwrap();
    cache.reset(1).unwrap();
    cache.truncate(2, kept[2]).unwrap();
    assert_eq!(cache.lens(), &kept);
    let held = |i: usize| seq_rows_at(&a, &s, i, 0, kept[i]);
    let at = go_on_and_check(
        pipe,
        (precision, tol, "truncated"),
        (&cfg, &s, &a, &b),
        &mut cache,
        &held,
    );
    // Past the cache's sequences, or longer than the sequence: errors that change nothing.
    assert!(matches!(
        cache.truncate(3, 0),
        Err(NsaError::InvalidShape { what: "seq", .. })
    ));
    assert!(matches!(
        cache.truncate(1, at[1] + 1),
        Err(NsaError::InvalidShape { what: "len", .. })
    ));
    assert_eq!(cache.lens(), &at);
}

/// [`copied_sequences_go_on_alone`] on `pipe` at `precision`.
fn check_copies(pipe: &NsaPipeline, precision: Precision, tol: f64, cfg: NsaConfig) {
    let (s, a, b) = three_sequences(&cfg);
    let mut cache = cache_holding(pipe, precision, (&cfg, &s, &a), &[141, 0, 60]);
    cache.copy_sequence(pipe, 0, 1).unwrap();
    cache.copy_sequence(pipe, 0, 2).unwrap();
    assert_eq!(cache.lens(), &[141, 141, 141]);
    let held = |_: usize| seq_rows_at(&a, &s, 0, 0, 141);
    let at = go_on_and_check(
        pipe,
        (precision, tol, "copied"),
        (&cfg, &s, &a, &b),
        &mut cache,
        &held,
    );
    for (src, dst, what) in [(0, 0, "dst"), (3, 0, "src"), (0, 3, "dst")] {
        let r = cache.copy_sequence(pipe, src, dst);
        assert!(
            matches!(r, Err(NsaError::InvalidShape { what: w, .. }) if w == what),
            "{r:?}"
        );
    }
    assert_eq!(cache.lens(), &at);
}
#[test]
fn append_then_decode_equals_prefill() {
    // Context appended without rows, then decoded: the last rows match a full prefill.
    let pipe = pipeline();
    let cfg = small();
    let s = Shape::prefill(1, 140, 4, 2, 8, 8);
    let data = Data::new(&cfg, &s, false, 31);
    let full = pipe
        .run_blocking(&cfg, &s, &data.inputs(), OutputRequest::all())
        .unwrap();
    let mut cache = NsaCache::new(pipe, &cfg, opts(&s, 64, false), None).unwrap();
    let ctx_len = 120;
    append_context(pipe, &mut cache, &data, &s, ctx_len);
    assert_eq!(cache.lens(), &[ctx_len]);
    assert_eq!(
        cache.compressed_tokens(),
        cfg.num_compressed(ctx_len) as u64
    );
    for t in ctx_len..s.tk {
        let r = decode_step(pipe, &mut cache, &data, &s, t, OutputRequest::default());
        assert_close(
            &format!("row {t}"),
            &r.out,
            &full.out[t * 32..(t + 1) * 32],
            1e-4,
        );
    }
    assert_eq!(cache.compressed_tokens(), cfg.num_compressed(s.tk) as u64);
}

#[test]
fn a_cache_keeps_its_step_buffers_until_it_grows_or_lets_them_go() {
    let pipe = pipeline();
    let cfg = small();
    let s = Shape::prefill(1, 140, 4, 2, 8, 8);
    let data = Data::new(&cfg, &s, false, 31);
    let mut cache = NsaCache::new(pipe, &cfg, opts(&s, 128, false), None).unwrap();
    assert_eq!(cache.kept_bytes(), 0);
    append_context(pipe, &mut cache, &data, &s, 100);
    for t in 100..104 {
        decode_step(pipe, &mut cache, &data, &s, t, OutputRequest::all());
    }
    let kept = cache.kept_bytes();
    assert!(kept > 0);
    // Growing the cache lets the scratches go (their bind groups hold the old key buffers);
    // the query, gate, output and readback buffers stay for the next step.
    cache.reserve(pipe, 140).unwrap();
    let after = cache.kept_bytes();
    assert!(
        after > 0 && after < kept,
        "{after} bytes kept after growing, {kept} before"
    );
    let full = pipe
        .run_blocking(&cfg, &s, &data.inputs(), OutputRequest::all())
        .unwrap();
    let row = |t: usize| &full.out[t * 32..(t + 1) * 32];
    let r = decode_step(pipe, &mut cache, &data, &s, 104, OutputRequest::default());
    assert_close("row 104", &r.out, row(104), 1e-4);
    assert!(cache.kept_bytes() > after);
    // Letting every kept buffer go leaves the cached keys: the next steps allocate anew.
    cache.release_buffers();
    assert_eq!(cache.kept_bytes(), 0);
    for t in 105..107 {
        let r = decode_step(pipe, &mut cache, &data, &s, t, OutputRequest::default());
        assert_close(&format!("row {t} after release"), &r.out, row(t), 1e-4);
    }
    assert!(cache.kept_bytes() > 0);
}

#[test]
fn split_selection_of_many_blocks_with_a_large_top_n() {
    // 563 blocks of 8 tokens and n = 256: the selection's token tile holds 128 blocks, so
    // its chunks cannot shrink to 563 / 4; the merge holds 1024 candidates (4 lists of
    // 256), so four splits must take the five chunks between them.
    let cfg = NsaConfig {
        cmp_block: 16,
        cmp_stride: 8,
        sel_block: 8,
        top_n: 256,
        window: 40,
        ..NsaConfig::default()
    };
    let s = Shape::prefill(1, 4500, 4, 2, 8, 8);
    last_step_matches_the_reference(&cfg, &s, &Data::new(&cfg, &s, false, 43));
}

#[test]
fn random_long_decode_steps_match_the_reference() {
    // Seeded configs with many blocks and large top-n against the reference, one decode step
    // each after thousands of cached tokens: selection splits whose chunks the selection's
    // token tile caps, long candidate lists for select_merge, every branch split, Mean and
    // Linear (with the old split rule, it chose wrong blocks).
    use rand::Rng;
    let (mut rng, cases) = common::sweep("random long decode", 0x6c6f_6e67, 6);
    for case in 0..cases {
        let cfg = random_long_config(&mut rng, &[1, 2, 4, 8], &[1, 30, 300], 245);
        let hkv = rng.random_range(1..=2);
        let hq = hkv * pick(&mut rng, &[1, 4, 16]);
        let tk = rng.random_range(1000..=6000);
        let s = Shape::prefill(1, tk, hq, hkv, 8, 8);
        println!("case {case}: {cfg:?} {s:?}");
        last_step_matches_the_reference(&cfg, &s, &Data::new(&cfg, &s, false, case as u64));
    }
}

/// Appends all but the last position of sequence 0 of `data` to a cache, decodes the last
/// one, and holds its output and block indices against the reference; returns the indices.
/// Both ways a decode step may select (one workgroup ranking each row's blocks where the
/// compressed branch keeps block sums, `select_top.wgsl`, and split selections merged), the
/// ranking with the adapter's invocations per workgroup and with 256.
fn last_step_matches_the_reference(cfg: &NsaConfig, s: &Shape, data: &Data) -> Vec<i32> {
    let pipes = [
        (pipeline(), "default"),
        (split_pipeline(), "split"),
        (narrow_pipeline(), "256 invocations"),
    ];
    last_step_matches_on(&pipes, cfg, s, data)
}

/// [`last_step_matches_the_reference`] on `pipes` (each with what it is called).
fn last_step_matches_on(
    pipes: &[(&NsaPipeline, &str)],
    cfg: &NsaConfig,
    s: &Shape,
    data: &Data,
) -> Vec<i32> {
    let inputs = data.inputs();
    let naive = nsa_wgpu::cpu::naive::nsa(cfg, s, &inputs).unwrap();
    let last = s.tk - 1;
    let per = s.hkv * cfg.top_n;
    let want = &naive.block_indices[last * per..s.tk * per];
    for &(pipe, how) in pipes {
        let mut cache = NsaCache::new(pipe, cfg, opts(s, s.tk, false), inputs.linear).unwrap();
        append_context(pipe, &mut cache, data, s, last);
        let request = OutputRequest {
            block_indices: true,
            ..OutputRequest::default()
        };
        let r = decode_step(pipe, &mut cache, data, s, last, request);
        assert_eq!(r.block_indices.as_deref(), Some(want), "{how}");
        let w = s.hq * s.dv;
        let got = &naive.out[last * w..s.tk * w];
        assert_close(&format!("last row, {how}"), &r.out, got, 1e-4);
    }
    want.to_vec()
}

#[test]
fn split_targets_move_the_work_not_the_results() {
    // A decode step (2 row groups) planned with split targets of 0 (no branch splits: its
    // key ranges are far below any adapter's key-tile cap) and of 12 (6 splits per row
    // group in every branch, where the defaults take more: as many as the key tiles, the
    // selected blocks or 32 allow), against the reference.
    let cfg = NsaConfig {
        window: 1000,
        ..NsaConfig::default()
    };
    let s = Shape::prefill(1, 12000, 8, 2, 16, 16);
    let targets = |n| nsa_wgpu::SplitTargets {
        compressed: n,
        compressed_mma: n,
        selected: n,
        window: n,
    };
    let (none, twelve) = (targets_pipeline(targets(0)), targets_pipeline(targets(12)));
    // The plans of that step split as told.
    let step = common::step_shape(1, s.tk, s.hq, s.hkv, s.dk, s.dv);
    let splits = |pipe: &NsaPipeline| -> Vec<u32> {
        let plan = Plan::new(&cfg, &step, &pipe.limits()).unwrap();
        let attn = [KernelId::CmpAttn, KernelId::SlcAttn, KernelId::WinAttn];
        attn.map(|k| {
            plan.steps
                .iter()
                .find(|st| st.kernel == k)
                .unwrap()
                .params
                .splits
        })
        .to_vec()
    };
    assert_eq!(splits(&none), [1, 1, 1]);
    assert_eq!(splits(&twelve), [6, 6, 6]);
    assert!(splits(pipeline()).iter().all(|&sp| sp > 6));
    let pipes = [(&none, "target 0"), (&twelve, "target 12")];
    last_step_matches_on(&pipes, &cfg, &s, &Data::new(&cfg, &s, false, 53));
}

/// [`pipeline`] with split targets `targets` (`NsaPipeline::set_split_targets`).
fn targets_pipeline(targets: nsa_wgpu::SplitTargets) -> NsaPipeline {
    let mut pipe = common::pipeline_like(pipeline());
    pipe.set_split_targets(targets);
    pipe
}

/// [`pipeline`] with split selections wherever calls have few rows
/// (`NsaPipeline::set_split_select`).
fn split_pipeline() -> &'static NsaPipeline {
    static PIPE: std::sync::OnceLock<NsaPipeline> = std::sync::OnceLock::new();
    PIPE.get_or_init(|| {
        let mut pipe = common::pipeline_like(pipeline());
        pipe.set_split_select(true);
        pipe
    })
}

/// [`pipeline`] on a new device of the same adapter that allows 256 invocations per
/// workgroup: `select_top.wgsl` then ranks with 256 rather than the most the adapter allows
/// (`select_top_invocations`).
fn narrow_pipeline() -> &'static NsaPipeline {
    static PIPE: std::sync::OnceLock<NsaPipeline> = std::sync::OnceLock::new();
    PIPE.get_or_init(|| {
        let pipe = pipeline_with_limits(wgpu::Limits {
            max_compute_invocations_per_workgroup: 256,
            max_compute_workgroup_size_x: 256,
            ..pipeline().context().device.limits()
        });
        assert_eq!(pipe.limits().max_invocations, 256);
        pipe
    })
}

/// One chunk per sequence of `owned` ([q, k, v, gates] rows): the keys and values of
/// positions `kv` (the whole sequence's rows), with the queries and gates when `attend`.
fn seq_chunks<'a>(
    owned: &'a [[Vec<f32>; 4]],
    s: &Shape,
    kv: std::ops::Range<usize>,
    attend: bool,
) -> Vec<SeqChunk<'a>> {
    let (kw, vw) = (s.hkv * s.dk, s.hkv * s.dv);
    all_chunks(owned, attend)
        .into_iter()
        .map(|c| SeqChunk {
            k: &c.k[kv.start * kw..kv.end * kw],
            v: &c.v[kv.start * vw..kv.end * vw],
            ..c
        })
        .collect()
}

/// Each sequence's `[q, k, v, gates]`: queries and gates of its rows from `from` on, keys and
/// values of all its rows (what [`seq_chunks`] cuts a context and a step from).
fn rows_from(data: &Data, s: &Shape, from: usize) -> Vec<[Vec<f32>; 4]> {
    let (kw, vw, qw, gw) = (s.hkv * s.dk, s.hkv * s.dv, s.hq * s.dk, s.hq * 3);
    (0..s.batch)
        .map(|b| {
            [
                rows(&data.q, s, b, from, s.tk, qw),
                rows(&data.k, s, b, 0, s.tk, kw),
                rows(&data.v, s, b, 0, s.tk, vw),
                rows(&data.gates, s, b, from, s.tk, gw),
            ]
        })
        .collect()
}

#[test]
fn timed_extends_write_what_extend_writes() {
    // The same context and step through three caches: plain (one pass), timed per pass, and
    // timed as a whole; outputs must agree exactly, and timings must be positive where the
    // adapter has timestamps.
    let pipe = pipeline();
    let cfg = small();
    let s = Shape::prefill(2, 301, 4, 2, 16, 16);
    let data = Data::new(&cfg, &s, false, 33);
    let last = s.tk - 1;
    let owned = rows_from(&data, &s, last);
    let timer = nsa_wgpu::profile::StepTimer::new(pipe.context(), 10 * s.batch);
    let mut results = Vec::new();
    for mode in 0..3 {
        let mut cache = NsaCache::new(pipe, &cfg, opts(&s, s.tk, false), None).expect("cache");
        let context = seq_chunks(&owned, &s, 0..last, false);
        pollster::block_on(pipe.append(&mut cache, &context)).expect("append");
        let step = seq_chunks(&owned, &s, last..s.tk, true);
        let req = OutputRequest::all();
        let out = match (mode, &timer) {
            (1, Some(t)) => {
                let (out, ms) =
                    pollster::block_on(pipe.extend_timed(&mut cache, &step, req, t)).unwrap();
                assert!(!ms.is_empty() && ms.iter().all(|(_, t)| *t >= 0.0));
                assert!(ms.iter().map(|(_, t)| t).sum::<f64>() > 0.0);
                out
            }
            (2, Some(t)) => {
                let (out, ms) =
                    pollster::block_on(pipe.extend_timed_whole(&mut cache, &step, req, t)).unwrap();
                assert!(ms > 0.0, "whole-pass time {ms}");
                out
            }
            _ => pollster::block_on(pipe.extend(&mut cache, &step, req)).unwrap(),
        };
        results.push(out);
    }
    for r in &results[1..] {
        for (a, b) in r.iter().zip(&results[0]) {
            assert_eq!(a.out, b.out);
            assert_eq!(a.block_indices, b.block_indices);
        }
    }
    // A timer too small for the plan is an error, not a panic.
    if let Some(t) = nsa_wgpu::profile::StepTimer::new(pipe.context(), 1) {
        let mut cache = NsaCache::new(pipe, &cfg, opts(&s, s.tk, false), None).expect("cache");
        let step = seq_chunks(&owned, &s, 0..1, true);
        let r =
            pollster::block_on(pipe.extend_timed(&mut cache, &step, OutputRequest::default(), &t));
        assert!(matches!(r, Err(NsaError::BadBuffer { .. })), "{r:?}");
    }
}

#[test]
fn timed_device_steps_write_what_encode_extend_writes() {
    // A context, then a chunk of 37 rows per sequence from GPU buffers through three caches:
    // encode_extend, and encode_extend_timed per pass and as a whole. The rows must agree bit
    // for bit (each written over NaN), and where the adapter has timestamps the timed passes
    // name their kernels and take positive time; a timer too small for the plan is an error.
    let pipe = pipeline();
    let cfg = small();
    let s = Shape::prefill(2, 301, 4, 2, 16, 16);
    let data = Data::new(&cfg, &s, false, 34);
    let (kw, vw, qw, gw) = (s.hkv * s.dk, s.hkv * s.dv, s.hq * s.dk, s.hq * 3);
    let (a, n) = (s.tk - 37, 37);
    let owned = rows_from(&data, &s, a);
    // The chunk's tensors, [seqs, n, ...], in GPU buffers.
    let cat = |i: usize, from: usize, w: usize| -> Vec<f32> {
        owned
            .iter()
            .flat_map(|o| o[i][from * w..].to_vec())
            .collect()
    };
    let p = Precision::F32;
    let q = input_buffer(pipe, &cat(0, 0, qw), p, false);
    let k = input_buffer(pipe, &cat(1, a, kw), p, false);
    let v = input_buffer(pipe, &cat(2, a, vw), p, false);
    let g = input_buffer(pipe, &cat(3, 0, gw), p, true);
    let timer = nsa_wgpu::profile::StepTimer::new(pipe.context(), 10 * s.batch);
    let device = &pipe.context().device;
    // The chunk ([q, k, v, gates]) as a step of `seqs` sequences writing into `out`.
    fn step_into<'a>(
        [q, k, v, g]: [&'a wgpu::Buffer; 4],
        out: &'a wgpu::Buffer,
        seqs: usize,
        tokens: usize,
    ) -> DeviceStep<'a> {
        DeviceStep {
            first_seq: 0,
            seqs,
            tokens,
            q: q.slice(..),
            k: k.slice(..),
            v: v.slice(..),
            gates: g.slice(..),
            out: out.slice(..),
            branch_kv: None,
            block_indices: None,
            branches: None,
        }
    }
    let mut results = Vec::new();
    for mode in 0..3 {
        let mut cache = NsaCache::new(pipe, &cfg, opts(&s, s.tk, false), None).expect("cache");
        let context = seq_chunks(&owned, &s, 0..a, false);
        pollster::block_on(pipe.append(&mut cache, &context)).expect("append");
        let out = sentinel_out(pipe, s.batch * n * s.hq * s.dv);
        let step = step_into([&q, &k, &v, &g], &out, s.batch, n);
        let mut enc = device.create_command_encoder(&Default::default());
        match (mode, &timer) {
            (1 | 2, Some(t)) => {
                let kernels = pollster::block_on(pipe.encode_extend_timed(
                    &mut enc,
                    &mut cache,
                    &step,
                    t,
                    mode == 2,
                ))
                .unwrap();
                let staging = t.resolve(pipe.context(), &mut enc, kernels.len());
                pipe.context().queue.submit([enc.finish()]);
                let ms =
                    pollster::block_on(nsa_wgpu::profile::StepTimer::read(pipe.context(), staging))
                        .unwrap();
                assert_eq!(ms.len(), kernels.len());
                assert!(
                    ms.iter().all(|t| *t >= 0.0) && ms.iter().sum::<f64>() > 0.0,
                    "{ms:?}"
                );
                if mode == 1 {
                    for k in [
                        KernelId::CmpAttn,
                        KernelId::Select,
                        KernelId::SlcAttn,
                        KernelId::WinAttn,
                    ] {
                        assert!(kernels.contains(&k), "{k:?} untimed: {kernels:?}");
                    }
                } else {
                    // One pass for the step's one plan (its compression and its rows).
                    assert_eq!(
                        kernels,
                        [KernelId::Compress],
                        "one pass, named by its first kernel"
                    );
                }
            }
            _ => {
                pollster::block_on(pipe.encode_extend(&mut enc, &mut cache, &step)).unwrap();
                pipe.context().queue.submit([enc.finish()]);
            }
        }
        assert_eq!(cache.lens(), &[s.tk, s.tk]);
        let got = read_f32(pipe, std::slice::from_ref(&out)).remove(0);
        assert!(
            got.iter().all(|x| x.is_finite()),
            "mode {mode}: unwritten rows"
        );
        results.push(got);
    }
    for (mode, r) in results.iter().enumerate().skip(1) {
        assert!(
            bit_equal(r, &results[0]),
            "mode {mode} differs from encode_extend"
        );
    }
    if let Some(t) = nsa_wgpu::profile::StepTimer::new(pipe.context(), 1) {
        let mut cache = NsaCache::new(pipe, &cfg, opts(&s, s.tk, false), None).expect("cache");
        let out = sentinel_out(pipe, s.batch * n * s.hq * s.dv);
        let step = step_into([&q, &k, &v, &g], &out, s.batch, n);
        let mut enc = device.create_command_encoder(&Default::default());
        let r =
            pollster::block_on(pipe.encode_extend_timed(&mut enc, &mut cache, &step, &t, false));
        assert!(matches!(r, Err(NsaError::BadBuffer { .. })), "{r:?}");
        assert_eq!(cache.lens(), &[0, 0], "a failed call appends nothing");
    }
}

#[test]
fn split_selection_ranks_ties_to_the_lower_block() {
    // One decode step over 8999 cached tokens splits the selection of its 282 blocks in two
    // (chunks of 127, one split taking the third; full candidate lists: 2 free slots) and
    // merges the candidates, or ranks all of them in one workgroup (select_top.wgsl, from
    // block sums: the default), and splits the compressed branch's 1124 tokens into 18
    // parts (more than one batch of the merge's loads). With every key equal, every whole
    // block scores the same (each one's probabilities are the same numbers added in the
    // same order), so both must keep the lowest-numbered ones, exactly as the reference
    // does.
    let cfg = small();
    let s = Shape::prefill(1, 9000, 4, 2, 8, 8);
    let mut data = Data::new(&cfg, &s, false, 41);
    data.k = (0..data.k.len()).map(|i| 0.25 * (i % 8) as f32).collect();
    // The step's selection does split, or rank in one workgroup (else the tie rules go
    // untested).
    let rows = nsa_wgpu::plan::CacheRows {
        capacity: 9000,
        cmp_capacity: cfg.num_compressed(9000),
        ..Default::default()
    };
    let step = common::step_shape(1, 9000, 4, 2, 8, 8);
    for (pipe, kernel, splits) in [
        (pipeline(), KernelId::SelectTop, 1),
        (split_pipeline(), KernelId::Select, 2),
    ] {
        let plan = Plan::cached(&cfg, &step, &pipe.limits(), rows, Precision::F32).expect("plan");
        let select = plan.steps.iter().find(|st| st.kernel == kernel);
        assert_eq!(select.map(|st| st.params.splits), Some(splits));
    }
    let chosen = last_step_matches_the_reference(&cfg, &s, &data);
    // The reference picks blocks 0, 1, 2 (lowest free ones) and the forced ones.
    assert_eq!(&chosen[..cfg.top_n], &[0, 1, 2, 280, 281]);
}

#[test]
fn select_top_ranks_distinct_and_tied_scores() {
    // Decode steps over 8200-9000 cached tokens (257-282 blocks: enough that a selection
    // would split) rank in one workgroup (select_top.wgsl's radix select). Random keys give
    // distinct scores, 6 and 18 free slots; with every key equal every whole block scores
    // the same, and 37 free slots must go to the lowest-numbered of the 254 candidates
    // (split_selection_ranks_ties_to_the_lower_block has 2 free slots among 280).
    for (tk, top_n, equal) in [(9000, 8, false), (8300, 21, false), (8200, 40, true)] {
        let cfg = NsaConfig { top_n, ..small() };
        let s = Shape::prefill(1, tk, 4, 2, 8, 8);
        let mut data = Data::new(&cfg, &s, false, 43 + top_n as u64);
        if equal {
            data.k = (0..data.k.len()).map(|i| 0.25 * (i % 8) as f32).collect();
        }
        let rows = nsa_wgpu::plan::CacheRows {
            capacity: tk,
            cmp_capacity: cfg.num_compressed(tk),
            ..Default::default()
        };
        let step = common::step_shape(1, tk, 4, 2, 8, 8);
        let plan =
            Plan::cached(&cfg, &step, &pipeline().limits(), rows, Precision::F32).expect("plan");
        assert!(
            plan.steps.iter().any(|st| st.kernel == KernelId::SelectTop),
            "{tk} tokens, n = {top_n}: the step ranks in one workgroup"
        );
        let chosen = last_step_matches_the_reference(&cfg, &s, &data);
        if equal {
            // Block 0 and the last two (255, 256) are forced; the free slots go to 1, 2, ...
            let want: Vec<i32> = (0..top_n as i32 - 2).chain([255, 256]).collect();
            assert_eq!(&chosen[..top_n], &want[..], "n = {top_n}");
        }
    }
}

#[test]
fn decode_steps_with_no_free_slots() {
    // n = init + local: every slot goes to a forced block, and the 280 candidates compete
    // for none (select_top.wgsl ranks nothing; the split selections keep empty lists).
    let cfg = NsaConfig {
        top_n: 3,
        ..small()
    };
    let s = Shape::prefill(1, 9000, 4, 2, 8, 8);
    let chosen = last_step_matches_the_reference(&cfg, &s, &Data::new(&cfg, &s, false, 47));
    assert_eq!(&chosen[..cfg.top_n], &[0, 280, 281]);
}

/// One chunk per sequence of `owned` ([q, k, v, gates] rows, then the six per-branch
/// tensors where there are), with the queries and gates when `attend`.
fn all_chunks<T: AsRef<[Vec<f32>]>>(owned: &[T], attend: bool) -> Vec<SeqChunk<'_>> {
    owned
        .iter()
        .enumerate()
        .map(|(seq, o)| {
            let o = o.as_ref();
            SeqChunk {
                seq,
                q: if attend { &o[0] } else { &[] },
                k: &o[1],
                v: &o[2],
                gates: if attend { &o[3] } else { &[] },
                branch_kv: (o.len() == 10).then(|| [&o[4][..], &o[5], &o[6], &o[7], &o[8], &o[9]]),
            }
        })
        .collect()
}

/// One ragged case: sequences of lengths `lens` (`hq`, `hkv` heads of `dk` dims, per-branch
/// K/V when `branch`) decode together through one cache: `steps` single-row steps, then a
/// chunk of `tail` rows each, every call for all sequences, each attending in `chains`
/// chains of dispatches (0: each step in as many as the bindings need, [`binding_chains`],
/// the tail in at least as many). With `cut` > 0 (at most `steps + tail`), each sequence's
/// context is followed by `cut` rows of other values that the cache then drops again
/// (`NsaCache::truncate`) before the steps.
#[derive(Clone, Copy)]
struct Ragged<'a> {
    cfg: NsaConfig,
    branch: bool,
    heads: (usize, usize, usize),
    lens: &'a [usize],
    steps: usize,
    tail: usize,
    chains: usize,
    cut: usize,
}

/// How many of `c`'s sequences' cached keys (or values: a [`Ragged`] case has Dk = Dv),
/// `capacity` rows each stored at `precision`, one of `pipe`'s bindings holds (0: not even
/// one), counted in 4-byte words as the plan counts them.
fn seqs_per_binding(pipe: &NsaPipeline, capacity: usize, c: &Ragged, precision: Precision) -> u64 {
    let (l, (_, hkv, d)) = (pipe.limits(), c.heads);
    let words = ((capacity * hkv * d) as u64 * precision.bytes()).div_ceil(4);
    (l.max_storage_binding - l.storage_align) / 4 / words
}

/// The chains of dispatches a ragged call of `c`'s sequences attends in where only the
/// adapter's binding size splits it: as many sequences share a chain as one binding holds
/// ([`seqs_per_binding`]), at most `RAGGED_MAX`. On llvmpipe (128 MiB bindings) two f32
/// sequences of 50,208 rows at Hkv = 3, D = 192 take two.
fn binding_chains(pipe: &NsaPipeline, capacity: usize, c: &Ragged, precision: Precision) -> usize {
    let fit = seqs_per_binding(pipe, capacity, c, precision);
    c.lens
        .len()
        .div_ceil(fit.clamp(1, nsa_wgpu::RAGGED_MAX as u64) as usize)
}

/// The inputs of a [`Ragged`] case: every sequence padded to the longest's end.
struct RaggedData {
    shape: Shape,
    data: Data,
}

impl RaggedData {
    fn new(c: &Ragged) -> Self {
        let (hq, hkv, dk) = c.heads;
        let t = c.lens.iter().max().unwrap() + c.steps + c.tail;
        let shape = Shape::prefill(c.lens.len(), t, hq, hkv, dk, dk);
        let data = Data::new(&c.cfg, &shape, c.branch, 41);
        RaggedData { shape, data }
    }

    /// Positions `[a, e)` of sequence `b`: q, k, v, gates, then the six per-branch tensors
    /// where there are.
    fn seq(&self, b: usize, a: usize, e: usize) -> Vec<Vec<f32>> {
        let (s, d) = (&self.shape, &self.data);
        let widths = [s.hq * s.dk, s.hkv * s.dk, s.hkv * s.dv, s.hq * 3];
        let mut t: Vec<Vec<f32>> = [&d.q, &d.k, &d.v, &d.gates]
            .iter()
            .zip(widths)
            .map(|(x, w)| rows(x, s, b, a, e, w))
            .collect();
        for br in d.branch.iter().flatten() {
            t.push(rows(br, s, b, a, e, widths[1]));
        }
        t
    }

    /// `c`'s calls through `cache` (stored at `precision`: its steps, then its tail, every
    /// sequence in each call), each sequence's outputs in call order. Where the adapter has
    /// timestamps, each call must attend in `c.chains` chains (where that is 0, each step in
    /// [`binding_chains`], the tail in at least as many).
    fn steps(
        &self,
        pipe: &NsaPipeline,
        cache: &mut NsaCache,
        c: &Ragged,
        precision: Precision,
        req: OutputRequest,
        name: &str,
    ) -> Vec<Vec<NsaOutputs>> {
        let timer = nsa_wgpu::profile::StepTimer::new(pipe.context(), 64);
        let mut got: Vec<Vec<NsaOutputs>> = c.lens.iter().map(|_| Vec::new()).collect();
        for (i, n) in std::iter::repeat_n(1, c.steps).chain([c.tail]).enumerate() {
            let at = |b: usize| c.lens[b] + i.min(c.steps);
            let owned: Vec<_> = (0..c.lens.len())
                .map(|b| self.seq(b, at(b), at(b) + n))
                .collect();
            let step = all_chunks(&owned, true);
            let out = match &timer {
                Some(tm) => {
                    let (out, ms) =
                        pollster::block_on(pipe.extend_timed(cache, &step, req, tm)).unwrap();
                    // Runs of equal length compress first; one chain attends for up to 64.
                    let attn = ms.iter().filter(|(k, _)| *k == KernelId::CmpAttn).count();
                    if c.chains > 0 {
                        assert_eq!(attn, c.chains, "{name} step {i}: {ms:?}");
                    } else {
                        // The tail's rows may split it further (partials, kept scores).
                        let bound = binding_chains(pipe, cache.capacity(), c, precision);
                        let ok = if n == 1 { attn == bound } else { attn >= bound };
                        assert!(ok, "{name} step {i}: {bound} chains expected: {ms:?}");
                    }
                    out
                }
                None => pollster::block_on(pipe.extend(cache, &step, req)).unwrap(),
            };
            for (b, o) in out.into_iter().enumerate() {
                got[b].push(o);
            }
        }
        got
    }

    /// A cache at `precision` (room for 16 rows at first, so that it grows) holding each
    /// sequence's keys and values before its first step.
    fn cache(&self, pipe: &NsaPipeline, precision: Precision, c: &Ragged) -> NsaCache {
        let o = CacheOptions {
            precision,
            ..opts(&self.shape, 16.min(self.shape.tk), c.branch)
        };
        let linear = self.data.inputs().linear;
        let mut cache = NsaCache::new(pipe, &c.cfg, o, linear).unwrap();
        let context: Vec<_> = (0..c.lens.len())
            .map(|b| self.seq(b, 0, c.lens[b]))
            .collect();
        // (A sequence without context gets its first rows from the steps.)
        let context: Vec<_> = all_chunks(&context, false)
            .into_iter()
            .filter(|c| !c.k.is_empty())
            .collect();
        pollster::block_on(pipe.append(&mut cache, &context)).unwrap();
        if c.cut > 0 {
            // The next `cut` rows' values scaled by -1.7, appended and dropped again.
            let junk: Vec<Vec<Vec<f32>>> = (0..c.lens.len())
                .map(|b| {
                    let rows = self.seq(b, c.lens[b], c.lens[b] + c.cut);
                    rows.iter()
                        .map(|t| t.iter().map(|x| -1.7 * x).collect())
                        .collect()
                })
                .collect();
            pollster::block_on(pipe.append(&mut cache, &all_chunks(&junk, false))).unwrap();
            for (b, &l) in c.lens.iter().enumerate() {
                cache.truncate(b, l).unwrap();
            }
        }
        cache
    }
}

/// Runs `c`: each sequence's rows must equal its own plain prefill, every compressed token
/// must be computed once (those of blocks that dropped rows completed, twice), and (where the adapter has timestamps) each call must attend in
/// `c.chains` chains.
fn check_ragged(c: Ragged) {
    check_ragged_at(pipeline(), Precision::F32, 1e-4, c);
}

/// [`check_ragged`] on `pipe` with inputs and cache stored at `precision`, the rows within
/// `tol` of each sequence's prefill at the same precision.
fn check_ragged_at(pipe: &NsaPipeline, precision: Precision, tol: f64, c: Ragged) {
    let (cfg, (hq, hkv, _), lens) = (c.cfg, c.heads, c.lens);
    let r = RaggedData::new(&c);
    let (s, linear) = (r.shape, r.data.inputs().linear);
    let seq = |b: usize, a: usize, e: usize| r.seq(b, a, e);
    let mut cache = r.cache(pipe, precision, &c);
    let req = OutputRequest::all();
    let name = format!("{hq}/{hkv} {:?} branch {}", cfg.compression, c.branch);
    let mut got = r.steps(pipe, &mut cache, &c, precision, req, &name);
    let mut cmp_total = 0;
    for (b, &l) in lens.iter().enumerate() {
        let end = l + c.steps + c.tail;
        let all = seq(b, 0, end);
        let shape = Shape::prefill(1, end, s.hq, s.hkv, s.dk, s.dv);
        let mut inputs = nsa_wgpu::NsaInputs::new(&all[0], &all[1], &all[2], &all[3]);
        if c.branch {
            common::set_branch_kv(&mut inputs, &all[4..]);
        }
        inputs.linear = linear;
        let alone = pollster::block_on(pipe.run_with(&cfg, &shape, &inputs, req, precision));
        let alone = alone.unwrap();
        let part = nsa_wgpu::cache::concat(std::mem::take(&mut got[b]), req);
        let (ow, iw) = (s.hq * s.dv, s.hkv * cfg.top_n);
        let name = format!("{name} {precision:?} seq {b} (length {l})");
        assert_close(&name, &part.out, &alone.out[l * ow..end * ow], tol);
        let idx = alone.block_indices.unwrap();
        assert_eq!(
            part.block_indices.unwrap(),
            &idx[l * iw..end * iw],
            "{name}"
        );
        let (a, r) = (part.branches.unwrap(), alone.branches.unwrap());
        assert_close(&name, &a.o_cmp, &r.o_cmp[l * ow..end * ow], tol);
        assert_close(&name, &a.o_slc, &r.o_slc[l * ow..end * ow], tol);
        assert_close(&name, &a.o_win, &r.o_win[l * ow..end * ow], tol);
        // Blocks the dropped rows completed were computed, and are computed again.
        cmp_total +=
            cfg.num_compressed(end) + cfg.num_compressed(l + c.cut) - cfg.num_compressed(l);
    }
    assert_eq!(
        cache.compressed_tokens(),
        cmp_total as u64,
        "{name}: each block once (and again after a truncation)"
    );
}

/// Seven sequences of different lengths (one a single token, one empty): four decode steps,
/// then a chunk of three rows, attending in `chains` chains.
fn seven_ragged(
    cfg: NsaConfig,
    branch: bool,
    heads: (usize, usize, usize),
    chains: usize,
) -> Ragged<'static> {
    Ragged {
        cfg,
        branch,
        heads,
        lens: &[50, 203, 1, 0, 130, 129, 77],
        steps: 4,
        tail: 3,
        chains,
        cut: 0,
    }
}

#[test]
fn ragged_batch_steps_in_one_plan_equal_each_sequence_alone() {
    // Group 2 (split selection over 2 kv heads) and 16 (split attention over one head's 16
    // rows), seven lengths, one a single token and one empty; Mean with shared K/V, and Linear
    // with per-branch K/V.
    let linear = NsaConfig {
        compression: Compression::Linear,
        ..small()
    };
    for (cfg, branch) in [(small(), false), (linear, true)] {
        for heads in [(4, 2, 16), (16, 1, 32)] {
            check_ragged(seven_ragged(cfg, branch, heads, 1));
        }
    }
}

#[test]
fn f16_ragged_batch_steps_equal_each_sequence_alone() {
    let linear = NsaConfig {
        compression: Compression::Linear,
        ..small()
    };
    for pipe in f16_pipelines() {
        for (cfg, branch, heads) in [(small(), false, (16, 1, 32)), (linear, true, (4, 2, 16))] {
            let c = Ragged {
                cfg,
                branch,
                heads,
                lens: &[50, 203, 1, 0, 130],
                steps: 3,
                tail: 3,
                chains: 1,
                // Two rows of other values, appended after the context and dropped again.
                cut: 2,
            };
            check_ragged_at(pipe, Precision::F16, 5e-3, c);
        }
    }
}

#[test]
fn seventy_ragged_sequences_take_two_chains() {
    // At most RAGGED_MAX (64) sequences of different lengths share a plan; pairs of equal
    // lengths compress together.
    let lens: Vec<usize> = (0..70).map(|i| 1 + (i / 2 * 13) % 90).collect();
    let case = Ragged {
        cfg: small(),
        branch: false,
        heads: (4, 1, 8),
        lens: &lens,
        steps: 1,
        tail: 2,
        chains: 2,
        cut: 0,
    };
    check_ragged(case);
    // From GPU buffers the second plan's rows (and selected blocks) go to the caller's
    // buffers after the first's.
    check_device_steps(pipeline(), Precision::F32, case);
}

/// A pipeline on a new device of the best adapter whose storage bindings hold at most
/// `bytes` (far below any adapter's own limit), so that caches and plans must split across
/// bindings at test sizes.
fn pipeline_with_binding_limit(bytes: u64) -> NsaPipeline {
    let pipe = pipeline_with_limits(wgpu::Limits {
        max_storage_buffer_binding_size: bytes,
        ..pipeline().context().device.limits()
    });
    assert_eq!(pipe.limits().max_storage_binding, bytes);
    pipe
}

#[test]
fn linear_weights_past_a_binding_are_exceeds_limit() {
    // A cache uploads Linear's weights whole and the compression binds them whole: W_k of
    // one kv head x 64 x 24 x 24 in f32 is 144 KiB, past a 32 KiB binding. The cache's
    // creation says so (before, the upload failed wgpu's validation and came back as a
    // `Gpu` error; tests/plan holds the plans' twin check), and at 8 x 8 (16 KiB) they fit.
    let pipe = pipeline_with_binding_limit(32 << 10);
    let cfg = NsaConfig {
        cmp_block: 64,
        cmp_stride: 16,
        sel_block: 64,
        compression: Compression::Linear,
        ..small()
    };
    let shape = Shape::prefill(1, 100, 2, 1, 24, 8);
    let data = Data::new(&cfg, &shape, false, 3);
    let linear = data.inputs().linear;
    let err = NsaCache::new(&pipe, &cfg, opts(&shape, 100, false), linear).expect_err("cache");
    assert!(
        matches!(&err, NsaError::ExceedsLimit { what, needed, limit }
            if what.contains("W_k or W_v") && *needed == 64 * 24 * 24 * 4 && *limit == 32 << 10),
        "{err}"
    );
    let fits = Shape::prefill(1, 100, 2, 1, 8, 8);
    let data = Data::new(&cfg, &fits, false, 3);
    NsaCache::new(&pipe, &cfg, opts(&fits, 100, false), data.inputs().linear).expect("fits");
}

#[test]
fn caches_past_one_binding_equal_each_sequence_alone() {
    // With 64 KiB bindings each cached sequence (up to 406 rows of 128 bytes per tensor)
    // fits one binding but the cache (seven of them) does not: every call binds each
    // sequence's own window of the cache, and the new rows go in by copies (the append
    // kernel binds whole cached tensors). The prefills the rows are held against split
    // their queries over bindings too. f32, and f16 where the adapter has it (on its
    // tensor cores where it has them).
    let pipe = pipeline_with_binding_limit(64 << 10);
    let linear = NsaConfig {
        compression: Compression::Linear,
        ..small()
    };
    let cases = [
        (small(), false, (4, 2, 16), 4),
        (linear, true, (16, 1, 32), 4),
    ];
    for (cfg, branch, heads, chains) in cases {
        let c = seven_ragged(cfg, branch, heads, chains);
        let cache = RaggedData::new(&c).cache(&pipe, Precision::F32, &c);
        let bytes = cache.key_value_buffers()[0].size();
        assert!(bytes > 64 << 10 && bytes < 4 << 20, "{bytes}");
        check_ragged_at(&pipe, Precision::F32, 1e-4, c);
        check_device_steps(&pipe, Precision::F32, c);
        // f16 rows (half the bytes: half the chains); windows start at whole 8-element units
        // (binding_unit).
        if pipe.supports(Precision::F16) {
            let c = Ragged {
                chains: chains / 2,
                ..c
            };
            check_ragged_at(&pipe, Precision::F16, 5e-3, c);
        }
    }
}

#[test]
fn random_ragged_batches_equal_each_sequence_alone() {
    // Seeded random configs, head shapes and lengths (zero included) through the ragged path,
    // from host slices and from GPU buffers: compression blocks and strides, selection
    // blocks, top-n with forced blocks, windows, Mean and Linear, shared and per-branch K/V.
    use rand::Rng;
    let (mut rng, cases) = common::sweep("random ragged", 0x7261_6767, 8);
    for _ in 0..cases {
        let cfg = random_config(&mut rng, &[1, 2, 4, 8], &[1, 7, 24]);
        let hkv = rng.random_range(1..=2);
        let g = pick(&mut rng, &[1, 3, 16]);
        let lens: Vec<usize> = (0..rng.random_range(2..=6))
            .map(|_| rng.random_range(0..=120))
            .collect();
        let case = Ragged {
            cfg,
            branch: rng.random_bool(0.5),
            heads: (hkv * g, hkv, pick(&mut rng, &[8, 12, 20])),
            lens: &lens,
            steps: 2,
            tail: rng.random_range(1..=5),
            // Lengths may all be equal (then the plain plan) or differ (one ragged one).
            chains: 1,
            cut: rng.random_range(0..=2),
        };
        check_ragged(case);
        // The same steps from GPU buffers write the same rows.
        check_device_steps(pipeline(), Precision::F32, case);
    }
}

#[test]
fn ragged_steps_match_the_naive_nsa() {
    // check_ragged_everywhere (which holds the long random caches below) at a size
    // lavapipe runs in seconds: three lengths (one empty), per-branch K/V, dropped rows.
    let c = Ragged {
        cfg: NsaConfig {
            compression: Compression::Linear,
            ..small()
        },
        branch: true,
        heads: (8, 2, 16),
        lens: &[300, 41, 0],
        steps: 3,
        tail: 9,
        chains: 1,
        cut: 2,
    };
    check_ragged_everywhere(c);
}

#[test]
#[ignore = "caches of up to 64k tokens: minutes on a GPU; run with --ignored"]
fn random_long_caches_equal_each_sequence_alone() {
    // The ragged path at the lengths the library is held to: random configs with many
    // blocks (common::random_64k_config), 1 to 3 sequences of 2k to 64k tokens in a cache
    // that starts at 16 rows and grows, three decode steps and a chunk of up to 70 rows,
    // sometimes per-branch K/V and rows appended and dropped again; f32, and f16 on every
    // f16 pipeline, against the naive NSA (check_ragged_everywhere).
    use rand::Rng;
    let (mut rng, cases) = common::sweep("random long caches", 0x6c63_6163, 2);
    for case in 0..cases {
        let cfg = common::random_64k_config(&mut rng);
        let hkv = rng.random_range(1..=4);
        let dk = pick(&mut rng, &[8, 16, 38, 64, 128, 192]);
        let lens: Vec<usize> = (0..rng.random_range(1..=3))
            .map(|_| rng.random_range(2048..=65400))
            .collect();
        // At most 2^26 query elements, so that drawing the inputs takes seconds.
        let room = (1 << 26) / (lens.len() * 65536 * hkv * dk);
        let group = pick(&mut rng, &[1, 2, 4, 16]).min(room.max(1));
        let c = Ragged {
            cfg,
            branch: rng.random_bool(0.2),
            heads: (hkv * group, hkv, dk),
            lens: &lens,
            steps: 3,
            tail: rng.random_range(1..=70),
            chains: 0,
            cut: rng.random_range(0..=2),
        };
        println!(
            "random long cache {case}: {cfg:?} heads {:?} lengths {lens:?}",
            c.heads
        );
        check_ragged_everywhere(c);
    }
}

/// `c`'s calls through a cache at f32 on the default pipeline and at f16 on every f16
/// pipeline ([`check_ragged_against_naive`]), on one set of inputs, the naive NSA computed
/// once per precision (the f16 pipelines' rounded inputs are the same): at 64k it takes
/// most of the time. A precision at which one sequence's keys do not fit the adapter's
/// bindings (a `Plan` error, `ExceedsLimit`, tested on its own) is left out, and says so.
fn check_ragged_everywhere(c: Ragged) {
    let r = RaggedData::new(&c);
    // The cache's capacity grows to r.shape.tk rows at most (its max_capacity).
    let fits = |pipe: &NsaPipeline, precision: Precision| {
        let fit = seqs_per_binding(pipe, r.shape.tk, &c, precision) > 0;
        if !fit {
            println!(
                "{precision:?}: one sequence's keys exceed the adapter's {}-byte bindings: left out",
                pipe.limits().max_storage_binding
            );
        }
        fit
    };
    if fits(pipeline(), Precision::F32) {
        let want = naive_rows(&r, &c, false);
        check_ragged_against_naive(pipeline(), Precision::F32, 1e-4, &r, &want, c);
    }
    let pipes: Vec<_> = f16_pipelines()
        .into_iter()
        .filter(|p| fits(p, Precision::F16))
        .collect();
    if !pipes.is_empty() {
        let want = naive_rows(&r, &c, true);
        for pipe in pipes {
            check_ragged_against_naive(pipe, Precision::F16, 1e-2, &r, &want, c);
        }
    }
}

/// Each sequence's rows of `c` by the naive NSA on its tokens up to them (inputs rounded to
/// f16 with `f16`), with the shape of those rows; the sequences on threads of their own.
fn naive_rows(
    r: &RaggedData,
    c: &Ragged,
    f16: bool,
) -> Vec<(Shape, nsa_wgpu::cpu::naive::NaiveOutputs)> {
    let s = r.shape;
    let round = |x: &[f32]| {
        if f16 {
            common::f16_round(x)
        } else {
            x.to_vec()
        }
    };
    let seqs: Vec<(usize, usize)> = c.lens.iter().copied().enumerate().collect();
    common::par_map(&seqs, |&(b, l)| {
        let end = l + c.steps + c.tail;
        let all = r.seq(b, 0, end);
        // The queries and gates of the rows; keys and values (and per-branch ones) up
        // to them.
        let q = round(&all[0][l * s.hq * s.dk..]);
        let kv: Vec<Vec<f32>> = all[1..3]
            .iter()
            .chain(&all[4..])
            .map(|x| round(x))
            .collect();
        let mut inputs = nsa_wgpu::NsaInputs::new(&q, &kv[0], &kv[1], &all[3][l * s.hq * 3..]);
        if c.branch {
            common::set_branch_kv(&mut inputs, &kv[2..]);
        }
        inputs.linear = r.data.inputs().linear;
        let part = Shape {
            batch: 1,
            tq: end - l,
            tk: end,
            ..s
        };
        let naive = nsa_wgpu::cpu::naive::nsa(&c.cfg, &part, &inputs).expect("naive");
        (part, naive)
    })
}

/// `c`'s calls through a cache on `pipe` at `precision`, each sequence's rows held against
/// `want`, the naive NSA on its tokens up to them ([`naive_rows`]; common::check_rows:
/// selections equal up to near ties, at f16's precision for f16; outputs within `tol` where
/// they are), rather than against its prefill on the GPU: with thousands of blocks per
/// query, the two paths' f32 sums may order a near tie differently.
fn check_ragged_against_naive(
    pipe: &NsaPipeline,
    precision: Precision,
    tol: f64,
    r: &RaggedData,
    want: &[(Shape, nsa_wgpu::cpu::naive::NaiveOutputs)],
    c: Ragged,
) {
    let s = r.shape;
    let mut cache = r.cache(pipe, precision, &c);
    let req = OutputRequest {
        block_indices: true,
        branches: false,
    };
    let name = format!("{:?} {s:?} {precision:?}", c.cfg);
    let mut got = r.steps(pipe, &mut cache, &c, precision, req, &name);
    let f16 = precision == Precision::F16;
    let mut tally = common::RowTally::default();
    for (b, (part, naive)) in want.iter().enumerate() {
        let rows = nsa_wgpu::cache::concat(std::mem::take(&mut got[b]), req);
        let idx = rows.block_indices.expect("block indices");
        common::check_rows(&mut tally, &c.cfg, part, naive, (&rows.out, &idx), f16);
    }
    let core = common::core_of(pipe);
    tally.assert_within(&format!("{name} ({core})"), f16, tol);
}

/// A lost device (here destroyed) makes every call an error that says so, never a panic in
/// wgpu's default error handler: prefill, dense attention, cache steps, growth and creation,
/// and new pipelines on a device this crate made ([`NsaError::DeviceLost`]), and a run on a
/// caller's device, whose loss the crate is not told of (the readback fails).
#[test]
fn a_lost_device_is_an_error_not_a_panic() {
    let ctx = pollster::block_on(nsa_wgpu::GpuContext::new()).expect("adapter");
    let theirs = nsa_wgpu::GpuContext::from_device(
        ctx.device.clone(),
        ctx.queue.clone(),
        ctx.adapter_info.clone(),
    );
    let pipe = pollster::block_on(NsaPipeline::new(&ctx)).expect("pipeline");
    let other = pollster::block_on(NsaPipeline::new(&theirs)).expect("pipeline");
    let cfg = small();
    let s = Shape::prefill(1, 40, 2, 1, 8, 8);
    let data = Data::new(&cfg, &s, false, 5);
    let rows = seq_rows(&data, &s, 0, 10);
    let mut cache = NsaCache::new(&pipe, &cfg, opts(&s, 16, false), None).unwrap();
    let run = |p: &NsaPipeline| p.run_blocking(&cfg, &s, &data.inputs(), OutputRequest::default());
    let dense = || pollster::block_on(pipe.dense_attention(&s, None, &data.q, &data.k, &data.v));
    let mut extend = || {
        pollster::block_on(pipe.extend(&mut cache, &[rows_chunk(&rows)], OutputRequest::default()))
    };
    assert!(run(&pipe).is_ok() && run(&other).is_ok() && dense().is_ok());
    assert!(extend().is_ok());
    assert_eq!(ctx.lost(), None);
    ctx.device.destroy();
    let lost = |r: nsa_wgpu::error::Result<()>| match r {
        Err(NsaError::DeviceLost(why)) => assert!(why.contains("Destroyed"), "{why}"),
        other => panic!("expected DeviceLost, got {other:?}"),
    };
    lost(run(&pipe).map(drop));
    lost(dense().map(drop));
    lost(extend().map(drop));
    lost(cache.reserve(&pipe, 32));
    lost(NsaCache::new(&pipe, &cfg, opts(&s, 16, false), None).map(drop));
    lost(pollster::block_on(NsaPipeline::new(&ctx)).map(drop));
    assert_eq!(
        theirs.lost(),
        None,
        "a caller's device keeps its own callback"
    );
    let r = run(&other).map(drop);
    assert!(matches!(r, Err(NsaError::Readback(_))), "{r:?}");
}

/// A wgpu error outside any error scope on a device this crate made (here a buffer over the
/// device's limit, made by the caller; a buffer the device has no memory for is reported
/// the same way) is an error of the crate's next call, never a panic in wgpu's default
/// handler; it is reported once, and the calls after it work. A cache whose creation,
/// growth or sequence copy meets one is left as it was.
#[test]
fn errors_outside_the_crates_scopes_are_errors_not_panics() {
    let ctx = pollster::block_on(nsa_wgpu::GpuContext::new()).expect("adapter");
    let pipe = pollster::block_on(NsaPipeline::new(&ctx)).expect("pipeline");
    let cfg = small();
    let s = Shape::prefill(2, 40, 2, 1, 8, 8);
    let data = Data::new(&cfg, &s, false, 5);
    let mut cache = NsaCache::new(&pipe, &cfg, opts(&s, 16, false), None).unwrap();
    let context = seq_rows(&data, &s, 0, 12);
    let c = SeqChunk::keys_values(0, &context[1], &context[2]);
    pollster::block_on(pipe.append(&mut cache, &[c])).unwrap();
    let escape = || {
        drop(ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("too large"),
            size: ctx.device.limits().max_buffer_size + 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        }))
    };
    let escaped = |r: nsa_wgpu::error::Result<()>| match r {
        Err(NsaError::Gpu(e)) => assert!(e.contains("too large"), "{e}"),
        other => panic!("expected the escaped error, got {other:?}"),
    };
    let run = || {
        pipe.run_blocking(&cfg, &s, &data.inputs(), OutputRequest::default())
            .map(drop)
    };
    escape();
    escaped(run());
    assert!(run().is_ok(), "reported once");
    escape();
    escaped(NsaCache::new(&pipe, &cfg, opts(&s, 16, false), None).map(drop));
    escape();
    escaped(cache.reserve(&pipe, 32));
    assert_eq!(cache.capacity(), 16, "growth changed nothing");
    escape();
    escaped(cache.copy_sequence(&pipe, 0, 1));
    assert_eq!(cache.lens(), &[12, 0], "the copy changed nothing");
    escape();
    escaped(pipe.scratch(&pipe.plan(&cfg, &s).unwrap()).map(drop));
    // The cache goes on.
    let step = seq_rows(&data, &s, 12, 13);
    let got =
        pollster::block_on(pipe.extend(&mut cache, &[rows_chunk(&step)], OutputRequest::default()));
    assert!(got.is_ok(), "{got:?}");
}

/// `values` as a cache of `precision` stores them (f16 or f32; `f32_only`: always f32, as
/// gates are).
fn stored_bytes(values: &[f32], precision: Precision, f32_only: bool) -> Vec<u8> {
    if precision == Precision::F16 && !f32_only {
        values
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect()
    } else {
        bytemuck::cast_slice(values).to_vec()
    }
}

/// A buffer holding `bytes`, with the usages a [`DeviceStep`] input needs.
fn bytes_buffer(pipe: &NsaPipeline, bytes: &[u8]) -> wgpu::Buffer {
    use wgpu::util::DeviceExt;
    let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::STORAGE;
    pipe.context()
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("test.step input"),
            contents: bytes,
            usage,
        })
}

/// A buffer holding `values` as a cache of `precision` stores them (see [`stored_bytes`]).
fn input_buffer(
    pipe: &NsaPipeline,
    values: &[f32],
    precision: Precision,
    f32_only: bool,
) -> wgpu::Buffer {
    bytes_buffer(pipe, &stored_bytes(values, precision, f32_only))
}

/// Bytes of junk before each tensor that [`packed_inputs`] puts into one buffer.
const PACK_GAP: usize = 12;

/// NaN floats before and after the rows of a step whose `out` is a slice of a larger buffer.
const OUT_PAD: usize = 3;

/// One buffer holding `tensors` one after another, each after [`PACK_GAP`] bytes of junk
/// (NaN bits), and each one's range in it.
fn packed_inputs(
    pipe: &NsaPipeline,
    tensors: &[Vec<u8>],
) -> (wgpu::Buffer, Vec<std::ops::Range<u64>>) {
    let mut bytes = Vec::new();
    let mut ranges = Vec::new();
    for t in tensors {
        bytes.resize(bytes.len().next_multiple_of(4) + PACK_GAP, 0xff);
        ranges.push(bytes.len() as u64..(bytes.len() + t.len()) as u64);
        bytes.extend_from_slice(t);
    }
    (bytes_buffer(pipe, &bytes), ranges)
}

/// An output buffer of `len` f32 filled with NaN (so an unwritten element fails).
fn sentinel_out(pipe: &NsaPipeline, len: usize) -> wgpu::Buffer {
    use wgpu::util::DeviceExt;
    pipe.context()
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("test.step out"),
            contents: bytemuck::cast_slice(&vec![f32::NAN; len]),
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        })
}

/// Reads `bufs` back as f32.
fn read_f32(pipe: &NsaPipeline, bufs: &[wgpu::Buffer]) -> Vec<Vec<f32>> {
    let device = &pipe.context().device;
    let mut enc = device.create_command_encoder(&Default::default());
    let staging =
        nsa_wgpu::pipeline::stage_readback(device, &mut enc, &bufs.iter().collect::<Vec<_>>());
    pipe.context().queue.submit([enc.finish()]);
    let bytes = pollster::block_on(nsa_wgpu::pipeline::read_staging(device, &staging)).unwrap();
    bytes
        .iter()
        .map(|b| bytemuck::cast_slice(b).to_vec())
        .collect()
}

/// Sequences of lengths `lens` (`heads` as in [`Ragged`], per-branch K/V when `branch`) go
/// through two caches alike, one with `extend` from host slices, the other with
/// `encode_extend` from GPU buffers (two single-row steps recorded into each encoder before
/// it is submitted, then a chunk of `tail` rows): every row, bit for bit, and both caches'
/// lengths and compressed-token counts must agree. The second step of each encoder takes its
/// tensors from one buffer at offsets ([`packed_inputs`]), writes its rows into the middle of
/// a larger one, whose elements around them must stay NaN, and its selected blocks likewise
/// (equal to `extend`'s); the first asks for no selected blocks.
fn check_device_steps(pipe: &NsaPipeline, precision: Precision, c: Ragged) {
    let (cfg, (hq, hkv, _), lens) = (c.cfg, c.heads, c.lens);
    let r = RaggedData::new(&c);
    let s = r.shape;
    let seq = |b: usize, a: usize, e: usize| r.seq(b, a, e);
    let mut host = r.cache(pipe, precision, &c);
    let mut dev = r.cache(pipe, precision, &c);
    let calls: Vec<usize> = std::iter::repeat_n(1, c.steps).chain([c.tail]).collect();
    let mut at: Vec<usize> = lens.to_vec();
    let name = format!(
        "{hq}/{hkv} {:?} branch {} {precision:?}",
        cfg.compression, c.branch
    );
    for (i, pair) in calls.chunks(2).enumerate() {
        let device = &pipe.context().device;
        let mut enc = device.create_command_encoder(&Default::default());
        let mut want = Vec::new();
        let mut want_idx = Vec::new();
        let mut want_br = Vec::new();
        let mut outs = Vec::new();
        let mut idxs = Vec::new();
        let mut brs = Vec::new();
        for (k, &n) in pair.iter().enumerate() {
            let owned: Vec<_> = (0..lens.len()).map(|b| seq(b, at[b], at[b] + n)).collect();
            let step = all_chunks(&owned, true);
            let packed = k == 1;
            // The packed step asks for the branch outputs too (a plan that stores them).
            let request = OutputRequest {
                block_indices: true,
                branches: packed,
            };
            let rows = pollster::block_on(pipe.extend(&mut host, &step, request)).unwrap();
            want.push(
                rows.iter()
                    .flat_map(|o| o.out.clone())
                    .collect::<Vec<f32>>(),
            );
            want_idx.push(
                rows.iter()
                    .flat_map(|o| o.block_indices.clone().unwrap())
                    .collect::<Vec<i32>>(),
            );
            if packed {
                let cat = |f: fn(&nsa_wgpu::BranchOutputs) -> &Vec<f32>| {
                    rows.iter()
                        .flat_map(|o| f(o.branches.as_ref().unwrap()).clone())
                        .collect::<Vec<f32>>()
                };
                want_br.extend([cat(|b| &b.o_cmp), cat(|b| &b.o_slc), cat(|b| &b.o_win)]);
            }
            // The same tensors, [seqs, n, ...], in GPU buffers.
            let cat = |j: usize| {
                owned
                    .iter()
                    .flat_map(|o| o[j].clone())
                    .collect::<Vec<f32>>()
            };
            let bytes: Vec<Vec<u8>> = (0..owned[0].len())
                .map(|j| stored_bytes(&cat(j), precision, j == 3))
                .collect();
            let (bufs, ranges) = if packed {
                let (buf, ranges) = packed_inputs(pipe, &bytes);
                (vec![buf], ranges)
            } else {
                let bufs: Vec<_> = bytes.iter().map(|b| bytes_buffer(pipe, b)).collect();
                let whole = bufs.iter().map(|b| 0..b.size()).collect();
                (bufs, whole)
            };
            let slice = |j: usize| bufs[j.min(bufs.len() - 1)].slice(ranges[j].clone());
            let rows = lens.len() * n * s.hq * s.dv;
            let pad = if packed { OUT_PAD } else { 0 };
            let out = sentinel_out(pipe, rows + 2 * pad);
            // The selected blocks too, in the packed calls (behind NaN words).
            let idx_len = lens.len() * n * s.hkv * cfg.top_n;
            let idx = sentinel_out(pipe, idx_len + 2 * pad);
            let br: Vec<wgpu::Buffer> = (0..3).map(|_| sentinel_out(pipe, rows)).collect();
            let step = nsa_wgpu::DeviceStep {
                first_seq: 0,
                seqs: lens.len(),
                tokens: n,
                q: slice(0),
                k: slice(1),
                v: slice(2),
                gates: slice(3),
                out: out.slice(pad as u64 * 4..(pad + rows) as u64 * 4),
                branch_kv: c.branch.then(|| [4, 5, 6, 7, 8, 9].map(slice)),
                block_indices: packed
                    .then(|| idx.slice(pad as u64 * 4..(pad + idx_len) as u64 * 4)),
                branches: packed.then(|| [0, 1, 2].map(|b| br[b].slice(..))),
            };
            pollster::block_on(pipe.encode_extend(&mut enc, &mut dev, &step)).unwrap();
            outs.push((out, pad));
            idxs.push((idx, packed.then_some(pad)));
            if packed {
                brs.extend(br);
            }
            at.iter_mut().for_each(|a| *a += n);
        }
        assert_eq!(
            dev.lens(),
            host.lens(),
            "{name} call {i}: counted when recorded"
        );
        pipe.context().queue.submit([enc.finish()]);
        let (outs, pads): (Vec<_>, Vec<_>) = outs.into_iter().unzip();
        for (j, (got, want)) in read_f32(pipe, &outs).iter().zip(&want).enumerate() {
            let (pad, end) = (pads[j], got.len() - pads[j]);
            assert!(
                got[..pad].iter().chain(&got[end..]).all(|x| x.is_nan()),
                "{name} call {i}.{j}: written outside the out slice"
            );
            assert!(
                bit_equal(&got[pad..end], want),
                "{name} call {i}.{j}: device rows differ"
            );
        }
        let (idxs, pads): (Vec<_>, Vec<_>) = idxs.into_iter().unzip();
        for (j, (got, want)) in read_f32(pipe, &idxs).iter().zip(&want_idx).enumerate() {
            let got: &[i32] = bytemuck::cast_slice(got);
            let Some(pad) = pads[j] else {
                // Not asked for: left as it was.
                assert!(got.iter().all(|x| f32::from_bits(*x as u32).is_nan()));
                continue;
            };
            let end = got.len() - pad;
            assert!(
                got[..pad]
                    .iter()
                    .chain(&got[end..])
                    .all(|x| f32::from_bits(*x as u32).is_nan()),
                "{name} call {i}.{j}: written outside the block_indices slice"
            );
            assert_eq!(
                &got[pad..end],
                &want[..],
                "{name} call {i}.{j}: block indices"
            );
        }
        assert_eq!(brs.len(), want_br.len());
        for (j, (got, want)) in read_f32(pipe, &brs).iter().zip(&want_br).enumerate() {
            assert!(
                bit_equal(got, want),
                "{name} call {i}: branch output {j} differs"
            );
        }
    }
    assert_eq!(dev.compressed_tokens(), host.compressed_tokens(), "{name}");
}

#[test]
fn device_steps_equal_host_steps() {
    // Ragged lengths (one empty), a cache that grows during the steps (once between two
    // steps of one encoder), decode steps two to an encoder, then a chunk; Mean with shared K/V, Linear with per-branch K/V; f32, and
    // f16 on every f16 pipeline.
    let linear = NsaConfig {
        compression: Compression::Linear,
        ..small()
    };
    let cases = [(small(), false, (4, 2, 16)), (linear, true, (16, 1, 32))];
    for (cfg, branch, heads) in cases {
        let c = |lens, cut| Ragged {
            cfg,
            branch,
            heads,
            lens,
            steps: 4,
            tail: 5,
            chains: 1,
            cut,
        };
        // After three rows of other values were appended and dropped again (truncate; the
        // empty sequence's: reset).
        check_device_steps(pipeline(), Precision::F32, c(&[50, 203, 0, 130], 3));
        // The cache (32 rows after this context) is full after the first step and grows
        // while that step waits in the encoder.
        check_device_steps(pipeline(), Precision::F32, c(&[31, 5, 0], 0));
        for pipe in f16_pipelines() {
            check_device_steps(pipe, Precision::F16, c(&[77, 1, 140], 2));
        }
    }
}

#[test]
fn device_chunks_past_a_binding_equal_host_chunks() {
    // On a device of 32 KiB bindings (128 KiB buffers), a chunk of 60 rows of one sequence
    // from the caller's GPU buffers holds 60 KiB of f32 queries (16 heads of 16) and as many
    // outputs: its plan binds them in windows, one per dispatch chunk, after copying the
    // caller's slices in. Its rows and selections (and those of the single-row steps before
    // it) must be `extend`'s from host slices, bit for bit, and the compressed blocks counted
    // alike.
    let limited = common::small_limits_pipeline();
    let linear = NsaConfig {
        compression: Compression::Linear,
        ..small()
    };
    for (cfg, branch, lens) in [(small(), false, [40]), (linear, true, [33])] {
        let c = Ragged {
            cfg,
            branch,
            heads: (16, 1, 16),
            lens: &lens,
            steps: 2,
            tail: 60,
            chains: 1,
            cut: 0,
        };
        check_device_steps(&limited, Precision::F32, c);
    }
}

#[test]
fn bad_device_steps_are_errors_and_change_nothing() {
    let s = Shape::prefill(2, 64, 4, 2, 16, 16);
    let pipe = pipeline();
    let mut cache = NsaCache::new(pipe, &small(), opts(&s, 64, false), None).unwrap();
    let buf = |n: usize| input_buffer(pipe, &vec![0.5; n], Precision::F32, true);
    let (q, k, v, g) = (buf(2 * 64), buf(2 * 32), buf(2 * 32), buf(2 * 12));
    let out = sentinel_out(pipe, 2 * 64);
    let good = nsa_wgpu::DeviceStep {
        first_seq: 0,
        seqs: 2,
        tokens: 1,
        q: q.slice(..),
        k: k.slice(..),
        v: v.slice(..),
        gates: g.slice(..),
        out: out.slice(..),
        branch_kv: None,
        block_indices: None,
        branches: None,
    };
    let small_q = buf(64);
    let no_copy_out = pipe
        .context()
        .device
        .create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 2 * 64 * 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
    let six = [&k, &v, &k, &v, &k, &v].map(|b| b.slice(..));
    let big_v = buf(2 * 32 + 4);
    let bad = [
        nsa_wgpu::DeviceStep {
            q: small_q.slice(..),
            ..good
        },
        nsa_wgpu::DeviceStep {
            out: no_copy_out.slice(..),
            ..good
        },
        nsa_wgpu::DeviceStep {
            first_seq: 1,
            ..good
        },
        nsa_wgpu::DeviceStep { tokens: 0, ..good },
        nsa_wgpu::DeviceStep { tokens: 2, ..good },
        nsa_wgpu::DeviceStep {
            branch_kv: Some(six),
            ..good
        },
        nsa_wgpu::DeviceStep {
            first_seq: usize::MAX,
            ..good
        },
        nsa_wgpu::DeviceStep {
            tokens: usize::MAX,
            ..good
        },
        // A slice of a large enough buffer that is too short, and one off the copy alignment.
        nsa_wgpu::DeviceStep {
            k: k.slice(..2 * 32 * 4 - 4),
            ..good
        },
        nsa_wgpu::DeviceStep {
            v: big_v.slice(2..),
            ..good
        },
        // Selected blocks into a buffer that cannot be copied to, and one too small.
        nsa_wgpu::DeviceStep {
            block_indices: Some(q.slice(..)),
            ..good
        },
        nsa_wgpu::DeviceStep {
            block_indices: Some(out.slice(..76)),
            ..good
        },
        // A branch output too small.
        nsa_wgpu::DeviceStep {
            branches: Some([out.slice(..), out.slice(..508), out.slice(..)]),
            ..good
        },
    ];
    let device = &pipe.context().device;
    for (i, step) in bad.iter().enumerate() {
        let mut enc = device.create_command_encoder(&Default::default());
        let err = pollster::block_on(pipe.encode_extend(&mut enc, &mut cache, step)).unwrap_err();
        let text = err.to_string();
        let expect = [
            "`q`: holds 256 bytes",
            "`out`: usage",
            "first_seq + seqs",
            "tokens",
            "`q`: holds 512 bytes",
            "branch_kv",
            "first_seq + seqs",
            "max_capacity",
            "`k`: holds 252 bytes, the step needs 256",
            "`v`: starts at byte 2, not a multiple of 4",
            "`block_indices`: usage",
            "`block_indices`: holds 76 bytes, the step needs 80",
            "`o_slc`: holds 508 bytes, the step needs 512",
        ];
        assert!(text.contains(expect[i]), "case {i}: {text}");
        assert_eq!(cache.lens(), &[0, 0], "case {i}");
    }
    // With no hard limit, a step of 2^40 tokens (whose byte counts overflowed: a debug
    // panic, and in release slices of wrapped sizes could pass) needs more than its slices.
    let unbounded = CacheOptions {
        max_capacity: usize::MAX,
        ..opts(&s, 64, false)
    };
    let mut open = NsaCache::new(pipe, &small(), unbounded, None).unwrap();
    let vast = nsa_wgpu::DeviceStep {
        tokens: 1 << 40,
        ..good
    };
    let mut enc = device.create_command_encoder(&Default::default());
    let err = pollster::block_on(pipe.encode_extend(&mut enc, &mut open, &vast)).unwrap_err();
    assert!(
        err.to_string()
            .contains("`q`: holds 512 bytes, the step needs 562949953421312"),
        "{err}"
    );
    assert_eq!(open.lens(), &[0, 0]);
    // Beyond the cache's hard limit: an error, nothing appended.
    for _ in 0..64 {
        let mut enc = device.create_command_encoder(&Default::default());
        pollster::block_on(pipe.encode_extend(&mut enc, &mut cache, &good)).unwrap();
        pipe.context().queue.submit([enc.finish()]);
    }
    let mut enc = device.create_command_encoder(&Default::default());
    let err = pollster::block_on(pipe.encode_extend(&mut enc, &mut cache, &good)).unwrap_err();
    assert!(matches!(err, NsaError::ExceedsLimit { .. }), "{err}");
    assert_eq!(cache.lens(), &[64, 64]);
    // The good steps wrote finite rows.
    let rows = read_f32(pipe, std::slice::from_ref(&out));
    assert!(rows[0].iter().all(|x| x.is_finite()));
}

#[test]
fn large_appends_equal_small_ones() {
    // Keys and values of more than 4 MiB in one call (here 2199 tokens of three sequences,
    // f32 Hkv = 1, D = 128: 6.8 MB) are written a sequence and tensor at a time, smaller ones
    // through one upload by the append kernel (300 tokens: 38,400 words per sequence and
    // tensor, which its workgroups take in several rounds): the same cache either way (then
    // one step on it, bit for bit).
    let cfg = NsaConfig::default();
    let s = Shape::prefill(3, 2200, 4, 1, 128, 128);
    let data = Data::new(&cfg, &s, false, 47);
    let pipe = pipeline();
    let w = s.hkv * s.dk;
    let kv = |b: usize, a: usize, e: usize| {
        (rows(&data.k, &s, b, a, e, w), rows(&data.v, &s, b, a, e, w))
    };
    let mut outs = Vec::new();
    for piece in [2199, 300] {
        let mut cache = NsaCache::new(pipe, &cfg, opts(&s, s.tk, false), None).unwrap();
        let mut at = 0;
        while at < 2199 {
            let end = (at + piece).min(2199);
            let owned: Vec<_> = (0..3).map(|b| kv(b, at, end)).collect();
            let chunks: Vec<SeqChunk> = owned
                .iter()
                .enumerate()
                .map(|(b, (k, v))| SeqChunk::keys_values(b, k, v))
                .collect();
            pollster::block_on(pipe.append(&mut cache, &chunks)).unwrap();
            at = end;
        }
        let owned: Vec<_> = (0..3)
            .map(|b| seq_rows_at(&data, &s, b, 2199, 2200))
            .collect();
        let step: Vec<SeqChunk> = owned
            .iter()
            .enumerate()
            .map(|(b, [q, k, v, g])| SeqChunk::new(b, q, k, v, g))
            .collect();
        let out = pollster::block_on(pipe.extend(&mut cache, &step, OutputRequest::default()));
        outs.push(out.unwrap());
    }
    for (a, b) in outs[0].iter().zip(&outs[1]) {
        assert!(bit_equal(&a.out, &b.out));
        assert!(a.out.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn a_cache_through_another_devices_pipeline_is_an_error() {
    // A cache's buffers live on the device it was made on: a pipeline of another device
    // (here another instance's) is refused before anything changes. Before, `extend` went
    // through, leaving buffers of the other device in the cache, and the next call on the
    // cache's own device panicked inside wgpu-core.
    let a = pipeline();
    let b = pipeline_with_limits(a.context().device.limits());
    let s = Shape::prefill(2, 40, 2, 1, 8, 8);
    let cfg = small();
    let data = Data::new(&cfg, &s, false, 2);
    let mut cache = NsaCache::new(a, &cfg, opts(&s, 16, false), None).unwrap();
    let rows = seq_rows(&data, &s, 0, 20);
    let chunk = [rows_chunk(&rows)];
    let out = sentinel_out(&b, 64);
    let buf = input_buffer(&b, &[0.5; 64], Precision::F32, true);
    let step = nsa_wgpu::DeviceStep {
        first_seq: 0,
        seqs: 1,
        tokens: 1,
        q: buf.slice(..),
        k: buf.slice(..),
        v: buf.slice(..),
        gates: buf.slice(..),
        out: out.slice(..),
        branch_kv: None,
        block_indices: None,
        branches: None,
    };
    let mut enc = b
        .context()
        .device
        .create_command_encoder(&Default::default());
    let errors = [
        pollster::block_on(b.extend(&mut cache, &chunk, OutputRequest::default())).map(|_| ()),
        pollster::block_on(b.append(&mut cache, &chunk)),
        pollster::block_on(b.encode_extend(&mut enc, &mut cache, &step)),
        cache.reserve(&b, 30),
        cache.copy_sequence(&b, 0, 1),
    ];
    for (i, r) in errors.into_iter().enumerate() {
        assert!(
            matches!(&r, Err(NsaError::BadBuffer { tensor: "cache", problem }) if problem.contains("another device")),
            "call {i}: {r:?}"
        );
    }
    assert_eq!(cache.lens(), &[0, 0]);
    assert_eq!(cache.capacity(), 16);
    // Its own device's pipeline still runs it, writing what a fresh cache writes.
    let got = pollster::block_on(a.extend(&mut cache, &chunk, OutputRequest::all())).unwrap();
    let mut fresh = NsaCache::new(a, &cfg, opts(&s, 16, false), None).unwrap();
    let want = pollster::block_on(a.extend(&mut fresh, &chunk, OutputRequest::all())).unwrap();
    assert!(bit_equal(&got[0].out, &want[0].out));
    assert_eq!(got[0].block_indices, want[0].block_indices);
}
