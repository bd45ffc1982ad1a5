//! `-R`: make the backup start as a standby of its source, as pg_basebackup does:
//! an empty `standby.signal`, and `primary_conninfo` (plus `primary_slot_name` with `-S`)
//! appended to `postgresql.auto.conf`. The password is written only when it was given in the
//! connection string itself, never when it came from PGPASSWORD or a password file.
//! It builds the text; the session writes it through the sink.

use crate::conninfo::{ConnConfig, Host, SslMode};

/// Quotes a conninfo value as libpq's `appendConnStrVal`.
fn conn_val(v: &str) -> String {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/' | ':'));
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

/// The `primary_conninfo` string for the connection we used.
pub fn primary_conninfo(cfg: &ConnConfig) -> String {
    let mut parts: Vec<(String, String)> = vec![("user".into(), cfg.user.clone())];
    if cfg.password_from_conninfo {
        if let Some(p) = &cfg.password {
            parts.push(("password".into(), p.clone()));
        }
    }
    if let Some(t) = cfg.targets.first() {
        match &t.host {
            Host::Socket(dir) => parts.push(("host".into(), dir.display().to_string())),
            Host::Tcp { name, addr } => {
                parts.push(("host".into(), name.clone()));
                if let Some(a) = addr {
                    parts.push(("hostaddr".into(), a.clone()));
                }
            }
        }
        parts.push(("port".into(), t.port.to_string()));
    }
    let mode = match cfg.sslmode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    };
    parts.push(("sslmode".into(), mode.into()));
    if let Some(r) = &cfg.sslrootcert {
        parts.push(("sslrootcert".into(), r.display().to_string()));
    }
    if let Some(db) = cfg.explicit.get("dbname").filter(|d| !d.contains('=')) {
        parts.push(("dbname".into(), db.clone()));
    }
    if let Some(a) = cfg.explicit.get("application_name") {
        parts.push(("application_name".into(), a.clone()));
    }
    parts
        .iter()
        .map(|(k, v)| format!("{k}={}", conn_val(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The settings `-R` appends to `postgresql.auto.conf` (beside an empty `standby.signal`).
pub fn settings(cfg: &ConnConfig, slot: Option<&str>) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let mut text = String::from("\n# written by pgpar backup -R\n");
    text.push_str(&format!(
        "primary_conninfo = {}\n",
        q(&primary_conninfo(cfg))
    ));
    if let Some(s) = slot {
        text.push_str(&format!("primary_slot_name = {}\n", q(s)));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conninfo::{ConnArgs, Env};

    struct E(Option<&'static str>);
    impl Env for E {
        fn var(&self, n: &str) -> Option<String> {
            (n == "PGPASSWORD")
                .then(|| self.0.map(str::to_string))
                .flatten()
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
    fn password_only_when_given_in_the_conninfo() {
        let c = cfg(
            "host=db.example port=5433 user=rep sslmode=require",
            Some("secret"),
        );
        let s = primary_conninfo(&c);
        assert_eq!(s, "user=rep host=db.example port=5433 sslmode=require");
        let c = cfg("host=/tmp/s user=rep password=a\\ b", None);
        assert_eq!(
            primary_conninfo(&c),
            "user=rep password='a b' host=/tmp/s port=5432 sslmode=prefer"
        );
    }

    #[test]
    fn settings_quote_the_conninfo_and_name_the_slot() {
        let t = settings(&cfg("host=/tmp/s user=o'k", None), Some("slot1"));
        assert!(t.starts_with("\n# written by pgpar backup -R\n"), "{t}");
        assert!(
            t.contains(
                "primary_conninfo = 'user=''o\\''k'' host=/tmp/s port=5432 sslmode=prefer'\n"
            ),
            "{t}"
        );
        assert!(t.ends_with("primary_slot_name = 'slot1'\n"));
    }
}
