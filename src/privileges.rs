//! What the connecting role may do, as far as the backup methods care: the privileges the sql
//! method needs, and for each one missing the exact statement that grants it.
//!
//! The sql method runs `pg_backup_start`/`pg_backup_stop` on a leader session, lists files
//! with `pg_ls_dir`/`pg_stat_file` and reads them with `pg_read_binary_file` over worker
//! sessions, and streams WAL over a replication connection. Every path it names is relative
//! to the data directory (tablespaces are reached through `pg_tblspc/<oid>`), so the
//! `pg_read_server_files` role, which only widens access to absolute paths, is not needed.
//! This module asks the server; it decides nothing about which method runs (the session
//! does) and prints nothing.

use serde::Serialize;

use crate::conn::sql::SqlSession;
use crate::error::Result;

/// The functions the sql method calls, by the exact signature a GRANT names.
pub const SQL_METHOD_FUNCTIONS: &[&str] = &[
    "pg_catalog.pg_backup_start(text, boolean)",
    "pg_catalog.pg_backup_stop(boolean)",
    "pg_catalog.pg_ls_dir(text, boolean, boolean)",
    "pg_catalog.pg_stat_file(text, boolean)",
    "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
];

/// The role's privileges that matter to the backup methods.
#[derive(Debug, Clone, Serialize)]
pub struct Privileges {
    /// The role, as an SQL identifier (quoted where it must be).
    pub role: String,
    /// `rolsuper`.
    pub superuser: bool,
    /// `rolreplication` (or superuser): needed for the WAL stream of every method.
    pub replication: bool,
    /// The sql method's functions the role may not execute.
    pub missing_functions: Vec<String>,
}

impl Privileges {
    /// Asks the server over `sess`.
    pub async fn of(sess: &mut SqlSession) -> Result<Privileges> {
        let rows = sess
            .query(
                "SELECT quote_ident(current_user), r.rolsuper, r.rolreplication \
                 FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await?;
        let row = rows.first().ok_or_else(|| {
            crate::error::Error::Protocol("pg_roles has no row for the current role".into())
        })?;
        let role = row.text(0, "role name")?.to_string();
        let superuser = row.get(1) == Some("t");
        let replication = superuser || row.get(2) == Some("t");
        let mut missing_functions = Vec::new();
        for f in SQL_METHOD_FUNCTIONS {
            let rows = sess
                .query("SELECT has_function_privilege($1, 'EXECUTE')", &[f])
                .await?;
            if rows.first().and_then(|r| r.get(0)) != Some("t") {
                missing_functions.push(f.to_string());
            }
        }
        Ok(Privileges {
            role,
            superuser,
            replication,
            missing_functions,
        })
    }

    /// Whether the role can take a backup with the sql method.
    pub fn sql_method(&self) -> bool {
        self.replication && (self.superuser || self.missing_functions.is_empty())
    }

    /// The statements (run as a superuser) that would let the role use the sql method.
    pub fn grants(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .missing_functions
            .iter()
            .map(|f| format!("GRANT EXECUTE ON FUNCTION {f} TO {};", self.role))
            .collect();
        if !self.replication {
            out.push(format!("ALTER ROLE {} REPLICATION;", self.role));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_missing_privilege_as_a_statement() {
        let p = Privileges {
            role: "\"Backup\"".into(),
            superuser: false,
            replication: false,
            missing_functions: vec![SQL_METHOD_FUNCTIONS[4].into()],
        };
        assert!(!p.sql_method());
        assert_eq!(
            p.grants(),
            [
                "GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO \"Backup\";",
                "ALTER ROLE \"Backup\" REPLICATION;"
            ]
        );
        let su = Privileges {
            superuser: true,
            replication: true,
            missing_functions: vec![],
            ..p
        };
        assert!(su.sql_method() && su.grants().is_empty());
    }
}
