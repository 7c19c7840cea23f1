// Element loads from the attention kernels' q and k (`array<in_s>`, in_s = f32), by element
// index. load_f16.wgsl has the same functions for pairs of f16.

fn load_q1(at: u32) -> f32 {
    return q[at];
}

fn load_k1(at: u32) -> f32 {
    return k[at];
}

// Elements at .. at + 3 of k.
fn load_k4(at: u32) -> vec4<f32> {
    return vec4<f32>(k[at], k[at + 1u], k[at + 2u], k[at + 3u]);
}
