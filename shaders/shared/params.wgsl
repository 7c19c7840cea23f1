// The one uniform struct every kernel reads, and the dispatch helpers.
// Keep in sync with `Params` in src/kernels.rs (a test checks the size against naga).

struct Params {
    batch: u32,        // batches in this dispatch chunk
    tq: u32,           // Tq (whole call)
    tk: u32,           // Tk
    hq: u32,
    hkv: u32,
    g: u32,            // Hq / Hkv
    dk: u32,
    dv: u32,
    cmp_block: u32,    // l
    cmp_stride: u32,   // d
    sel_block: u32,    // l'
    top_n: u32,        // n
    init_blocks: u32,
    local_blocks: u32,
    window: u32,       // w
    n_cmp: u32,        // C, compressed tokens per sequence
    scale: f32,
    q_start: u32,      // first query row of this chunk
    q_count: u32,      // query rows in this chunk
    linear: u32,       // compress: 1 = Linear, 0 = Mean
    dim: u32,          // compress: row width of the tensor being compressed; append: table words per sequence
    head_chunks: u32,  // attention: workgroups per (query, kv head)
    kv_tile: u32,      // attention: keys per workgroup tile
    total_wg: u32,     // workgroups in this dispatch (the grid may round up)
    // Element offsets of each binding inside its bound window (windows start at aligned bytes).
    off_q: u32,
    off_k: u32,        // (append: the table word of the first sequence's key entry, off_v its value entry)
    off_v: u32,
    off_kc: u32,
    off_gates: u32,
    off_out: u32,
    off_ocmp: u32,
    off_oslc: u32,
    off_owin: u32,
    off_lse: u32,
    off_idx: u32,
    c_start: u32,      // compress: first compressed token of this dispatch
    c_count: u32,      // compress: compressed tokens per sequence in this dispatch
    q_block: u32,      // attention: consecutive queries per workgroup; compress: tokens per workgroup
    k_stride: u32,     // key/value rows per sequence in the bound buffers (Tk, or a cache's capacity)
    c_stride: u32,     // compressed rows per sequence in the bound buffers (C, or a cache's)
    splits: u32,       // attention, select: workgroups sharing one row group's keys (1: none)
    branch: u32,       // merge: 0 dense, 1 NSA (all three branches, then the gated sum), 2 NSA
                       // and the branch outputs; win_attn: 2 stores o_win
    sel_chunk: u32,    // select: blocks per chunk (a split takes every splits-th chunk)
    partials: u32,     // attention: 1 = write split partials for merge.wgsl (see part_index)
    cmp_splits: u32,   // select: 0 = read lse; else combine it from cmp_attn's partials
    slc_splits: u32,   // merge: splits of the selected branch's partials, at off_pslc
    win_splits: u32,   // merge: splits of the window branch's partials, at off_pwin
    off_pslc: u32,
    off_pwin: u32,
    kept_stride: u32,  // cmp_attn, select: 0, or the row stride of the kept scores (see cmp_attn)
    off_kept: u32,
    kept_tile: u32,    // cmp_attn, select: 0, or the tile of the kept block sums (see cmp_attn)
    // Per batch element of this dispatch, at most 64 (a KV cache's sequences of different
    // lengths in one plan, Rust's `Plan::cached_ragged`): how many tokens fewer than Tk its
    // sequence holds. Its rows' positions are that much earlier; 0 everywhere else.
    behind: array<vec4<u32>, 16>,
}

@group(0) @binding(0) var<uniform> params: Params;

// The linear workgroup index of a 2D grid (x is capped at 65535 by the dispatch limit).
fn linear_workgroup(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.x + wg.y * nwg.x;
}

// Absolute position of query row `i` (0-based within the whole call) of batch element `bb`
// (within the dispatch).
fn query_position(bb: u32, i: u32) -> u32 {
    return params.tk - params.tq + i - params.behind[bb / 4u][bb % 4u];
}

// First key of position `p`'s sliding window.
fn window_start(p: u32) -> u32 {
    return select(0u, p + 1u - params.window, p + 1u > params.window);
}

// Compressed tokens visible at position `p`: those with i*d + l - 1 <= p.
fn visible_compressed(p: u32) -> u32 {
    if p + 1u < params.cmp_block {
        return 0u;
    }
    return min((p + 1u - params.cmp_block) / params.cmp_stride + 1u, params.n_cmp);
}
