// Merges split selection (select.wgsl with params.splits > 1): each split left its best
// candidates over its own chunks of blocks, best first, padded with score -1. A candidate's
// overall rank is how many candidates beat it (under the one strict order: higher score,
// ties to the lower block); the top n - nf are those ranked below n - nf. One workgroup per
// (batch, query, kv head) row; the output is what unsplit select writes.
//
// Only candidates that can make the top are ranked: where a split's list is full (slots
// entries), its last entry has slots - 1 others above it, so anything that entry beats ranks
// slots or worse. The best of those last entries, tau, is the bar: the survivors (everything
// tau does not beat) hold the whole top, everything that beats a survivor survives too, and
// each split's survivors are a prefix of its list. Each survivor's rank is then how many
// survivors beat it: a loop of independent loads that every invocation reads in step
// (broadcasts), instead of one chain of dependent loads per list.

#import topn

@group(0) @binding(1) var<storage, read> cand: array<i32>;                // [rows, splits, n, 2]
@group(0) @binding(2) var<storage, read_write> block_indices: array<i32>; // [B, Tq, Hkv, n]

const WG: u32 = 128u;
const CAND_MAX: u32 = 768u;  // splits * n at most (Rust's CAND_MAX)
const SPLITS_MAX: u32 = 64u;  // at least Rust's SELECT_SPLITS_MAX, at most WG

var<workgroup> cand_score: array<f32, CAND_MAX>;
var<workgroup> cand_idx: array<u32, CAND_MAX>;
var<workgroup> surv_score: array<f32, CAND_MAX>;  // the survivors, split by split
var<workgroup> surv_idx: array<u32, CAND_MAX>;
var<workgroup> kept: array<u32, SPLITS_MAX>;      // per split: survivors, then where they start
var<workgroup> filled: array<u32, SPLITS_MAX>;    // per split: candidates with a score
var<workgroup> bar: u32;    // tau's candidate number; CAND_MAX when no list is full
var<workgroup> totals: vec2<u32>;  // survivors, candidates with a score

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
    let bb = row / params.hkv / params.q_count;
    let f = forced_blocks(query_position(bb, params.q_start + iq));
    let slots = params.top_n - f.nf;
    let n = params.top_n;
    let total = params.splits * n;
    let base = params.off_kc + row * total * 2u;  // off_kc: the candidates' offset
    for (var x = lid; x < total; x += WG) {
        cand_score[x] = bitcast<f32>(cand[base + 2u * x]);
        cand_idx[x] = u32(cand[base + 2u * x + 1u]);
    }
    workgroupBarrier();
    if lid == 0u {
        var t = CAND_MAX;
        for (var s = 0u; s < params.splits && slots > 0u; s++) {
            let last = s * n + slots - 1u;
            let full = cand_score[last] >= 0.0;
            if full && (t == CAND_MAX || beats(cand_score[last], cand_idx[last], cand_score[t], cand_idx[t])) {
                t = last;
            }
        }
        bar = t;
    }
    workgroupBarrier();
    // Per split: its candidates (at most slots, best first), and the prefix tau does not beat.
    if lid < params.splits {
        let t = bar;
        var c = 0u;
        var p = 0u;
        for (var x = lid * n; x < lid * n + slots && cand_score[x] >= 0.0; x++) {
            c++;
            p += u32(t == CAND_MAX || !beats(cand_score[t], cand_idx[t], cand_score[x], cand_idx[x]));
        }
        filled[lid] = c;
        kept[lid] = p;
    }
    workgroupBarrier();
    if lid == 0u {
        var ns = 0u;
        var nv = 0u;
        for (var s = 0u; s < params.splits; s++) {
            let p = kept[s];
            kept[s] = ns;
            ns += p;
            nv += filled[s];
        }
        totals = vec2<u32>(ns, nv);
    }
    workgroupBarrier();
    let ns = totals.x;
    for (var x = lid; x < total; x += WG) {
        let s = x / n;
        let at = kept[s] + x % n;
        if at < select(ns, kept[s + 1u], s + 1u < params.splits) {
            surv_score[at] = cand_score[x];
            surv_idx[at] = cand_idx[x];
        }
    }
    workgroupBarrier();
    for (var k = lid; k < ns; k += WG) {
        let sa = surv_score[k];
        let ja = surv_idx[k];
        var rank = 0u;
        for (var y = 0u; y < ns; y++) {
            rank += u32(beats(surv_score[y], surv_idx[y], sa, ja));
        }
        if rank < slots {
            top_idx[rank] = ja;
        }
    }
    workgroupBarrier();
    write_selection(lid, params.off_idx + row * params.top_n, f, min(slots, totals.y), false);
}
