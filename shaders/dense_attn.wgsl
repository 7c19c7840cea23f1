// Dense causal attention (flash-attention style: tiled, online softmax, GQA): every key
// 0 ..= p. The honest baseline for NSA's speed ratios, and an op in its own right.

#import attention

@group(0) @binding(4) var<storage, read_write> out: array<f32>;  // [B, Tq, Hq, Dv]

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
    attn_keys(lid, r, params.tk, 0u, r.pos + 1u);
    for (var a = 0u; a < ACC; a++) {
        let o = lid + a * WG;
        if o >= r.n * params.dv {
            break;
        }
        out[params.off_out + r.row0 * params.dv + o] = attn_value(a, o / params.dv);
    }
}
