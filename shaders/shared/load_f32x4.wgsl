// Element loads from the attention kernels' q (`array<in_s>`, f32) and k read as vec4s
// (`array<in_kv>`), by element index: one 16-byte load per four elements, which the plain
// f32 loads (load_f32.wgsl) cannot promise the driver. For f32 storage when Dk and Dv are
// multiples of 4: every key and value row, every bound window and every element offset
// (`params.off_*`) then falls on whole vec4s, and load_k4 is only asked for whole vec4s of a
// row.

alias in_kv = vec4<f32>;

fn load_q1(at: u32) -> f32 {
    return q[at];
}

fn load_k1(at: u32) -> f32 {
    return k[at >> 2u][at & 3u];
}

// Elements at .. at + 3 of k (`at` a multiple of 4).
fn load_k4(at: u32) -> vec4<f32> {
    return k[at >> 2u];
}
