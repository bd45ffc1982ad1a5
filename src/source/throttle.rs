//! `-r`/`--max-rate` for the methods that fetch ranges: one token bucket shared by every
//! worker connection, so the total rate is capped at every moment, not averaged since the
//! start. It owns no connection and knows nothing of what the bytes are; the pool calls
//! [`Throttle::consume`] for each piece of file data before handing it on.
//!
//! Why a bucket with a small burst: an average since the start lets a backup that stalled
//! (a paused walsender, a slow disk, a lock) send everything it "saved" at full speed after
//! the stall, which is exactly when a DBA's limit matters (pg_basebackup's server-side
//! throttle does not do that either). The burst is a tenth of a second's worth, at least one
//! server message (32 KiB), so a cap at the slowest allowed rate still lets a message through.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The smallest burst: one CopyData message from the server.
const MIN_BURST: f64 = 32.0 * 1024.0;

/// A total rate limit shared by every connection.
pub struct Throttle {
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    /// Bytes that may go now; negative while callers wait for bytes already taken.
    tokens: f64,
    last: Instant,
}

impl Throttle {
    /// At most `bytes_per_sec` over all connections together.
    pub fn new(bytes_per_sec: u64) -> Throttle {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate / 10.0).max(MIN_BURST);
        Throttle {
            rate,
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// How long the caller must wait before sending `n` bytes taken now at `now`.
    fn take(&self, n: u64, now: Instant) -> Duration {
        let mut b = self.bucket.lock().expect("throttle lock");
        let refill = now.saturating_duration_since(b.last).as_secs_f64() * self.rate;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.last = now;
        b.tokens -= n as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / self.rate)
        }
    }

    /// Waits until `n` more bytes fit under the cap.
    pub async fn consume(&self, n: u64) {
        let wait = self.take(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes sent in each window are bounded by rate × window + burst, even right after a
    /// long idle time (the bug an average-since-start has).
    #[test]
    fn a_stall_saves_no_credit_beyond_the_burst() {
        let rate = 1024 * 1024;
        let t = Throttle::new(rate);
        let start = Instant::now();
        // 10 s of nothing, then 4 MiB asked for at once in 32 KiB pieces.
        let now = start + Duration::from_secs(10);
        let mut wait = Duration::ZERO;
        for _ in 0..128 {
            wait = t.take(32 * 1024, now);
        }
        // Only the burst (a tenth of a second) came free; the rest waits at the rate.
        let expect = (4.0 * 1024.0 * 1024.0 - t.burst) / rate as f64;
        assert!(
            (wait.as_secs_f64() - expect).abs() < 1e-6,
            "{wait:?} vs {expect}"
        );
    }

    #[test]
    fn steady_sending_keeps_the_rate() {
        let t = Throttle::new(100 * 1024);
        let start = Instant::now();
        let mut now = start;
        let mut sent = 0u64;
        // Each caller sends once its wait is over; 20 s of that.
        while now < start + Duration::from_secs(20) {
            let w = t.take(32 * 1024, now);
            now += w;
            sent += 32 * 1024;
        }
        let secs = (now - start).as_secs_f64();
        assert!(sent as f64 <= 100.0 * 1024.0 * secs + t.burst + 32.0 * 1024.0);
        assert!(sent as f64 >= 100.0 * 1024.0 * secs - 32.0 * 1024.0);
    }
}
