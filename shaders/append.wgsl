// Appends new key and value rows to a KV cache, every sequence of a call in one dispatch per
// pair of cached tensors (keys and values), where a copy per sequence and tensor would each
// wait for the one before (copies into one buffer are ordered by a barrier each).
//
// `staging` holds a table, then the rows. Word 0 is the number of sequences `count`; then
// come `params.dim` words per sequence, three per cached tensor: where the sequence's rows
// start in `staging`, where they go in the tensor, and how many words they are (f16 rows
// hold whole pairs, so every row is whole words). This dispatch's two tensors' entries of
// the first sequence sit at `params.off_k` (into `dst_k`) and `params.off_v` (into
// `dst_v`). Workgroup (x, y, z) copies sequence x's rows of tensor z, the workgroups along
// y sharing its words.

#import params

@group(0) @binding(1) var<storage, read> staging: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst_k: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst_v: array<u32>;

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    if wg.x >= staging[0] {
        return;
    }
    let at = select(params.off_k, params.off_v, wg.z == 1u) + params.dim * wg.x;
    let src = staging[at];
    let to = staging[at + 1u];
    let words = staging[at + 2u];
    for (var i = wg.y * WG + lid; i < words; i += WG * nwg.y) {
        let w = staging[src + i];
        if wg.z == 0u {
            dst_k[to + i] = w;
        } else {
            dst_v[to + i] = w;
        }
    }
}
