// Top-n bookkeeping shared by select and select_merge: the ranking rule, the forced blocks
// and the final write-out. The including kernel defines `WG` and the `block_indices` binding.

#import params

// top_n at most: the selection's lists are sized by the config's n (Rust's
// `Specialization::top_list`); select_merge keeps 256 (the crate's `MERGE_TOP_N`: plans with
// a larger n never split their selection).
override NMAX: u32 = 256u;

var<workgroup> top_idx: array<u32, NMAX>;  // the chosen blocks, best first

// True when (sa, ja) ranks before (sb, jb): higher score first, ties to the lower block.
fn beats(sa: f32, ja: u32, sb: f32, jb: u32) -> bool {
    return sa > sb || (sa == sb && ja < jb);
}

// The blocks position p always selects: [0, fa) and [fl, c] (disjoint), nf of them, where c
// is p's own block.
struct Forced {
    c: u32,
    fa: u32,
    fl: u32,
    nf: u32,
}

fn forced_blocks(p: u32) -> Forced {
    var f: Forced;
    f.c = p / params.sel_block;
    f.fa = min(params.init_blocks, f.c + 1u);
    f.fl = max(f.c + 1u - min(params.local_blocks, f.c + 1u), f.fa);
    f.nf = f.fa + (f.c + 1u - f.fl);
    return f;
}

// Writes the forced blocks and the `cnt` chosen ones (top_idx, already in block order
// where `sorted`) in ascending order at block_indices[ob ..], then pads to n with -1. The
// chosen lie in [fa, fl), between the forced blocks.
fn write_selection(lid: u32, ob: u32, f: Forced, cnt: u32, sorted: bool) {
    for (var x = lid; x < f.nf + cnt; x += WG) {
        var j: u32;
        var pos: u32;
        if x < f.nf {
            j = select(f.fl + (x - f.fa), x, x < f.fa);
            pos = select(x + cnt, x, x < f.fa);
        } else if sorted {
            j = top_idx[x - f.nf];
            pos = f.fa + (x - f.nf);
        } else {
            j = top_idx[x - f.nf];
            pos = f.fa;
            for (var y = 0u; y < cnt; y++) {
                pos += u32(top_idx[y] < j);
            }
        }
        block_indices[ob + pos] = i32(j);
    }
    for (var x = f.nf + cnt + lid; x < params.top_n; x += WG) {
        block_indices[ob + x] = -1;
    }
}
