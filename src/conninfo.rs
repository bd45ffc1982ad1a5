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

/// libpq's `channel_binding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Never bind (SCRAM-SHA-256 with the "n" flag even when -PLUS is offered).
    Disable,
    /// Bind when TLS is in use and the server offers SCRAM-SHA-256-PLUS.
    Prefer,
    /// Authenticate only through SCRAM-SHA-256-PLUS over TLS; refuse anything else.
    Require,
}

/// libpq's `target_session_attrs`: which server a session may end on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    /// Any server.
    Any,
    /// A session that is not read-only.
    ReadWrite,
    /// A read-only session (a standby, or `default_transaction_read_only`).
    ReadOnly,
    /// A server not in hot standby.
    Primary,
    /// A server in hot standby.
    Standby,
    /// A standby if any host is one, else any server.
    PreferStandby,
}

/// TCP keepalive settings (libpq's `keepalives*`); `None` leaves the system default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalives {
    /// `keepalives`: on unless set to 0 (libpq's default is on).
    pub enabled: bool,
    /// `keepalives_idle`: seconds of silence before the first probe.
    pub idle: Option<u32>,
    /// `keepalives_interval`: seconds between probes.
    pub interval: Option<u32>,
    /// `keepalives_count`: probes lost before the connection is dead.
    pub count: Option<u32>,
    /// `tcp_user_timeout`: milliseconds sent data may stay unacknowledged.
    pub user_timeout_ms: Option<u32>,
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
    /// `channel_binding`.
    pub channel_binding: ChannelBinding,
    /// TCP keepalives and `tcp_user_timeout`, applied to every TCP connection.
    pub keepalives: Keepalives,
    /// `options`: command-line options sent to the server in the startup packet.
    pub options: Option<String>,
    /// `target_session_attrs`, checked after each connection as libpq checks it.
    pub target_session_attrs: TargetSessionAttrs,
    /// `sslcert`: client certificate (PEM), when one is given or the default file exists.
    pub sslcert: Option<PathBuf>,
    /// `sslkey`: the client certificate's private key (PEM, not encrypted).
    pub sslkey: Option<PathBuf>,
    /// `sslsni`: send the host name in the TLS handshake (libpq's default: yes).
    pub sslsni: bool,
    /// `ssl_min_protocol_version` / `ssl_max_protocol_version`, as TLS minor versions (2, 3).
    pub ssl_versions: (u8, u8),
    /// Every keyword given explicitly (conninfo and options), for `primary_conninfo`.
    pub explicit: BTreeMap<String, String>,
    /// Every keyword's value as libpq's `PQconninfo` reports it for this connection (given in
    /// the string, by `-h`/`-p`/`-U` or a `PG*` variable, else libpq's default), in libpq's
    /// order, for `-R`'s `primary_conninfo` (see [`crate::recovery`]).
    pub in_use: Vec<InUse>,
    /// Server settings sent in the startup packet (the backup's own sessions set their
    /// timeouts to 0 here; empty unless the caller sets it).
    pub session_settings: Vec<(String, String)>,
}

/// One keyword of [`ConnConfig::in_use`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InUse {
    /// The libpq keyword.
    pub keyword: &'static str,
    /// Its value.
    pub value: String,
    /// Whether it is libpq's default (nothing gave it).
    pub default: bool,
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

/// The keywords pgpar honours with libpq's meaning; others are refused so typos do not pass
/// silently.
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslsni",
    "sslcompression",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "sslnegotiation",
    "sslcertmode",
    "gssencmode",
    "application_name",
    "fallback_application_name",
    "connect_timeout",
    "passfile",
    "replication",
    "channel_binding",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "options",
    "client_encoding",
    "target_session_attrs",
    "load_balance_hosts",
];

