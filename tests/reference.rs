//! The naive reference on hand-worked cases: the rules of SPEC.md checked one by one.

mod common;

use common::{assert_close, small, Data};
use nsa_wgpu::cpu::naive::{block_importance, nsa, select_blocks};
use nsa_wgpu::{Compression, LinearWeights, NsaConfig, NsaInputs, Shape};

#[test]
fn importance_weights_are_1_2_2_2_1_for_the_paper_config() {
    let cfg = NsaConfig::default();
    // One-hot p_cmp on token t: block 2 covers p_cmp[7..=11] with weights 1, 2, 2, 2, 1.
    for (t, want) in (7..=11).zip([1.0, 2.0, 2.0, 2.0, 1.0]) {
        let mut p = vec![0.0; 20];
        p[t] = 1.0;
        let s = block_importance(&cfg, &p, 4);
        assert_eq!(s[2], want, "token {t}");
        // A token covers l/d = 2 pieces, and each piece lies in exactly one block.
        assert_eq!(s.iter().sum::<f64>(), 2.0, "token {t}");
    }
    // Token 3 straddles blocks 0 and 1: weight 1 in block 1 (its first piece is block 0's
    // last), weight 1 in block 0.
    let mut p = vec![0.0; 20];
    p[3] = 1.0;
    let s = block_importance(&cfg, &p, 4);
    assert_eq!(&s[..3], &[1.0, 1.0, 0.0]);
}

/// The kernels' per-token form of the overlap sum (cpu::select::block_score, as select.wgsl
/// forms it) equals SPEC's double sum over pieces, for blocks short and long beside tokens
/// short and long (block and token spans past the selection's 512-token tile included).
#[test]
fn per_token_overlap_weights_equal_the_double_sum() {
    use nsa_wgpu::cpu::select::{block_score, overlap};
    assert_eq!(
        (0..5).map(|g| overlap(g, 4, 2)).collect::<Vec<_>>(),
        [1, 2, 2, 2, 1]
    );
    for (m, u) in [
        (4, 2),
        (1, 1),
        (1, 7),
        (8, 3),
        (600, 3),
        (250, 300),
        (2, 525),
    ] {
        let cfg = NsaConfig {
            cmp_block: u,
            cmp_stride: 1,
            sel_block: m,
            ..NsaConfig::default()
        };
        let nv = 3 * m + u + 5;
        let p: Vec<f32> = (0..nv)
            .map(|t| ((t * 37 % 101) as f32 + 1.0) / 128.0)
            .collect();
        let p64: Vec<f64> = p.iter().map(|x| *x as f64).collect();
        let want = block_importance(&cfg, &p64, nv.div_ceil(m) + 1);
        // The whole walk over a block's m + u - 1 tokens (from its first past the sequence's
        // start), skipping the invisible ones: the same sums, bit for bit, whichever tokens
        // are visible.
        let walk = |p: &[f32], j: usize| {
            let mut s = 0.0f32;
            // Groups from the block's first token past the sequence's start.
            for g0 in ((u - 1).saturating_sub(m * j)..m + u - 1).step_by(16) {
                let mut part = 0.0f32;
                for g in g0..(g0 + 16).min(m + u - 1) {
                    let t = (m * j + g) as isize - (u - 1) as isize;
                    if t >= 0 && (t as usize) < p.len() {
                        part += overlap(g, m, u) as f32 * p[t as usize];
                    }
                }
                s += part;
            }
            s
        };
        for j in 0..want.len() {
            for visible in [0, 1, m / 2, m + 3, nv] {
                let p = &p[..visible];
                assert_eq!(
                    block_score(p, j, m, u),
                    walk(p, j),
                    "m {m}, u {u}, block {j}"
                );
            }
        }
        for (j, w) in want.iter().enumerate() {
            let got = block_score(&p, j, m, u) as f64;
            assert!(
                (got - w).abs() <= 1e-6 * w.abs(),
                "m {m}, u {u}, block {j}: {got} against {w}"
            );
        }
    }
}

