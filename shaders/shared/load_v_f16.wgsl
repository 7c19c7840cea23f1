// Element loads from attention's v (`array<in_s>`, in_s = u32): as load_f16.wgsl for k.

fn load_v1(at: u32) -> f32 {
    return unpack2x16float(v[at >> 1u])[at & 1u];
}

// As load_k4: with Dv even, at is even.
fn load_v4(at: u32) -> vec4<f32> {
    let w = at >> 1u;
    if DV % 2u == 0u {
        return vec4<f32>(unpack2x16float(v[w]), unpack2x16float(v[w + 1u]));
    }
    return quad(at, v[w], v[w + 1u], v[w + 2u * (at & 1u)]);
}