/// Keywords libpq (PostgreSQL 17) accepts that pgpar does not implement, with their
/// environment variable and what to do instead. They are refused, never ignored: a setting
/// a user relies on for security (require_auth, sslcrl, requirepeer) must not silently do
/// nothing.
const UNSUPPORTED: &[(&str, &str, &str)] = &[
    (
        "service",
        "PGSERVICE",
        "give the settings directly in -d or PG* variables",
    ),
    (
        "servicefile",
        "PGSERVICEFILE",
        "give the settings directly in -d or PG* variables",
    ),
    (
        "require_auth",
        "PGREQUIREAUTH",
        "restrict the methods in the server's pg_hba.conf, or use channel_binding=require",
    ),
    (
        "sslpassword",
        "",
        "decrypt the key (openssl pkey -in KEY -out KEY.plain) and give that file as sslkey",
    ),
    (
        "sslcrl",
        "PGSSLCRL",
        "remove revoked certificates from sslrootcert instead",
    ),
    (
        "sslcrldir",
        "PGSSLCRLDIR",
        "remove revoked certificates from sslrootcert instead",
    ),
    (
        "requirepeer",
        "PGREQUIREPEER",
        "check the server's owner another way, or connect over TCP with sslmode=verify-full",
    ),
    (
        "krbsrvname",
        "PGKRBSRVNAME",
        "pgpar has no GSSAPI/Kerberos support: use password, SCRAM or certificate authentication",
    ),
    (
        "gsslib",
        "PGGSSLIB",
        "pgpar has no GSSAPI/Kerberos support: use password, SCRAM or certificate authentication",
    ),
    (
        "gssdelegation",
        "PGGSSDELEGATION",
        "pgpar has no GSSAPI/Kerberos support: use password, SCRAM or certificate authentication",
    ),
];

fn unsupported(k: &str, hint: &str) -> Error {
    Error::Usage(format!(
        "connection option \"{k}\" is not supported by pgpar; {hint}"
    ))
}

