//! Connecting: every authentication method and TLS mode the fixture offers, the ways a password
//! can be given, and how each kind of connection failure is reported (`pgpar check`).

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::cluster::{free_port, password, scratch_dir, Cluster, Pg};
use crate::util::{pgpar, run, Out};

/// `pgpar check --json -d CONNINFO` with `PGPASSWORD` set to `pw` when given.
fn check(conninfo: &str, pw: Option<&str>) -> Out {
    let mut cmd = pgpar();
    cmd.args(["check", "--json", "-d", conninfo]);
    if let Some(pw) = pw {
        cmd.env("PGPASSWORD", pw);
    }
    run(&mut cmd)
}

/// Every password the fixture knows, and a wrong one tests use: none may ever be printed.
fn all_secrets() -> Vec<String> {
    let mut v: Vec<String> = crate::cluster::ROLES.iter().map(|r| password(r)).collect();
    v.push(WRONG.to_string());
    v
}

const WRONG: &str = "WrongPw9Kd2";

#[track_caller]
fn assert_hides_all(out: &Out) {
    let secrets = all_secrets();
    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    out.assert_hides(&refs);
}

/// A successful check: exit 0, JSON for this very server, no password shown.
#[track_caller]
fn assert_checked(c: &Cluster, out: &Out) {
    out.assert_success();
    assert_hides_all(out);
    let j = out.json();
    assert_eq!(
        j["system_identifier"].as_str(),
        Some(c.system_identifier().as_str()),
        "system_identifier is not this server's:\n{out}"
    );
}

fn tls_verify_full(c: &Cluster, role: &str, host: &str) -> String {
    format!(
        "host={host} hostaddr=127.0.0.1 port={} user={role} sslmode=verify-full sslrootcert={}",
        c.port,
        c.ca_cert.display()
    )
}

#[test]
fn check_trust_over_tcp_and_socket() {
    let c = Cluster::new(Pg::V15);
    assert_checked(&c, &check(&c.conninfo("trust_user"), None));
    assert_checked(&c, &check(&c.socket_conninfo("trust_user"), None));
    // The same through -h/-p/-U, -h naming the socket directory as libpq allows.
    let out = run(pgpar()
        .args(["check", "--json", "-h"])
        .arg(&c.sockdir)
        .args(["-p", &c.port.to_string(), "-U", "trust_user"]));
    assert_checked(&c, &out);
}

#[test]
fn check_password_method() {
    let c = Cluster::new(Pg::V15);
    let pw = password("pass_user");
    assert_checked(&c, &check(&c.conninfo("pass_user"), Some(&pw)));
    assert_checked(&c, &check(&c.socket_conninfo("pass_user"), Some(&pw)));
}

#[test]
fn check_md5_method() {
    let c = Cluster::new(Pg::V15);
    let pw = password("md5_user");
    assert_checked(&c, &check(&c.conninfo("md5_user"), Some(&pw)));
    assert_checked(&c, &check(&c.socket_conninfo("md5_user"), Some(&pw)));
}

#[test]
fn check_scram_method() {
    let c = Cluster::new(Pg::V15);
    let pw = password("scram_user");
    assert_checked(&c, &check(&c.conninfo("scram_user"), Some(&pw)));
    assert_checked(&c, &check(&c.socket_conninfo("scram_user"), Some(&pw)));
}

#[test]
fn check_tls_sslmode_require() {
    let c = Cluster::new(Pg::V15);
    // ssl_user has only a hostssl row: success proves the session is encrypted.
    let conninfo = format!("{} sslmode=require", c.conninfo("ssl_user"));
    assert_checked(&c, &check(&conninfo, Some(&password("ssl_user"))));
    // Same through the environment.
    let out = run(pgpar()
        .args(["check", "--json", "-d", &c.conninfo("ssl_user")])
        .env("PGSSLMODE", "require")
        .env("PGPASSWORD", password("ssl_user")));
    assert_checked(&c, &out);
}

