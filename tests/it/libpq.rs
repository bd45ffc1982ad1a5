//! libpq's connection keywords as pgpar honours them, against real servers: channel binding
//! (refused as libpq refuses it, accepted over SCRAM-SHA-256-PLUS), `options` in the startup
//! packet, `target_session_attrs`, client certificates (`cert` in pg_hba.conf), keepalives,
//! and the keywords pgpar refuses rather than ignores.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::cluster::{give_to_server_user, password, run_ok, Cluster, Pg};
use crate::util::{pgpar, run, Out};

fn check(conninfo: &str, pw: Option<&str>) -> Out {
    let mut cmd = pgpar();
    cmd.args(["check", "--json", "-d", conninfo]);
    if let Some(pw) = pw {
        cmd.env("PGPASSWORD", pw);
    }
    run(&mut cmd)
}

#[track_caller]
fn assert_refused(out: &Out, expect: &str) {
    out.assert_error(3);
    assert!(
        out.error_message().contains(expect),
        "expected \"{expect}\" in the error:\n{out}"
    );
}

#[test]
fn channel_binding_require_refused_without_scram_plus_over_tls() {
    let c = Cluster::new(Pg::V15);
    // md5 over TLS: libpq refuses to answer the md5 request at all.
    let ci = |role: &str, extra: &str| format!("{} {extra}", c.conninfo(role));
    assert_refused(
        &check(
            &ci("md5_user", "sslmode=require channel_binding=require"),
            Some(&password("md5_user")),
        ),
        "channel binding required but not supported by server's authentication request",
    );
    // cleartext password over TLS: the same, and the password never leaves.
    assert_refused(
        &check(
            &ci("pass_user", "sslmode=require channel_binding=require"),
            Some(&password("pass_user")),
        ),
        "channel binding required but not supported by server's authentication request",
    );
    // trust over TLS: the server authenticates without any exchange.
    assert_refused(
        &check(
            &ci("trust_user", "sslmode=require channel_binding=require"),
            None,
        ),
        "channel binding required, but server authenticated client without channel binding",
    );
    // SCRAM without TLS: nothing to bind to.
    assert_refused(
        &check(
            &ci("scram_user", "sslmode=disable channel_binding=require"),
            Some(&password("scram_user")),
        ),
        "channel binding required, but SSL not in use",
    );
    // Through the environment as well.
    let out = run(pgpar()
        .args([
            "check",
            "--json",
            "-d",
            &ci("trust_user", "sslmode=require"),
        ])
        .env("PGCHANNELBINDING", "require"));
    assert_refused(&out, "without channel binding");
    crate::util::fault_covered(
        "channel_binding=require, and the server authenticates without SCRAM-SHA-256-PLUS over TLS (md5, password, trust, or no TLS)",
        "refused with libpq's message before any password is sent; exit 3",
    );
}

#[test]
fn channel_binding_require_accepted_with_scram_plus_over_tls() {
    let c = Cluster::new(Pg::V15);
    for role in ["scram_user", "ssl_user"] {
        let out = check(
            &format!(
                "{} sslmode=require channel_binding=require",
                c.conninfo(role)
            ),
            Some(&password(role)),
        );
        out.assert_success();
    }
    // disable: plain SCRAM-SHA-256 even though -PLUS is offered; still logs in.
    check(
        &format!(
            "{} sslmode=require channel_binding=disable",
            c.conninfo("scram_user")
        ),
        Some(&password("scram_user")),
    )
    .assert_success();
    crate::util::fault_covered(
        "channel_binding=require against SCRAM-SHA-256 over TLS",
        "SCRAM-SHA-256-PLUS with tls-server-end-point binding; connects",
    );
}

