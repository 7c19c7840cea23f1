//! Calls on host slices that are too large for the device as a whole, run as independent
//! parts: ranges of sequences and of kv heads (each with its group's query heads). NSA never
//! mixes sequences or kv groups (SPEC.md: everything is per sequence and per kv head, the
//! selection shared only within a group), so a part is the same call on a smaller shape,
//! and its outputs go back in place. This is what lets a call whose one sequence's keys pass
//! `max_storage_buffer_binding_size` (they interleave all kv heads, so a plan cannot bind
//! them in pieces) or whose tensors pass `max_buffer_size` run at all.

use std::ops::Range;

use crate::config::{Compression, NsaConfig, Precision, Shape};
use crate::error::{NsaError, Result};
use crate::inputs::{
    check_stored_range, BranchOutputs, LinearWeights, NsaInputs, NsaOutputs, OutputRequest,
};

/// One part of a call: sequences `b`, kv heads `h` (and their query heads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    /// The sequences.
    pub b: Range<usize>,
    /// The kv heads.
    pub h: Range<usize>,
}

impl Part {
    /// The part's shape within `shape`.
    pub fn shape(&self, shape: &Shape) -> Shape {
        Shape {
            batch: self.b.len(),
            hq: self.h.len() * shape.group(),
            hkv: self.h.len(),
            ..*shape
        }
    }

    /// The part's query heads.
    fn q_heads(&self, shape: &Shape) -> Range<usize> {
        self.h.start * shape.group()..self.h.end * shape.group()
    }
}

/// The largest parts of `shape` that `plans` accepts: the most kv heads per part, then the
/// most sequences at that many heads (both found by bisection: a smaller part never needs
/// more of a limit). `None` when not even one sequence's one kv head plans.
pub(crate) fn part_size(shape: &Shape, plans: impl Fn(&Shape) -> bool) -> Option<(usize, usize)> {
    let fits = |b: usize, h: usize| plans(&Part { b: 0..b, h: 0..h }.shape(shape));
    if !fits(1, 1) {
        return None;
    }
    let h = largest(shape.hkv, |h| fits(1, h));
    Some((largest(shape.batch, |b| fits(b, h)), h))
}

/// The largest `x` in `1..=hi` for which `ok` holds, given that it holds for 1 and, once it
/// fails, for nothing larger.
fn largest(hi: usize, ok: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (1, hi);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if ok(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// How a call runs: whole, on its plan, or in parts of at most `(sequences, kv heads)`.
#[derive(Debug)]
pub(crate) enum Planned<T> {
    /// One plan for the whole call.
    Whole(Box<T>),
    /// Parts of this size ([`parts`]), each planned alone.
    Parts((usize, usize)),
}

/// Plans `shape` by `plan`; where that exceeds a limit ([`NsaError::ExceedsLimit`]), the
/// largest parts that plan, or the whole call's error when not even one sequence's one kv
/// head does.
pub(crate) fn plan_or_parts<T>(
    shape: &Shape,
    plan: impl Fn(&Shape) -> Result<T>,
) -> Result<Planned<T>> {
    match plan(shape) {
        Ok(p) => Ok(Planned::Whole(Box::new(p))),
        Err(err @ NsaError::ExceedsLimit { .. }) => part_size(shape, |s| plan(s).is_ok())
            .map(Planned::Parts)
            .ok_or(err),
        Err(err) => Err(err),
    }
}

/// Checks, before any part runs, that the tensors stored at `precision` hold only values it
/// can (so that an error names the index in the caller's tensor).
pub(crate) fn check_ranges(inputs: &NsaInputs, precision: Precision) -> Result<()> {
    for (name, t) in inputs.stored_tensors() {
        check_stored_range(name, t, precision)?;
    }
    Ok(())
}

/// One part's inputs, gathered from the whole call's.
pub(crate) struct PartInputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    gates: Vec<f32>,
    /// `k_cmp` … `v_win`, where the call has them.
    branch: Vec<Option<Vec<f32>>>,
    /// `w_k, pe_k, w_v, pe_v`, for Linear compression.
    linear: Option<[Vec<f32>; 4]>,
}

impl PartInputs {
    /// `part`'s tensors of a call of `shape` on `inputs`.
    pub fn gather(config: &NsaConfig, shape: &Shape, inputs: &NsaInputs, part: &Part) -> Self {
        let s = shape;
        let take =
            |heads: Heads, width: usize, x: &[f32]| Layout::of(s, heads, width).gather(x, part, s);
        let branch = (inputs.branch_tensors().into_iter())
            .enumerate()
            .map(|(i, (_, t))| t.map(|t| take(Heads::Kv, if i % 2 == 0 { s.dk } else { s.dv }, t)))
            .collect();
        // The weights, `[Hkv, l, D, D]` and `[Hkv, l, D]`, as one sequence of one row.
        let heads = Part {
            b: 0..1,
            h: part.h.clone(),
        };
        let weight = |width: usize, x: &[f32]| {
            let layout = Layout {
                batch: 1,
                ..Layout::of(s, Heads::Kv, width)
            };
            layout.gather(x, &heads, s)
        };
        let l = config.cmp_block;
        let linear = (inputs.linear)
            .filter(|_| config.compression == Compression::Linear)
            .map(|w| {
                [
                    weight(l * s.dk * s.dk, w.w_k),
                    weight(l * s.dk, w.pe_k),
                    weight(l * s.dv * s.dv, w.w_v),
                    weight(l * s.dv, w.pe_v),
                ]
            });
        Self {
            q: take(Heads::Q, s.dk, inputs.q),
            k: take(Heads::Kv, s.dk, inputs.k),
            v: take(Heads::Kv, s.dv, inputs.v),
            gates: take(Heads::Q, 3, inputs.gates),
            branch,
            linear,
        }
    }

    /// The part's inputs as a call takes them.
    pub fn inputs(&self) -> NsaInputs<'_> {
        let branch = |i: usize| self.branch[i].as_deref();
        NsaInputs {
            k_cmp: branch(0),
            v_cmp: branch(1),
            k_slc: branch(2),
            v_slc: branch(3),
            k_win: branch(4),
            v_win: branch(5),
            linear: self.linear.as_ref().map(|w| LinearWeights {
                w_k: &w[0],
                pe_k: &w[1],
                w_v: &w[2],
                pe_v: &w[3],
            }),
            ..NsaInputs::new(&self.q, &self.k, &self.v, &self.gates)
        }
    }
}

