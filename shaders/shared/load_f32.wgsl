// Element loads from the attention kernels' q and k (`array<in_s>`, in_s = f32), by element
// index. load_f16.wgsl has the same functions for pairs of f16.

fn load_q1(at: u32) -> f32 {
    return q[at];
}

fn load_k1(at: u32) -> f32 {
    return k[at];
}

// Elements at .. at + 3 of k, as a tile fetch holds them (`in_raw`: for f32, the elements).
fn raw_k4(at: u32) -> in_raw {
    return vec4<f32>(k[at], k[at + 1u], k[at + 2u], k[at + 3u]);
}

// The elements of raw_k4's (raw_v4's) `in_raw`, for tile rows of width `d` (Dk or Dv).
fn unraw4(w: in_raw, d: u32) -> vec4<f32> {
    return w;
}
