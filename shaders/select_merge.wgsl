// Merges split selection (select.wgsl with params.splits > 1): each split left its best
// candidates over its own chunks of blocks; the overall top n - nf are the candidates that
// fewer than n - nf others beat (the ranking is a strict order, so ranks are distinct).
// One workgroup per (batch, query, kv head) row; the output is what unsplit select writes.

#import topn

@group(0) @binding(1) var<storage, read> cand: array<i32>;                // [rows, splits, n, 2]
@group(0) @binding(2) var<storage, read_write> block_indices: array<i32>; // [B, Tq, Hkv, n]

const WG: u32 = 128u;
const CAND_MAX: u32 = 1024u;  // splits * n at most

var<workgroup> cand_score: array<f32, CAND_MAX>;
var<workgroup> cand_idx: array<u32, CAND_MAX>;

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
    workgroupBarrier();
    var valid = 0u;
    for (var y = 0u; y < total; y++) {
        valid += u32(cand_score[y] >= 0.0);
    }
    for (var x = lid; x < total; x += WG) {
        let sa = cand_score[x];
        let ja = cand_idx[x];
        if sa >= 0.0 {
            var rank = 0u;
            for (var y = 0u; y < total; y++) {
                rank += u32(cand_score[y] >= 0.0 && beats(cand_score[y], cand_idx[y], sa, ja));
            }
            if rank < slots {
                top_idx[rank] = ja;
            }
        }
    }
    workgroupBarrier();
    write_selection(lid, params.off_idx + row * params.top_n, f, min(slots, valid));
}
