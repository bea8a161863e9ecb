//! Transfer rates: bytes per second over the last few seconds, for `/v1/status`.

use std::sync::Mutex;
use std::time::Instant;

/// Seconds a [`Meter`] looks back.
pub const RATE_WINDOW_SECS: u64 = 5;

/// Bytes per second over the last [`RATE_WINDOW_SECS`] seconds, from per-second buckets.
pub struct Meter {
    start: Instant,
    /// (second since `start`, bytes in it), one slot per second of the window. Held briefly.
    buckets: Mutex<[(u64, u64); RATE_WINDOW_SECS as usize]>,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            start: Instant::now(),
            buckets: Mutex::new([(u64::MAX, 0); RATE_WINDOW_SECS as usize]),
        }
    }
}

impl Meter {
    pub fn add(&self, bytes: u64) {
        self.add_at(bytes, Instant::now());
    }

    fn add_at(&self, bytes: u64, now: Instant) {
        let sec = now.duration_since(self.start).as_secs();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut b[(sec % RATE_WINDOW_SECS) as usize];
        if slot.0 != sec {
            *slot = (sec, 0);
        }
        slot.1 += bytes;
    }

    /// Bytes per second, rounded.
    pub fn rate(&self) -> u64 {
        self.rate_at(Instant::now())
    }

    fn rate_at(&self, now: Instant) -> u64 {
        let elapsed = now.duration_since(self.start).as_secs_f64();
        let sec = elapsed as u64;
        let b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bytes: u64 = b
            .iter()
            .filter(|(s, _)| *s <= sec && sec - s < RATE_WINDOW_SECS)
            .map(|(_, n)| n)
            .sum();
        // The current second counts for the part of it that has passed.
        let span = (elapsed - sec as f64 + (RATE_WINDOW_SECS - 1) as f64).min(elapsed);
        (bytes as f64 / span.max(1e-3)).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_meter_averages_over_its_window() {
        let m = Meter::default();
        let t0 = m.start;
        for s in 0..10 {
            m.add_at(1000, t0 + Duration::from_secs(s));
        }
        let rate = m.rate_at(t0 + Duration::from_millis(9_999));
        assert!((990..=1010).contains(&rate), "{rate}");
        assert_eq!(m.rate_at(t0 + Duration::from_secs(30)), 0);
    }
}
