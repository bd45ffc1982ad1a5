//! Progress on stderr (`-P`): bytes done of the total, rate and ETA.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress display, or nothing when disabled.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A bar for `total` bytes (an estimate from the server; it may be exceeded).
    pub fn new(enabled: bool, total: u64) -> Progress {
        if !enabled {
            return Progress(None);
        }
        let pb = ProgressBar::with_draw_target(Some(total.max(1)), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} ({percent}%) {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .expect("valid template"),
        );
        Progress(Some(pb))
    }

    /// Adds bytes done.
    pub fn add(&self, n: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(n);
            if pb.position() > pb.length().unwrap_or(0) {
                pb.set_length(pb.position());
            }
        }
    }

    /// Sets the bytes done (from the server's own count).
    pub fn set(&self, n: u64) {
        if let Some(pb) = &self.0 {
            if n > pb.position() {
                pb.set_position(n);
            }
        }
    }

    /// Ends the display.
    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish();
        }
    }
}
