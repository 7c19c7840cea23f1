// Merges split selection (select.wgsl with params.splits > 1): each split left its best
// candidates over its own chunks of blocks, best first, padded with score -1. A candidate's
// overall rank is its place in its own list plus, for every other split, how many of that
// split's candidates beat it (a binary search: each list is sorted by the same strict
// order); the top n - nf are those ranked below n - nf. One workgroup per (batch, query, kv
// head) row; the output is what unsplit select writes.

#import topn

@group(0) @binding(1) var<storage, read> cand: array<i32>;                // [rows, splits, n, 2]
@group(0) @binding(2) var<storage, read_write> block_indices: array<i32>; // [B, Tq, Hkv, n]

const WG: u32 = 128u;
const CAND_MAX: u32 = 1024u;  // splits * n at most

var<workgroup> cand_score: array<f32, CAND_MAX>;
var<workgroup> cand_idx: array<u32, CAND_MAX>;
var<workgroup> valid: atomic<u32>;  // candidates with a score, at most slots per split

@compute @workgroup_size(128)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = linear_workgroup(wg, nwg);
    if row >= params.total_wg {
        return;
    }
    let iq = row / params.hkv % params.q_count;
    let f = forced_blocks(query_position(params.q_start + iq));
    let slots = params.top_n - f.nf;
    let total = params.splits * params.top_n;
    let base = params.off_kc + row * total * 2u;  // off_kc: the candidates' offset
    for (var x = lid; x < total; x += WG) {
        cand_score[x] = bitcast<f32>(cand[base + 2u * x]);
        cand_idx[x] = u32(cand[base + 2u * x + 1u]);
    }
    if lid == 0u {
        atomicStore(&valid, 0u);
    }
    workgroupBarrier();
    let n = params.top_n;
    for (var x = lid; x < total; x += WG) {
        let sa = cand_score[x];
        let ja = cand_idx[x];
        let own = x / n;
        var rank = x % n;
        if sa < 0.0 || rank >= slots {
            continue;
        }
        atomicAdd(&valid, 1u);
        for (var s = 0u; s < params.splits; s++) {
            if s == own {
                continue;
            }
            // The first entry of split s that does not beat (sa, ja).
            var lo = s * n;
            var hi = lo + n;
            while lo < hi {
                let mid = (lo + hi) / 2u;
                if cand_score[mid] >= 0.0 && beats(cand_score[mid], cand_idx[mid], sa, ja) {
                    lo = mid + 1u;
                } else {
                    hi = mid;
                }
            }
            rank += lo - s * n;
        }
        if rank < slots {
            top_idx[rank] = ja;
        }
    }
    workgroupBarrier();
    let chosen = min(slots, atomicLoad(&valid));
    write_selection(lid, params.off_idx + row * params.top_n, f, chosen);
}