#[test]
fn check_tls_verify_full() {
    let c = Cluster::new(Pg::V15);
    let pw = password("ssl_user");
    assert_checked(
        &c,
        &check(&tls_verify_full(&c, "ssl_user", "localhost"), Some(&pw)),
    );
    // The same through PGSSLMODE/PGSSLROOTCERT, and with host=localhost resolved by name.
    let out = run(pgpar()
        .args([
            "check",
            "--json",
            "-h",
            "localhost",
            "-p",
            &c.port.to_string(),
        ])
        .args(["-U", "ssl_user"])
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &c.ca_cert)
        .env("PGPASSWORD", &pw));
    // localhost may resolve to ::1 first, where nothing listens: a client must then try 127.0.0.1.
    assert_checked(&c, &out);
}

#[test]
fn check_json_describes_the_server() {
    let c = Cluster::new(Pg::V15);
    // Three walsenders busy elsewhere: check must count them.
    let busy: Vec<_> = (1..=3)
        .map(|n| {
            c.hold_session(
                &format!("{} replication=true", c.socket_conninfo("postgres")),
                "IDENTIFY_SYSTEM;\n",
                &format!("SELECT (count(*) >= {n})::int FROM pg_stat_replication;"),
            )
        })
        .collect();
    let out = check(&c.conninfo("trust_user"), None);
    out.assert_success();
    let j = out.json();
    drop(busy);

    // What the server itself says over a replication connection.
    let ident = c.psql(&format!(
        "\\c \"{} replication=true\"\nIDENTIFY_SYSTEM\n",
        c.socket_conninfo("postgres")
    ));
    let fields: Vec<&str> = ident.trim().split('|').collect();
    assert_eq!(fields.len(), 4, "IDENTIFY_SYSTEM gave {ident:?}");
    assert_eq!(fields[0], c.system_identifier());
    assert_eq!(j["system_identifier"].as_str(), Some(fields[0]), "{out}");
    assert_eq!(
        j["timeline"].as_u64(),
        Some(fields[1].parse().unwrap()),
        "{out}"
    );

    let version_num: u64 = c.psql("SHOW server_version_num;").trim().parse().unwrap();
    assert_eq!(j["server_version_num"].as_u64(), Some(version_num), "{out}");
    assert_eq!(
        j["server_version"].as_str(),
        Some(c.psql("SHOW server_version;").trim()),
        "{out}"
    );
    assert_eq!(j["wal_level"].as_str(), Some("replica"), "{out}");
    assert_eq!(j["max_wal_senders"].as_u64(), Some(20), "{out}");
    match &j["wal_senders_free"] {
        serde_json::Value::Null => {}
        v => {
            // 20 less the 3 busy ones; one less again if pgpar counts its own connection.
            let free = v
                .as_u64()
                .unwrap_or_else(|| panic!("wal_senders_free {v}:\n{out}"));
            assert!((16..=17).contains(&free), "wal_senders_free {free}:\n{out}");
        }
    }
    assert_eq!(
        j["parallel_backup"].as_bool(),
        Some(false),
        "stock PG15:\n{out}"
    );

    // The human form names the same system.
    let human = run(pgpar().args(["check", "-d", &c.conninfo("trust_user")]));
    human.assert_success();
    assert!(
        human.stdout.contains(fields[0]),
        "human output lacks the system identifier:\n{human}"
    );
}

#[test]
fn check_wrong_password_fails_for_every_method() {
    let c = Cluster::new(Pg::V15);
    for role in ["pass_user", "md5_user", "scram_user"] {
        for conninfo in [c.conninfo(role), c.socket_conninfo(role)] {
            // Through PGPASSWORD ...
            let out = check(&conninfo, Some(WRONG));
            out.assert_error(3);
            assert_hides_all(&out);
            assert!(
                out.error_message()
                    .contains("password authentication failed"),
                "the server's reason is not passed on:\n{out}"
            );
            // ... and through the conninfo string itself.
            let out = check(&format!("{conninfo} password={WRONG}"), None);
            out.assert_error(3);
            assert_hides_all(&out);
        }
        // No password at all: we never prompt, so this fails instead of hanging.
        let out = check(&c.conninfo(role), None);
        out.assert_error(3);
        assert_hides_all(&out);
    }
    crate::util::fault_covered(
        "wrong or missing password (password, md5, SCRAM; TCP and socket)",
        "exit 3 with the server's reason; no password printed; never prompts",
    );
}

