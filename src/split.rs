//! Calls on host slices that are too large for the device as a whole, run as independent
//! parts: ranges of sequences and of kv heads (each with its group's query heads). NSA never
//! mixes sequences or kv groups (SPEC.md: everything is per sequence and per kv head, the
//! selection shared only within a group), so a part is the same call on a smaller shape,
//! and its outputs go back in place. This is what lets a call whose one sequence's keys pass
//! `max_storage_buffer_binding_size` (they interleave all kv heads, so a plan cannot bind
//! them in pieces) or whose tensors pass `max_buffer_size` run at all.

use std::ops::Range;

use crate::config::Shape;
use crate::error::{NsaError, Result};
use crate::plan::Plan;

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
pub(crate) enum Planned {
    /// One plan for the whole call.
    Whole(Box<Plan>),
    /// Parts of this size ([`parts`]), each planned alone.
    Parts((usize, usize)),
}

/// Plans `shape` by `plan`; where that exceeds a limit ([`NsaError::ExceedsLimit`]), the
/// largest parts that plan, or the whole call's error when not even one sequence's one kv
/// head does.
pub(crate) fn plan_or_parts(
    shape: &Shape,
    plan: impl Fn(&Shape) -> Result<Plan>,
) -> Result<Planned> {
    match plan(shape) {
        Ok(p) => Ok(Planned::Whole(Box::new(p))),
        Err(err @ NsaError::ExceedsLimit { .. }) => part_size(shape, |s| plan(s).is_ok())
            .map(Planned::Parts)
            .ok_or(err),
        Err(err) => Err(err),
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
