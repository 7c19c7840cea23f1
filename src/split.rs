//! Calls on host slices that are too large for the device as a whole, run as independent
//! parts: ranges of sequences, of kv heads (each with its group's query heads) and of query
//! rows. NSA never mixes sequences or kv groups (SPEC.md: everything is per sequence and per
//! kv head, the selection shared only within a group), and a query's row depends only on
//! the keys up to it (a chunk's rows are the prefill's), so a part is the same call on a
//! smaller shape (query rows `a..b` of `Tq` take the keys up to the last of them:
//! `Tk - (Tq - b)`), and its outputs go back in place. This is what lets a call whose one
//! sequence's keys pass `max_storage_buffer_binding_size` (they interleave all kv heads, so
//! a plan cannot bind them in pieces) or whose tensors pass `max_buffer_size` (one kv
//! head's queries of one sequence too, in parts of query rows) run at all.

use std::ops::Range;

use crate::config::{Compression, NsaConfig, Precision, Shape};
use crate::error::{NsaError, Result};
use crate::inputs::{
    check_stored_range, BranchOutputs, LinearWeights, NsaInputs, NsaOutputs, OutputRequest,
};

/// One part of a call: sequences `b`, kv heads `h` (and their query heads), query rows `t`
/// (with the keys up to the last of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    /// The sequences.
    pub b: Range<usize>,
    /// The kv heads.
    pub h: Range<usize>,
    /// The query rows (of `Tq`).
    pub t: Range<usize>,
}

impl Part {
    /// The part's shape within `shape`.
    pub fn shape(&self, shape: &Shape) -> Shape {
        Shape {
            batch: self.b.len(),
            tq: self.t.len(),
            tk: self.keys(shape),
            hq: self.h.len() * shape.group(),
            hkv: self.h.len(),
            ..*shape
        }
    }

    /// The part's keys: those up to its last query row.
    fn keys(&self, shape: &Shape) -> usize {
        shape.tk - (shape.tq - self.t.end)
    }

    /// The part's query heads.
    fn q_heads(&self, shape: &Shape) -> Range<usize> {
        self.h.start * shape.group()..self.h.end * shape.group()
    }
}

/// The size of a call's parts: at most this many sequences, kv heads and query rows each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PartSize {
    /// Sequences.
    pub b: usize,
    /// Kv heads.
    pub h: usize,
    /// Query rows.
    pub t: usize,
}

