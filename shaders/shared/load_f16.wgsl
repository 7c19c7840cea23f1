// Element loads from the attention kernels' q and k (`array<in_s>`, in_s = vec2<f16>: two
// elements per 4-byte load, as single 2-byte loads made f16 inputs slower than f32 on an
// H200), by element index. load_f32.wgsl has the same functions for f32.

fn load_q1(at: u32) -> f32 {
    return f32(q[at >> 1u][at & 1u]);
}

fn load_k1(at: u32) -> f32 {
    return f32(k[at >> 1u][at & 1u]);
}

// Elements at .. at + 3 of k.
fn load_k4(at: u32) -> vec4<f32> {
    let w = at >> 1u;
    return quad(at, k[w], k[w + 1u], k[w + 2u * (at & 1u)]);
}

// Elements at .. at + 3 from the pairs at / 2 (a), at / 2 + 1 (b) and, for an odd `at`,
// at / 2 + 2 (c; for an even one, any pair: callers pass `a`'s again, which costs no load).
fn quad(at: u32, a: vec2<f16>, b: vec2<f16>, c: vec2<f16>) -> vec4<f32> {
    let fa = vec2<f32>(a);
    let fb = vec2<f32>(b);
    if (at & 1u) == 0u {
        return vec4<f32>(fa, fb);
    }
    return vec4<f32>(fa.y, fb, f32(c.x));
}
