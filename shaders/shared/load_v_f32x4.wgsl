// Element loads from attention's v read as vec4s (`array<in_kv>`): as load_f32x4.wgsl for k.

fn load_v1(at: u32) -> f32 {
    return v[at >> 2u][at & 3u];
}

fn load_v4(at: u32) -> vec4<f32> {
    return v[at >> 2u];
}
