//! The startup exchange and authentication: the startup packet, then one function per
//! method the server may ask for (cleartext password, md5, SCRAM-SHA-256 with channel binding
//! over TLS), until ReadyForQuery.
//!
//! Every failure here is an [`Error::Connect`] naming the target, with a hint where the fix is
//! known (pg_hba.conf, the REPLICATION attribute, the password). It must not run queries.

use postgres_protocol::authentication::sasl::{ChannelBinding as ScramBinding, ScramSha256};
use postgres_protocol::message::frontend;

use super::{log_notice, Connection, Replication};
use crate::conninfo::{ChannelBinding, ConnConfig};
use crate::error::{DbError, Error, Result};
use crate::protocol::backend::BackendMessage;
use crate::protocol::sqlstate;

const CB_HINT: &str =
    "channel_binding=require needs TLS (sslmode=require or stronger) and a role whose \
     pg_hba.conf method is scram-sha-256 with a SCRAM password; or use channel_binding=prefer";

// Authentication request codes (the protocol's AuthenticationXXX messages).
const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT: i32 = 3;
const AUTH_MD5: i32 = 5;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

/// The md5 answer for a 4-byte salt; `None` when the request is malformed.
fn md5_response(cfg: &ConnConfig, pw: &str, salt: &[u8]) -> Option<String> {
    let salt: [u8; 4] = salt.get(..4)?.try_into().ok()?;
    Some(postgres_protocol::authentication::md5_hash(
        cfg.user.as_bytes(),
        pw.as_bytes(),
        salt,
    ))
}

