//! Input mutation for property tests of parsers that read bytes walvault did not write.
//!
//! Random bytes rarely get past a magic number or a checksum, so the property tests of both
//! crates start from a valid input and damage it the ways storage and forgery do: bit flips,
//! overwritten bytes, truncation, and forged little- or big-endian length fields. Built only for
//! tests (`cfg(test)` here, the `fuzzing` feature for the walvault crate's tests).

use proptest::prelude::*;

/// One way of damaging an input; positions are taken modulo the input's length.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Flips one bit.
    Flip(usize, u8),
    /// Overwrites one byte.
    Set(usize, u8),
    /// Cuts the input to a fraction (in 1/256ths) of its length.
    Truncate(u8),
    /// Writes a 32-bit value, little-endian: a forged length, offset or count.
    LengthLe(usize, u32),
    /// Writes a 32-bit value, big-endian (network order, as replication messages use).
    LengthBe(usize, u32),
    /// Inserts bytes.
    Insert(usize, Vec<u8>),
}

/// Values that make length checks go wrong: zero, one, small, around powers of two, the maximum.
fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(u32::MAX),
        Just(i32::MAX as u32),
        (0u32..32).prop_map(|b| 1u32 << b),
        (0u32..32).prop_map(|b| (1u32 << b).wrapping_sub(1)),
        any::<u32>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip(at, bit)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
        1 => any::<u8>().prop_map(Mutation::Truncate),
        2 => (any::<usize>(), interesting_u32()).prop_map(|(at, v)| Mutation::LengthLe(at, v)),
        2 => (any::<usize>(), interesting_u32()).prop_map(|(at, v)| Mutation::LengthBe(at, v)),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
    ]
}

/// Applies `mutation` to `bytes`.
pub fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len();
    let at = |i: usize, width: usize| (len >= width).then(|| i % (len - width + 1));
    match mutation {
        Mutation::Flip(i, bit) => {
            if let Some(i) = at(*i, 1) {
                bytes[i] ^= 1 << bit;
            }
        }
        Mutation::Set(i, b) => {
            if let Some(i) = at(*i, 1) {
                bytes[i] = *b;
            }
        }
        Mutation::Truncate(frac) => bytes.truncate(len * usize::from(*frac) / 256),
        Mutation::LengthLe(i, v) => {
            if let Some(i) = at(*i, 4) {
                bytes[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        Mutation::LengthBe(i, v) => {
            if let Some(i) = at(*i, 4) {
                bytes[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
        Mutation::Insert(i, more) => {
            let i = if len == 0 { 0 } else { i % (len + 1) };
            bytes.splice(i..i, more.iter().copied());
        }
    }
}

/// `valid` damaged by one to eight mutations, or (one case in eight) replaced by random bytes
/// of up to twice its length.
pub fn damaged(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let max_random = valid.len().saturating_mul(2).max(64);
    prop_oneof![
        7 => proptest::collection::vec(mutation(), 1..8).prop_map(move |ms| {
            let mut bytes = valid.clone();
            for m in &ms {
                apply(&mut bytes, m);
            }
            bytes
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..max_random),
    ]
}

/// Like [`damaged`], for text formats: the damaged bytes read as UTF-8, lossily.
pub fn damaged_text(valid: &str) -> impl Strategy<Value = String> {
    damaged(valid.as_bytes().to_vec()).prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The normal suite's case count for a target, or `PROPTEST_CASES` when set (the long runs of
/// `bench/fuzz.sh`).
pub fn config(normal_cases: u32) -> proptest::test_runner::Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(normal_cases);
    proptest::test_runner::Config {
        cases,
        // Shrinking a long run's find can take longer than the run: a bounded effort is enough.
        max_shrink_iters: 2048,
        ..proptest::test_runner::Config::default()
    }
}