#[test]
fn options_reach_the_server_and_target_session_attrs_is_checked() {
    let c = Cluster::new(Pg::V15);
    let ro = format!(
        "{} options='-c default_transaction_read_only=on'",
        c.conninfo("trust_user")
    );
    // The option took effect: the session is read-only, so read-write refuses it ...
    assert_refused(
        &check(&format!("{ro} target_session_attrs=read-write"), None),
        "session is read-only",
    );
    // ... and read-only accepts it, where a plain session is refused.
    check(&format!("{ro} target_session_attrs=read-only"), None).assert_success();
    assert_refused(
        &check(
            &format!(
                "{} target_session_attrs=read-only",
                c.conninfo("trust_user")
            ),
            None,
        ),
        "session is not read-only",
    );
    // A primary is not a standby; prefer-standby falls back to it.
    assert_refused(
        &check(
            &format!("{} target_session_attrs=standby", c.conninfo("trust_user")),
            None,
        ),
        "server is not in hot standby mode",
    );
    check(
        &format!(
            "{} target_session_attrs=prefer-standby",
            c.conninfo("trust_user")
        ),
        None,
    )
    .assert_success();
    check(
        &format!("{} target_session_attrs=primary", c.conninfo("trust_user")),
        None,
    )
    .assert_success();
    // PGOPTIONS is the same setting; an option the server does not know is refused by it.
    let out = run(pgpar()
        .args(["check", "--json", "-d", &c.conninfo("trust_user")])
        .env("PGOPTIONS", "-c no_such_setting=1"));
    assert_refused(&out, "no_such_setting");
    crate::util::fault_covered(
        "target_session_attrs the server does not satisfy (read-only session, not a standby), or an options= setting the server does not know",
        "session refused with libpq's reason (\"session is read-only\" …) or the server's error; exit 3",
    );
}

#[test]
fn keepalive_settings_are_applied_and_bad_values_refused() {
    let c = Cluster::new(Pg::V15);
    check(
        &format!(
            "{} keepalives=1 keepalives_idle=5 keepalives_interval=2 keepalives_count=3 tcp_user_timeout=10000",
            c.conninfo("trust_user")
        ),
        None,
    )
    .assert_success();
    // That the options land on the socket is checked below the socket, in conn::dial's tests.
    let out = check(
        &format!("{} keepalives_idle=0", c.conninfo("trust_user")),
        None,
    );
    out.assert_error(2);
    assert!(
        out.error_message().contains("keepalives_idle"),
        "error does not name the keyword:\n{out}"
    );
}

#[test]
fn unsupported_libpq_keywords_are_refused_not_ignored() {
    let c = Cluster::new(Pg::V15);
    for (kw, expect) in [
        (
            "sslpassword=secret",
            "\"sslpassword\" is not supported by pgpar",
        ),
        (
            "require_auth=scram-sha-256",
            "\"require_auth\" is not supported by pgpar",
        ),
        ("sslcrl=/x.crl", "\"sslcrl\" is not supported by pgpar"),
        ("service=main", "\"service\" is not supported by pgpar"),
        ("gssencmode=require", "no GSSAPI support"),
        ("keepalives_idl=5", "unknown keyword"),
    ] {
        let out = check(&format!("{} {kw}", c.conninfo("trust_user")), None);
        out.assert_error(2);
        assert!(
            out.error_message().contains(expect),
            "{kw}: expected \"{expect}\":\n{out}"
        );
    }
    crate::util::fault_covered(
        "a libpq keyword pgpar does not implement (sslpassword, require_auth, sslcrl, service, gssencmode=require) or a misspelt one",
        "refused with a clear error naming it and what to do instead; exit 2, never ignored",
    );
}

#[test]
fn pgpassfile_that_is_not_a_plain_file_gets_libpq_warning() {
    let c = Cluster::new(Pg::V15);
    let dir = tempfile::tempdir().unwrap();
    let out = run(pgpar()
        .args(["check", "--json", "-d", &c.conninfo("trust_user")])
        .env("PGPASSFILE", dir.path()));
    out.assert_success();
    assert!(
        out.stderr.contains(&format!(
            "password file \"{}\" is not a plain file",
            dir.path().display()
        )),
        "no warning about the directory given as PGPASSFILE:\n{out}"
    );
    crate::util::fault_covered(
        "PGPASSFILE names a directory",
        "libpq's warning (\"is not a plain file\"), file skipped",
    );
}

