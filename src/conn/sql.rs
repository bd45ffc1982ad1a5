//! An ordinary SQL session (replication off) that speaks the extended query protocol: the
//! same conninfo, TLS and authentication as replication connections ([`Connection::connect`]
//! with [`Replication::None`]), then statements prepared once and executed many times with
//! several executions in flight, results read in the order they were asked for, in binary
//! where the caller wants the bytes themselves (a `bytea` arrives as its bytes, not hex).
//!
//! It owns the I/O; what the messages look like and which response answers which request is
//! [`crate::protocol::extended`]'s. It knows no SQL of its own: the sql method's source says
//! what to run.

use super::{log_notice, redact, Connection, Replication, Row, State};
use crate::conninfo::ConnConfig;
use crate::error::{DbError, Error, Result};
use crate::protocol::backend::BackendMessage;
pub use crate::protocol::extended::Format;
use crate::protocol::extended::{self, Expect, Pipeline, Step};

/// One SQL session (see the module doc).
pub struct SqlSession {
    conn: Connection,
    pipe: Pipeline,
    next_execution: u64,
}

/// What an execution sent with [`SqlSession::queue_execute`] produced, read with
/// [`SqlSession::next_result`].
#[derive(Debug)]
pub enum Reply {
    /// A row of execution `n`.
    Row(u64, Row),
    /// Execution `n` ended.
    Done(u64),
    /// The server reached the Sync queued with [`SqlSession::queue_sync`].
    Ready,
}

impl SqlSession {
    /// Opens a session with `cfg` (database `postgres` when the conninfo names none, as
    /// `pgpar check` does).
    pub async fn connect(cfg: &ConnConfig) -> Result<SqlSession> {
        let mut cfg = cfg.clone();
        if cfg.dbname.is_none() {
            cfg.dbname = Some("postgres".into());
        }
        let conn = Connection::connect(&cfg, Replication::None).await?;
        Ok(SqlSession {
            conn,
            pipe: Pipeline::new(),
            next_execution: 0,
        })
    }

    /// See [`Connection::set_read_limit`].
    pub fn set_read_limit(&mut self, limit: Option<std::time::Duration>) {
        self.conn.set_read_limit(limit);
    }

    /// `host port N` or the socket path, for messages.
    pub fn target(&self) -> &str {
        self.conn.target()
    }

    /// The backend's process id.
    pub fn backend_pid(&self) -> i32 {
        self.conn.backend_pid()
    }

    /// The database's encoding (the server's `server_encoding`, `SQL_ASCII` if it did not
    /// say).
    pub fn server_encoding(&self) -> String {
        self.conn
            .parameter("server_encoding")
            .unwrap_or("SQL_ASCII")
            .to_string()
    }

    /// The server's version number, e.g. 150018.
    pub fn server_version_num(&self) -> Option<u32> {
        self.conn.server_version_num()
    }

    /// The server's error as this crate reports it; a FATAL one means the session is over.
    fn server_error(&mut self, db: DbError) -> Error {
        let fatal = db.severity == "FATAL" || db.severity == "PANIC";
        if fatal {
            self.conn.state = State::Broken;
        }
        Error::Server {
            context: if fatal {
                format!("server {} ended the session", self.conn.target)
            } else {
                format!("server {}", self.conn.target)
            },
            db: Box::new(db),
            generic: true,
        }
    }

    fn check_usable(&self) -> Result<()> {
        if self.conn.state == State::Broken {
            return Err(Error::ConnectionLost {
                target: self.conn.target.clone(),
                reason: "connection is broken".into(),
            });
        }
        Ok(())
    }

    /// Prepares `sql` as statement `name` with parameter types `types` (OIDs, 0 to infer).
    pub async fn prepare(&mut self, name: &str, sql: &str, types: &[u32]) -> Result<()> {
        self.check_usable()?;
        tracing::debug!(target: "pgpar::sql", conn = %self.conn.target, "prepare {name}: {}", redact(sql));
        extended::parse(name, sql, types, &mut self.conn.wbuf)?;
        self.pipe.push(Expect::ParseComplete);
        self.queue_sync();
        self.flush().await?;
        self.drain_to_ready().await
    }

    /// Reads up to the next ReadyForQuery, failing with the first error met on the way.
    async fn drain_to_ready(&mut self) -> Result<()> {
        self.rows_to_ready(None).await.map(drop)
    }