#[test]
fn check_unknown_role_fails() {
    let c = Cluster::new(Pg::V15);
    let out = check(&c.conninfo("nobody_here"), Some(WRONG));
    out.assert_error(3);
    assert_hides_all(&out);
    assert!(
        out.error_message().contains("nobody_here"),
        "error does not name the role:\n{out}"
    );
}

#[test]
fn check_role_without_replication_fails() {
    let c = Cluster::new(Pg::V15);
    let out = check(&c.conninfo("norepl_user"), Some(&password("norepl_user")));
    out.assert_error(3);
    assert_hides_all(&out);
    assert!(
        out.error_message().contains("replication"),
        "error does not say replication is missing:\n{out}"
    );
    crate::util::fault_covered(
        "role without the REPLICATION attribute",
        "exit 3, says replication is missing",
    );
}

#[test]
fn check_ssl_only_role_refused_without_tls() {
    let c = Cluster::new(Pg::V15);
    let out = check(
        &format!("{} sslmode=disable", c.conninfo("ssl_user")),
        Some(&password("ssl_user")),
    );
    out.assert_error(3);
    assert_hides_all(&out);
}

#[test]
fn check_closed_port_fails() {
    let port = free_port();
    let out = check(
        &format!("host=127.0.0.1 port={port} user=trust_user password={WRONG}"),
        None,
    );
    out.assert_error(3);
    assert_hides_all(&out);
    assert!(
        out.error_message().contains(&port.to_string()),
        "error does not say where it tried:\n{out}"
    );
    crate::util::fault_covered(
        "nothing listening on the port",
        "exit 3, error names host and port",
    );
}

#[test]
fn check_no_server_at_socket_fails() {
    let dir = scratch_dir();
    let port = free_port();
    let out = check(
        &format!("host={} port={port} user=trust_user", dir.path().display()),
        None,
    );
    out.assert_error(3);
    assert!(
        out.error_message().contains(&port.to_string()),
        "error does not say where it tried:\n{out}"
    );
}

#[test]
fn check_verify_full_refuses_wrong_host_name() {
    let c = Cluster::new(Pg::V15);
    let pw = password("ssl_user");
    let out = check(&tls_verify_full(&c, "ssl_user", "wronghost"), Some(&pw));
    out.assert_error(3);
    assert_hides_all(&out);
    assert!(
        out.error_message().to_lowercase().contains("certificate"),
        "error does not say the certificate did not match:\n{out}"
    );
    // And a server whose certificate another CA signed (each cluster has a CA of its own).
    let foreign = Cluster::new(Pg::V15);
    let conninfo = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=ssl_user sslmode=verify-full \
         sslrootcert={}",
        foreign.port,
        c.ca_cert.display()
    );
    let out = check(&conninfo, Some(&pw));
    out.assert_error(3);
    assert_hides_all(&out);
    crate::util::fault_covered(
        "server certificate does not name the host (sslmode=verify-full)",
        "exit 3, TLS handshake refused, says why",
    );
}