/// A client key and certificate for `cn`, signed by the fixture's CA, in `dir`.
fn client_certificate(c: &Cluster, dir: &std::path::Path, cn: &str) -> (String, String) {
    let ca_dir = c.ca_cert.parent().unwrap();
    let key = dir.join("client.key");
    let csr = dir.join("client.csr");
    let crt = dir.join("client.crt");
    run_ok(Command::new("openssl").args([
        "req",
        "-new",
        "-nodes",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        csr.to_str().unwrap(),
        "-subj",
        &format!("/CN={cn}"),
    ]));
    let ext = dir.join("client.ext");
    fs::write(
        &ext,
        "basicConstraints = critical, CA:FALSE\nextendedKeyUsage = clientAuth\n",
    )
    .unwrap();
    run_ok(Command::new("openssl").args([
        "x509",
        "-req",
        "-in",
        csr.to_str().unwrap(),
        "-CA",
        c.ca_cert.to_str().unwrap(),
        "-CAkey",
        ca_dir.join("ca.key").to_str().unwrap(),
        "-CAcreateserial",
        "-out",
        crt.to_str().unwrap(),
        "-days",
        "30",
        "-extfile",
        ext.to_str().unwrap(),
    ]));
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    (
        crt.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
    )
}

#[test]
fn client_certificate_login_with_cert_auth() {
    let c = Cluster::new(Pg::V15);
    // cert_user may log in only with a certificate the server's CA signed, for its name.
    fs::copy(&c.ca_cert, c.data.join("root.crt")).unwrap();
    give_to_server_user(&c.data.join("root.crt"));
    let hba = fs::read_to_string(c.data.join("pg_hba.conf")).unwrap();
    fs::write(
        c.data.join("pg_hba.conf"),
        format!(
            "hostssl replication cert_user 127.0.0.1/32 cert\n\
             hostssl all         cert_user 127.0.0.1/32 cert\n{hba}"
        ),
    )
    .unwrap();
    c.psql(
        "CREATE ROLE cert_user LOGIN REPLICATION; \
         ALTER SYSTEM SET ssl_ca_file = 'root.crt'; SELECT pg_reload_conf();",
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = client_certificate(&c, dir.path(), "cert_user");
    let base = format!(
        "{} sslmode=verify-full host=localhost hostaddr=127.0.0.1 sslrootcert={}",
        c.conninfo("cert_user"),
        c.ca_cert.display()
    );
    check(&format!("{base} sslcert={crt} sslkey={key}"), None).assert_success();
    // The same through PGSSLCERT/PGSSLKEY.
    run(pgpar()
        .args(["check", "--json", "-d", &base])
        .env("PGSSLCERT", &crt)
        .env("PGSSLKEY", &key))
    .assert_success();
    // Without the certificate the server refuses the role.
    check(&base, None).assert_error(3);
    // sslcertmode=disable withholds it.
    check(
        &format!("{base} sslcert={crt} sslkey={key} sslcertmode=disable"),
        None,
    )
    .assert_error(3);
    // cert auth is not channel binding: libpq refuses channel_binding=require here.
    assert_refused(
        &check(
            &format!("{base} sslcert={crt} sslkey={key} channel_binding=require"),
            None,
        ),
        "without channel binding",
    );
    // A key others may read is refused as libpq refuses it.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    assert_refused(
        &check(&format!("{base} sslcert={crt} sslkey={key}"), None),
        "has group or world access",
    );
    crate::util::fault_covered(
        "cert auth in pg_hba.conf: no client certificate, or a key file others may read",
        "no certificate: the server's refusal, exit 3; open key: refused with libpq's permission message",
    );
}

