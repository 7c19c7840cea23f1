// The attention core's score hooks (see attention.wgsl) for compressed attention keeping
// its scores: row i's scores of keys t .. t + 3 (keep4) or of key t (keep1) go to
// cmp_attn.wgsl's keep_score.

fn keep4(r: Rows, i: u32, t: u32, s: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        keep_score(r, i, t + c, s[c]);
    }
}

fn keep1(r: Rows, i: u32, t: u32, s: f32) {
    keep_score(r, i, t, s);
}
