//! libpq-compatible connection options.
//!
//! Parses keyword/value conninfo strings and `postgresql://` URIs, layers the command-line
//! options, the `PG*` environment variables and `~/.pgpass` over them the way libpq does, and
//! yields a [`ConnConfig`]. Owns no sockets. The password is kept out of `Debug` and out of
//! every string this module builds for messages.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plain first, TLS if the server insists (we try plain, then TLS).
    Allow,
    /// TLS if the server offers it, else plain.
    Prefer,
    /// TLS, no verification of the certificate (verify-ca if a root file is present).
    Require,
    /// TLS, certificate chain verified against `sslrootcert`.
    VerifyCa,
    /// TLS, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::Usage(format!(
                    "invalid sslmode \"{other}\": expected disable, allow, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }
}

/// Where to connect: a TCP host or a Unix-socket directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// Host name or IP address (`hostaddr` overrides the address used, not the name checked).
    Tcp {
        /// Name used for TLS verification and messages.
        name: String,
        /// Numeric address to connect to instead of resolving `name`.
        addr: Option<String>,
    },
    /// Directory holding `.s.PGSQL.<port>`.
    Socket(PathBuf),
}

/// One resolved connection target.
#[derive(Debug, Clone)]
pub struct Target {
    /// Host or socket directory.
    pub host: Host,
    /// Port (also names the socket file).
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Tcp { name, addr } => match addr {
                Some(a) if a != name => write!(f, "{name} ({a}) port {}", self.port),
                _ => write!(f, "{name} port {}", self.port),
            },
            Host::Socket(dir) => write!(f, "socket {}/.s.PGSQL.{}", dir.display(), self.port),
        }
    }
}

/// A fully resolved set of connection parameters.
#[derive(Clone)]
pub struct ConnConfig {
    /// Candidate targets, tried in order.
    pub targets: Vec<Target>,
    /// Role name.
    pub user: String,
    /// Password, if any source provided one.
    pub password: Option<String>,
    /// True when the password came from the conninfo string itself (matters for `-R`).
    pub password_from_conninfo: bool,
    /// Database name (used by `replication=database` and for `-R`'s `dbname`).
    pub dbname: Option<String>,
    /// TLS mode.
    pub sslmode: SslMode,
    /// Root certificate file for verify-ca / verify-full (and require when present).
    pub sslrootcert: Option<PathBuf>,
    /// `application_name` sent at startup.
    pub application_name: String,
    /// Connection timeout.
    pub connect_timeout: Option<Duration>,
    /// Every keyword given explicitly (conninfo and options), for `primary_conninfo`.
    pub explicit: BTreeMap<String, String>,
}

impl fmt::Debug for ConnConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnConfig")
            .field("targets", &self.targets)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .finish()
    }
}

/// The keywords we understand; others are refused so typos do not pass silently.
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "application_name",
    "fallback_application_name",
    "connect_timeout",
    "passfile",
    "replication",
    "channel_binding",
    "keepalives",
    "options",
];

/// Parses a conninfo string (keyword/value or URI) into keyword → value pairs.
pub fn parse_conninfo(s: &str) -> Result<BTreeMap<String, String>> {
    let t = s.trim_start();
    let map = if t.starts_with("postgresql://") || t.starts_with("postgres://") {
        parse_uri(t)?
    } else if !t.contains('=') && !t.is_empty() {
        // libpq treats a bare word given as dbname as a database name.
        BTreeMap::from([("dbname".to_string(), t.trim().to_string())])
    } else {
        parse_kv(t)?
    };
    for k in map.keys() {
        if !KEYWORDS.contains(&k.as_str()) {
            return Err(Error::Usage(format!(
                "invalid connection string: unknown keyword \"{k}\""
            )));
        }
    }
    Ok(map)
}

fn parse_kv(s: &str) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    let mut chars = s.chars().peekable();
    let bad = |what: String| Error::Usage(format!("invalid connection string: {what}"));
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(bad(format!("missing \"=\" after \"{key}\"")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some(n) => val.push(n),
                        None => break,
                    },
                    '\'' => {
                        closed = true;
                        break;
                    }
                    c => val.push(c),
                }
            }
            if !closed {
                return Err(bad(format!("unterminated quoted value for \"{key}\"")));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        val.push(n);
                    }
                } else {
                    val.push(c);
                }
            }
        }
        if key.is_empty() {
            return Err(bad("empty keyword".into()));
        }
        map.insert(key, val);
    }
    Ok(map)
}

fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    Error::Usage("invalid connection URI: bad percent-encoding".into())
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| Error::Usage("invalid connection URI: percent-encoding is not UTF-8".into()))
}

fn parse_uri(s: &str) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    let rest = s.split_once("://").map(|x| x.1).unwrap_or_default();
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.find('/') {
        Some(i) => (&main[..i], Some(&main[i + 1..])),
        None => (main, None),
    };
    let hostpart = match authority.rsplit_once('@') {
        Some((userinfo, h)) => {
            let (u, p) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !u.is_empty() {
                map.insert("user".into(), percent_decode(u)?);
            }
            if let Some(p) = p {
                map.insert("password".into(), percent_decode(p)?);
            }
            h
        }
        None => authority,
    };
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    for hp in hostpart.split(',').filter(|x| !x.is_empty()) {
        let (h, p) = if let Some(stripped) = hp.strip_prefix('[') {
            let end = stripped.find(']').ok_or_else(|| {
                Error::Usage("invalid connection URI: unterminated [ in host".into())
            })?;
            let h = &stripped[..end];
            let p = stripped[end + 1..].strip_prefix(':');
            (h.to_string(), p)
        } else {
            match hp.rsplit_once(':') {
                Some((h, p)) => (percent_decode(h)?, Some(p)),
                None => (percent_decode(hp)?, None),
            }
        };
        hosts.push(h);
        ports.push(p.unwrap_or("").to_string());
    }
    if !hosts.is_empty() && hosts.iter().any(|h| !h.is_empty()) {
        map.insert("host".into(), hosts.join(","));
    }
    if ports.iter().any(|p| !p.is_empty()) {
        map.insert("port".into(), ports.join(","));
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        map.insert("dbname".into(), percent_decode(db)?);
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|x| !x.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                Error::Usage(format!(
                    "invalid connection URI: parameter \"{pair}\" has no \"=\""
                ))
            })?;
            map.insert(percent_decode(k)?, percent_decode(v)?);
        }
    }
    Ok(map)
}

/// Command-line connection options (`-d -h -p -U`), all optional.
#[derive(Debug, Clone, Default)]
pub struct ConnArgs {
    /// `-d`: conninfo string or URI.
    pub dbname: Option<String>,
    /// `-h`.
    pub host: Option<String>,
    /// `-p`.
    pub port: Option<String>,
    /// `-U`.
    pub username: Option<String>,
}

/// Looks up an environment variable, treating empty as unset (as libpq does).
pub trait Env {
    /// The variable's value.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl ConnConfig {
    /// Parses a conninfo string or URI and resolves it against the process environment.
    pub fn parse(conninfo: &str) -> Result<ConnConfig> {
        ConnConfig::resolve(
            &ConnArgs {
                dbname: Some(conninfo.to_string()),
                ..Default::default()
            },
            &ProcessEnv,
        )
    }

