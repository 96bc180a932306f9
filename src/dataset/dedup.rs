//! Exact and near-duplicate removal. Exact: hash of the normalised conversation. Near: MinHash
//! estimates of the Jaccard similarity of word 3-shingles, for the question and for the answer;
//! a conversation is a near duplicate of a kept one when both reach the threshold (a reposted
//! question answered with a lightly edited copy-paste). Candidates come from LSH over 16 bands
//! of 4 hashes, so time and memory stay linear in the number of kept conversations (256 bytes
//! each).

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};

use super::pairs::Conversation;

/// Texts shorter than this (in words) are only checked for exact duplicates: a few shingles
/// say too little.
const NEAR_MIN_WORDS: usize = 8;
const HASHES: usize = 64;
const BANDS: usize = 16;
const ROWS: usize = HASHES / BANDS;

type Signature = [u32; HASHES];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Unique,
    Exact,
    Near,
}

pub struct Deduper {
    exact: HashSet<[u8; 16]>,
    kept: Vec<(Signature, Signature)>,
    buckets: HashMap<(u8, u64), Vec<u32>>,
    threshold: f64,
}

fn normalise(text: &str) -> String {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// FNV-1a: stable across Rust versions, unlike the std hasher, so dedup decisions (and so the
/// dataset hash) never change with the toolchain.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// splitmix64 finaliser: turns one shingle hash into the i-th independent-looking hash.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn minhash(text: &str) -> Option<Signature> {
    let norm = normalise(text);
    let words: Vec<&str> = norm.split(' ').filter(|w| !w.is_empty()).collect();
    if words.len() < NEAR_MIN_WORDS {
        return None;
    }
    let mut sig = [u32::MAX; HASHES];
    for shingle in words.windows(3) {
        let h = fnv1a(shingle.join(" ").as_bytes());
        for (i, slot) in sig.iter_mut().enumerate() {
            let v = (mix(h ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) >> 32) as u32;
            *slot = (*slot).min(v);
        }
    }
    Some(sig)
}

/// Estimated Jaccard similarity: the share of equal MinHash slots.
pub fn similarity(a: &Signature, b: &Signature) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / HASHES as f64
}

fn band_key(sig: &Signature, band: usize) -> u64 {
    let mut bytes = [0u8; ROWS * 4];
    for (r, v) in sig[band * ROWS..(band + 1) * ROWS].iter().enumerate() {
        bytes[r * 4..r * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    fnv1a(&bytes)
}

impl Deduper {
    /// `threshold`: Jaccard similarity (0, 1] from which two conversations are near
    /// duplicates; 1.0 keeps only exact deduplication.
    pub fn new(threshold: f64) -> Self {
        Self { exact: HashSet::new(), kept: Vec::new(), buckets: HashMap::new(), threshold }
    }

    /// Judge `c` against everything kept so far; remember it when unique.
    pub fn check(&mut self, c: &Conversation) -> Verdict {
        let mut h = Sha256::new();
        for m in &c.messages {
            h.update(m.role.as_bytes());
            h.update([0]);
            h.update(normalise(&m.content).as_bytes());
            h.update([1]);
        }
        let mut key = [0u8; 16];
        key.copy_from_slice(&h.finalize()[..16]);
        if self.exact.contains(&key) {
            return Verdict::Exact;
        }
        if self.threshold < 1.0 {
            if let (Some(q), Some(a)) = (minhash(&c.user_text()), minhash(&c.assistant_text())) {
                if self.is_near(&q, &a) {
                    return Verdict::Near;
                }
                let idx = self.kept.len() as u32;
                for band in 0..BANDS {
                    self.buckets.entry((band as u8, band_key(&a, band))).or_default().push(idx);
                }
                self.kept.push((q, a));
            }
        }
        self.exact.insert(key);
        Verdict::Unique
    }

    fn is_near(&self, q: &Signature, a: &Signature) -> bool {
        (0..BANDS).any(|band| {
            self.buckets.get(&(band as u8, band_key(a, band))).is_some_and(|ids| {
                ids.iter().any(|&i| {
                    let (kq, ka) = &self.kept[i as usize];
                    similarity(ka, a) >= self.threshold && similarity(kq, q) >= self.threshold
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::pairs::turn;

    fn conv(q: &str, a: &str) -> Conversation {
        Conversation { thread_id: Some(1), answer_id: None, messages: vec![turn("user", q), turn("assistant", a)] }
    }

    const Q: &str = "Which park skis should I buy for my first season riding rails and small jumps?";
    const A: &str = "Get something soft and twin tipped, mount it at true center, and buy used to save money for a \
                     season pass. Honestly the first season is all about mileage, so ride as many days as you can and \
                     don't stress about the gear too much.";

    #[test]
    fn exact_near_and_distinct() {
        let mut d = Deduper::new(0.7);
        assert_eq!(d.check(&conv(Q, A)), Verdict::Unique);
        assert_eq!(d.check(&conv(&Q.to_uppercase(), &format!("{A}!!"))), Verdict::Exact, "case and punctuation do not matter");
        assert_eq!(d.check(&conv(Q, &A.replace("Honestly", "Really"))), Verdict::Near);
        assert_eq!(d.check(&conv(Q, &format!("{A} Good luck out there!"))), Verdict::Near);
        let other = "Boots matter more than skis, go to a proper boot fitter before you spend anything on new planks this year.";
        assert_eq!(d.check(&conv(Q, other)), Verdict::Unique, "another answer to the same question is kept");
        let other_q = "What wax should I use for spring slush at my local hill in April when it is warm?";
        assert_eq!(d.check(&conv(other_q, A)), Verdict::Unique, "the same answer to another question is kept");
        assert_eq!(d.check(&conv("short q", "short answer")), Verdict::Unique);
        assert_eq!(d.check(&conv("short q", "short answer")), Verdict::Exact);
        let mut exact_only = Deduper::new(1.0);
        assert_eq!(exact_only.check(&conv(Q, A)), Verdict::Unique);
        assert_eq!(exact_only.check(&conv(Q, &A.replace("Honestly", "Really"))), Verdict::Unique);
    }

    #[test]
    fn minhash_estimates_jaccard() {
        let words: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
        let a = words.join(" ");
        // Replacing the last 40 words keeps 158 of 238 distinct shingles: Jaccard ~0.66.
        let b = words[..160].iter().cloned().chain((0..40).map(|i| format!("x{i}"))).collect::<Vec<_>>().join(" ");
        let s = similarity(&minhash(&a).unwrap(), &minhash(&b).unwrap());
        assert!((0.5..0.82).contains(&s), "{s}");
        assert_eq!(minhash("too short"), None);
    }
}
