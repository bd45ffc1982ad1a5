//! The library's error type.
//!
//! Every error carries enough context to act on: the host it was talking to, the path it was
//! writing, the server's SQLSTATE and message, and what pgpar was doing (which worker, which
//! file or range, the WAL stream) — [`Error::context`] keeps that for every kind, not only for
//! server errors. `Display` is one line; a hint, where there is one, is kept apart so the
//! binary can print it on its own line. SQLSTATEs are compared only against the names in
//! [`crate::protocol::sqlstate`].

use std::fmt;
use std::io;

use crate::protocol::sqlstate;

/// An error reported by the server (an ErrorResponse), with every field we use kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbError {
    /// Severity as sent (`ERROR`, `FATAL`, …), not localised.
    pub severity: String,
    /// The five-character SQLSTATE.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, ": {}", d.replace('\n', " "))?;
        }
        Ok(())
    }
}

/// The library's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid input noticed before any server work: options, conninfo, target directory.
    #[error("{0}")]
    Usage(String),
    /// Could not reach or log into the server.
    #[error("could not connect to {target}: {reason}")]
    Connect {
        /// `host:port` or the socket path, never the password.
        target: String,
        /// What went wrong.
        reason: String,
        /// The SQLSTATE when the server refused us.
        sqlstate: Option<String>,
        /// What the user can do about it.
        hint: Option<String>,
    },
    /// The server answered a command with an error.
    #[error("{context}: {db}")]
    Server {
        /// What we were doing.
        context: String,
        /// The server's error.
        db: Box<DbError>,
        /// `context` is still the connection's own ("server HOST"): the first caller that
        /// says which command failed replaces it; later ones wrap.
        generic: bool,
    },
    /// The server sent something the protocol does not allow at this point.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The connection was closed or broke while a command was running.
    #[error("connection to {target} lost: {reason}")]
    ConnectionLost {
        /// `host:port` or socket path.
        target: String,
        /// The I/O error or "closed by server".
        reason: String,
    },
    /// A local file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// The operation and path.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Data pages failed checksum verification on the server: the copy is complete but the
    /// source is damaged, so the files are kept without a manifest (as pg_basebackup does).
    #[error("{0}")]
    DataChecksums(String),
    /// Anything else that makes the backup impossible, already phrased for the user.
    #[error("{0}")]
    Failed(String),
    /// Another error, with what pgpar was doing when it happened ("worker 3: fetching
    /// \"base/5/16384\" bytes 0..65536", "WAL stream"). Every question asked of an error
    /// (SQLSTATE, hint, exit code, kind) is answered by the error inside.
    #[error("{context}: {source}")]
    Context {
        /// What we were doing.
        context: String,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Io`] naming the operation and path.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The error under any [`Error::Context`] layers: its kind decides retries, exit codes
    /// and whether files are kept.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            other => other,
        }
    }

    /// The SQLSTATE the server sent, if this error came from the server.
    pub fn sqlstate(&self) -> Option<&str> {
        match self.root() {
            Error::Server { db, .. } => Some(&db.code),
            Error::Connect { sqlstate, .. } => sqlstate.as_deref(),
            _ => None,
        }
    }

    /// The server's error, if any.
    pub fn db_error(&self) -> Option<&DbError> {
        match self.root() {
            Error::Server { db, .. } => Some(db),
            _ => None,
        }
    }

    /// A hint for the user, printed on its own line by the binary.
    pub fn hint(&self) -> Option<String> {
        match self.root() {
            Error::Connect { hint, .. } => hint.clone(),
            Error::Server { db, .. } => db.hint.clone().or_else(|| server_hint(&db.code)),
            _ => None,
        }
    }

    /// The process exit code this error maps to (documented in README.md).
    pub fn exit_code(&self) -> i32 {
        match self.root() {
            Error::Usage(_) => 2,
            Error::Connect { .. } => 3,
            _ => 1,
        }
    }

    /// Adds what we were doing. A server error's generic context (the connection's "server
    /// HOST") is replaced by the first caller, since the command says more; everything else
    /// is wrapped, so "worker 3" or "WAL stream" reaches the message whatever went wrong.
    pub fn context(self, what: impl Into<String>) -> Error {
        match self {
            Error::Server {
                db, generic: true, ..
            } => Error::Server {
                context: what.into(),
                db,
                generic: false,
            },
            other => Error::Context {
                context: what.into(),
                source: Box::new(other),
            },
        }
    }
}

fn server_hint(code: &str) -> Option<String> {
    match code {
        sqlstate::TOO_MANY_CONNECTIONS => Some(
            "all connection slots for WAL senders are in use: raise max_wal_senders on the \
             server (needs a restart), or use fewer --jobs"
                .into(),
        ),
        sqlstate::ADMIN_SHUTDOWN | sqlstate::CRASH_SHUTDOWN | sqlstate::CANNOT_CONNECT_NOW => Some(
            "the server stopped or restarted during the backup: run the backup again once it \
             is up"
                .into(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_reaches_the_message_of_every_kind() {
        let lost = Error::ConnectionLost {
            target: "db1:5432".into(),
            reason: "connection reset by peer".into(),
        }
        .context("fetching \"base/5/16384\" bytes 0..8192")
        .context("worker 3");
        assert_eq!(
            lost.to_string(),
            "worker 3: fetching \"base/5/16384\" bytes 0..8192: connection to db1:5432 lost: connection reset by peer"
        );
        assert!(matches!(lost.root(), Error::ConnectionLost { .. }));
        assert_eq!(lost.exit_code(), 1);
        assert_eq!(Error::Usage("x".into()).context("y").exit_code(), 2);

        let server = Error::Server {
            context: "server db1:5432".into(),
            db: Box::new(DbError {
                severity: "ERROR".into(),
                code: sqlstate::TOO_MANY_CONNECTIONS.into(),
                message: "too many".into(),
                ..Default::default()
            }),
            generic: true,
        }
        .context("START_BACKUP failed")
        .context("worker 2");
        assert_eq!(
            server.to_string(),
            "worker 2: START_BACKUP failed: too many (SQLSTATE 53300)"
        );
        assert_eq!(server.sqlstate(), Some(sqlstate::TOO_MANY_CONNECTIONS));
        assert!(server.hint().is_some_and(|h| h.contains("max_wal_senders")));
    }
}