    /// Resolves command-line options, environment and pgpass into a configuration.
    ///
    /// Precedence, as pg_basebackup: `-h/-p/-U` over the `-d` string, over `PG*` variables,
    /// over built-in defaults; the password from the string, else `PGPASSWORD`, else the
    /// password file.
    pub fn resolve(args: &ConnArgs, env: &dyn Env) -> Result<ConnConfig> {
        let mut explicit = match &args.dbname {
            Some(s) => parse_conninfo(s)?,
            None => BTreeMap::new(),
        };
        for (k, v) in [
            ("host", &args.host),
            ("port", &args.port),
            ("user", &args.username),
        ] {
            if let Some(v) = v {
                explicit.insert(k.to_string(), v.clone());
            }
        }
        let get = |k: &str, envname: &str| -> Option<String> {
            explicit
                .get(k)
                .cloned()
                .filter(|v| !v.is_empty())
                .or_else(|| env.var(envname))
        };
        let user = get("user", "PGUSER")
            .or_else(os_user_name)
            .ok_or_else(|| Error::Usage("no user name given: use -U or PGUSER".into()))?;
        let hosts: Vec<String> = get("host", "PGHOST")
            .map(|h| h.split(',').map(str::to_string).collect())
            .unwrap_or_else(|| vec![String::new()]);
        let addrs: Vec<String> = get("hostaddr", "PGHOSTADDR")
            .map(|h| h.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        let ports: Vec<String> = get("port", "PGPORT")
            .map(|p| p.split(',').map(str::to_string).collect())
            .unwrap_or_else(|| vec![String::new()]);
        let n = hosts.len().max(addrs.len());
        if ports.len() != 1 && ports.len() != n {
            return Err(Error::Usage(format!(
                "invalid connection string: {} ports given for {n} hosts",
                ports.len()
            )));
        }
        let mut targets = Vec::with_capacity(n);
        for i in 0..n {
            let port_s = if ports.len() == 1 {
                &ports[0]
            } else {
                &ports[i]
            };
            let port = if port_s.is_empty() {
                5432
            } else {
                port_s.parse::<u16>().map_err(|_| {
                    Error::Usage(format!(
                        "invalid port number \"{port_s}\" in connection options"
                    ))
                })?
            };
            let name = hosts.get(i).cloned().unwrap_or_default();
            let addr = addrs.get(i).cloned().filter(|a| !a.is_empty());
            let host = if name.starts_with('/') && addr.is_none() {
                Host::Socket(PathBuf::from(name))
            } else if name.is_empty() && addr.is_none() {
                Host::Socket(PathBuf::from("/var/run/postgresql"))
            } else {
                Host::Tcp {
                    name: if name.is_empty() {
                        addr.clone().unwrap_or_default()
                    } else {
                        name
                    },
                    addr,
                }
            };
            targets.push(Target { host, port });
        }
        let sslmode = match get("sslmode", "PGSSLMODE") {
            Some(m) => SslMode::parse(&m)?,
            None => SslMode::Prefer,
        };
        let sslrootcert = get("sslrootcert", "PGSSLROOTCERT").map(PathBuf::from);
        let connect_timeout = match get("connect_timeout", "PGCONNECT_TIMEOUT") {
            Some(t) => {
                let secs: i64 = t.parse().map_err(|_| {
                    Error::Usage(format!("invalid connect_timeout \"{t}\": expected seconds"))
                })?;
                (secs > 0).then(|| Duration::from_secs(secs.max(2) as u64))
            }
            None => None,
        };
        let dbname = get("dbname", "PGDATABASE");
        let application_name = get("application_name", "PGAPPNAME")
            .or_else(|| explicit.get("fallback_application_name").cloned())
            .unwrap_or_else(|| "pgpar".to_string());
        let password_from_conninfo = explicit.get("password").is_some_and(|p| !p.is_empty());
        let mut password = explicit
            .get("password")
            .cloned()
            .filter(|p| !p.is_empty())
            .or_else(|| env.var("PGPASSWORD"));
        if password.is_none() {
            let passfile = get("passfile", "PGPASSFILE")
                .map(PathBuf::from)
                .or_else(|| env.var("HOME").map(|h| Path::new(&h).join(".pgpass")));
            if let (Some(pf), Some(t)) = (passfile, targets.first()) {
                password = pgpass_lookup(&pf, t, dbname.as_deref(), &user);
            }
        }
        Ok(ConnConfig {
            targets,
            user,
            password,
            password_from_conninfo,
            dbname,
            sslmode,
            sslrootcert,
            application_name,
            connect_timeout,
            explicit,
        })
    }
}

fn os_user_name() -> Option<String> {
    // SAFETY: geteuid has no preconditions; getpwuid returns a pointer into static storage
    // that we copy out of before any other call could overwrite it.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if pw.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr((*pw).pw_name);
        Some(name.to_string_lossy().into_owned())
    }
}

