// Element loads from the attention kernels' q and k (`array<in_s>`, in_s = vec2<u32>: four
// f16 per pair of words, unpacked with unpack2x16float), by element index. load_f32.wgsl
// has the same functions for f32.

fn load_q1(at: u32) -> f32 {
    return unpack2x16float(q[at >> 2u][(at >> 1u) & 1u])[at & 1u];
}

fn load_k1(at: u32) -> f32 {
    return unpack2x16float(k_word(at >> 1u))[at & 1u];
}

// Word w (elements 2 w, 2 w + 1) of k.
fn k_word(w: u32) -> u32 {
    return k[w >> 1u][w & 1u];
}

// Elements at .. at + 3 of k, as the raw words a tile fetch holds until it stores them. With
// Dk a multiple of 4, every vec4 a tile fetch loads starts at a multiple of 4 elements (the
// plan's offsets and rows are multiples of Dk), so one 8-byte load holds it, and its words
// stay packed: nothing consumes a load before the tile is stored, so the fetch never waits
// on its own loads. Otherwise word by word, unpacked at once where Dk is odd.
fn raw_k4(at: u32) -> in_raw {
    if DK % 4u == 0u {
        return vec4<u32>(k[at >> 2u], 0u, 0u);
    }
    let w = at >> 1u;
    return raw_words(at, DK, k_word(w), k_word(w + 1u), k_word(w + 2u * (at & 1u)));
}

// raw_k4 (raw_v4) from the words at / 2 .. at / 2 + 2 of k (v) as `quad` takes them, for
// rows of width `d`: with `d` even only the first two (the third load is then unused, and
// compiled out).
fn raw_words(at: u32, d: u32, a: u32, b: u32, c: u32) -> in_raw {
    if d % 2u == 0u {
        return vec4<u32>(a, b, 0u, 0u);
    }
    return bitcast<vec4<u32>>(quad(at, a, b, c));
}

// The elements of raw_k4's (raw_v4's) words, for tile rows of width `d` (Dk or Dv).
fn unraw4(w: in_raw, d: u32) -> vec4<f32> {
    if d % 2u == 0u {
        return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
    }
    return bitcast<vec4<f32>>(w);
}

// Elements at .. at + 3 from the words at / 2 (a), at / 2 + 1 (b) and, for an odd `at`,
// at / 2 + 2 (c; for an even one, any word: callers pass `a`'s again, which costs no load).
fn quad(at: u32, a: u32, b: u32, c: u32) -> vec4<f32> {
    let fa = unpack2x16float(a);
    let fb = unpack2x16float(b);
    if (at & 1u) == 0u {
        return vec4<f32>(fa, fb);
    }
    return vec4<f32>(fa.y, fb, unpack2x16float(c).x);
}
