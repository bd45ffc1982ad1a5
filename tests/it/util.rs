//! Running the `pgpar` binary and looking at what it did.

use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one pgpar run may take before the test fails (a hang is a failure, not a wait).
const PGPAR_TIMEOUT: Duration = Duration::from_secs(300);

/// `pgpar` with an environment that cannot leak the test runner's settings into it: no `PG*`
/// variables, and `HOME` an empty directory (no `~/.pgpass`).
///
/// `PGPAR_TEST_BIN` names another build of pgpar to test instead of this crate's (say, a
/// release binary).
pub fn pgpar() -> Command {
    let bin = std::env::var_os("PGPAR_TEST_BIN")
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_pgpar").into());
    let mut c = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            c.env_remove(k);
        }
    }
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("empty-home");
    fs::create_dir_all(&home).unwrap();
    c.env("HOME", home).stdin(Stdio::null());
    c
}

/// What a finished process did.
pub struct Out {
    pub cmdline: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub seconds: f64,
}

/// Run `cmd` to completion (failing the test if it runs longer than `PGPAR_TIMEOUT`).
pub fn run(cmd: &mut Command) -> Out {
    let cmdline = format!("{cmd:?}");
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {cmdline}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > PGPAR_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmdline} ran longer than {PGPAR_TIMEOUT:?}; killed. stderr so far:\n{}",
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Out {
        cmdline,
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
        seconds: started.elapsed().as_secs_f64(),
    };
    // Every pgpar run the suite makes through here, success or error, is read for Rust
    // Debug output: what a person reads must never be `Some(…)` or a struct dump.
    assert_readable(&out.stderr, &out.cmdline);
    out
}

/// Waits for a pgpar a test started in the background (`cmdline`, started at `started`) and
/// collects its run, read for Rust Debug text like every run through [`run`].
pub fn wait_for(child: std::process::Child, cmdline: String, started: Instant) -> Out {
    let output = child.wait_with_output().expect("wait for pgpar");
    let out = Out {
        cmdline,
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        seconds: started.elapsed().as_secs_f64(),
    };
    assert_readable(&out.stderr, &out.cmdline);
    out
}

/// Fails the test when `stderr` (what pgpar told a person) holds Rust `Debug` formatting:
/// `Some(`, `None`, `Ok(`/`Err(`, a tuple variant such as `CommandComplete("COPY 0")`, or a
/// struct dump such as `Connect { target: …`. Lines of debug and trace logging are left out.
/// Tests that spawn pgpar themselves collect its run with [`wait_for`], which calls it.
#[track_caller]
pub fn assert_readable(stderr: &str, what: &str) {
    // Debug and trace logs (PGPAR_LOG=debug, -vv) are for developers and quote libraries'
    // own Debug output (rustls): every other line is for a person.
    let for_people: String = stderr
        .lines()
        .filter(|l| !l.starts_with("pgpar: debug: ") && !l.starts_with("pgpar: trace: "))
        .collect::<Vec<_>>()
        .join("\n");
    if let Some(found) = debug_text(&for_people) {
        panic!("pgpar printed Rust Debug formatting ({found}) in:\n{what}\n--- stderr\n{stderr}");
    }
}

/// The first piece of `text` that looks like Rust `Debug` output, if any.
pub fn debug_text(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let word_start = |i: usize| i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
    for (i, _) in text.char_indices() {
        let rest = &text[i..];
        for lit in ["Some(", "Ok(", "Err("] {
            if rest.starts_with(lit) && word_start(i) {
                return Some(lit.to_string());
            }
        }
        if rest.starts_with("None")
            && word_start(i)
            && !rest[4..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        {
            return Some("None".into());
        }
        // A capitalised identifier, then `(` and a quote or another capitalised identifier
        // (`CommandComplete("`, `Kind(NotFound`), or ` { field: ` (a struct dump).
        if b[i].is_ascii_uppercase() && word_start(i) {
            let ident_len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let ident = &rest[..ident_len];
            let after = &rest[ident_len..];
            if ident.len() > 1 && ident.chars().any(|c| c.is_ascii_lowercase()) {
                if let Some(arg) = after.strip_prefix('(') {
                    if arg.starts_with('"') || arg.starts_with(|c: char| c.is_ascii_uppercase()) {
                        return Some(format!("{ident}({}", &arg[..1]));
                    }
                }
                if let Some(body) = after.strip_prefix(" { ") {
                    let field_len = body
                        .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                        .unwrap_or(0);
                    if field_len > 0 && body[field_len..].starts_with(": ") {
                        return Some(format!("{ident} {{ {}: ", &body[..field_len]));
                    }
                }
            }
        }
    }
    None
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n  exit code: {:?} after {:.1}s\n--- stdout\n{}\n--- stderr\n{}",
            self.cmdline, self.code, self.seconds, self.stdout, self.stderr
        )
    }
}