/// The outputs of a call of `shape` with `n` selected blocks, as `request` asks, before any
/// part is put in: every element is written by one part, and these fillers (NaN, `i32::MIN`)
/// would show any that were not.
pub(crate) fn unfilled_outputs(shape: &Shape, n: usize, request: OutputRequest) -> NsaOutputs {
    let s = shape;
    let outs = s.batch * s.tq * s.hq * s.dv;
    NsaOutputs {
        out: vec![f32::NAN; outs],
        block_indices: (request.block_indices).then(|| vec![i32::MIN; s.batch * s.tq * s.hkv * n]),
        branches: request.branches.then(|| BranchOutputs {
            o_cmp: vec![f32::NAN; outs],
            o_slc: vec![f32::NAN; outs],
            o_win: vec![f32::NAN; outs],
        }),
    }
}

/// Puts `part`'s outputs `got` in place in the whole call's `res` (of `shape`, with `n`
/// selected blocks).
pub(crate) fn put_outputs(
    res: &mut NsaOutputs,
    got: &NsaOutputs,
    shape: &Shape,
    n: usize,
    part: &Part,
) {
    let s = shape;
    let out = Layout::of(s, Heads::Q, s.dv);
    out.scatter(&mut res.out, &got.out, part, s);
    if let (Some(x), Some(from)) = (&mut res.block_indices, &got.block_indices) {
        Layout::of(s, Heads::Kv, n).scatter(x, from, part, s);
    }
    if let (Some(x), Some(from)) = (&mut res.branches, &got.branches) {
        out.scatter(&mut x.o_cmp, &from.o_cmp, part, s);
        out.scatter(&mut x.o_slc, &from.o_slc, part, s);
        out.scatter(&mut x.o_win, &from.o_win, part, s);
    }
}

/// The parts of `shape` of at most `(sequences, kv heads)` each, sequences outermost.
pub(crate) fn parts(shape: &Shape, (nb, nh): (usize, usize)) -> Vec<Part> {
    let ranges = |n: usize, step: usize| {
        (0..n)
            .step_by(step)
            .map(move |a| a..(a + step).min(n))
            .collect::<Vec<_>>()
    };
    let hs = ranges(shape.hkv, nh);
    ranges(shape.batch, nb)
        .into_iter()
        .flat_map(|b| {
            hs.iter().map(move |h| Part {
                b: b.clone(),
                h: h.clone(),
            })
        })
        .collect()
}

