//! The gate every writer of a backup passes: it lets a failed backup stop all writing before
//! its directory is removed.
//!
//! Writers run on threads (the pool's writer threads, the stream method's extractor) and in
//! tasks (the WAL stream) that outlive the future that failed: aborting a task or dropping a
//! channel's sender only makes them stop at their next step, and a thread drains what was
//! queued. Removing the backup directory while one of them still creates files leaves a
//! partial directory behind ("Directory not empty"). So each writer holds a [`Pass`] and
//! checks it before every write; [`Gate::close_and_wait`] refuses further writes and waits
//! until every pass has been dropped. It owns no files and must not decide what a failure
//! means.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

#[derive(Default)]
struct Inner {
    closed: AtomicBool,
    live: Mutex<usize>,
    gone: Condvar,
}

/// Shared by the session and every writer of one backup.
#[derive(Clone, Default)]
pub struct Gate {
    inner: Arc<Inner>,
}

/// One writer's right to write; dropped when the writer is gone.
pub struct Pass {
    inner: Arc<Inner>,
}

impl Gate {
    /// A pass for one more writer.
    pub fn pass(&self) -> Pass {
        *self.inner.live.lock().expect("gate lock") += 1;
        Pass {
            inner: self.inner.clone(),
        }
    }

    /// Refuses every further write and waits (at most `limit`) until every writer has let
    /// go of its pass. False when some were still alive at the limit (a write stuck in the
    /// kernel, say): the caller then goes on, and says so.
    pub fn close_and_wait(&self, limit: Duration) -> bool {
        self.inner.closed.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + limit;
        let mut live = self.inner.live.lock().expect("gate lock");
        while *live > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            live = self
                .inner
                .gone
                .wait_timeout(live, deadline - now)
                .expect("gate lock")
                .0;
        }
        true
    }
}

impl Pass {
    /// Fails once the backup is being abandoned.
    pub fn check(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(Error::Failed("the backup is being abandoned".into()));
        }
        Ok(())
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut live = self.inner.live.lock().expect("gate lock");
        *live -= 1;
        if *live == 0 {
            self.inner.gone.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_waits_for_every_pass_and_refuses_further_writes() {
        let g = Gate::default();
        let p = g.pass();
        assert!(p.check().is_ok());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            assert!(p.check().is_err(), "closed before the writer's next step");
            drop(p);
        });
        let began = Instant::now();
        assert!(g.close_and_wait(Duration::from_secs(10)));
        assert!(began.elapsed() >= Duration::from_millis(90));
        t.join().unwrap();
        let stuck = g.pass();
        assert!(!g.close_and_wait(Duration::from_millis(10)));
        drop(stuck);
    }
}
