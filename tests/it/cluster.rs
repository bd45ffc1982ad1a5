//! `Cluster`: a throwaway PostgreSQL server for one test, and the tools around it.
//!
//! Each `Cluster` owns a temporary directory holding its data directory, Unix socket directory,
//! TLS files and server log, listens on 127.0.0.1 on a port of its own, and is stopped
//! (immediate shutdown) and removed when dropped. Tests run in threads, so any number of clusters
//! can run side by side; nothing here is global except the bookkeeping of handed-out ports.
//!
//! `initdb` and `postgres` refuse to run as root, and CI runs as root: when the effective uid is
//! 0, server-side commands run as the `postgres` OS user (`runuser -u postgres --`) and the
//! directories they need are given to that user. Client tools (psql, pgbench, pg_verifybackup)
//! run as whoever runs the tests.
//!
//! Roles (all LOGIN; all REPLICATION except `norepl_user`), each with its pg_hba rows for both
//! the `replication` and `all` databases, over the socket and over 127.0.0.1/32:
//!
//! | role          | method          | note                                       |
//! |---------------|-----------------|--------------------------------------------|
//! | `trust_user`  | trust           |                                            |
//! | `pass_user`   | password        | cleartext password exchange                |
//! | `md5_user`    | md5             | password stored as md5 (else PG upgrades to SCRAM) |
//! | `scram_user`  | scram-sha-256   |                                            |
//! | `norepl_user` | scram-sha-256   | NOREPLICATION                              |
//! | `ssl_user`    | scram-sha-256   | `hostssl` only: no socket, no plain TCP    |
//! | `postgres`    | trust           | bootstrap superuser, socket and TCP        |
//!
//! TLS: a test CA (`ca_cert`) signs the server certificate for CN=localhost with
//! subjectAltName DNS:localhost, IP:127.0.0.1; `sslmode=verify-full sslrootcert=<ca_cert>`
//! works with host=localhost. A server build without OpenSSL (see `Cluster::tls`) runs
//! without TLS and without `ssl_user`'s row; the TLS tests use PostgreSQL 15, which has it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The roles the fixture creates; see the module doc for their pg_hba method.
pub const ROLES: &[&str] = &[
    "trust_user",
    "pass_user",
    "md5_user",
    "scram_user",
    "norepl_user",
    "ssl_user",
];

/// The password of a fixture role. Distinctive, so that tests can grep output for it.
pub fn password(role: &str) -> String {
    format!("Pw{}Xq7z", role.replace('_', ""))
}

/// Which server build a cluster runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pg {
    /// Stock PostgreSQL 15 (Debian's package): `PGPAR_PG15_BINDIR`, default
    /// `/usr/lib/postgresql/15/bin`.
    V15,
    /// PostgreSQL 17 with `pg-patches/17`: `PGPAR_PG17_BINDIR` (set by `make test`).
    V17,
}

impl Pg {
    pub fn major(self) -> u32 {
        match self {
            Pg::V15 => 15,
            Pg::V17 => 17,
        }
    }

    /// The bin directory of this server build. Panics, saying what to set, when it is missing:
    /// a test never skips silently.
    pub fn bindir(self) -> PathBuf {
        let (var, default) = match self {
            Pg::V15 => ("PGPAR_PG15_BINDIR", Some("/usr/lib/postgresql/15/bin")),
            Pg::V17 => ("PGPAR_PG17_BINDIR", None),
        };
        let dir = match (std::env::var_os(var).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => PathBuf::from(v),
            (None, Some(d)) => PathBuf::from(d),
            (None, None) => panic!(
                "{var} is not set: it must name the bin directory of the patched PostgreSQL {} \
                 build (`make test` sets it; `make -s pg-bindir` prints it)",
                self.major()
            ),
        };
        assert!(
            dir.join("initdb").is_file() && dir.join("pg_ctl").is_file(),
            "{var}={}: no initdb/pg_ctl there; install PostgreSQL {} (tests/scripts/deps.sh, \
             `make postgres`) or point {var} at its bin directory",
            dir.display(),
            self.major()
        );
        server_user_can_reach(&dir.join("initdb"));
        dir
    }
}

