// Block importance, group sum and top-n selection of one (batch, query, kv head) row per
// workgroup, all its blocks at once (up to TOP_BLOCKS), from the block sums cmp_attn kept:
// what select.wgsl splits over several workgroups plus select_merge.wgsl compute for calls
// with few rows (decode steps, short chunks), in one dispatch. Each invocation scores its
// blocks (block_importance) and keeps them in registers; the top n - nf candidates are then
// found by a radix select over (score, block) keys, 4 bits per step: higher scores first,
// ties to the lower block (topn's `beats`), every key distinct, so that exactly the top
// slots remain whatever the ties.

#import topn
#import select_lse
#import block_sums

// [B, Tq, Hq]; or cmp_attn's partials when params.cmp_splits > 0 (see load_lse)
@group(0) @binding(1) var<storage, read> lse: array<f32>;
// [B, Tq, Hkv, n]
@group(0) @binding(2) var<storage, read_write> block_indices: array<i32>;
// cmp_attn's block sums: [B, Tq, Hq, kept_stride], per tile kept_tile / 4 + 2 elements
@group(0) @binding(3) var<storage, read> kept: array<f32>;

const ROWS: u32 = 16u;      // heads per group at most (Rust's ROWS)
const TOP_BLOCKS: u32 = 2048u;  // candidate blocks per row at most (Rust's TOP_BLOCKS)
// Invocations per workgroup: 256, 512 or 1024, the most the adapter allows (Rust's
// `select_top_invocations`), so that each scores fewer blocks.
override WG: u32 = 256u;
const BPI_MAX: u32 = TOP_BLOCKS / 256u;
override BPI: u32 = TOP_BLOCKS / WG;  // blocks per invocation
const DIGITS: u32 = 16u;    // 4 bits per step
// Passes over a key: the score's 32 bits, then the candidate's place's 12 (TOP_BLOCKS = 2^11).
const SCORE_PASSES: u32 = 8u;
const PASSES: u32 = 11u;

// load_lse's scratch. Loading the first block's sums for 8 heads before the log-sum-exps, so
// that both round trips overlap, was 1-2 µs slower on an H200 (fifty-eighth session).
var<workgroup> partial: array<f32, 16u * ROWS>;
// Per step, how many live keys have each digit: two sets, so that one is cleared while the
// other counts. One atomic per live key: on an H200 (f16) counting per invocation
// (forty-eighth session) or per subgroup (`subgroupAdd` of packed counts, fifty-seventh)
// with one atomic per digit made the selection slower (0.023 against 0.019 ms at 64k).
var<workgroup> hist: array<array<atomic<u32>, DIGITS>, 2>;
// The step's cut: its digit, the live keys above it, and those at it.
var<workgroup> cut: vec3<u32>;
var<workgroup> chosen_n: atomic<u32>;

// Digit `step` of the key of a block with score bits `s` at place r among the candidates:
// the score's from the top, then those of TOP_BLOCKS - 1 - r (the lower block ranks higher).
fn digit(s: u32, r: u32, step: u32) -> u32 {
    if step < SCORE_PASSES {
        return (s >> (28u - 4u * step)) & 15u;
    }
    return ((TOP_BLOCKS - 1u - r) >> (8u - 4u * (step - SCORE_PASSES))) & 15u;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = linear_workgroup(wg, nwg);
    if row >= params.total_wg {
        return;
    }
    let h = row % params.hkv;
    let iq = row / params.hkv % params.q_count;
    let bb = row / params.hkv / params.q_count;
    let p = query_position(bb, params.q_start + iq);
    let nv = visible_compressed(p);
    let f = forced_blocks(p);
    let slots = params.top_n - f.nf;
    // The candidates: blocks [fa, fl), place r = j - fa.
    let ncand = f.fl - f.fa;
    let row0 = (bb * params.q_count + iq) * params.hq + h * params.g;  // first head of the group
    if lid < 2u * DIGITS {
        atomicStore(&hist[lid / DIGITS][lid % DIGITS], 0u);
    }
    if lid == 0u {
        atomicStore(&chosen_n, 0u);
    }
    load_lse(lid, row0, params.g);
    workgroupBarrier();  // lse_s is in
    // Invocation lid holds places lid, lid + WG, ...: bit i of `live` where place
    // lid + i * WG is a candidate still in the running, of `chosen` where it is taken.
    var score: array<u32, BPI_MAX>;
    var live = 0u;
    for (var i = 0u; i < BPI; i++) {
        let r = lid + i * WG;
        score[i] = 0u;
        if r < ncand {
            let s = block_importance(f.fa + r, row0, params.g, nv);
            // Probability sums: +0 or more (a -0 ranks as +0).
            score[i] = select(0u, bitcast<u32>(s), s > 0.0);
            live |= 1u << i;
        }
    }
    var chosen = 0u;
    if ncand <= slots {
        chosen = live;
    } else if slots > 0u {
        // k: how many of the live keys are still to be taken (1 <= k <= live keys).
        var k = slots;
        for (var step = 0u; step < PASSES; step++) {
            let b = step & 1u;
            if lid < DIGITS {
                atomicStore(&hist[b ^ 1u][lid], 0u);  // for the next step
            }
            for (var i = 0u; i < BPI; i++) {
                if (live >> i & 1u) != 0u {
                    atomicAdd(&hist[b][digit(score[i], lid + i * WG, step)], 1u);
                }
            }
            workgroupBarrier();
            // The digit whose keys hold the k-th best: fewer than k above it, k or more at
            // or above it (exactly one digit).
            if lid < DIGITS {
                var above = 0u;
                for (var d = lid + 1u; d < DIGITS; d++) {
                    above += atomicLoad(&hist[b][d]);
                }
                let here = atomicLoad(&hist[b][lid]);
                if above < k && above + here >= k {
                    cut = vec3<u32>(lid, above, here);
                }
            }
            let c = workgroupUniformLoad(&cut);
            k -= c.y;
            for (var i = 0u; i < BPI; i++) {
                let bit = 1u << i;
                if (live & bit) != 0u {
                    let d = digit(score[i], lid + i * WG, step);
                    chosen |= select(0u, bit, d > c.x);
                    live &= select(~bit, 0xffffffffu, d == c.x);
                }
            }
            // Every key left at the cut digit is taken (the last step leaves one: keys are
            // distinct).
            if c.z == k {
                chosen |= live;
                break;
            }
        }
    }
    for (var i = 0u; i < BPI; i++) {
        if (chosen >> i & 1u) != 0u {
            top_idx[atomicAdd(&chosen_n, 1u)] = f.fa + lid + i * WG;
        }
    }
    workgroupBarrier();
    write_selection(lid, params.off_idx + row * params.top_n, f, min(slots, ncand), false);
}