fn invalid(k: &str, v: &str, expected: &str) -> Error {
    Error::Usage(format!("invalid {k} value: \"{v}\" (expected {expected})"))
}

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
        if let Some((_, _, hint)) = UNSUPPORTED.iter().find(|u| u.0 == k) {
            return Err(unsupported(k, hint));
        }
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
        for (k, envname, hint) in UNSUPPORTED {
            if !envname.is_empty() && env.var(envname).is_some() {
                return Err(Error::Usage(format!(
                    "connection option \"{k}\" (from {envname}) is not supported by pgpar; {hint}"
                )));
            }
        }
        let channel_binding = match get("channel_binding", "PGCHANNELBINDING").as_deref() {
            None | Some("prefer") => ChannelBinding::Prefer,
            Some("disable") => ChannelBinding::Disable,
            Some("require") => ChannelBinding::Require,
            Some(v) => return Err(invalid("channel_binding", v, "disable, prefer or require")),
        };
        let int = |k: &str, envname: &str| -> Result<Option<i64>> {
            get(k, envname)
                .map(|v| {
                    v.trim().parse::<i64>().map_err(|_| {
                        Error::Usage(format!(
                            "invalid integer value \"{v}\" for connection option \"{k}\""
                        ))
                    })
                })
                .transpose()
        };
        let positive = |k: &str| -> Result<Option<u32>> {
            match int(k, "")? {
                None => Ok(None),
                Some(n) if n >= 1 && n <= i64::from(i32::MAX) => Ok(Some(n as u32)),
                Some(n) => Err(invalid(
                    k,
                    &n.to_string(),
                    "a number of seconds, at least 1",
                )),
            }
        };
        let keepalives = Keepalives {
            enabled: int("keepalives", "")?.is_none_or(|n| n != 0),
            idle: positive("keepalives_idle")?,
            interval: positive("keepalives_interval")?,
            count: positive("keepalives_count")?,
            user_timeout_ms: match int("tcp_user_timeout", "")? {
                None | Some(0) => None,
                Some(n) if n > 0 && n <= i64::from(i32::MAX) => Some(n as u32),
                Some(n) => {
                    return Err(invalid(
                        "tcp_user_timeout",
                        &n.to_string(),
                        "milliseconds, 0 for the system default",
                    ))
                }
            },
        };
        let options = get("options", "PGOPTIONS");
        let target_session_attrs =
            match get("target_session_attrs", "PGTARGETSESSIONATTRS").as_deref() {
                None | Some("any") => TargetSessionAttrs::Any,
                Some("read-write") => TargetSessionAttrs::ReadWrite,
                Some("read-only") => TargetSessionAttrs::ReadOnly,
                Some("primary") => TargetSessionAttrs::Primary,
                Some("standby") => TargetSessionAttrs::Standby,
                Some("prefer-standby") => TargetSessionAttrs::PreferStandby,
                Some(v) => {
                    return Err(invalid(
                        "target_session_attrs",
                        v,
                        "any, read-write, read-only, primary, standby or prefer-standby",
                    ))
                }
            };
        match get("client_encoding", "PGCLIENTENCODING") {
            None => {}
            // pgpar sets client_encoding SQL_ASCII (names as bytes, see conn/auth.rs) and
            // prints UTF-8; these ask for nothing else.
            Some(v)
                if ["utf8", "utf-8", "unicode", "sql_ascii"]
                    .contains(&v.to_ascii_lowercase().as_str()) => {}
            Some(v) => {
                return Err(Error::Usage(format!(
                    "client_encoding \"{v}\" is not supported: pgpar takes file names from the server as bytes, unconverted (it sets client_encoding SQL_ASCII), and prints UTF-8; leave client_encoding unset"
                )))
            }
        }
        match get("gssencmode", "PGGSSENCMODE").as_deref() {
            // Without GSSAPI support libpq accepts these and connects without GSS encryption.
            None | Some("disable") | Some("prefer") => {}
            Some("require") => {
                return Err(Error::Usage(
                    "gssencmode=require is not supported: pgpar has no GSSAPI support; use TLS (sslmode=verify-full)".into(),
                ))
            }
            Some(v) => return Err(invalid("gssencmode", v, "disable, prefer or require")),
        }
        match get("sslnegotiation", "PGSSLNEGOTIATION").as_deref() {
            None | Some("postgres") => {}
            Some("direct") => {
                return Err(Error::Usage(
                    "sslnegotiation=direct is not supported by pgpar; use sslnegotiation=postgres (the default)".into(),
                ))
            }
            Some(v) => return Err(invalid("sslnegotiation", v, "postgres or direct")),
        }
        match get("sslcompression", "PGSSLCOMPRESSION").as_deref() {
            None | Some("0") => {}
            Some("1") => {
                return Err(Error::Usage(
                    "sslcompression=1 is not supported: TLS compression is not available (it is insecure); use sslcompression=0".into(),
                ))
            }
            Some(v) => return Err(invalid("sslcompression", v, "0 or 1")),
        }
        let certmode_disable = match get("sslcertmode", "PGSSLCERTMODE").as_deref() {
            None | Some("allow") => false,
            Some("disable") => true,
            Some("require") => {
                return Err(Error::Usage(
                    "sslcertmode=require is not supported by pgpar; use sslcertmode=allow and require the certificate on the server (clientcert=verify-full or cert in pg_hba.conf)".into(),
                ))
            }
            Some(v) => return Err(invalid("sslcertmode", v, "disable, allow or require")),
        };
        let sslsni = match get("sslsni", "PGSSLSNI").as_deref() {
            None | Some("1") => true,
            Some("0") => false,
            Some(v) => return Err(invalid("sslsni", v, "0 or 1")),
        };
        let tls_version = |k: &str, envname: &str, dflt: u8| -> Result<u8> {
            Ok(match get(k, envname).as_deref() {
                None => dflt,
                // rustls speaks TLS 1.2 and 1.3 only: a lower minimum admits nothing lower.
                Some("TLSv1") | Some("TLSv1.1") if k.starts_with("ssl_min") => 2,
                Some("TLSv1.2") => 2,
                Some("TLSv1.3") => 3,
                Some(v @ ("TLSv1" | "TLSv1.1")) => {
                    return Err(Error::Usage(format!(
                        "{k}={v} is not supported: pgpar speaks TLS 1.2 and 1.3 only"
                    )))
                }
                Some(v) => return Err(invalid(k, v, "TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3")),
            })
        };
        let ssl_versions = (
            tls_version("ssl_min_protocol_version", "PGSSLMINPROTOCOLVERSION", 2)?,
            tls_version("ssl_max_protocol_version", "PGSSLMAXPROTOCOLVERSION", 3)?,
        );
        if ssl_versions.0 > ssl_versions.1 {
            return Err(Error::Usage("invalid SSL protocol version range: ssl_min_protocol_version is above ssl_max_protocol_version".into()));
        }
        // libpq's defaults: ~/.postgresql/postgresql.crt and .key, used when they exist.
        let home_file = |name: &str| {
            env.var("HOME")
                .map(|h| Path::new(&h).join(".postgresql").join(name))
                .filter(|p| p.exists())
        };
        let (sslcert, sslkey) = if certmode_disable {
            (None, None)
        } else {
            let cert = get("sslcert", "PGSSLCERT")
                .map(PathBuf::from)
                .or_else(|| home_file("postgresql.crt"));
            let key = get("sslkey", "PGSSLKEY")
                .map(PathBuf::from)
                .or_else(|| cert.as_ref().and_then(|_| home_file("postgresql.key")));
            (cert, key)
        };
        match get("load_balance_hosts", "PGLOADBALANCEHOSTS").as_deref() {
            None | Some("disable") => {}
            Some("random") => shuffle(&mut targets),
            Some(v) => return Err(invalid("load_balance_hosts", v, "disable or random")),
        }
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
        // libpq's conn->pgpass: what the string or PGPASSWORD gave (a password from the
        // password file is kept per host, and PQconninfo does not report it).
        let given_password = password.clone().filter(|p| !p.is_empty());
        // libpq names its default password file only when no password was given.
        let mut passfile_in_use = get("passfile", "PGPASSFILE").map(|p| (p, false));
        if password.is_none() {
            let passfile = get("passfile", "PGPASSFILE")
                .map(PathBuf::from)
                .or_else(|| env.var("HOME").map(|h| Path::new(&h).join(".pgpass")));
            if passfile_in_use.is_none() {
                passfile_in_use = passfile.as_ref().map(|p| (p.display().to_string(), true));
            }
            if let (Some(pf), Some(t)) = (passfile, targets.first()) {
                password = pgpass_lookup(&pf, t, dbname.as_deref(), &user);
            }
        }
        let mut in_use = Vec::new();
        let mut add = |keyword: &'static str, v: Option<(String, bool)>| {
            if let Some((value, default)) = v.filter(|(v, _)| !v.is_empty()) {
                in_use.push(InUse {
                    keyword,
                    value,
                    default,
                });
            }
        };
        // PQconninfoOptions' order (PostgreSQL 17's fe-connect.c), the keywords pgpar
        // implements; the value given, else libpq's default.
        let given = |k: &str, envname: &str, dflt: Option<&str>| {
            get(k, envname)
                .map(|v| (v, false))
                .or_else(|| dflt.map(|d| (d.to_string(), true)))
        };
        add("user", Some((user.clone(), false)));
        add("password", given_password.map(|p| (p, false)));
        add("passfile", passfile_in_use);
        add(
            "channel_binding",
            given("channel_binding", "PGCHANNELBINDING", Some("prefer")),
        );
        add(
            "connect_timeout",
            given("connect_timeout", "PGCONNECT_TIMEOUT", None),
        );
        add("host", given("host", "PGHOST", None));
        add("hostaddr", given("hostaddr", "PGHOSTADDR", None));
        add("port", given("port", "PGPORT", Some("5432")));
        add(
            "client_encoding",
            given("client_encoding", "PGCLIENTENCODING", None),
        );
        add("options", given("options", "PGOPTIONS", None));
        add(
            "application_name",
            given("application_name", "PGAPPNAME", None),
        );
        for k in [
            "keepalives",
            "keepalives_idle",
            "keepalives_interval",
            "keepalives_count",
            "tcp_user_timeout",
        ] {
            add(k, given(k, "", None));
        }
        add("sslmode", given("sslmode", "PGSSLMODE", Some("prefer")));
        add(
            "sslnegotiation",
            given("sslnegotiation", "PGSSLNEGOTIATION", Some("postgres")),
        );
        add(
            "sslcompression",
            given("sslcompression", "PGSSLCOMPRESSION", Some("0")),
        );
        add("sslcert", given("sslcert", "PGSSLCERT", None));
        add("sslkey", given("sslkey", "PGSSLKEY", None));
        add(
            "sslcertmode",
            given("sslcertmode", "PGSSLCERTMODE", Some("allow")),
        );
        add("sslrootcert", given("sslrootcert", "PGSSLROOTCERT", None));
        add("sslsni", given("sslsni", "PGSSLSNI", Some("1")));
        add(
            "ssl_min_protocol_version",
            given(
                "ssl_min_protocol_version",
                "PGSSLMINPROTOCOLVERSION",
                Some("TLSv1.2"),
            ),
        );
        add(
            "ssl_max_protocol_version",
            given("ssl_max_protocol_version", "PGSSLMAXPROTOCOLVERSION", None),
        );
        add(
            "gssencmode",
            given("gssencmode", "PGGSSENCMODE", Some("prefer")),
        );
        add(
            "target_session_attrs",
            given("target_session_attrs", "PGTARGETSESSIONATTRS", Some("any")),
        );
        add(
            "load_balance_hosts",
            given("load_balance_hosts", "PGLOADBALANCEHOSTS", Some("disable")),
        );
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
            channel_binding,
            keepalives,
            options,
            target_session_attrs,
            sslcert,
            sslkey,
            sslsni,
            ssl_versions,
            explicit,
            in_use,
            session_settings: Vec::new(),
        })
    }
}

