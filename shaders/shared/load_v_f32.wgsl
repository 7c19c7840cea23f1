// Element loads from attention's v (`array<in_s>`, in_s = f32): as load_f32.wgsl for k.

fn load_v1(at: u32) -> f32 {
    return v[at];
}

fn load_v4(at: u32) -> vec4<f32> {
    return vec4<f32>(v[at], v[at + 1u], v[at + 2u], v[at + 3u]);
}
