// Compressed attention: each query head attends to the compressed tokens whose whole block
// lies at or before its position (online softmax over tiles), and records its log-sum-exp
// for the selection kernel. Where the plan keeps scores (the steps compiled with the core's
// keep_on.wgsl, params.kept_stride > 0: every chunk whose scores fit the budget), it also
// stores every scaled score it computes, so that the selection reads them (select_kept.wgsl)
// instead of multiplying the queries with the compressed keys a second time.

#import attention

@group(0) @binding(4) var<storage, read_write> o_cmp: array<f32>;  // [B, Tq, Hq, Dv], or partials when split
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;    // [B, Tq, Hq]
// [B, Tq, Hq, kept_stride] as vec4s (the stride a multiple of 4): row r's score of
// compressed token t at element r * kept_stride + t, for the tokens the row sees (NEG_BIG or
// unwritten past them)
@group(0) @binding(6) var<storage, read_write> kept: array<vec4<f32>>;

// Called through keep_on.wgsl: row i's scores of keys t .. t + 3, all four in this tile when
// `whole`. Rows past r.n may hold stale scores in the tile; they are not this workgroup's to
// write.
fn keep_scores(r: Rows, i: u32, t: u32, s: vec4<f32>, whole: bool) {
    if i >= r.n {
        return;
    }
    let at = kept_at(i, t);
    // One 16-byte store where the four are a whole, aligned vec4 of the row; its masked
    // scores (NEG_BIG) are past the row's tokens, which the selection never reads.
    if whole && (at & 3u) == 0u {
        kept[at >> 2u] = s;
        return;
    }
    for (var c = 0u; c < 4u; c++) {
        keep_score(r, i, t + c, s[c]);
    }
}

// Row i's score of key t, where it sees it.
fn keep_score(r: Rows, i: u32, t: u32, s: f32) {
    if i < r.n && s != NEG_BIG {
        let at = kept_at(i, t);
        kept[at >> 2u][at & 3u] = s;
    }
}

// The element of `kept` that holds row i's score of key t (only steps with
// params.kept_stride > 0 compile keep_on.wgsl, which calls the two above).
fn kept_at(i: u32, t: u32) -> u32 {
    return params.off_kept + attn_row(i) * params.kept_stride + t;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = attn_rows(linear_workgroup(wg, nwg));
    if !r.valid {
        return;
    }
    // Rows are ordered by position, so the last one sees the most tokens.
    let keys = split_range(r, 0u, visible_compressed(attn_pos(r, r.n - 1u)));
    attn_begin(lid, r, params.c_stride, keys);
    if lid < ROWS {
        row_lo[lid] = 0u;
        row_hi[lid] = select(0u, visible_compressed(attn_pos(r, lid)), lid < r.n);
    }
    workgroupBarrier();
    attn_keys(lid, r, params.c_stride, keys.x, keys.y, vec2<u32>(0u));
    attn_finish(lid, r);
    if params.partials != 0u {
        for (var x = lid; x < part_count(r); x += WG) {
            o_cmp[params.off_ocmp + part_index(r, x)] = part_value(x);
        }
        return;
    }
    for (var x = lid; x < r.n * DV; x += WG) {
        o_cmp[params.off_ocmp + attn_row(x / DV) * DV + x % DV] = attn_out(x / DV, x % DV);
    }
    if lid < r.n {
        let l = row_sum[lid];
        lse[params.off_lse + attn_row(lid)] = select(0.0, row_max[lid] + log(l), l > 0.0);
    }
}
