//! Deterministic inputs for examples, benchmarks and tests.

/// `n` values uniform in `[-1, 1)` from a xorshift generator seeded with `seed`: the same
/// numbers on every machine, no dependencies, fast enough for 64k-token inputs.
pub fn sample_values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}
