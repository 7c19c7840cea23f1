// Element loads from attention's v (`array<in_s>`, in_s = vec2<u32>): as load_f16.wgsl for k.

fn load_v1(at: u32) -> f32 {
    return unpack2x16float(v_word(at >> 1u))[at & 1u];
}

// Word w (elements 2 w, 2 w + 1) of v.
fn v_word(w: u32) -> u32 {
    return v[w >> 1u][w & 1u];
}

// As raw_k4.
fn raw_v4(at: u32) -> in_raw {
    if DV % 4u == 0u {
        return vec4<u32>(v[at >> 2u], 0u, 0u);
    }
    let w = at >> 1u;
    return raw_words(at, DV, v_word(w), v_word(w + 1u), v_word(w + 2u * (at & 1u)));
}