/// Panic with one clear line (the same one `make test` prints before the suite) unless the
/// servers' OS user can reach `path` (execute a program, enter a directory): as root the servers
/// run as `postgres`, and a build or a TMPDIR under a 0700 home (Debian's /root) would otherwise
/// fail every test with its own "Permission denied" from runuser, initdb or the server.
/// The check runs once per path; every later caller gets the same answer, so all the tests it
/// stops say the same line.
fn server_user_can_reach(path: &Path) {
    static CHECKED: OnceLock<Mutex<HashMap<PathBuf, Result<(), String>>>> = OnceLock::new();
    let checked = CHECKED.get_or_init(Default::default);
    let mut checked = checked.lock().unwrap_or_else(|e| e.into_inner());
    let answer = checked.entry(path.to_path_buf()).or_insert_with(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/server-access.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("could not run {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    });
    if let Err(line) = answer {
        let line = line.clone();
        drop(checked);
        panic!("{line}");
    }
}

/// True when the tests run as root, so server-side commands must run as `postgres`.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A command that runs as the OS user owning the servers' files: `postgres` when we are root,
/// ourselves otherwise. As `postgres` it runs from `/`: the tests' own working directory is the
/// repository, which `postgres` may not be able to enter (a clone under /root), and PostgreSQL
/// 15's tools then warn "could not change directory" on every call. Paths given are absolute.
pub fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"])
            .arg(program)
            .current_dir("/");
        c
    } else {
        Command::new(program)
    }
}

/// Give `path` (recursively, without following symlinks) to the server's OS user.
pub fn give_to_server_user(path: &Path) {
    if is_root() {
        run_ok(
            Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(path),
        );
    }
}