/// `-R` writes the connection's libpq keywords into `primary_conninfo` as pg_basebackup
/// does (PQconninfo: what was given, and libpq's defaults), and the standby connects with
/// them: over TLS verified against the CA, with the keepalives and application name given.
#[test]
fn recovery_conninfo_carries_the_connection_settings_and_the_standby_streams() {
    let c = Cluster::new(Pg::V15);
    assert!(c.tls, "the PostgreSQL 15 build has TLS");
    c.psql("CREATE TABLE t AS SELECT generate_series(1, 100) g;");
    // ssl_user: hostssl rows only, SCRAM: the standby must use TLS and the password.
    let conninfo = format!(
        "host=localhost port={} user=ssl_user sslmode=verify-full sslrootcert={} \
         keepalives_idle=7 keepalives_interval=3 application_name=pgpar_standby",
        c.port,
        c.ca_cert.display()
    );
    let dir = crate::cluster::scratch_dir();
    let target = dir.path().join("standby");
    // A slot of its own keeps the standby's WAL on the primary: pg_basebackup's checkpoint
    // below may otherwise remove the segment the standby starts streaming from.
    let out = run(pgpar()
        .args(["backup", "-c", "fast", "--method", "stream", "-R"])
        .args(["-C", "-S", "pgpar_standby", "-D"])
        .arg(&target)
        .args(["-d", &conninfo])
        .env("PGPASSWORD", password("ssl_user")));
    out.assert_success();
    let auto = fs::read_to_string(target.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("primary_slot_name = 'pgpar_standby'"),
        "no primary_slot_name:\n{auto}"
    );
    let line = auto
        .lines()
        .find_map(|l| l.strip_prefix("primary_conninfo = '"))
        .and_then(|l| l.strip_suffix('\''))
        .unwrap_or_else(|| panic!("no primary_conninfo:\n{auto}"));
    let ca = c.ca_cert.display().to_string();
    let expected = format!(
        "user=ssl_user password={pw} channel_binding=prefer host=localhost port={port} \
         application_name=pgpar_standby keepalives_idle=7 keepalives_interval=3 \
         sslmode=''verify-full'' sslcompression=0 sslrootcert=''{ca}'' sslsni=1 \
         ssl_min_protocol_version=TLSv1.2 gssencmode=prefer target_session_attrs=any",
        pw = password("ssl_user"),
        port = c.port,
    );
    assert_eq!(line, expected, "in:\n{auto}");

    // pg_basebackup, same connection and environment, writes the same, but for the keywords
    // pgpar leaves out on purpose (GSSAPI ones it does not implement; defaults of keywords a
    // PostgreSQL 15 libpq would not know, when this libpq is newer).
    let pgb = dir.path().join("pg_basebackup");
    run_ok(
        Command::new(c.bindir.join("pg_basebackup"))
            .args(["-c", "fast", "-R", "-D"])
            .arg(&pgb)
            .args(["-d", &conninfo])
            .env("PGPASSWORD", password("ssl_user"))
            .env("HOME", dir.path()),
    );
    let theirs = fs::read_to_string(pgb.join("postgresql.auto.conf")).unwrap();
    let theirs = theirs
        .lines()
        .find_map(|l| l.strip_prefix("primary_conninfo = '"))
        .and_then(|l| l.strip_suffix('\''))
        .unwrap_or_else(|| panic!("pg_basebackup wrote no primary_conninfo:\n{theirs}"));
    let left_out = [
        "krbsrvname=",
        "gssdelegation=",
        "sslcertmode=allow",
        "sslnegotiation=postgres",
        "load_balance_hosts=disable",
    ];
    let theirs: Vec<&str> = theirs
        .split(' ')
        .filter(|kv| !left_out.iter().any(|o| kv.starts_with(o)))
        .collect();
    assert_eq!(line, theirs.join(" "), "pgpar's against pg_basebackup's");

    // The standby starts and streams from the primary with those settings.
    let standby = c.start_backup_copy(&target);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let receiver = loop {
        let r = standby.psql("SELECT status, conninfo FROM pg_stat_wal_receiver;");
        if r.starts_with("streaming|") {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the standby's WAL receiver is not streaming: {r:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    for kv in [
        "keepalives_idle=7",
        "keepalives_interval=3",
        "sslmode=verify-full",
        "application_name=pgpar_standby",
    ] {
        assert!(receiver.contains(kv), "{kv} not in use: {receiver}");
    }
    assert_eq!(
        c.psql(
            "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) \
             WHERE r.application_name = 'pgpar_standby' AND r.usename = 'ssl_user';"
        )
        .trim(),
        "t",
        "the standby's connection is not the TLS one primary_conninfo describes"
    );
    c.psql("INSERT INTO t VALUES (101);");
    while standby.psql("SELECT count(*) FROM t;").trim() != "101" {
        assert!(
            std::time::Instant::now() < deadline,
            "the standby does not replay the primary's new rows"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
