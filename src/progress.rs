//! Progress: a bar on stderr (`-P`, drawn by indicatif) or one JSON object per line
//! (`--progress=json`, handed to the [`Reporter`]), with bytes done of the total, rate, ETA
//! and active workers. Counters are atomics, so workers update them without locks; a ticker
//! renders them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::session::Reporter;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A progress bar on a terminal.
    Bar,
    /// One JSON object per line on stderr, for scripts.
    Json,
}

struct Inner {
    mode: Option<ProgressMode>,
    reporter: Arc<dyn Reporter>,
    done: AtomicU64,
    total: AtomicU64,
    active: AtomicUsize,
    started: Instant,
    bar: Option<ProgressBar>,
}

/// Shared progress counters and their display.
#[derive(Clone)]
pub struct Progress(Arc<Inner>);

impl Progress {
    /// A display for `total` bytes (an estimate; it grows if exceeded).
    pub fn new(mode: Option<ProgressMode>, total: u64, reporter: Arc<dyn Reporter>) -> Progress {
        let bar = (mode == Some(ProgressMode::Bar)).then(|| {
            let pb = ProgressBar::with_draw_target(Some(total.max(1)), ProgressDrawTarget::stderr());
            pb.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} ({percent}%) {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("valid template"),
            );
            pb
        });
        Progress(Arc::new(Inner {
            mode,
            reporter,
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
            active: AtomicUsize::new(0),
            started: Instant::now(),
            bar,
        }))
    }

    /// Adds bytes done.
    pub fn add(&self, n: u64) {
        self.0.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets bytes done (from a server-side count), never going backwards.
    pub fn set(&self, n: u64) {
        self.0.done.fetch_max(n, Ordering::Relaxed);
    }

    /// A worker started (+1) or stopped (-1) transferring.
    pub fn worker_active(&self, on: bool) {
        if on {
            self.0.active.fetch_add(1, Ordering::Relaxed);
        } else {
            self.0.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.0.done.load(Ordering::Relaxed)
    }

    fn render(&self, last: bool) {
        let i = &self.0;
        let done = i.done.load(Ordering::Relaxed);
        let total = i.total.load(Ordering::Relaxed).max(done);
        let active = i.active.load(Ordering::Relaxed);
        let secs = i.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        match i.mode {
            Some(ProgressMode::Bar) => {
                if let Some(pb) = &i.bar {
                    pb.set_length(total.max(1));
                    pb.set_position(done);
                    pb.set_message(format!("{active} active"));
                    if last {
                        pb.finish();
                    }
                }
            }
            Some(ProgressMode::Json) => {
                let eta = if rate > 0.0 {
                    (total - done) as f64 / rate
                } else {
                    0.0
                };
                i.reporter.progress_line(
                    &serde_json::json!({
                        "bytes_done": done,
                        "bytes_total": total,
                        "percent": if total > 0 { (done as f64 * 100.0 / total as f64 * 10.0).round() / 10.0 } else { 100.0 },
                        "mb_per_s": (rate / 1_048_576.0 * 10.0).round() / 10.0,
                        "eta_s": eta.round(),
                        "active_workers": active,
                        "done": last,
                    })
                    .to_string(),
                );
            }
            None => {}
        }
    }

    /// Starts rendering periodically until the returned handle is aborted.
    pub fn spawn_ticker(&self) -> Option<tokio::task::JoinHandle<()>> {
        let every = match self.0.mode? {
            ProgressMode::Bar => Duration::from_millis(200),
            ProgressMode::Json => Duration::from_secs(1),
        };
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                me.render(false);
            }
        }))
    }

    /// Renders the final state.
    pub fn finish(&self) {
        self.render(true);
    }
}