/// Run a command, panic with its output unless it succeeds, return its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A port on 127.0.0.1 that nothing listens on now and that no other cluster of this process
/// has been given.
///
/// Ports come from 15000..32000, below Linux's ephemeral range (32768..), so that the client
/// side of some test's outgoing connection cannot be sitting on a port just handed to a
/// server. Another process may still take the port before the server binds it: `Cluster`
/// retries on a new port when that happens.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    // No rand crate: mix the clock, the pid and a counter (this only has to spread picks).
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ (u64::from(std::process::id()) << 32);
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 15000 + (x % 17000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A temporary directory that the server's OS user can enter (mode 0755), for backups and
/// tablespaces that a server will use. It lands in `$TMPDIR` (else /tmp), which that user must
/// be able to reach: checked first, with the one-line answer of `server_user_can_reach`.
pub fn scratch_dir() -> TempDir {
    server_user_can_reach(&std::env::temp_dir());
    let dir = tempfile::Builder::new()
        .prefix("pgpar-it-")
        .tempdir()
        .expect("create temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    dir
}

/// A running PostgreSQL server.
pub struct Cluster {
    pub pg: Pg,
    pub bindir: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    /// Unix socket directory (use as `host=`).
    pub sockdir: PathBuf,
    pub log: PathBuf,
    /// The CA certificate that signed the server certificate (for `sslrootcert`).
    pub ca_cert: PathBuf,
    /// Whether the server build supports TLS (then `ssl = on` and `ssl_user` exists as
    /// documented; without it, `ssl_user` has no pg_hba row).
    pub tls: bool,
    running: bool,
    /// Settings written after the fixture's own at every start (see `restart_with`).
    extra_conf: String,
    // Dropped after `Drop::drop` has stopped the server.
    _dir: TempDir,
}

impl Cluster {
    /// initdb, configure, and start a cluster of this build.
    pub fn new(pg: Pg) -> Cluster {
        Cluster::with_initdb_args(pg, &[])
    }

    /// As [`Cluster::new`], with more initdb arguments (`--wal-segsize=1`, say).
    pub fn with_initdb_args(pg: Pg, extra: &[&str]) -> Cluster {
        let bindir = pg.bindir();
        let dir = scratch_dir();
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        let sockdir = root.join("sock");
        let tls_dir = root.join("tls");
        fs::create_dir(&sockdir).unwrap();
        fs::create_dir(&tls_dir).unwrap();
        let ca_cert = make_certificates(&tls_dir);
        give_to_server_user(&root);

        run_ok(
            as_server_user(&bindir.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["--data-checksums", "-A", "trust", "-U", "postgres"])
                .args(["-E", "UTF8", "--locale=C", "--no-sync"])
                .args(extra)
                .env("LC_ALL", "C"),
        );

        for f in ["server.crt", "server.key"] {
            fs::copy(tls_dir.join(f), data.join(f)).unwrap();
            fs::set_permissions(data.join(f), fs::Permissions::from_mode(0o600)).unwrap();
        }
        give_to_server_user(&data);
        let tls = build_supports_tls(&bindir);
        fs::write(data.join("pg_hba.conf"), hba_conf(tls)).unwrap();

        let mut cluster = Cluster {
            pg,
            bindir,
            data,
            port: 0,
            sockdir,
            log: root.join("server.log"),
            ca_cert,
            tls,
            running: false,
            extra_conf: String::new(),
            _dir: dir,
        };
        cluster.start_on_free_port("initdb'd cluster");
        cluster.create_roles();
        cluster
    }

    /// Start `backup` (a plain-format backup directory) as a server of the same build, on a port
    /// of its own. The directory and the targets of its `pg_tblspc` links are given to the
    /// server's OS user and made private first, as a DBA would before `pg_ctl start`.
    pub fn start_backup_copy(&self, backup: &Path) -> Cluster {
        self.try_start_backup_copy(backup).unwrap_or_else(|log| {
            panic!(
                "pg_ctl start of restored backup in {} failed; server log:\n{log}",
                backup.display()
            )
        })
    }

    /// Like [`Cluster::start_backup_copy`], but a server that refuses to start is an answer,
    /// not a failure: `Err` carries its log (for tests of what must never start).
    pub fn try_start_backup_copy(&self, backup: &Path) -> Result<Cluster, String> {
        let dir = scratch_dir();
        let root = dir.path().to_path_buf();
        let sockdir = root.join("sock");
        fs::create_dir(&sockdir).unwrap();
        give_to_server_user(&root);

        let mut private = vec![backup.to_path_buf()];
        if let Ok(entries) = fs::read_dir(backup.join("pg_tblspc")) {
            for e in entries {
                let link = e.unwrap().path();
                if let Ok(target) = fs::read_link(&link) {
                    private.push(target);
                }
            }
        }
        for p in &private {
            give_to_server_user(p);
            run_ok(Command::new("chmod").args(["-R", "go-rwx"]).arg(p));
        }

        let mut copy = Cluster {
            pg: self.pg,
            bindir: self.bindir.clone(),
            data: backup.to_path_buf(),
            port: 0,
            sockdir,
            log: root.join("server.log"),
            ca_cert: self.ca_cert.clone(),
            tls: self.tls,
            running: false,
            extra_conf: self.extra_conf.clone(),
            _dir: dir,
        };
        copy.try_start_on_free_port()?;
        Ok(copy)
    }

    fn start_on_free_port(&mut self, what: &str) {
        if let Err(log) = self.try_start_on_free_port() {
            panic!(
                "pg_ctl start of {what} in {} failed; server log:\n{log}",
                self.data.display()
            );
        }
    }

    /// Starts the server, retrying on a new port when the port was taken; `Err` holds what
    /// pg_ctl said and the server log of the last attempt.
    fn try_start_on_free_port(&mut self) -> Result<(), String> {
        let mut last_log = String::new();
        for _attempt in 0..3 {
            self.port = free_port();
            // postgresql.auto.conf is read last, so this wins over whatever a backup carried.
            // (A partial backup may not have the file yet: the server must say what is missing.)
            let mut conf =
                fs::read_to_string(self.data.join("postgresql.auto.conf")).unwrap_or_default();
            conf.push_str(&server_conf(self.port, &self.sockdir, self.tls));
            conf.push_str(&self.extra_conf);
            fs::write(self.data.join("postgresql.auto.conf"), conf).unwrap();
            let said = match self.pg_ctl_start() {
                Ok(()) => {
                    self.running = true;
                    return Ok(());
                }
                Err(said) => said,
            };
            // pg_ctl may have given up waiting on a server that is still starting: stop it.
            self.pg_ctl_stop("immediate");
            last_log = format!("pg_ctl start said: {said}\n{}", self.server_log());
            if !last_log.contains("could not bind") && !last_log.contains("could not create") {
                break;
            }
        }
        Err(last_log)
    }

    /// Restarts the server with `conf` (settings that need a restart) after the fixture's own
    /// settings, on a new free port.
    pub fn restart_with(&mut self, conf: &str) {
        self.pg_ctl_stop("fast");
        self.extra_conf = conf.to_string();
        self.start_on_free_port("restarted cluster");
    }

    /// `pg_ctl start`; `Err` holds what pg_ctl itself printed (it may refuse before any log).
    fn pg_ctl_start(&self) -> Result<(), String> {
        let out = as_server_user(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "120", "start"])
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        let _ = as_server_user(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.running = false;
    }

    /// The server log so far (for failure messages).
    pub fn server_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn create_roles(&self) {
        let mut sql = String::new();
        for role in ROLES {
            let repl = if *role == "norepl_user" {
                "NOREPLICATION"
            } else {
                "REPLICATION"
            };
            let enc = if *role == "md5_user" {
                "md5"
            } else {
                "scram-sha-256"
            };
            writeln!(
                sql,
                "SET password_encryption = '{enc}'; CREATE ROLE {role} LOGIN {repl} PASSWORD '{}';",
                password(role)
            )
            .unwrap();
        }
        self.psql(&sql);
    }

    /// Keyword/value conninfo for `role` over TCP to 127.0.0.1, without a password.
    pub fn conninfo(&self, role: &str) -> String {
        format!("host=127.0.0.1 port={} user={role}", self.port)
    }

    /// Keyword/value conninfo for `role` over the Unix socket, without a password.
    pub fn socket_conninfo(&self, role: &str) -> String {
        format!(
            "host={} port={} user={role}",
            self.sockdir.display(),
            self.port
        )
    }

    /// Run SQL (any number of statements) as the superuser over the socket; returns psql's
    /// unaligned, tuples-only output of every statement. Panics on any error.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        let mut child = self
            .psql_command(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run psql");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "psql on port {} failed ({}) running:\n{sql}\n--- stderr\n{}",
            self.port,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn psql_command(&self, db: &str) -> Command {
        let mut c = Command::new(self.bindir.join("psql"));
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.sockdir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db, "-f", "-"])
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .env("PGAPPNAME", "pgpar-fixture");
        c
    }

    /// `pgbench -i -s scale` into database `postgres`.
    pub fn pgbench_init(&self, scale: u32) {
        run_ok(
            Command::new(self.bindir.join("pgbench"))
                .args(["-i", "-q", "-s", &scale.to_string()])
                .arg("-h")
                .arg(&self.sockdir)
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-U", "postgres", "postgres"]),
        );
    }

    /// `pg_controldata` of this cluster, as a map of its "Key: value" lines.
    pub fn controldata(&self) -> BTreeMap<String, String> {
        let out = run_ok(
            Command::new(self.bindir.join("pg_controldata"))
                .arg("-D")
                .arg(&self.data)
                .env("LC_ALL", "C"),
        );
        out.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    /// The "Database system identifier" of this cluster.
    pub fn system_identifier(&self) -> String {
        self.controldata()["Database system identifier"].clone()
    }

    /// Run this build's `pg_verifybackup` on `dir`; panics with its output unless the backup
    /// verifies.
    pub fn pg_verifybackup(&self, dir: &Path) -> String {
        run_ok(Command::new(self.bindir.join("pg_verifybackup")).arg(dir))
    }

    /// Waits until a walsender runs a command starting with `prefix` (the oldest such one
    /// when several do), for at most `within`; returns its pid.
    pub fn wait_for_walsender(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let pid = self.psql(&format!(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender' \
                 AND query LIKE '{prefix}%' ORDER BY backend_start LIMIT 1;"
            ));
            if !pid.trim().is_empty() {
                return pid.trim().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no walsender ran {prefix} within {} s",
                within.as_secs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Hold a session that has a temporary table (with a few pages of data) until the returned
    /// guard is dropped. Returns once the table exists.
    pub fn hold_temp_table(&self) -> HeldSession {
        self.hold_session(
            &format!("{} dbname=postgres", self.socket_conninfo("postgres")),
            "CREATE TEMP TABLE pgpar_held_temp AS SELECT g, repeat('x', 200) AS pad \
             FROM generate_series(1, 5000) g;\nCHECKPOINT;\n",
            "SELECT count(*) FROM pg_class WHERE relname = 'pgpar_held_temp' \
             AND relpersistence = 't';",
        )
    }

    /// Hold a psql session on `conninfo` that has run `sql`, until the returned guard is
    /// dropped. Returns once `ready` (a query run as the superuser) answers "1" or more, so
    /// the caller knows the session is in place.
    pub fn hold_session(&self, conninfo: &str, sql: &str, ready: &str) -> HeldSession {
        let mut child = Command::new(self.bindir.join("psql"))
            .args(["-X", "-q", "-d", conninfo])
            .env_remove("PGPASSWORD")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run psql");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(sql.as_bytes()).unwrap();
        stdin.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n: u64 = self.psql(ready).trim().parse().unwrap_or(0);
            if n >= 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "session on {conninfo} did not come up (waiting for: {ready})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        HeldSession {
            child,
            _stdin: stdin,
        }
    }

    /// Create `relative` (a file inside the data directory) with `contents`, owned by the
    /// server's OS user, as the server itself would.
    pub fn put_file(&self, relative: &str, contents: &[u8]) -> PathBuf {
        let path = self.data.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, contents).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        if is_root() {
            run_ok(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(path.parent().unwrap())
                    .arg(&path),
            );
        }
        path
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Shown with the failed test's output (libtest captures it otherwise).
            let log = self.server_log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of the server log of {} (port {})",
                self.data.display(),
                self.port
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        if self.running {
            self.pg_ctl_stop("immediate");
        }
    }
}

/// A psql session kept open; killed on drop.
pub struct HeldSession {
    child: Child,
    _stdin: std::process::ChildStdin,
}

impl Drop for HeldSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_conf(port: u16, sockdir: &Path, tls: bool) -> String {
    let ssl = if tls {
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
    } else {
        ""
    };
    format!(
        "\n# pgpar test fixture\n\
         listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = '{}'\n\
         wal_level = replica\n\
         max_wal_senders = 20\n\
         max_replication_slots = 10\n\
         max_connections = 60\n\
         shared_buffers = 32MB\n\
         {ssl}\
         fsync = off\n\
         synchronous_commit = off\n\
         full_page_writes = on\n\
         log_connections = on\n\
         log_replication_commands = on\n\
         log_min_messages = info\n",
        sockdir.display()
    )
}

/// Whether the server build in `bindir` was configured with OpenSSL.
fn build_supports_tls(bindir: &Path) -> bool {
    let configure = run_ok(Command::new(bindir.join("pg_config")).arg("--configure"));
    configure.contains("--with-openssl") || configure.contains("--with-ssl=openssl")
}

fn hba_conf(tls: bool) -> String {
    let mut s = String::from(
        "# TYPE  DATABASE     USER         ADDRESS        METHOD\n\
         local   all          postgres                    trust\n\
         local   replication  postgres                    trust\n\
         host    all          postgres     127.0.0.1/32   trust\n\
         host    replication  postgres     127.0.0.1/32   trust\n",
    );
    for db in ["replication", "all"] {
        for (role, method) in [
            ("trust_user", "trust"),
            ("pass_user", "password"),
            ("md5_user", "md5"),
            ("scram_user", "scram-sha-256"),
            ("norepl_user", "scram-sha-256"),
        ] {
            writeln!(s, "local   {db:<12} {role:<12}                {method}").unwrap();
            writeln!(s, "host    {db:<12} {role:<12} 127.0.0.1/32   {method}").unwrap();
        }
        // Without TLS in the build, a hostssl row could never match: leave it out.
        if tls {
            writeln!(
                s,
                "hostssl {db:<12} ssl_user     127.0.0.1/32   scram-sha-256"
            )
            .unwrap();
        }
    }
    s
}

/// A test CA and a server certificate it signed (CN=localhost, SAN DNS:localhost,
/// IP:127.0.0.1), in `dir`: ca.crt, server.crt, server.key. Returns the CA certificate's path.
///
/// The server certificate is not self-signed on purpose: a self-signed certificate carries
/// `CA:TRUE`, which strict verifiers (webpki) refuse as an end-entity certificate.
fn make_certificates(dir: &Path) -> PathBuf {
    let ossl = |args: &[&str]| {
        run_ok(Command::new("openssl").args(args).current_dir(dir));
    };
    ossl(&[
        "req",
        "-x509",
        "-new",
        "-nodes",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=pgpar test CA",
    ]);
    ossl(&[
        "req",
        "-new",
        "-nodes",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    fs::write(
        dir.join("server.ext"),
        "basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\n\
         subjectAltName = DNS:localhost, IP:127.0.0.1\n",
    )
    .unwrap();
    ossl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "3650",
        "-extfile",
        "server.ext",
    ]);
    dir.join("ca.crt")
}