/// The largest parts of `shape` that `plans` accepts: the most kv heads per part, then the
/// most sequences at that many heads, all query rows; where not even one sequence's one kv
/// head plans and `rows` allows, one sequence's most query rows, then the most kv heads at
/// that many (each found by bisection: a smaller part never needs more of a limit; a part of
/// query rows is tried as the last rows, which take every key). `None` when not even one
/// query row of one kv head plans (or, without `rows`, one sequence's one kv head).
pub(crate) fn part_size(
    shape: &Shape,
    rows: bool,
    plans: impl Fn(&Shape) -> bool,
) -> Option<PartSize> {
    let fits = |b: usize, h: usize, t: usize| {
        let last = shape.tq - t..shape.tq;
        plans(
            &Part {
                b: 0..b,
                h: 0..h,
                t: last,
            }
            .shape(shape),
        )
    };
    if fits(1, 1, shape.tq) {
        let h = largest(shape.hkv, |h| fits(1, h, shape.tq));
        let b = largest(shape.batch, |b| fits(b, h, shape.tq));
        return Some(PartSize { b, h, t: shape.tq });
    }
    if !rows || !fits(1, 1, 1) {
        return None;
    }
    let t = largest(shape.tq, |t| fits(1, 1, t));
    let h = largest(shape.hkv, |h| fits(1, h, t));
    Some(PartSize { b: 1, h, t })
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

/// How a call runs: whole, on its plan, or in parts of at most a [`PartSize`].
#[derive(Debug)]
pub(crate) enum Planned<T> {
    /// One plan for the whole call.
    Whole(Box<T>),
    /// Parts of this size ([`parts`]), each planned alone.
    Parts(PartSize),
}

/// Plans `shape` by `plan`; where that exceeds a limit ([`NsaError::ExceedsLimit`]), the
/// largest parts that plan ([`part_size`], in parts of query rows where `rows` allows), or
/// the whole call's error when none does.
pub(crate) fn plan_or_parts<T>(
    shape: &Shape,
    rows: bool,
    plan: impl Fn(&Shape) -> Result<T>,
) -> Result<Planned<T>> {
    match plan(shape) {
        Ok(p) => Ok(Planned::Whole(Box::new(p))),
        Err(err @ NsaError::ExceedsLimit { .. }) => part_size(shape, rows, |s| plan(s).is_ok())
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
            |kind: Kind, width: usize, x: &[f32]| Layout::of(s, kind, width).gather(x, part, s);
        let branch = (inputs.branch_tensors().into_iter())
            .enumerate()
            .map(|(i, (_, t))| t.map(|t| take(Kind::Keys, if i % 2 == 0 { s.dk } else { s.dv }, t)))
            .collect();
        // The weights, `[Hkv, l, D, D]` and `[Hkv, l, D]`, as one sequence of one key row, of
        // a shape of one query and one key (which a part of its one row takes whole).
        let one = Shape { tq: 1, tk: 1, ..*s };
        let heads = Part {
            b: 0..1,
            h: part.h.clone(),
            t: 0..1,
        };
        let weight = |width: usize, x: &[f32]| {
            let layout = Layout {
                batch: 1,
                ..Layout::of(&one, Kind::Keys, width)
            };
            layout.gather(x, &heads, &one)
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
            q: take(Kind::Queries, s.dk, inputs.q),
            k: take(Kind::Keys, s.dk, inputs.k),
            v: take(Kind::Keys, s.dv, inputs.v),
            gates: take(Kind::Queries, 3, inputs.gates),
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
    let out = Layout::of(s, Kind::Queries, s.dv);
    out.scatter(&mut res.out, &got.out, part, s);
    if let (Some(x), Some(from)) = (&mut res.block_indices, &got.block_indices) {
        Layout::of(s, Kind::Selections, n).scatter(x, from, part, s);
    }
    if let (Some(x), Some(from)) = (&mut res.branches, &got.branches) {
        out.scatter(&mut x.o_cmp, &from.o_cmp, part, s);
        out.scatter(&mut x.o_slc, &from.o_slc, part, s);
        out.scatter(&mut x.o_win, &from.o_win, part, s);
    }
}

/// The parts of `shape` of at most `size` each: sequences outermost, then query rows, then
/// kv heads.
pub(crate) fn parts(shape: &Shape, size: PartSize) -> Vec<Part> {
    let ranges = |n: usize, step: usize| {
        (0..n)
            .step_by(step)
            .map(move |a| a..(a + step).min(n))
            .collect::<Vec<_>>()
    };
    let (hs, ts) = (ranges(shape.hkv, size.h), ranges(shape.tq, size.t));
    let mut parts = Vec::new();
    for b in ranges(shape.batch, size.b) {
        for t in &ts {
            for h in &hs {
                let (b, h, t) = (b.clone(), h.clone(), t.clone());
                parts.push(Part { b, h, t });
            }
        }
    }
    parts
}

/// What a `[B, T, H, W]` tensor's heads and rows are, which says what of it a part takes:
/// kv heads and key rows (`k`, `v` and the branches' own, the linear weights as
/// `[1, 1, Hkv, l * D * D]`), query heads and query rows (`q`, `gates`, `out` and the branch
/// outputs), or kv heads and query rows (block indices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Kv heads, key rows.
    Keys,
    /// Query heads, query rows.
    Queries,
    /// Kv heads, query rows.
    Selections,
}

/// A `[B, T, H, W]` tensor of `shape` (B and H as `shape` and `kind` say; `T` and `W` are
/// the tensor's) and the part's view of it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    /// Sequences.
    pub batch: usize,
    /// Which heads and rows the tensor has.
    pub kind: Kind,
    /// How many heads.
    pub heads: usize,
    /// Elements per head and row.
    pub width: usize,
}

impl Layout {
    /// A tensor of `shape` of `kind` whose rows hold `width` per head.
    pub fn of(shape: &Shape, kind: Kind, width: usize) -> Self {
        Self {
            batch: shape.batch,
            kind,
            heads: match kind {
                Kind::Keys | Kind::Selections => shape.hkv,
                Kind::Queries => shape.hq,
            },
            width,
        }
    }

    /// The part's ranges of sequences, rows (of a tensor of `rows` per sequence) and heads
    /// in this layout.
    fn ranges(&self, part: &Part, shape: &Shape, rows: usize) -> [Range<usize>; 3] {
        let h = match self.kind {
            Kind::Keys | Kind::Selections => part.h.clone(),
            Kind::Queries => part.q_heads(shape),
        };
        let t = match self.kind {
            Kind::Keys => 0..rows - (shape.tq - part.t.end),
            Kind::Queries | Kind::Selections => part.t.clone(),
        };
        [part.b.clone(), t, h]
    }

    /// The offsets and length of each contiguous run of `x` (of this layout) that the part
    /// holds, in order.
    fn runs(&self, len: usize, part: &Part, shape: &Shape) -> impl Iterator<Item = Range<usize>> {
        let rows = len / (self.batch * self.heads * self.width);
        let [b, t, h] = self.ranges(part, shape, rows);
        let (heads, width, run) = (self.heads, self.width, h.len() * self.width);
        b.flat_map(move |bi| {
            let h0 = h.start;
            t.clone().map(move |t| {
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
        // Three sequences of 7 queries over 9 keys, 5 kv heads of groups of 3: parts of 2
        // sequences, 2 kv heads and 7 or 3 query rows, remainders in each.
        let shape = Shape {
            tk: 9,
            ..Shape::prefill(3, 7, 15, 5, 4, 2)
        };
        for (t, count) in [(7, 2 * 3), (3, 2 * 3 * 3)] {
            let ps = parts(&shape, PartSize { b: 2, h: 2, t });
            assert_eq!(ps.len(), count);
            let kinds = [
                (Kind::Queries, 4),
                (Kind::Keys, 2),
                (Kind::Keys, 16),
                (Kind::Selections, 5),
            ];
            for (kind, width) in kinds {
                let layout = Layout::of(&shape, kind, width);
                let rows = if kind == Kind::Keys { 9 } else { 7 };
                let len = layout.batch * rows * layout.heads * width;
                let x: Vec<u32> = (0..len as u32).collect();
                // Keys are taken up to each part's last query row: some by several parts.
                let mut seen = vec![0usize; len];
                let mut back = vec![u32::MAX; len];
                for p in &ps {
                    let got = layout.gather(&x, p, &shape);
                    let own = p.shape(&shape);
                    let own_rows = if kind == Kind::Keys { own.tk } else { own.tq };
                    let own_layout = Layout::of(&own, kind, width);
                    assert_eq!(got.len(), own.batch * own_rows * own_layout.heads * width);
                    for &i in &got {
                        seen[i as usize] += 1;
                    }
                    layout.scatter(&mut back, &got, p, &shape);
                }
                assert_eq!(back, x, "{kind:?} {width} t {t}");
                if kind != Kind::Keys {
                    assert!(seen.iter().all(|&n| n == 1), "{kind:?} {width} t {t}");
                }
            }
        }
        // The last of three row parts takes every key, the first those up to its row 2.
        let ps = parts(&shape, PartSize { b: 3, h: 5, t: 3 });
        let tks: Vec<usize> = ps.iter().map(|p| p.shape(&shape).tk).collect();
        assert_eq!(tks, [5, 8, 9]);
    }

    #[test]
    fn the_largest_part_that_plans_is_found() {
        let shape = Shape::prefill(10, 7, 8, 4, 4, 4);
        let size = |b, h, t| Some(PartSize { b, h, t });
        // Kv heads limit to 3, then sequences times heads to 7: 2 sequences of 3 heads.
        let got = part_size(&shape, true, |s| s.hkv <= 3 && s.batch * s.hkv <= 7);
        assert_eq!(got, size(2, 3, 7));
        assert_eq!(part_size(&shape, true, |_| true), size(10, 4, 7));
        let one = |s: &Shape| s.hkv == 1 && s.batch == 1;
        assert_eq!(part_size(&shape, true, one), size(1, 1, 7));
        assert_eq!(part_size(&shape, true, |_| false), None);
        // Query rows limited to 3 and rows times kv heads to 6 (and every part tried has all
        // 7 keys): one sequence's 3 rows of 2 heads; without rows, no part.
        let rows = |s: &Shape| s.batch == 1 && s.tq <= 3 && s.tq * s.hkv <= 6 && s.tk == 7;
        assert_eq!(part_size(&shape, true, rows), size(1, 2, 3));
        assert_eq!(part_size(&shape, false, rows), None);
    }
}