/// Which heads of a `[B, T, H, W]` tensor a part takes: kv heads (`k`, `v`, block indices,
/// the linear weights as `[1, 1, Hkv, l * D * D]`) or query heads (`q`, `gates`, `out`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Heads {
    /// Indexed by kv head.
    Kv,
    /// Indexed by query head.
    Q,
}

/// A `[B, T, H, W]` tensor of `shape` (B and H as `shape` and `heads` say; `T` and `W` are
/// the tensor's) and the part's view of it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    /// Sequences.
    pub batch: usize,
    /// Which heads the tensor has.
    pub kind: Heads,
    /// How many.
    pub heads: usize,
    /// Elements per head and row.
    pub width: usize,
}

impl Layout {
    /// A tensor of `shape` whose heads are `heads` and whose rows hold `width` per head.
    pub fn of(shape: &Shape, heads: Heads, width: usize) -> Self {
        Self {
            batch: shape.batch,
            kind: heads,
            heads: match heads {
                Heads::Kv => shape.hkv,
                Heads::Q => shape.hq,
            },
            width,
        }
    }

    /// The part's ranges of sequences and heads in this layout.
    fn ranges(&self, part: &Part, shape: &Shape) -> (Range<usize>, Range<usize>) {
        let h = match self.kind {
            Heads::Kv => part.h.clone(),
            Heads::Q => part.q_heads(shape),
        };
        (part.b.clone(), h)
    }

    /// The offsets and length of each contiguous run of `x` (of this layout) that the part
    /// holds, in order.
    fn runs(&self, len: usize, part: &Part, shape: &Shape) -> impl Iterator<Item = Range<usize>> {
        let (b, h) = self.ranges(part, shape);
        let rows = len / (self.batch * self.heads * self.width);
        let (heads, width, run) = (self.heads, self.width, h.len() * self.width);
        b.flat_map(move |bi| {
            let h0 = h.start;
            (0..rows).map(move |t| {
                let at = ((bi * rows + t) * heads + h0) * width;
                at..at + run
            })
        })
    }

    /// The part's elements of `x`, as the part's own tensor.
    pub fn gather<T: Copy>(&self, x: &[T], part: &Part, shape: &Shape) -> Vec<T> {
        let mut out = Vec::new();
        for r in self.runs(x.len(), part, shape) {
            out.extend_from_slice(&x[r]);
        }
        out
    }

    /// Writes the part's tensor `from` back into `x` where [`Self::gather`] took it.
    pub fn scatter<T: Copy>(&self, x: &mut [T], from: &[T], part: &Part, shape: &Shape) {
        let mut at = 0;
        for r in self.runs(x.len(), part, shape) {
            let n = r.len();
            x[r].copy_from_slice(&from[at..at + n]);
            at += n;
        }
        debug_assert_eq!(at, from.len(), "a part's tensor fills its runs");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_every_element_once() {
        // Three sequences, 5 kv heads of groups of 3, parts of 2 x 2: remainders in both.
        let shape = Shape::prefill(3, 7, 15, 5, 4, 2);
        let ps = parts(&shape, (2, 2));
        assert_eq!(ps.len(), 2 * 3);
        assert_eq!(ps[5], Part { b: 2..3, h: 4..5 });
        for (heads, width) in [(Heads::Q, 4), (Heads::Kv, 2), (Heads::Kv, 16)] {
            let layout = Layout::of(&shape, heads, width);
            let len = layout.batch * 7 * layout.heads * width;
            let x: Vec<u32> = (0..len as u32).collect();
            let mut back = vec![u32::MAX; len];
            for p in &ps {
                let got = layout.gather(&x, p, &shape);
                let ps_shape = p.shape(&shape);
                let want = Layout::of(&ps_shape, heads, width).batch
                    * 7
                    * Layout::of(&ps_shape, heads, width).heads
                    * width;
                assert_eq!(got.len(), want);
                layout.scatter(&mut back, &got, p, &shape);
            }
            assert_eq!(back, x, "{heads:?} {width}");
        }
    }

    #[test]
    fn the_largest_part_that_plans_is_found() {
        let shape = Shape::prefill(10, 7, 8, 4, 4, 4);
        // Kv heads limit to 3, then sequences times heads to 7: 2 sequences of 3 heads.
        let size = part_size(&shape, |s| s.hkv <= 3 && s.batch * s.hkv <= 7);
        assert_eq!(size, Some((2, 3)));
        assert_eq!(part_size(&shape, |_| true), Some((10, 4)));
        assert_eq!(
            part_size(&shape, |s| s.hkv == 1 && s.batch == 1),
            Some((1, 1))
        );
        assert_eq!(part_size(&shape, |_| false), None);
    }
}