/// Compressed tokens of billions of strides: a block's score adds only its visible tokens'
/// terms, exactly (`l/d = 2^31 + 5` beside 3-stride blocks: block 0 is 3 p0 + 2 p1 + p2,
/// block 1 takes tokens 0 .. 3 whole and 4, 5 in part), without walking the tokens before
/// the sequence (select.wgsl does the same).
#[test]
fn block_scores_of_vast_compressed_tokens_add_the_visible_ones() {
    use nsa_wgpu::cpu::select::block_score;
    let (m, u) = (3, (1usize << 31) + 5);
    let p: Vec<f32> = (0..40).map(|t| (t as f32 + 1.5) / 64.0).collect();
    let w = |ws: &[f32]| {
        let part = ws.iter().zip(&p).fold(0.0f32, |a, (w, x)| a + w * x);
        0.0f32 + part
    };
    assert_eq!(block_score(&p, 0, m, u), w(&[3.0, 2.0, 1.0]));
    assert_eq!(block_score(&p, 1, m, u), w(&[3.0, 3.0, 3.0, 3.0, 2.0, 1.0]));
    assert_eq!(block_score(&[], 1, m, u), 0.0);
}

/// Blocks that every visible compressed token overlaps whole (tokens of 40 pieces beside
/// blocks of 2) have the same importance: their f32 scores tie bit for bit, so that the lower
/// block wins, as SPEC asks, whatever the probabilities (groups of 16 terms at multiples of
/// 16 of a block's token index split the same terms differently from block to block).
#[test]
fn blocks_every_token_overlaps_whole_tie_exactly() {
    use nsa_wgpu::cpu::select::block_score;
    let (m, u) = (2, 40);
    for nv in [1, 2, 3, 7, 17] {
        let p: Vec<f32> = (0..nv).map(|t| 1.0 / (3.0 + t as f32 * 0.7311)).collect();
        // Block j's pieces 2j, 2j + 1 lie in token t's t .. t + 39 for every t < nv where
        // nv - 1 <= 2j and 2j + 1 <= 39.
        let whole = (nv / 2..20).filter(|j| 2 * j + 1 >= nv);
        let scores: Vec<u32> = whole.map(|j| block_score(&p, j, m, u).to_bits()).collect();
        assert!(
            scores.windows(2).all(|w| w[0] == w[1]),
            "{nv} tokens: {scores:?}"
        );
    }
}

#[test]
fn forced_blocks_are_always_selected() {
    let cfg = NsaConfig::default(); // n=16, 1 initial + 2 local
    let c = 40;
    // Every free block scores higher than the forced ones.
    let score: Vec<f64> = (0..=c)
        .map(|j| {
            if j == 0 || j >= 39 {
                0.0
            } else {
                1.0 + j as f64
            }
        })
        .collect();
    let sel = select_blocks(&cfg, &score, c);
    assert!(
        sel.contains(&0) && sel.contains(&39) && sel.contains(&40),
        "{sel:?}"
    );
    // The 13 free slots go to the highest scores: blocks 26..=38.
    let want: Vec<i32> = [0].into_iter().chain(26..=38).chain([39, 40]).collect();
    assert_eq!(sel, want);
}

#[test]
fn ties_go_to_the_lower_index() {
    let cfg = NsaConfig::default();
    let sel = select_blocks(&cfg, &[0.5; 31], 30);
    let want: Vec<i32> = (0..=13).chain([29, 30]).collect();
    assert_eq!(sel, want);
}

#[test]
fn early_queries_pad_with_minus_one() {
    let cfg = NsaConfig::default();
    assert_eq!(
        select_blocks(&cfg, &[0.0], 0),
        [vec![0], vec![-1; 15]].concat()
    );
    assert_eq!(
        select_blocks(&cfg, &[0.0; 2], 1),
        [vec![0, 1], vec![-1; 14]].concat()
    );
    let few = select_blocks(&cfg, &[0.0; 5], 4);
    assert_eq!(few, [vec![0, 1, 2, 3, 4], vec![-1; 11]].concat());
}

#[test]
fn early_queries_see_no_compressed_token() {
    let cfg = NsaConfig::default();
    let shape = Shape::prefill(1, 40, 2, 1, 8, 8);
    let data = Data::new(&cfg, &shape, false, 3);
    let r = nsa(&cfg, &shape, &data.inputs()).unwrap();
    let dv = shape.dv;
    for i in 0..40 {
        let row = &r.o_cmp[i * 2 * dv..(i + 1) * 2 * dv];
        if i < 31 {
            assert!(
                row.iter().all(|x| *x == 0.0),
                "query {i} sees no compressed token"
            );
        } else {
            assert!(row.iter().any(|x| *x != 0.0), "query {i} sees token 0");
        }
    }
}