/// Finds a password in a pgpass file (`host:port:db:user:password`, `*` wildcards, `\`
/// escapes). Like libpq, a file readable by group or others is ignored with a warning.
pub fn pgpass_lookup(path: &Path, target: &Target, db: Option<&str>, user: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file \"{}\" has group or world access; permissions should be u=rw (0600) or less",
            path.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let host = match &target.host {
        Host::Tcp { name, .. } => name.clone(),
        Host::Socket(dir) => {
            if dir == Path::new("/var/run/postgresql") || dir == Path::new("/tmp") {
                "localhost".to_string()
            } else {
                dir.display().to_string()
            }
        }
    };
    let port = target.port.to_string();
    let db = db.unwrap_or(user);
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass(line);
        if fields.len() < 5 {
            continue;
        }
        let m = |pat: &str, v: &str| pat == "*" || pat == v;
        let host_ok = m(&fields[0], &host)
            || (fields[0] == "localhost" && matches!(target.host, Host::Socket(_)));
        if host_ok
            && m(&fields[1], &port)
            && (m(&fields[2], db) || fields[2] == "replication")
            && m(&fields[3], user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

fn split_pgpass(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().expect("never empty").push(n);
                }
            }
            ':' if out.len() < 5 => out.push(String::new()),
            c => out.last_mut().expect("never empty").push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoEnv;
    impl Env for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }
    struct MapEnv(BTreeMap<&'static str, &'static str>);
    impl Env for MapEnv {
        fn var(&self, n: &str) -> Option<String> {
            self.0.get(n).map(|s| s.to_string())
        }
    }

    fn resolve(s: &str) -> ConnConfig {
        ConnConfig::resolve(
            &ConnArgs {
                dbname: Some(s.into()),
                ..Default::default()
            },
            &NoEnv,
        )
        .unwrap()
    }

    #[test]
    fn keyword_value_with_quotes_and_escapes() {
        let m = parse_conninfo(r"host=db1 port = 5433 password='it''s' user='a b\'c'").unwrap_err();
        // '' is not an escape in conninfo; it ends the value and starts a new quoted word.
        assert!(m.to_string().contains("invalid connection string"));
        let m = parse_conninfo(r"host=db1 port = 5433 user='a b\'c' password=x\ y").unwrap();
        assert_eq!(m["host"], "db1");
        assert_eq!(m["port"], "5433");
        assert_eq!(m["user"], "a b'c");
        assert_eq!(m["password"], "x y");
    }

    #[test]
    fn malformed_conninfo_is_refused() {
        assert!(parse_conninfo("host=a port").is_err());
        assert!(parse_conninfo("host='a").is_err());
        assert!(parse_conninfo("hots=a").is_err());
    }

    #[test]
    fn uri_forms() {
        let m = parse_conninfo("postgresql://us%40r:p%3Ass@h1:5433,[::1]:5434/db?sslmode=require")
            .unwrap();
        assert_eq!(m["user"], "us@r");
        assert_eq!(m["password"], "p:ss");
        assert_eq!(m["host"], "h1,::1");
        assert_eq!(m["port"], "5433,5434");
        assert_eq!(m["dbname"], "db");
        assert_eq!(m["sslmode"], "require");
        let c = resolve("postgresql://u@%2Ftmp%2Fsock:6000");
        assert_eq!(c.targets[0].host, Host::Socket("/tmp/sock".into()));
        assert_eq!(c.targets[0].port, 6000);
    }

    #[test]
    fn options_override_string_and_env_fills_gaps() {
        let env = MapEnv(BTreeMap::from([
            ("PGPORT", "7000"),
            ("PGUSER", "envuser"),
            ("PGSSLMODE", "require"),
            ("PGPASSWORD", "envpw"),
        ]));
        let c = ConnConfig::resolve(
            &ConnArgs {
                dbname: Some("host=a user=u1".into()),
                host: Some("b".into()),
                ..Default::default()
            },
            &env,
        )
        .unwrap();
        assert_eq!(
            c.targets[0].host,
            Host::Tcp {
                name: "b".into(),
                addr: None
            }
        );
        assert_eq!(c.targets[0].port, 7000);
        assert_eq!(c.user, "u1");
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.password.as_deref(), Some("envpw"));
        assert!(!c.password_from_conninfo);
        assert!(!format!("{c:?}").contains("envpw"));
    }

    #[test]
    fn pgpass_matching_and_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pf = dir.path().join("pgpass");
        std::fs::write(
            &pf,
            "# comment\nother:*:*:*:nope\nlocalhost:5432:*:bob:s\\:ecret\n*:*:*:*:fallback\n",
        )
        .unwrap();
        std::fs::set_permissions(&pf, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = Target {
            host: Host::Tcp {
                name: "localhost".into(),
                addr: None,
            },
            port: 5432,
        };
        assert_eq!(
            pgpass_lookup(&pf, &t, None, "bob").as_deref(),
            Some("s:ecret")
        );
        assert_eq!(
            pgpass_lookup(&pf, &t, None, "al").as_deref(),
            Some("fallback")
        );
        std::fs::set_permissions(&pf, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(pgpass_lookup(&pf, &t, None, "bob"), None);
    }
}
