// Compressed attention: each query head attends to the compressed tokens whose whole block
// lies at or before its position (online softmax over tiles), and records its log-sum-exp
// for the selection kernel.

#import attention

@group(0) @binding(4) var<storage, read_write> o_cmp: array<f32>;  // [B, Tq, Hq, Dv]
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;    // [B, Tq, Hq]

@compute @workgroup_size(128)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = attn_rows(linear_workgroup(wg, nwg));
    if !r.valid {
        return;
    }
    attn_begin(lid);
    attn_keys(lid, r, params.n_cmp, 0u, visible_compressed(r.pos));
    for (var a = 0u; a < ACC; a++) {
        let o = lid + a * WG;
        if o >= r.n * params.dv {
            break;
        }
        o_cmp[params.off_ocmp + r.row0 * params.dv + o] = attn_value(a, o / params.dv);
    }
    if lid < r.n {
        let l = row_sum[lid];
        lse[params.off_lse + r.row0 + lid] = select(0.0, row_max[lid] + log(l), l > 0.0);
    }
}
