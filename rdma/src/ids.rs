//! Unguessable identifiers (client ids, session ids, session secrets, rkeys) from the operating
//! system's CSPRNG, and how logs show them: an identifier is logged as a short prefix
//! ([`short`]), a secret never.
//!
//! A predictable id or secret hands a borrower's memory to whoever guesses it (issue #10: the
//! generator seeded by the clock was recovered offline in a second), so nothing here falls back
//! to a weaker source: if the OS generator fails, the caller refuses the request.

use std::fmt;

/// The OS random generator failed (no `getrandom(2)`, or no entropy yet at early boot).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the operating system's random generator failed ({0}); no identifier can be made safely")]
pub struct RandomError(String);

/// A uniformly random, non-zero `u64` from the OS CSPRNG.
pub fn random_u64() -> Result<u64, RandomError> {
    loop {
        let v = getrandom::u64().map_err(|e| RandomError(e.to_string()))?;
        if v != 0 {
            return Ok(v);
        }
    }
}

/// A uniformly random, non-zero `u32` from the OS CSPRNG.
pub fn random_u32() -> Result<u32, RandomError> {
    loop {
        let v = getrandom::u32().map_err(|e| RandomError(e.to_string()))?;
        if v != 0 {
            return Ok(v);
        }
    }
}

/// Compares two secrets in time independent of where they differ.
pub fn secrets_equal(a: u64, b: u64) -> bool {
    // One XOR and one comparison with zero: no early exit on the first differing byte.
    std::hint::black_box(a ^ b) == 0
}

/// An identifier as logs show it: its first 16 bits in hex and an ellipsis (`3fa2…`), enough to
/// tell sessions apart in a log, useless to resume one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Short(u64);

/// The loggable form of identifier `id`.
pub fn short(id: u64) -> Short {
    Short(id)
}

impl fmt::Display for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}\u{2026}", self.0 >> 48)
    }
}

impl fmt::Debug for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_and_logs_show_a_prefix_only() {
        let a = random_u64().expect("random");
        let b = random_u64().expect("random");
        assert_ne!(a, b);
        assert_ne!(random_u32().expect("random"), 0);
        assert_eq!(short(0x3fa2_1234_5678_9abc).to_string(), "3fa2\u{2026}");
        assert!(secrets_equal(a, a) && !secrets_equal(a, b));
    }
}
