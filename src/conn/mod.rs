//! Our own replication-capable PostgreSQL connection, on tokio, in three parts as
//! tokio-postgres splits it: `dial` opens the socket (TCP, Unix, SSLRequest, TLS), `auth`
//! runs the startup exchange (trust, password, md5, SCRAM-SHA-256 with channel binding over
//! TLS), and this file is the query/copy state machine a replication client needs: result
//! sets, CopyOut, CopyBoth, CopyIn. One task owns a `Connection`; reads are cancel-safe
//! (partial messages stay in the read buffer), so [`Connection::next_event`] can sit in a
//! `select!`. Server notices go to `tracing`. It does not know any replication command: that
//! is `crate::replication`; nor any message layout: that is `crate::protocol::backend`.

mod auth;
mod dial;
pub mod sql;
pub mod tls;

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use dial::Stream;

pub use crate::protocol::backend::Column;
use crate::protocol::backend::{decode, BackendMessage, DEFAULT_MAX_MESSAGE};

use crate::conninfo::{ConnConfig, Host, SslMode, Target, TargetSessionAttrs};
use crate::error::{DbError, Error, Result};
use crate::protocol::sqlstate;

/// Which kind of session to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// A normal SQL session.
    None,
    /// `replication=true`: a physical walsender.
    Physical,
    /// `replication=database`: a walsender bound to a database (SQL allowed too).
    Database,
}

/// One step of a simple query's response.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A result set begins.
    RowDescription(Vec<Column>),
    /// A row of the current result set.
    DataRow(Row),
    /// A command or result set ended.
    CommandComplete(String),
    /// The query string was empty.
    EmptyQuery,
    /// The server starts sending CopyData (COPY OUT).
    CopyOutStart,
    /// The server starts a two-way copy (START_REPLICATION).
    CopyBothStart,
    /// The server wants CopyData from us.
    CopyInStart,
    /// One CopyData payload.
    CopyData(Bytes),
    /// The server ended its side of the copy.
    CopyDone,
}

/// Names what arrived, as the protocol calls it, for messages (never the bytes).
impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::RowDescription(_) => write!(f, "a result set (RowDescription)"),
            Event::DataRow(_) => write!(f, "a data row"),
            Event::CommandComplete(tag) => write!(f, "CommandComplete \"{tag}\""),
            Event::EmptyQuery => write!(f, "EmptyQueryResponse"),
            Event::CopyOutStart => write!(f, "CopyOutResponse"),
            Event::CopyBothStart => write!(f, "CopyBothResponse"),
            Event::CopyInStart => write!(f, "CopyInResponse"),
            Event::CopyData(d) => write!(f, "CopyData ({} bytes)", d.len()),
            Event::CopyDone => write!(f, "CopyDone"),
        }
    }
}

/// What arrived, or the end of the response, for messages.
pub fn describe(ev: Option<&Event>) -> String {
    ev.map_or_else(|| "the end of the response".to_string(), Event::to_string)
}

/// A data row; values are text (the simple query protocol), `None` for NULL.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row(pub Vec<Option<Bytes>>);

impl Row {
    /// Column `i` as text, `None` when NULL, absent or not UTF-8.
    pub fn get(&self, i: usize) -> Option<&str> {
        self.0
            .get(i)?
            .as_ref()
            .and_then(|b| std::str::from_utf8(b).ok())
    }

    /// Column `i` as text, or a protocol error naming `what` when it is NULL, missing or not
    /// UTF-8.
    pub fn text(&self, i: usize, what: &str) -> Result<&str> {
        self.get(i).ok_or_else(|| match self.get_bytes(i) {
            Some(b) => Error::Protocol(format!(
                "the server sent a {what} that is not UTF-8: \"{}\"",
                crate::relpath::escaped(b)
            )),
            None => Error::Protocol(format!("the server sent no {what}")),
        })
    }

    /// Column `i` as a tablespace location, `None` when NULL or absent. pgpar handles a
    /// location as text (`-T` maps it, `tablespace_map` names it): one that is not UTF-8 is
    /// refused, naming it, rather than lost on the way.
    pub fn tablespace_location(&self, i: usize) -> Result<Option<&str>> {
        let Some(b) = self.get_bytes(i) else {
            return Ok(None);
        };
        std::str::from_utf8(b).map(Some).map_err(|_| {
            Error::Failed(format!(
                "the tablespace location \"{}\" is not valid UTF-8, and pgpar handles tablespace \
                 locations as text: back this cluster up with pg_basebackup, or move the \
                 tablespace's contents to a tablespace whose location is UTF-8",
                crate::relpath::escaped(b)
            ))
        })
    }

