// Element loads from attention's v (`array<in_s>`, in_s = f32): as load_f32.wgsl for k.

fn load_v1(at: u32) -> f32 {
    return v[at];
}

fn raw_v4(at: u32) -> in_raw {
    return vec4<f32>(v[at], v[at + 1u], v[at + 2u], v[at + 3u]);
}