impl Connection {
    pub(super) async fn startup(
        &mut self,
        cfg: &ConnConfig,
        repl: Replication,
        endpoint: Option<Vec<u8>>,
    ) -> Result<()> {
        let mut params: Vec<(&str, &str)> = vec![("user", &cfg.user)];
        let db = cfg.dbname.as_deref().unwrap_or(&cfg.user);
        match repl {
            Replication::None => params.push(("database", db)),
            Replication::Physical => params.push(("replication", "true")),
            Replication::Database => {
                params.push(("database", db));
                params.push(("replication", "database"));
            }
        }
        params.push(("application_name", &cfg.application_name));
        // File names are bytes, not text: with SQL_ASCII the server converts nothing either
        // way (it only refuses a zero byte), so a name that is not valid UTF-8 arrives, and
        // goes back in a command, as it is on disk. See protocol-notes/client.md.
        params.push(("client_encoding", "SQL_ASCII"));
        if let Some(o) = cfg.options.as_deref() {
            params.push(("options", o));
        }
        // After `options`: a setting given both ways takes the startup packet's own value.
        for (k, v) in &cfg.session_settings {
            params.push((k, v));
        }
        frontend::startup_message(params.iter().copied(), &mut self.wbuf).map_err(|e| {
            self.connect_err(format!("could not build startup message: {e}"), None, None)
        })?;
        self.flush_writes()
            .await
            .map_err(|e| self.as_connect_error(e))?;

        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = self
                .read_message()
                .await
                .map_err(|e| self.as_connect_error(e))?;
            match msg {
                BackendMessage::Authentication { code, data } => {
                    self.authenticate(cfg, code, &data, endpoint.as_deref(), &mut scram)
                        .await?
                }
                BackendMessage::ParameterStatus { name, value } => {
                    self.params.insert(name, value);
                }
                BackendMessage::BackendKeyData { pid, .. } => self.backend_pid = pid,
                BackendMessage::ReadyForQuery(_) => break,
                BackendMessage::ErrorResponse(db) => {
                    let hint = startup_hint(&db, cfg, repl);
                    return Err(self.connect_err(
                        db.message.clone(),
                        Some(db.code.clone()),
                        hint.or(db.hint.clone()),
                    ));
                }
                BackendMessage::NoticeResponse(n) => log_notice(&n),
                BackendMessage::Ignored(_) => {}
                other => {
                    return Err(self.connect_err(
                        format!("unexpected {} from the server during startup", other.name()),
                        None,
                        None,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Answers one authentication request (code as in the protocol's Authentication
    /// message); `scram` carries a SASL exchange across its three steps.
    async fn authenticate(
        &mut self,
        cfg: &ConnConfig,
        code: i32,
        data: &[u8],
        endpoint: Option<&[u8]>,
        scram: &mut Option<ScramSha256>,
    ) -> Result<()> {
        // libpq's check_expected_areq: with channel_binding=require, answer nothing but SASL
        // (no password leaves for a server that did not prove its certificate), and accept
        // the end of authentication only after a SCRAM exchange that was channel-bound.
        if cfg.channel_binding == ChannelBinding::Require {
            match code {
                AUTH_SASL | AUTH_SASL_CONTINUE | AUTH_SASL_FINAL => {}
                AUTH_OK if self.channel_bound => {}
                AUTH_OK => return Err(self.connect_err(
                    "channel binding required, but server authenticated client without channel binding".into(),
                    None,
                    Some(CB_HINT.into()),
                )),
                _ => return Err(self.connect_err(
                    "channel binding required but not supported by server's authentication request".into(),
                    None,
                    Some(CB_HINT.into()),
                )),
            }
        }
        match code {
            AUTH_OK => return Ok(()),
            AUTH_CLEARTEXT => {
                let pw = self.need_password(cfg)?;
                self.send_password(pw.as_bytes())?;
            }
            AUTH_MD5 => {
                let pw = self.need_password(cfg)?;
                let hash = md5_response(cfg, &pw, data)
                    .ok_or_else(|| self.connect_err("malformed md5 request".into(), None, None))?;
                self.send_password(hash.as_bytes())?;
            }
            AUTH_SASL => *scram = Some(self.sasl_start(cfg, data, endpoint)?),
            AUTH_SASL_CONTINUE => {
                let s = scram.as_mut().ok_or_else(|| {
                    self.connect_err("SASL continue without SASL start".into(), None, None)
                })?;
                s.update(data).map_err(|e| {
                    self.connect_err(format!("SCRAM exchange failed: {e}"), None, None)
                })?;
                frontend::sasl_response(s.message(), &mut self.wbuf)
                    .map_err(|e| self.connect_err(e.to_string(), None, None))?;
            }
            AUTH_SASL_FINAL => {
                let s = scram.as_mut().ok_or_else(|| {
                    self.connect_err("SASL final without SASL start".into(), None, None)
                })?;
                return s.finish(data).map_err(|e| {
                    self.connect_err(
                        format!("could not verify the server's SCRAM signature: {e}"),
                        None,
                        None,
                    )
                });
            }
            other => {
                return Err(self.connect_err(
                    format!("unsupported authentication method (code {other}); pgpar supports trust, password, md5 and scram-sha-256"),
                    None,
                    None,
                ))
            }
        }
        self.flush_writes()
            .await
            .map_err(|e| self.as_connect_error(e))
    }

    fn send_password(&mut self, pw: &[u8]) -> Result<()> {
        frontend::password_message(pw, &mut self.wbuf)
            .map_err(|e| self.connect_err(e.to_string(), None, None))
    }

    /// Picks SCRAM-SHA-256-PLUS (channel binding) over TLS when offered, and sends the
    /// client-first message.
    fn sasl_start(
        &mut self,
        cfg: &ConnConfig,
        mechanisms: &[u8],
        endpoint: Option<&[u8]>,
    ) -> Result<ScramSha256> {
        let pw = self.need_password(cfg)?;
        let mechs: Vec<&[u8]> = mechanisms
            .split(|&b| b == 0)
            .filter(|m| !m.is_empty())
            .collect();
        let plus = mechs.contains(&&b"SCRAM-SHA-256-PLUS"[..]);
        if !mechs.contains(&&b"SCRAM-SHA-256"[..]) && !plus {
            return Err(self.connect_err(
                "the server offers no SASL mechanism we support (need SCRAM-SHA-256)".into(),
                None,
                None,
            ));
        }
        let require = cfg.channel_binding == ChannelBinding::Require;
        if require && endpoint.is_none() {
            return Err(self.connect_err(
                "channel binding required, but SSL not in use".into(),
                None,
                Some(CB_HINT.into()),
            ));
        }
        if require && !plus {
            return Err(self.connect_err(
                "channel binding is required, but server did not offer an authentication method that supports channel binding".into(),
                None,
                Some(CB_HINT.into()),
            ));
        }
        let endpoint = endpoint.filter(|_| cfg.channel_binding != ChannelBinding::Disable);
        self.channel_bound = endpoint.is_some() && plus;
        let (mech, cb) = match (endpoint, plus) {
            (Some(ep), true) => (
                "SCRAM-SHA-256-PLUS",
                ScramBinding::tls_server_end_point(ep.to_vec()),
            ),
            (Some(_), false) => ("SCRAM-SHA-256", ScramBinding::unrequested()),
            // libpq sends "n" (client does not support binding) when it is disabled too.
            (None, _) => ("SCRAM-SHA-256", ScramBinding::unsupported()),
        };
        let s = ScramSha256::new(pw.as_bytes(), cb);
        frontend::sasl_initial_response(mech, s.message(), &mut self.wbuf)
            .map_err(|e| self.connect_err(e.to_string(), None, None))?;
        Ok(s)
    }

    fn need_password(&self, cfg: &ConnConfig) -> Result<String> {
        cfg.password.clone().ok_or_else(|| {
            self.connect_err(
                format!("the server asked for a password for user \"{}\", but none was given", cfg.user),
                Some(sqlstate::INVALID_PASSWORD.into()),
                Some("give one with PGPASSWORD, a password file (~/.pgpass or PGPASSFILE), or password= in -d".into()),
            )
        })
    }

    fn connect_err(&self, reason: String, sqlstate: Option<String>, hint: Option<String>) -> Error {
        Error::Connect {
            target: self.target.clone(),
            reason,
            sqlstate,
            hint,
        }
    }

    /// Turns an I/O or protocol failure during startup into a connect error.
    fn as_connect_error(&self, e: Error) -> Error {
        match e {
            Error::Connect { .. } => e,
            other => self.connect_err(other.to_string(), None, None),
        }
    }
}

/// What to do about a refused startup. An ordinary SQL session (the sql method's leader
/// and workers) is matched in pg_hba.conf by its database and counts against
/// `max_connections`; a replication connection by "replication" and `max_wal_senders`.
fn startup_hint(db: &DbError, cfg: &ConnConfig, repl: Replication) -> Option<String> {
    let sql_session = matches!(repl, Replication::None);
    match db.code.as_str() {
        sqlstate::INVALID_PASSWORD => Some(
            "check the password (PGPASSWORD, the password file, or password= in -d)".into(),
        ),
        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION
            if db.message.contains("pg_hba.conf") && sql_session =>
        {
            Some(format!(
                "add a line for database \"{}\" (or \"all\") for this user and host to the server's pg_hba.conf and reload (the sql method's sessions are ordinary connections)",
                cfg.dbname.as_deref().unwrap_or(&cfg.user)
            ))
        }
        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION if db.message.contains("pg_hba.conf") => Some(
            "add a line for database \"replication\" (or \"all\") for this user and host to the server's pg_hba.conf and reload"
                .into(),
        ),
        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION if db.message.contains("does not exist") => {
            Some(format!("create the role, or connect as another with -U (tried \"{}\")", cfg.user))
        }
        sqlstate::INSUFFICIENT_PRIVILEGE if sql_session => Some(format!(
            "the role needs CONNECT on the database: GRANT CONNECT ON DATABASE \"{}\" TO \"{}\"",
            cfg.dbname.as_deref().unwrap_or(&cfg.user),
            cfg.user
        )),
        sqlstate::INSUFFICIENT_PRIVILEGE => Some(format!(
            "the role needs the REPLICATION attribute: ALTER ROLE \"{}\" REPLICATION",
            cfg.user
        )),
        sqlstate::TOO_MANY_CONNECTIONS if sql_session => Some(
            "raise max_connections on the server, or use fewer --jobs".into(),
        ),
        sqlstate::TOO_MANY_CONNECTIONS => Some(
            "raise max_wal_senders (and max_connections) on the server, or use fewer --jobs".into(),
        ),
        sqlstate::CANNOT_CONNECT_NOW => Some("the server is starting up or shutting down: try again in a moment".into()),
        _ => None,
    }
}
