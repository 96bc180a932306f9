//! Deterministic train/test split by thread id: a thread's side depends only on its id and the
//! seed, so every pair of a thread lands on the same side (no leak), the split is stable as the
//! store grows, and rebuilding gives the same files.

use sha2::{Digest, Sha256};

/// True when `thread_id` belongs to the held-out test set.
pub fn is_test(thread_id: u64, seed: u64, test_fraction: f64) -> bool {
    let mut h = Sha256::new();
    h.update(b"freeski-bot split v1");
    h.update(seed.to_le_bytes());
    h.update(thread_id.to_le_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // Uniform in [0, 1).
    let x = (u64::from_le_bytes(first) >> 11) as f64 / (1u64 << 53) as f64;
    x < test_fraction
}

/// A stable 64-bit key for a question (case and whitespace ignored): feedback is split by it, so
/// every answer to one question lands on the same side.
pub fn question_key(question: &str) -> u64 {
    let norm = question.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    let digest = Sha256::digest(norm.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_is_respected_and_stable() {
        let n = 20_000u64;
        let test = (0..n).filter(|id| is_test(*id, 0, 0.1)).count() as f64 / n as f64;
        assert!((test - 0.1).abs() < 0.01, "{test}");
        let a: Vec<bool> = (0..500).map(|id| is_test(id, 7, 0.1)).collect();
        let b: Vec<bool> = (0..500).map(|id| is_test(id, 7, 0.1)).collect();
        assert_eq!(a, b);
        let c: Vec<bool> = (0..500).map(|id| is_test(id, 8, 0.1)).collect();
        assert_ne!(a, c, "the seed changes the split");
        assert!(!(0..1000).any(|id| is_test(id, 0, 0.0)));
        assert!((0..1000).all(|id| is_test(id, 0, 1.0)));
        assert_eq!(question_key("How do I  butter?\n"), question_key("how do i butter?"));
        assert_ne!(question_key("How do I butter?"), question_key("How do I press?"));
    }
}
