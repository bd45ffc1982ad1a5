//! `-R`: make the backup start as a standby of its source, as pg_basebackup does:
//! an empty `standby.signal`, and `primary_conninfo` (plus `primary_slot_name` with `-S`)
//! appended to `postgresql.auto.conf`.
//!
//! `primary_conninfo` is built as PostgreSQL 17's `GenerateRecoveryConfig`
//! (`src/fe_utils/recovery_gen.c`) builds it from `PQconninfo`: every connection keyword in
//! use, in libpq's order, with the value the connection string, `-h`/`-p`/`-U` or a `PG*`
//! variable gave, else libpq's default (`channel_binding=prefer`, `sslmode=prefer`, …);
//! without `replication`, `dbname` and `fallback_application_name` (the walreceiver sets
//! those), then `dbname` when the connection string names one. As there, the password is
//! written when the string or `PGPASSWORD` gave it, not when it came from a password file
//! (then `passfile` names the file, libpq's default `~/.pgpass` included). Values are quoted
//! as libpq's `appendConnStrVal`, the whole as `escape_quotes` does for a configuration file.
//!
//! Two differences, both so that the standby's own libpq reads it: libpq's defaults for
//! keywords older servers do not know (`sslcertmode`, `load_balance_hosts`: 16;
//! `sslnegotiation`: 17) are left out for a server older than that (a value given is written
//! whatever the version), and the GSSAPI keywords pgpar refuses (`krbsrvname`,
//! `gssdelegation`) are never written (their defaults apply).
//! It builds the text; the session writes it through the sink.

use crate::conninfo::ConnConfig;

/// Quotes a conninfo value as libpq's `appendConnStrVal`: bare when it is one or more of
/// `[A-Za-z0-9_.]`, else in single quotes with `'` and `\` escaped by a backslash.
fn conn_val(v: &str) -> String {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.'));
    if plain {
        v.to_string()
    } else {
        let mut s = String::from("'");
        for c in v.chars() {
            if c == '\'' || c == '\\' {
                s.push('\\');
            }
            s.push(c);
        }
        s.push('\'');
        s
    }
}

/// The first server version (`server_version_num`) whose libpq knows `keyword`, for the
/// keywords newer than PostgreSQL 15 (the oldest pgpar backs up).
fn known_since(keyword: &str) -> u32 {
    match keyword {
        "sslcertmode" | "load_balance_hosts" => 160000,
        "sslnegotiation" => 170000,
        _ => 0,
    }
}

/// The `primary_conninfo` string for the connection we used, for a server of
/// `server_version` (`server_version_num`).
pub fn primary_conninfo(cfg: &ConnConfig, server_version: u32) -> String {
    let mut parts: Vec<String> = cfg
        .in_use
        .iter()
        .filter(|u| !(u.default && known_since(u.keyword) > server_version))
        .map(|u| format!("{}={}", u.keyword, conn_val(&u.value)))
        .collect();
    // GetDbnameFromConnectionOptions: the dbname of the connection string only.
    if let Some(db) = cfg.explicit.get("dbname").filter(|d| !d.contains('=')) {
        parts.push(format!("dbname={}", conn_val(db)));
    }
    parts.join(" ")
}

/// A value for a configuration file, as `escape_quotes` (`'` and `\` doubled) in quotes.
fn conf_val(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// The settings `-R` appends to `postgresql.auto.conf` (beside an empty `standby.signal`).
pub fn settings(cfg: &ConnConfig, slot: Option<&str>, server_version: u32) -> String {
    let mut text = String::from("\n# written by pgpar backup -R\n");
    text.push_str(&format!(
        "primary_conninfo = {}\n",
        conf_val(&primary_conninfo(cfg, server_version))
    ));
    if let Some(s) = slot {
        text.push_str(&format!("primary_slot_name = {}\n", conf_val(s)));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conninfo::{ConnArgs, Env};

    /// PGPASSWORD (when given) and HOME.
    struct E(Option<&'static str>);
    impl Env for E {
        fn var(&self, n: &str) -> Option<String> {
            match n {
                "PGPASSWORD" => self.0.map(str::to_string),
                "HOME" => Some("/nonexistent/home".into()),
                _ => None,
            }
        }
    }

    fn cfg(s: &str, pw_env: Option<&'static str>) -> ConnConfig {
        ConnConfig::resolve(
            &ConnArgs {
                dbname: Some(s.into()),
                ..Default::default()
            },
            &E(pw_env),
        )
        .unwrap()
    }

    #[test]
    fn every_keyword_in_use_in_libpqs_order_with_its_defaults() {
        // PGPASSWORD is written, as pg_basebackup writes it (PQconninfo reports it); the
        // password file is then not named.
        let c = cfg(
            "host=db.example port=5433 user=rep sslmode=require keepalives_idle=30 \
             application_name=standby1 options='-c work_mem=64MB' dbname=app",
            Some("secret"),
        );
        assert_eq!(
            primary_conninfo(&c, 170000),
            "user=rep password=secret channel_binding=prefer host=db.example port=5433 \
             options='-c work_mem=64MB' application_name=standby1 keepalives_idle=30 \
             sslmode=require sslnegotiation=postgres sslcompression=0 sslcertmode=allow \
             sslsni=1 ssl_min_protocol_version=TLSv1.2 gssencmode=prefer \
             target_session_attrs=any load_balance_hosts=disable dbname=app"
        );
        // A server older than the keywords' libpq: their defaults are left out.
        assert_eq!(
            primary_conninfo(&c, 150000),
            "user=rep password=secret channel_binding=prefer host=db.example port=5433 \
             options='-c work_mem=64MB' application_name=standby1 keepalives_idle=30 \
             sslmode=require sslcompression=0 sslsni=1 ssl_min_protocol_version=TLSv1.2 \
             gssencmode=prefer target_session_attrs=any dbname=app"
        );
        // No password given: libpq names its default password file.
        let c = cfg("host=/tmp/s user=rep load_balance_hosts=disable", None);
        let s = primary_conninfo(&c, 150000);
        assert!(
            s.starts_with("user=rep passfile='/nonexistent/home/.pgpass' channel_binding=prefer host='/tmp/s' port=5432 sslmode=prefer"),
            "{s}"
        );
        assert!(s.ends_with(" load_balance_hosts=disable"), "given: {s}");
    }

    #[test]
    fn settings_quote_the_conninfo_and_name_the_slot() {
        let t = settings(
            &cfg("host=/tmp/s user=o'k password=a\\\\b", None),
            Some("slot1"),
            170000,
        );
        assert!(t.starts_with("\n# written by pgpar backup -R\n"), "{t}");
        // appendConnStrVal: 'o\'k', 'a\\b'; then escape_quotes doubles ' and \.
        assert!(
            t.contains("primary_conninfo = 'user=''o\\\\''k'' password=''a\\\\\\\\b'' channel_binding=prefer host=''/tmp/s'' port=5432 "),
            "{t}"
        );
        assert!(t.ends_with("primary_slot_name = 'slot1'\n"));
    }
}