#[test]
fn linear_with_identity_over_l_equals_mean() {
    let mean = small();
    let lin = NsaConfig {
        compression: Compression::Linear,
        ..mean
    };
    let shape = Shape::prefill(1, 90, 4, 2, 6, 5);
    let data = Data::new(&mean, &shape, false, 4);
    let eye = |d: usize| -> Vec<f32> {
        let mut w = vec![0.0; shape.hkv * mean.cmp_block * d * d];
        for blk in w.chunks_mut(d * d) {
            (0..d).for_each(|i| blk[i * d + i] = 1.0 / mean.cmp_block as f32);
        }
        w
    };
    let (wk, wv) = (eye(shape.dk), eye(shape.dv));
    let (pk, pv) = (
        vec![0.0; shape.hkv * 16 * shape.dk],
        vec![0.0; shape.hkv * 16 * shape.dv],
    );
    let mut inputs = data.inputs();
    inputs.linear = Some(LinearWeights {
        w_k: &wk,
        pe_k: &pk,
        w_v: &wv,
        pe_v: &pv,
    });
    let a = nsa(&mean, &shape, &data.inputs()).unwrap();
    let b = nsa(&lin, &shape, &inputs).unwrap();
    assert_eq!(a.block_indices, b.block_indices);
    let got: Vec<f32> = b.out.iter().map(|x| *x as f32).collect();
    assert_close("linear vs mean", &got, &a.out, 1e-6);
}

/// Dense causal attention in f64, independent of the NSA code.
fn dense(shape: &Shape, inputs: &NsaInputs, scale: f64) -> Vec<f64> {
    let s = shape;
    let mut o = vec![0.0; s.tq * s.hq * s.dv];
    for i in 0..s.tq {
        let p = s.position(i);
        for hq in 0..s.hq {
            let h = hq / s.group();
            let q = &inputs.q[(i * s.hq + hq) * s.dk..][..s.dk];
            let sc: Vec<f64> = (0..=p)
                .map(|t| {
                    scale
                        * (0..s.dk)
                            .map(|e| q[e] as f64 * inputs.k[(t * s.hkv + h) * s.dk + e] as f64)
                            .sum::<f64>()
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
            for (t, x) in sc.iter().enumerate() {
                let w = (x - mx).exp() / z;
                for e in 0..s.dv {
                    o[(i * s.hq + hq) * s.dv + e] +=
                        w * inputs.v[(t * s.hkv + h) * s.dv + e] as f64;
                }
            }
        }
    }
    o
}

#[test]
fn window_covering_everything_is_dense_causal_attention() {
    let cfg = NsaConfig {
        window: 1000,
        ..small()
    };
    let shape = Shape {
        batch: 1,
        tq: 50,
        tk: 120,
        hq: 3,
        hkv: 1,
        dk: 7,
        dv: 5,
    };
    let data = Data::new(&cfg, &shape, false, 5);
    let r = nsa(&cfg, &shape, &data.inputs()).unwrap();
    let d = dense(&shape, &data.inputs(), cfg.scale_for(7) as f64);
    let got: Vec<f32> = r.o_win.iter().map(|x| *x as f32).collect();
    assert_close("window = dense", &got, &d, 1e-6);
}

#[test]
fn all_blocks_selected_is_dense_causal_attention() {
    let cfg = NsaConfig {
        top_n: 8,
        ..small()
    }; // 120 keys = 4 blocks of 32
    let shape = Shape {
        batch: 1,
        tq: 120,
        tk: 120,
        hq: 2,
        hkv: 2,
        dk: 9,
        dv: 4,
    };
    let data = Data::new(&cfg, &shape, false, 6);
    let r = nsa(&cfg, &shape, &data.inputs()).unwrap();
    let d = dense(&shape, &data.inputs(), cfg.scale_for(9) as f64);
    let got: Vec<f32> = r.o_slc.iter().map(|x| *x as f32).collect();
    assert_close("all blocks = dense", &got, &d, 1e-6);
}

#[test]
fn cpu_forward_matches_naive() {
    let cfg = small();
    let shape = Shape {
        batch: 2,
        tq: 70,
        tk: 100,
        hq: 6,
        hkv: 2,
        dk: 10,
        dv: 6,
    };
    let data = Data::new(&cfg, &shape, true, 8);
    let r = nsa_wgpu::cpu::forward(&cfg, &shape, &data.inputs(), nsa_wgpu::OutputRequest::all())
        .unwrap();
    let n = nsa(&cfg, &shape, &data.inputs()).unwrap();
    assert_eq!(r.block_indices.unwrap(), n.block_indices);
    assert_close("cpu forward", &r.out, &n.out, 1e-4);
}
