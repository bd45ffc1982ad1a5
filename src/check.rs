//! `pgpar check`: what a DBA wants to know before a backup.

use serde::Serialize;

use crate::conn::sql::SqlSession;
use crate::conn::{Connection, Replication};
use crate::conninfo::ConnConfig;
use crate::error::{Error, Result};
use crate::privileges::Privileges;
use crate::replication::{identify_system, show};

/// The report, printed as text or JSON.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// `server_version` as reported at startup.
    pub server_version: String,
    /// e.g. 150018.
    pub server_version_num: u32,
    /// The cluster's system identifier, as a string (JSON numbers lose u64 precision).
    pub system_identifier: String,
    /// Current timeline.
    pub timeline: u32,
    /// `wal_level`.
    pub wal_level: String,
    /// `max_wal_senders`.
    pub max_wal_senders: u32,
    /// Walsender slots not in use, `None` when it could not be counted (needs a SQL session).
    pub wal_senders_free: Option<u32>,
    /// True when the server offers START_BACKUP / SEND_FILE_LIST / SEND_FILES_CONTENT / STOP_BACKUP.
    pub parallel_backup: bool,
    /// Protocol version of the parallel commands, when offered.
    pub parallel_backup_protocol: Option<u32>,
    /// The methods this role can use on this server, best first ("parallel", "sql", "stream").
    pub methods: Vec<&'static str>,
    /// The role's privileges, `None` when no SQL session could be opened to ask.
    pub privileges: Option<Privileges>,
    /// What the sql method still needs: statements for a superuser to run.
    pub sql_method_grants: Vec<String>,
}

/// Detects the parallel backup commands (see protocol-notes/parallel-backup.md).
pub async fn parallel_protocol(c: &mut Connection) -> Result<Option<u32>> {
    Ok(show(c, "parallel_backup_protocol")
        .await?
        .and_then(|v| v.trim().parse().ok()))
}

/// Connects and gathers the report.
pub async fn run(cfg: &ConnConfig) -> Result<CheckReport> {
    let privileges = privileges(cfg).await;
    let mut c = match Connection::connect(cfg, Replication::Physical).await {
        Ok(c) => c,
        Err(e) => {
            return Err(match (e, &privileges) {
                (
                    Error::Connect {
                        target,
                        reason,
                        sqlstate,
                        ..
                    },
                    Some(p),
                ) if !p.replication => Error::Connect {
                    target,
                    reason,
                    sqlstate,
                    hint: Some(format!(
                        "every method needs a replication connection for the WAL stream; as a \
                         superuser, run: {}",
                        p.grants().join(" ")
                    )),
                },
                (e, _) => e,
            })
        }
    };
    let sys = identify_system(&mut c).await?;
    let wal_level = show(&mut c, "wal_level").await?.unwrap_or_default();
    let max_wal_senders: u32 = show(&mut c, "max_wal_senders")
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let proto = parallel_protocol(&mut c).await?;
    let server_version = c.parameter("server_version").unwrap_or("").to_string();
    let server_version_num = c.server_version_num().unwrap_or(0);
    c.close().await;
    let wal_senders_free = count_free_walsenders(cfg, max_wal_senders).await;
    let mut methods = Vec::new();
    if proto == Some(1) {
        methods.push("parallel");
    }
    if privileges.as_ref().is_some_and(Privileges::sql_method) {
        methods.push("sql");
    }
    methods.push("stream");
    let sql_method_grants = privileges
        .as_ref()
        .map(Privileges::grants)
        .unwrap_or_default();
    Ok(CheckReport {
        server_version,
        server_version_num,
        system_identifier: sys.system_identifier.to_string(),
        timeline: sys.timeline,
        wal_level,
        max_wal_senders,
        wal_senders_free,
        parallel_backup: proto.is_some(),
        parallel_backup_protocol: proto,
        methods,
        privileges,
        sql_method_grants,
    })
}

/// The role's privileges, asked over a SQL session; `None` when one cannot be opened (a
/// pg_hba.conf with replication rows only) or the question fails.
async fn privileges(cfg: &ConnConfig) -> Option<Privileges> {
    let mut s = SqlSession::connect(cfg).await.ok()?;
    let p = Privileges::of(&mut s).await.ok();
    s.close().await;
    p
}

/// Counts walsenders in use over a SQL session; a replication-only role or pg_hba set-up may
/// not allow one, and then the answer is unknown rather than an error.
async fn count_free_walsenders(cfg: &ConnConfig, max: u32) -> Option<u32> {
    let mut cfg = cfg.clone();
    if cfg.dbname.is_none() {
        cfg.dbname = Some("postgres".into());
    }
    let mut c = Connection::connect(&cfg, Replication::None).await.ok()?;
    let (_, row) = c
        .query_one("SELECT count(*) FROM pg_stat_get_wal_senders()")
        .await
        .ok()?;
    let used: u32 = row.get(0)?.parse().ok()?;
    c.close().await;
    Some(max.saturating_sub(used))
}

impl CheckReport {
    /// Human-readable lines.
    pub fn render(&self) -> String {
        let free = match self.wal_senders_free {
            Some(n) => format!("{n} free"),
            None => "free slots unknown: no SQL access".into(),
        };
        let par = match self.parallel_backup_protocol {
            Some(v) => format!("yes (protocol {v}): pgpar backup uses --jobs connections"),
            None => "no (stock server)".into(),
        };
        let sql = match &self.privileges {
            None => "unknown: no SQL session could be opened to check the role's privileges".into(),
            Some(p) if p.sql_method() => format!("yes: role {} has the privileges", p.role),
            Some(p) => format!(
                "no: role {} lacks privileges; as a superuser, run:\n{}",
                p.role,
                p.grants()
                    .iter()
                    .map(|g| format!("                      {g}\n"))
                    .collect::<String>()
                    .trim_end()
            ),
        };
        format!(
            "server version:     {} ({})\nsystem identifier:  {}\ntimeline:           {}\nwal_level:          {}\nmax_wal_senders:    {} ({})\nparallel backup:    {}\nsql method:         {}\nmethods usable:     {} (pgpar backup uses the first)\n",
            self.server_version,
            self.server_version_num,
            self.system_identifier,
            self.timeline,
            self.wal_level,
            self.max_wal_senders,
            free,
            par,
            sql,
            self.methods.join(", ")
        )
    }
}
