// Element loads from the attention kernels' q and k (`array<in_s>`, in_s = vec2<f16>: two
// elements per 4-byte load), by element index; key loads stay f16 (converted when stored to
// the tile). load_f32.wgsl has the same functions for f32.

fn load_q1(at: u32) -> f32 {
    return f32(q[at >> 1u][at & 1u]);
}

fn load_k1(at: u32) -> in_t {
    return k[at >> 1u][at & 1u];
}

// Elements at .. at + 3 of k.
fn load_k4(at: u32) -> pre_t {
    let w = at >> 1u;
    return quad(at, k[w], k[w + 1u], k[w + 2u * (at & 1u)]);
}

// Elements at .. at + 3 from the pairs at / 2 (a), at / 2 + 1 (b) and, for an odd `at`,
// at / 2 + 2 (c; for an even one, any pair: callers pass `a`'s again, which costs no load).
fn quad(at: u32, a: vec2<f16>, b: vec2<f16>, c: vec2<f16>) -> pre_t {
    if (at & 1u) == 0u {
        return pre_t(a, b);
    }
    return pre_t(a.y, b, c.x);
}
