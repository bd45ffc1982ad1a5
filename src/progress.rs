//! Progress counting: bytes done of the total and active workers, kept in atomics so workers
//! update them without locks, and a ticker that hands a [`Snapshot`] of them to the
//! [`Reporter`] now and then. It draws nothing: the binary turns snapshots into a bar (`-P`)
//! or JSON lines (`--progress=json`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::session::Reporter;

/// How progress is shown (the binary draws it; the library only picks how often to report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A progress bar on a terminal.
    Bar,
    /// One JSON object per line on stderr, for scripts.
    Json,
}

/// The counters at one moment, as handed to [`Reporter::progress`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// How the user asked to see progress.
    pub mode: ProgressMode,
    /// Bytes transferred so far.
    pub bytes_done: u64,
    /// Bytes expected in all (an estimate, never below `bytes_done`).
    pub bytes_total: u64,
    /// Mean rate since the start, in bytes per second.
    pub bytes_per_sec: f64,
    /// Workers transferring right now.
    pub active_workers: usize,
    /// Time since the transfer started.
    pub elapsed: Duration,
    /// The last snapshot of this transfer (it is complete).
    pub done: bool,
}

struct Inner {
    mode: Option<ProgressMode>,
    reporter: Arc<dyn Reporter>,
    done: AtomicU64,
    total: AtomicU64,
    active: AtomicUsize,
    started: Instant,
}

/// Shared progress counters.
#[derive(Clone)]
pub struct Progress(Arc<Inner>);

impl Progress {
    /// Counters for `total` bytes (an estimate; it grows if exceeded), reported to
    /// `reporter` when `mode` is set.
    pub fn new(mode: Option<ProgressMode>, total: u64, reporter: Arc<dyn Reporter>) -> Progress {
        Progress(Arc::new(Inner {
            mode,
            reporter,
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
            active: AtomicUsize::new(0),
            started: Instant::now(),
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

    /// The counters now, or `None` when progress is not shown.
    fn snapshot(&self, last: bool) -> Option<Snapshot> {
        let i = &self.0;
        let mode = i.mode?;
        let done = i.done.load(Ordering::Relaxed);
        let total = i.total.load(Ordering::Relaxed).max(done);
        let elapsed = i.started.elapsed();
        Some(Snapshot {
            mode,
            bytes_done: done,
            bytes_total: total,
            bytes_per_sec: done as f64 / elapsed.as_secs_f64().max(1e-3),
            active_workers: i.active.load(Ordering::Relaxed),
            elapsed,
            done: last,
        })
    }

    fn report(&self, last: bool) {
        if let Some(s) = self.snapshot(last) {
            self.0.reporter.progress(&s);
        }
    }

    /// Starts reporting periodically until the returned handle is aborted.
    pub fn spawn_ticker(&self) -> Option<tokio::task::JoinHandle<()>> {
        // A bar redraws often enough to look alive; JSON lines are for scripts and logs.
        let every = match self.0.mode? {
            ProgressMode::Bar => Duration::from_millis(200),
            ProgressMode::Json => Duration::from_secs(1),
        };
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                me.report(false);
            }
        }))
    }

    /// Reports the final state.
    pub fn finish(&self) {
        self.report(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Record(Mutex<Vec<Snapshot>>);
    impl Reporter for Record {
        fn notice(&self, _: &str) {}
        fn step(&self, _: &str) {}
        fn warning(&self, _: &str) {}
        fn progress(&self, s: &Snapshot) {
            self.0.lock().unwrap().push(*s);
        }
    }

    #[test]
    fn finish_hands_the_counters_to_the_reporter() {
        let rec = Arc::new(Record::default());
        let p = Progress::new(Some(ProgressMode::Json), 100, rec.clone());
        p.worker_active(true);
        p.add(30);
        p.set(20); // never backwards
        p.add(90); // beyond the estimate: the total grows with it
        p.finish();
        let got = rec.0.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        let s = got[0];
        assert_eq!((s.bytes_done, s.bytes_total), (120, 120));
        assert_eq!(s.active_workers, 1);
        assert!(s.done);
        assert_eq!(s.mode, ProgressMode::Json);
    }

    #[test]
    fn nothing_is_reported_without_a_mode() {
        let rec = Arc::new(Record::default());
        let p = Progress::new(None, 100, rec.clone());
        p.add(10);
        p.finish();
        assert!(p.spawn_ticker().is_none());
        assert!(rec.0.lock().unwrap().is_empty());
    }
}