    /// Reads up to the next ReadyForQuery, keeping the rows of execution `keep`; fails with
    /// the first error met on the way (after reading on to the ReadyForQuery, unless the
    /// connection broke).
    async fn rows_to_ready(&mut self, keep: Option<u64>) -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            match self.next_step().await? {
                Step::Row(m, v) if Some(m) == keep => rows.push(Row(v)),
                Step::Ready => break,
                Step::Failed { error, .. } => {
                    let e = self.server_error(error);
                    if self.conn.state == State::Broken {
                        return Err(e);
                    }
                    failed.get_or_insert(e);
                }
                _ => {}
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Runs `sql` once with text parameters and returns its rows, in text.
    pub async fn query(&mut self, sql: &str, params: &[&str]) -> Result<Vec<Row>> {
        self.check_usable()?;
        tracing::debug!(target: "pgpar::sql", conn = %self.conn.target, "{}", redact(sql));
        extended::parse("", sql, &[], &mut self.conn.wbuf)?;
        self.pipe.push(Expect::ParseComplete);
        let values: Vec<Option<&[u8]>> = params.iter().map(|p| Some(p.as_bytes())).collect();
        let n = self.queue_execute("", &values, Format::Text)?;
        self.queue_sync();
        self.flush().await?;
        self.rows_to_ready(Some(n)).await
    }

    /// Queues Bind and Execute of prepared statement `statement` with `params` (text, `None`
    /// for NULL), results in `result`; returns the execution's number. Nothing is sent
    /// before [`SqlSession::flush`].
    pub fn queue_execute(
        &mut self,
        statement: &str,
        params: &[Option<&[u8]>],
        result: Format,
    ) -> Result<u64> {
        let start = self.conn.wbuf.len();
        let r = extended::bind(
            "",
            statement,
            Format::Text,
            params,
            result,
            &mut self.conn.wbuf,
        )
        .and_then(|()| extended::execute("", 0, &mut self.conn.wbuf));
        if let Err(e) = r {
            self.conn.wbuf.truncate(start);
            return Err(e);
        }
        let n = self.next_execution;
        self.next_execution += 1;
        self.pipe.push(Expect::BindComplete);
        self.pipe.push(Expect::Execute(n));
        Ok(n)
    }

    /// Queues a Sync (the end of a pipeline segment; after an error the server skips to it).
    pub fn queue_sync(&mut self) {
        extended::sync(&mut self.conn.wbuf);
        self.pipe.push(Expect::Ready);
    }

    /// Executions sent and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.pipe.executions_in_flight()
    }

    /// Sends what was queued.
    pub async fn flush(&mut self) -> Result<()> {
        self.check_usable()?;
        self.conn.flush_writes().await
    }

    async fn next_step(&mut self) -> Result<Step> {
        loop {
            self.check_usable()?;
            let m = self.conn.read_message().await?;
            match self.pipe.on(m) {
                Ok(Step::Notice(n)) => log_notice(&n),
                Ok(Step::Nothing) => {}
                Ok(s) => return Ok(s),
                Err(e) => {
                    self.conn.state = State::Broken;
                    return Err(e);
                }
            }
        }
    }

    /// The next result of the executions queued: their rows and ends, in order. A server
    /// error is returned as an error; one that ends the session (a FATAL one, such as
    /// `pg_terminate_backend`) leaves this session unusable.
    pub async fn next_result(&mut self) -> Result<Reply> {
        match self.next_step().await? {
            Step::Row(n, v) => Ok(Reply::Row(n, Row(v))),
            Step::Executed(n, _) => Ok(Reply::Done(n)),
            Step::Ready => Ok(Reply::Ready),
            Step::Failed { error, .. } => Err(self.server_error(error)),
            Step::ParameterTypes(_) | Step::Columns(_) | Step::Notice(_) | Step::Nothing => Err(
                Error::Protocol("the server described a statement that was not asked about".into()),
            ),
        }
    }

    /// After an error from [`SqlSession::next_result`] that did not end the session: reads
    /// up to the Sync so the session can be used again.
    pub async fn recover(&mut self) -> Result<()> {
        while !self.pipe.is_idle() {
            match self.next_step().await? {
                Step::Failed { error, .. } => {
                    let e = self.server_error(error);
                    if self.conn.state == State::Broken {
                        return Err(e);
                    }
                }
                _ => continue,
            }
        }
        Ok(())
    }

    /// While the session sits idle: waits until the server ends it (or the connection
    /// breaks) and returns why. Cancel-safe, so it can race other work in a `select!`.
    pub async fn watch(&mut self) -> Error {
        loop {
            match self.conn.read_message().await {
                Err(e) => return e,
                Ok(BackendMessage::ErrorResponse(db)) => return self.server_error(db),
                Ok(BackendMessage::NoticeResponse(n)) => log_notice(&n),
                Ok(_) => {}
            }
        }
    }

    /// Ends the session politely.
    pub async fn close(self) {
        self.conn.close().await;
    }
}
