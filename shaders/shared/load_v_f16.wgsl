// Element loads from attention's v (`array<in_s>`, in_s = u32): as load_f16.wgsl for k.

fn load_v1(at: u32) -> f32 {
    return unpack2x16float(v[at >> 1u])[at & 1u];
}

// As raw_k4: with Dv even, at is even and the words stay packed.
fn raw_v4(at: u32) -> in_raw {
    let w = at >> 1u;
    return raw_words(at, DV, v[w], v[w + 1u], v[w + 2u * (at & 1u)]);
}