    /// Column `i` parsed, or a protocol error naming `what` and the value.
    pub fn parse<T: std::str::FromStr>(&self, i: usize, what: &str) -> Result<T> {
        let v = self.text(i, what)?;
        v.parse()
            .map_err(|_| Error::Protocol(format!("the server sent an invalid {what} \"{v}\"")))
    }

    /// Column `i` as raw bytes.
    pub fn get_bytes(&self, i: usize) -> Option<&Bytes> {
        self.0.get(i)?.as_ref()
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One result set of a command.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResultSet {
    /// The columns.
    pub columns: Vec<Column>,
    /// The rows.
    pub rows: Vec<Row>,
    /// The command tag that closed it.
    pub tag: String,
}

impl ResultSet {
    /// Index of the column called `name`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Query,
    CopyOut,
    CopyBoth,
    CopyIn,
    Broken,
}

impl State {
    /// The state in words, for errors a user reads.
    fn describe(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Query => "still running a query",
            State::CopyOut => "still in a COPY from the server",
            State::CopyBoth => "still in a two-way COPY (replication stream)",
            State::CopyIn => "still in a COPY to the server",
            State::Broken => "broken by an earlier error",
        }
    }
}

/// Read buffer growth step; large so CopyData streams cost few syscalls.
const READ_CHUNK: usize = 256 * 1024;

/// An open, authenticated connection.
pub struct Connection {
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    state: State,
    pending_error: Option<DbError>,
    target: String,
    params: HashMap<String, String>,
    backend_pid: i32,
    tls: bool,
    /// Whether authentication ran SCRAM-SHA-256-PLUS (for channel_binding=require).
    channel_bound: bool,
    /// A read that waits longer than this for any byte fails the connection as stalled
    /// ([`Connection::set_read_limit`]).
    read_limit: Option<std::time::Duration>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("target", &self.target)
            .field("backend_pid", &self.backend_pid)
            .field("tls", &self.tls)
            .finish()
    }
}

fn attrs_name(a: TargetSessionAttrs) -> &'static str {
    match a {
        TargetSessionAttrs::Any => "any",
        TargetSessionAttrs::ReadWrite => "read-write",
        TargetSessionAttrs::ReadOnly => "read-only",
        TargetSessionAttrs::Primary => "primary",
        TargetSessionAttrs::Standby => "standby",
        TargetSessionAttrs::PreferStandby => "prefer-standby",
    }
}

/// What a failed attempt teaches the caller about retrying with the other TLS choice.
enum Attempt {
    Done(Connection),
    Failed(Error, bool),
}

impl Connection {
    /// Connects to the first target that answers, performing TLS negotiation and
    /// authentication. Every failure is an [`Error::Connect`] naming the target.
    ///
    /// `target_session_attrs` is checked on each session as libpq checks it (from the
    /// `in_hot_standby` and `default_transaction_read_only` the server reports at startup);
    /// a session that does not fit is closed and the next host tried. `prefer-standby`
    /// makes a second pass accepting any server when no host is a standby.
    pub async fn connect(cfg: &ConnConfig, repl: Replication) -> Result<Connection> {
        let passes: &[TargetSessionAttrs] = match cfg.target_session_attrs {
            TargetSessionAttrs::PreferStandby => {
                &[TargetSessionAttrs::Standby, TargetSessionAttrs::Any]
            }
            TargetSessionAttrs::Any => &[TargetSessionAttrs::Any],
            TargetSessionAttrs::ReadWrite => &[TargetSessionAttrs::ReadWrite],
            TargetSessionAttrs::ReadOnly => &[TargetSessionAttrs::ReadOnly],
            TargetSessionAttrs::Primary => &[TargetSessionAttrs::Primary],
            TargetSessionAttrs::Standby => &[TargetSessionAttrs::Standby],
        };
        let mut last = None;
        for &want in passes {
            for t in &cfg.targets {
                match Self::connect_target(cfg, t, repl).await {
                    Ok(c) => match c.session_mismatch(want) {
                        None => return Ok(c),
                        Some(reason) => {
                            last = Some(Error::Connect {
                                target: c.target.clone(),
                                reason: reason.to_string(),
                                sqlstate: None,
                                hint: Some(format!(
                                    "target_session_attrs={} refused this server; name another host or change target_session_attrs",
                                    attrs_name(cfg.target_session_attrs)
                                )),
                            });
                            c.close().await;
                        }
                    },
                    Err(e) => last = Some(e),
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Usage("no host to connect to".into())))
    }

    /// Why this session does not satisfy `want`, in libpq's words; `None` when it does.
    /// A server that does not report a setting (before PostgreSQL 14) counts as "off".
    fn session_mismatch(&self, want: TargetSessionAttrs) -> Option<&'static str> {
        let on = |p: &str| self.parameter(p) == Some("on");
        let standby = on("in_hot_standby");
        let read_only = standby || on("default_transaction_read_only");
        match want {
            TargetSessionAttrs::ReadWrite if read_only => Some("session is read-only"),
            TargetSessionAttrs::ReadOnly if !read_only => Some("session is not read-only"),
            TargetSessionAttrs::Primary if standby => Some("server is in hot standby mode"),
            TargetSessionAttrs::Standby if !standby => Some("server is not in hot standby mode"),
            _ => None,
        }
    }