impl Out {
    #[track_caller]
    pub fn assert_success(&self) -> &Out {
        assert_eq!(self.code, Some(0), "expected success:\n{self}");
        self
    }

    /// Exit code `code`, and the error reported the documented way: exactly one stderr line
    /// starting "pgpar: error: ". Other lines may come with it (a hint, the server's warnings
    /// that led up to the error, a notice), but every stderr line is pgpar's own, starting
    /// "pgpar: ", with no escape codes: the output is read by scripts and by logs.
    #[track_caller]
    pub fn assert_error(&self, code: i32) -> &Out {
        assert_eq!(self.code, Some(code), "expected exit code {code}:\n{self}");
        let errors = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("pgpar: error: "))
            .count();
        assert_eq!(errors, 1, "expected one 'pgpar: error: ' line:\n{self}");
        for line in self.stderr.lines() {
            assert!(
                line.starts_with("pgpar: ") && !line.contains('\x1b'),
                "stderr line {line:?} is not a 'pgpar: ' line:\n{self}"
            );
        }
        self
    }

    /// The error line, without its "pgpar: error: " prefix.
    pub fn error_message(&self) -> &str {
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix("pgpar: error: "))
            .unwrap_or("")
    }

    /// Neither stdout nor stderr contains any of `secrets`.
    #[track_caller]
    pub fn assert_hides(&self, secrets: &[&str]) -> &Out {
        for s in secrets {
            assert!(
                !self.stdout.contains(s) && !self.stderr.contains(s),
                "output reveals the secret {s:?}:\n{self}"
            );
        }
        self
    }

    /// stdout parsed as one JSON object.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}):\n{self}"));
        assert!(v.is_object(), "stdout JSON is not an object:\n{self}");
        v
    }
}

/// Every entry under `root` (not following symlinks), as paths relative to `root`, sorted.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    fn go(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let e = e.unwrap();
            let path = e.path();
            out.push(path.strip_prefix(root).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                go(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    go(root, root, &mut out);
    out.sort();
    out
}

/// Names of the entries directly in `dir`, sorted.
pub fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Permission bits of `path` (not following a symlink).
pub fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Registers, for `docs/faults.md`, that the running test provoked `fault` and saw pgpar do
/// `outcome`. Call it after the assertions that prove the outcome, so a row exists only
/// where they held; `make test` sets `PGPAR_FAULTS_DIR`, and assembles the table
/// (tests/scripts/faults.sh) only when the whole suite passed. Elsewhere it does nothing.
///
/// The test's name is the libtest thread's name (libtest runs each test on a thread named
/// after it, whatever `--test-threads` says), so a renamed test renames its rows.
pub fn fault_covered(fault: &str, outcome: &str) {
    let Some(dir) = std::env::var_os("PGPAR_FAULTS_DIR").filter(|d| !d.is_empty()) else {
        return;
    };
    for s in [fault, outcome] {
        assert!(
            !s.contains(['\t', '\n']),
            "a fault row may not hold tabs or newlines: {s:?}"
        );
    }
    let thread = std::thread::current();
    let test = thread
        .name()
        .filter(|n| *n != "main")
        .expect("fault_covered runs on a libtest test thread");
    let dir = PathBuf::from(dir);
    fs::create_dir_all(&dir).unwrap();
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{}.tsv", test.replace("::", "__"))))
        .unwrap();
    writeln!(f, "{fault}\t{outcome}\t{test}").unwrap();
}
