//! `-r`/`--max-rate` is a cap at every moment: after a stall (pgpar stopped with SIGSTOP for
//! 4 s, then resumed) the parallel method does not catch up at full speed.
//! Measured from `--progress=json` lines, timestamped as they arrive: the bytes done in any
//! window of a second or more are bounded by the rate times the window plus a small burst.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cluster::{scratch_dir, Cluster, Pg};
use crate::util::pgpar;

/// Sends SIGCONT to the stopped process when dropped, so a failing test leaves nothing stopped.
struct Stopped(Vec<i32>);

impl Drop for Stopped {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: kill(2) on a pid we started; no memory involved.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

#[test]
fn max_rate_holds_after_a_stall() {
    let c = Cluster::new(Pg::V17);
    let dir = scratch_dir();
    let target = dir.path().join("b");
    let rate: f64 = 2.0 * 1024.0 * 1024.0;
    let mut child = pgpar()
        .args(["backup", "-c", "fast", "--method", "parallel", "-j", "2"])
        .args(["-r", "2M", "--progress=json", "-D"])
        .arg(&target)
        .args(["-d", &c.conninfo("trust_user")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgpar");
    let (tx, rx) = mpsc::channel::<(Instant, u64)>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(b) = v["bytes_done"].as_u64() {
                    let _ = tx.send((Instant::now(), b));
                }
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    // Let the copy get going (2 MB done), then stop every walsender for 4 s.
    while samples.last().is_none_or(|s| s.1 < 2 * 1024 * 1024) {
        samples.push(
            rx.recv_timeout(Duration::from_secs(60))
                .expect("progress lines while copying"),
        );
    }
    // Stop pgpar itself: stopping the walsenders stalls nothing at this rate, as the
    // sockets' kernel buffers hold seconds of data. A stopped client (a paused VM, a host
    // swapping) is the stall whose "saved" time an average would spend at full speed.
    let stopped = Stopped(vec![child.id() as i32]);
    // SAFETY: as in Stopped::drop; our own child.
    assert_eq!(unsafe { libc::kill(stopped.0[0], libc::SIGSTOP) }, 0);
    let stall_start = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    drop(stopped);
    samples.extend(rx.iter());
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(status.success(), "backup failed:\n{log}");
    crate::util::assert_readable(&log, "pgpar backup -r 2M --progress=json");
    c.pg_verifybackup(&target);

    // The stall happened and bytes came after it (the test exercised what it claims).
    let after: Vec<&(Instant, u64)> = samples
        .iter()
        .filter(|s| s.0 > stall_start + Duration::from_secs(5))
        .collect();
    let before = samples
        .iter()
        .filter(|s| s.0 <= stall_start)
        .map(|s| s.1)
        .max()
        .unwrap();
    assert!(
        after.last().is_some_and(|s| s.1 > before + 2 * 1024 * 1024),
        "less than 2 MB arrived after the stall; nothing to measure:\n{log}"
    );
    // Every window of at least a second: rate × (window + 0.3 s for the timestamps' jitter)
    // + the burst (a tenth of a second) + a message in flight per worker.
    let slack = rate * 0.1 + 2.0 * 256.0 * 1024.0;
    for (i, a) in samples.iter().enumerate() {
        for b in &samples[i + 1..] {
            let dt = (b.0 - a.0).as_secs_f64();
            if dt < 1.0 {
                continue;
            }
            let bytes = (b.1 - a.1) as f64;
            let bound = rate * (dt + 0.3) + slack;
            assert!(
                bytes <= bound,
                "{:.1} MB in {dt:.2} s exceeds -r 2M (bound {:.1} MB):\n{log}",
                bytes / 1048576.0,
                bound / 1048576.0
            );
        }
    }
    crate::util::fault_covered(
        "pgpar stopped (SIGSTOP) for 4 s during a -r 2M parallel backup",
        "no catch-up burst: bytes in every window of 1 s or more stay under the rate plus a 0.1 s burst; the backup verifies",
    );
}