#[test]
fn password_from_pgpassword_conninfo_uri_and_passfile() {
    let c = Cluster::new(Pg::V15);
    let pw = password("scram_user");

    // PGPASSWORD
    assert_checked(&c, &check(&c.conninfo("scram_user"), Some(&pw)));
    // password= in the conninfo string
    assert_checked(
        &c,
        &check(&format!("{} password={pw}", c.conninfo("scram_user")), None),
    );
    // user:password@ in a URI
    let uri = format!("postgresql://scram_user:{pw}@127.0.0.1:{}/", c.port);
    assert_checked(&c, &check(&uri, None));

    // PGPASSFILE, and passfile= in the conninfo; the entry matches this host and port only.
    let dir = scratch_dir();
    let passfile = dir.path().join("pgpass");
    fs::write(
        &passfile,
        format!(
            "127.0.0.1:{}:*:md5_user:{}\n127.0.0.1:{}:*:scram_user:{pw}\n",
            c.port.wrapping_add(1),
            WRONG,
            c.port
        ),
    )
    .unwrap();
    fs::set_permissions(&passfile, fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(pgpar()
        .args(["check", "--json", "-d", &c.conninfo("scram_user")])
        .env("PGPASSFILE", &passfile));
    assert_checked(&c, &out);
    let out = run(pgpar().args([
        "check",
        "--json",
        "-d",
        &format!(
            "{} passfile={}",
            c.conninfo("scram_user"),
            passfile.display()
        ),
    ]));
    assert_checked(&c, &out);

    // ~/.pgpass
    let home = scratch_dir();
    fs::copy(&passfile, home.path().join(".pgpass")).unwrap();
    fs::set_permissions(
        home.path().join(".pgpass"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let out = run(pgpar()
        .args(["check", "--json", "-d", &c.conninfo("scram_user")])
        .env("HOME", home.path()));
    assert_checked(&c, &out);

    // A passfile entry for another port is not used.
    let out = run(pgpar()
        .args(["check", "--json", "-d", &c.conninfo("md5_user")])
        .env("PGPASSFILE", &passfile));
    out.assert_error(3);
    assert_hides_all(&out);
}

#[test]
fn check_human_output_hides_password() {
    let c = Cluster::new(Pg::V15);
    let pw = password("pass_user");
    let out = run(pgpar().args([
        "check",
        "-d",
        &format!("{} password={pw}", c.conninfo("pass_user")),
    ]));
    out.assert_success();
    assert_hides_all(&out);
}

#[test]
fn check_takes_connection_settings_from_the_environment() {
    let c = Cluster::new(Pg::V15);
    let port = c.port.to_string();
    let log_start = c.server_log().len();
    let out = run(pgpar()
        .args(["check", "--json"])
        .env("PGHOST", &c.sockdir)
        .env("PGPORT", &port)
        .env("PGUSER", "scram_user")
        .env("PGPASSWORD", password("scram_user"))
        .env("PGAPPNAME", "pgpar-it-app"));
    assert_checked(&c, &out);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = c.server_log();
    assert!(
        log[log_start..].contains("application_name=pgpar-it-app"),
        "PGAPPNAME did not reach the server:\n{}",
        &log[log_start..]
    );

    // Options win over the environment.
    let out = run(pgpar()
        .args([
            "check",
            "--json",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "trust_user",
        ])
        .env("PGHOST", "/nonexistent")
        .env("PGPORT", "1")
        .env("PGUSER", "nobody_here"));
    assert_checked(&c, &out);
}

#[test]
fn check_tls_default_prefer_and_verify_ca() {
    let c = Cluster::new(Pg::V15);
    let pw = password("ssl_user");
    // No sslmode: libpq's default, prefer, encrypts when the server can (ssl_user needs it).
    assert_checked(&c, &check(&c.conninfo("ssl_user"), Some(&pw)));
    // verify-ca checks the chain, not the name: a wrong host name is fine ...
    let verify_ca = format!(
        "host=wronghost hostaddr=127.0.0.1 port={} user=ssl_user sslmode=verify-ca sslrootcert={}",
        c.port,
        c.ca_cert.display()
    );
    assert_checked(&c, &check(&verify_ca, Some(&pw)));
    // ... but a CA that did not sign the certificate is not.
    let foreign = Cluster::new(Pg::V15);
    let wrong_ca = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=ssl_user sslmode=verify-ca sslrootcert={}",
        foreign.port,
        c.ca_cert.display()
    );
    let out = check(&wrong_ca, Some(&pw));
    out.assert_error(3);
    assert_hides_all(&out);
}