    async fn connect_target(cfg: &ConnConfig, t: &Target, repl: Replication) -> Result<Connection> {
        let is_socket = matches!(t.host, Host::Socket(_));
        // libpq order of attempts per sslmode; TLS never applies to Unix sockets.
        let order: &[bool] = match (cfg.sslmode, is_socket) {
            (_, true) | (SslMode::Disable, _) => &[false],
            (SslMode::Allow, _) => &[false, true],
            (SslMode::Prefer, _) => &[true, false],
            _ => &[true],
        };
        let mut last = None;
        for &want_tls in order {
            match Self::attempt(cfg, t, repl, want_tls).await {
                Attempt::Done(c) => return Ok(c),
                Attempt::Failed(e, retry) => {
                    last = Some(e);
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    async fn attempt(cfg: &ConnConfig, t: &Target, repl: Replication, want_tls: bool) -> Attempt {
        let target = t.to_string();
        let fut = Self::attempt_inner(cfg, t, repl, want_tls, &target);
        let res = match cfg.connect_timeout {
            Some(d) => match tokio::time::timeout(d, fut).await {
                Ok(r) => r,
                Err(_) => Err((
                    Error::Connect {
                        target: target.clone(),
                        reason: format!("timeout expired after {} s", d.as_secs()),
                        sqlstate: None,
                        hint: Some("check the host and port, or raise connect_timeout".into()),
                    },
                    false,
                )),
            },
            None => fut.await,
        };
        match res {
            Ok(c) => Attempt::Done(c),
            Err((e, retry)) => Attempt::Failed(e, retry),
        }
    }

    async fn attempt_inner(
        cfg: &ConnConfig,
        t: &Target,
        repl: Replication,
        want_tls: bool,
        target: &str,
    ) -> std::result::Result<Connection, (Error, bool)> {
        let (stream, tls, endpoint) = dial::open(cfg, t, want_tls, target).await?;
        let mut conn = Connection {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::new(),
            state: State::Idle,
            pending_error: None,
            target: target.to_string(),
            params: HashMap::new(),
            backend_pid: 0,
            tls,
            channel_bound: false,
            read_limit: None,
        };
        match conn.startup(cfg, repl, endpoint).await {
            Ok(()) => Ok(conn),
            Err(e) => {
                // With allow/prefer, a refusal by pg_hba may be specific to (non-)TLS.
                let retry = matches!(e, Error::Connect { ref sqlstate, .. } if sqlstate.as_deref() == Some(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION));
                Err((e, retry))
            }
        }
    }

    /// `host port N` or the socket path, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// A server parameter reported at startup (`server_version`, `integer_datetimes` …).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// The server's version number, e.g. 150018, from `server_version`.
    pub fn server_version_num(&self) -> Option<u32> {
        let v = self.parameter("server_version")?;
        let mut parts = v
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty());
        let major: u32 = parts.next()?.parse().ok()?;
        let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(major * 10000 + minor)
    }

    /// The backend's process id (for pg_terminate_backend and messages).
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    async fn flush_writes(&mut self) -> Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let res = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        }
        .await;
        self.wbuf.clear();
        res.map_err(|e| {
            self.state = State::Broken;
            Error::ConnectionLost {
                target: self.target.clone(),
                reason: e.to_string(),
            }
        })
    }

    /// Bounds every wait for the server's next bytes from now on (`None`: unbounded, the
    /// default): a server that sends nothing for `limit` while pgpar waits for its answer
    /// breaks the connection with an error naming `--stall-timeout`. For commands whose
    /// answer flows without long pauses (a file list), not for one that may rightly think
    /// for minutes (a spread checkpoint).
    pub fn set_read_limit(&mut self, limit: Option<std::time::Duration>) {
        self.read_limit = limit;
    }

    /// Reads one backend message. Cancel-safe.
    async fn read_message(&mut self) -> Result<BackendMessage> {
        loop {
            if let Some(m) = decode(&mut self.rbuf, DEFAULT_MAX_MESSAGE)? {
                return Ok(m);
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            let read = self.stream.read_buf(&mut self.rbuf);
            let res = match self.read_limit {
                None => read.await,
                Some(limit) => match tokio::time::timeout(limit, read).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.state = State::Broken;
                        return Err(Error::ConnectionLost {
                            target: self.target.clone(),
                            reason: format!(
                                "the server sent nothing for {} s: its backend or the network is stalled (--stall-timeout {})",
                                limit.as_secs(),
                                limit.as_secs()
                            ),
                        });
                    }
                },
            };
            match res {
                Ok(0) => {
                    self.state = State::Broken;
                    return Err(Error::ConnectionLost {
                        target: self.target.clone(),
                        reason: "server closed the connection unexpectedly".into(),
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    self.state = State::Broken;
                    return Err(Error::ConnectionLost {
                        target: self.target.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
    }

    /// Sends a simple query. Follow with [`Connection::next_event`] until it returns `None`.
    pub async fn start_query(&mut self, sql: &str) -> Result<()> {
        self.start_query_bytes(sql.as_bytes()).await
    }

    /// [`Connection::start_query`] with a command that is bytes, not text (file names as
    /// the server has them; the server converts nothing: client_encoding is SQL_ASCII).
    pub async fn start_query_bytes(&mut self, sql: &[u8]) -> Result<()> {
        if self.state != State::Idle {
            return Err(Error::Protocol(format!(
                "a new query was started while the connection was {}",
                self.state.describe()
            )));
        }
        if sql.contains(&0) {
            return Err(Error::Protocol("a command cannot hold a zero byte".into()));
        }
        tracing::debug!(target: "pgpar::sql", conn = %self.target, "{}", redact(&String::from_utf8_lossy(sql)));
        let len = i32::try_from(sql.len() + 5)
            .map_err(|_| Error::Protocol("a command over 2 GiB cannot be sent".into()))?;
        self.wbuf.extend_from_slice(b"Q");
        self.wbuf.extend_from_slice(&len.to_be_bytes());
        self.wbuf.extend_from_slice(sql);
        self.wbuf.extend_from_slice(&[0]);
        self.flush_writes().await?;
        self.state = State::Query;
        Ok(())
    }

    /// The next step of the running query's response; `None` once the server is ready for
    /// the next query. A server error is returned after the server finished the command.
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn next_event(&mut self) -> Result<Option<Event>> {
        loop {
            if matches!(self.state, State::Idle) {
                return Ok(None);
            }
            if self.state == State::Broken {
                return Err(Error::ConnectionLost {
                    target: self.target.clone(),
                    reason: "connection is broken".into(),
                });
            }
            let m = self.read_message().await?;
            let ev = match m {
                BackendMessage::RowDescription(c) => Event::RowDescription(c),
                BackendMessage::DataRow(v) => Event::DataRow(Row(v)),
                BackendMessage::CommandComplete(t) => {
                    if matches!(self.state, State::CopyOut | State::CopyBoth | State::CopyIn) {
                        self.state = State::Query;
                    }
                    Event::CommandComplete(t)
                }
                BackendMessage::EmptyQueryResponse => Event::EmptyQuery,
                BackendMessage::CopyOutResponse => {
                    self.state = State::CopyOut;
                    Event::CopyOutStart
                }
                BackendMessage::CopyBothResponse => {
                    self.state = State::CopyBoth;
                    Event::CopyBothStart
                }
                BackendMessage::CopyInResponse => {
                    self.state = State::CopyIn;
                    Event::CopyInStart
                }
                BackendMessage::CopyData(d) => Event::CopyData(d),
                BackendMessage::CopyDone => Event::CopyDone,
                BackendMessage::ErrorResponse(e) => {
                    if e.severity == "FATAL" || e.severity == "PANIC" {
                        self.state = State::Broken;
                        return Err(Error::Server {
                            context: format!("server {} ended the session", self.target),
                            db: Box::new(e),
                            generic: true,
                        });
                    }
                    // The server still sends ReadyForQuery; keep reading until then.
                    self.pending_error.get_or_insert(e);
                    if self.state == State::CopyBoth || self.state == State::CopyIn {
                        self.state = State::Query;
                    }
                    continue;
                }
                BackendMessage::ReadyForQuery(_) => {
                    self.state = State::Idle;
                    if let Some(e) = self.pending_error.take() {
                        return Err(Error::Server {
                            context: format!("server {}", self.target),
                            db: Box::new(e),
                            generic: true,
                        });
                    }
                    return Ok(None);
                }
                BackendMessage::NoticeResponse(n) => {
                    log_notice(&n);
                    continue;
                }
                BackendMessage::ParameterStatus { name, value } => {
                    self.params.insert(name, value);
                    continue;
                }
                BackendMessage::Ignored(_) | BackendMessage::BackendKeyData { .. } => continue,
                BackendMessage::Authentication { .. } => {
                    return Err(Error::Protocol(
                        "authentication request after startup".into(),
                    ))
                }
                // Only an extended-protocol exchange (`sql::SqlSession`) produces these.
                BackendMessage::Extended(m) => {
                    self.state = State::Broken;
                    return Err(Error::Protocol(format!(
                        "unexpected {} in response to a simple query",
                        m.name()
                    )));
                }
            };
            return Ok(Some(ev));
        }
    }

    /// Runs a command and collects every result set it returns. A copy in the response is a
    /// protocol error here: use [`Connection::start_query`] for those.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<ResultSet>> {
        self.start_query(sql).await?;
        let mut sets = Vec::new();
        let mut cur: Option<ResultSet> = None;
        while let Some(ev) = self.next_event().await? {
            match ev {
                Event::RowDescription(columns) => {
                    cur = Some(ResultSet {
                        columns,
                        ..Default::default()
                    })
                }
                Event::DataRow(r) => match cur.as_mut() {
                    Some(c) => c.rows.push(r),
                    None => return Err(Error::Protocol("DataRow without RowDescription".into())),
                },
                Event::CommandComplete(tag) => {
                    let mut set = cur.take().unwrap_or_default();
                    set.tag = tag;
                    sets.push(set);
                }
                Event::EmptyQuery => {}
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected {other} in response to \"{}\"",
                        redact(sql)
                    )))
                }
            }
        }
        // A walsender's result sets may end without CommandComplete (e.g. IDENTIFY_SYSTEM
        // before PG 15 sent one per set); keep a trailing set too.
        if let Some(set) = cur.take() {
            sets.push(set);
        }
        Ok(sets)
    }

    /// Runs a command that returns exactly one row and returns it with its columns.
    pub async fn query_one(&mut self, sql: &str) -> Result<(Vec<Column>, Row)> {
        let sets = self.simple_query(sql).await?;
        let set = sets
            .into_iter()
            .find(|s| !s.columns.is_empty())
            .ok_or_else(|| {
                Error::Protocol(format!("\"{}\" returned no result set", redact(sql)))
            })?;
        let row = set
            .rows
            .into_iter()
            .next()
            .ok_or_else(|| Error::Protocol(format!("\"{}\" returned no row", redact(sql))))?;
        Ok((set.columns, row))
    }

    /// Sends CopyData (during CopyIn or CopyBoth). Buffers; call [`Connection::flush`].
    pub fn queue_copy_data(&mut self, data: &[u8]) -> Result<()> {
        frontend::CopyData::new(data)
            .map_err(|e| Error::Protocol(e.to_string()))?
            .write(&mut self.wbuf);
        Ok(())
    }

    /// Sends CopyDone.
    pub async fn send_copy_done(&mut self) -> Result<()> {
        frontend::copy_done(&mut self.wbuf);
        self.flush_writes().await
    }

    /// Flushes queued messages.
    pub async fn flush(&mut self) -> Result<()> {
        self.flush_writes().await
    }

    /// Sends Terminate and closes the socket; errors are ignored (we are leaving anyway).
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush_writes().await;
        let _ = self.stream.shutdown().await;
    }
}

/// Keeps passwords out of logged commands (none of ours carry one, but SQL may).
fn redact(sql: &str) -> String {
    if sql.to_ascii_lowercase().contains("password") {
        "<command redacted: contains a password>".into()
    } else {
        sql.chars().take(200).collect()
    }
}

fn log_notice(n: &DbError) {
    match n.severity.as_str() {
        "WARNING" => tracing::warn!(target: "pgpar::server", "{}", n.message),
        _ => tracing::info!(target: "pgpar::server", "{}", n.message),
    }
}