/// Puts the targets in a random order (`load_balance_hosts=random`), from the standard
/// library's per-process random hash keys: no cryptographic quality is needed.
fn shuffle(targets: &mut [Target]) {
    use std::hash::{BuildHasher, Hasher};
    let seed = std::collections::hash_map::RandomState::new();
    for i in (1..targets.len()).rev() {
        let mut h = seed.build_hasher();
        h.write_usize(i);
        let j = (h.finish() % (i as u64 + 1)) as usize;
        targets.swap(i, j);
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
        // libpq's passwordFromFile: a directory, FIFO or device is skipped with a warning.
        tracing::warn!("password file \"{}\" is not a plain file", path.display());
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

    fn resolve_err(s: &str) -> String {
        ConnConfig::resolve(
            &ConnArgs {
                dbname: Some(s.into()),
                ..Default::default()
            },
            &NoEnv,
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn libpq_keywords_are_honoured_or_refused() {
        let c = resolve("host=a");
        assert_eq!(c.channel_binding, ChannelBinding::Prefer);
        assert!(c.keepalives.enabled, "libpq's default is keepalives=1");
        assert_eq!(c.target_session_attrs, TargetSessionAttrs::Any);
        assert!(c.sslsni);
        let c = resolve(
            "host=a channel_binding=require keepalives=1 keepalives_idle=7 keepalives_interval=3 \
             keepalives_count=4 tcp_user_timeout=9000 options='-c work_mem=8MB' \
             target_session_attrs=prefer-standby sslsni=0 ssl_min_protocol_version=TLSv1.3 \
             client_encoding=UTF8 gssencmode=disable",
        );
        assert_eq!(c.channel_binding, ChannelBinding::Require);
        assert_eq!(
            c.keepalives,
            Keepalives {
                enabled: true,
                idle: Some(7),
                interval: Some(3),
                count: Some(4),
                user_timeout_ms: Some(9000)
            }
        );
        assert_eq!(c.options.as_deref(), Some("-c work_mem=8MB"));
        assert_eq!(c.target_session_attrs, TargetSessionAttrs::PreferStandby);
        assert!(!c.sslsni);
        assert_eq!(c.ssl_versions, (3, 3));
        assert!(!resolve("host=a keepalives=0").keepalives.enabled);
        for (conninfo, expect) in [
            (
                "channel_binding=maybe",
                "invalid channel_binding value: \"maybe\"",
            ),
            (
                "keepalives_idle=x",
                "invalid integer value \"x\" for connection option \"keepalives_idle\"",
            ),
            ("keepalives_count=0", "invalid keepalives_count value"),
            (
                "target_session_attrs=master",
                "invalid target_session_attrs value",
            ),
            ("sslpassword=x", "\"sslpassword\" is not supported by pgpar"),
            (
                "require_auth=scram-sha-256",
                "\"require_auth\" is not supported by pgpar",
            ),
            ("service=foo", "\"service\" is not supported"),
            (
                "client_encoding=LATIN1",
                "takes file names from the server as bytes",
            ),
            ("gssencmode=require", "no GSSAPI support"),
            ("ssl_max_protocol_version=TLSv1.1", "TLS 1.2 and 1.3 only"),
            (
                "ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2",
                "invalid SSL protocol version range",
            ),
            ("keepalives_idl=3", "unknown keyword \"keepalives_idl\""),
        ] {
            let e = resolve_err(&format!("host=a {conninfo}"));
            assert!(e.contains(expect), "{conninfo}: {e}");
            assert!(!e.contains("Some(") && !e.contains("None"), "{e}");
        }
        let env = MapEnv(BTreeMap::from([("PGREQUIREAUTH", "md5")]));
        let e = ConnConfig::resolve(&ConnArgs::default(), &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"require_auth\" (from PGREQUIREAUTH) is not supported"),
            "{e}"
        );
    }

    #[test]
    fn pgpass_that_is_not_a_plain_file_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let t = Target {
            host: Host::Socket("/tmp".into()),
            port: 5432,
        };
        assert_eq!(pgpass_lookup(dir.path(), &t, None, "bob"), None);
    }
}
