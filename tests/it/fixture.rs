//! The fixture's own promises, checked with the server's own client (psql), so that a failure
//! in the pgpar tests can be told apart from a broken fixture.

use std::process::Command;

use crate::cluster::{password, Cluster, Pg, ROLES};
use crate::util::{run, Out};

fn psql(c: &Cluster, conninfo: &str, pw: Option<&str>, sql: &str) -> Out {
    let mut cmd = Command::new(c.bindir.join("psql"));
    cmd.args(["-X", "-A", "-t", "-w", "-d", conninfo, "-c", sql])
        .env_remove("PGPASSWORD")
        .env("PGPASSFILE", "/dev/null");
    if let Some(pw) = pw {
        cmd.env("PGPASSWORD", pw);
    }
    run(&mut cmd)
}

#[test]
fn fixture_roles_connect_as_documented() {
    let c = Cluster::new(Pg::V15);
    for role in ROLES {
        let pw = password(role);
        let tcp = format!("{} dbname=postgres sslmode=disable", c.conninfo(role));
        let sock = format!("{} dbname=postgres", c.socket_conninfo(role));
        let tls = format!(
            "host=localhost hostaddr=127.0.0.1 port={} user={role} dbname=postgres \
             sslmode=verify-full sslrootcert={}",
            c.port,
            c.ca_cert.display()
        );
        let repl = format!("{} replication=true", c.conninfo(role));
        let ok = |o: &Out, what: &str, expect: bool| {
            assert_eq!(o.code == Some(0), expect, "{role} {what}:\n{o}");
        };
        let ssl_only = *role == "ssl_user";
        ok(&psql(&c, &tcp, Some(&pw), "SELECT 1"), "tcp", !ssl_only);
        ok(&psql(&c, &sock, Some(&pw), "SELECT 1"), "socket", !ssl_only);
        let o = psql(
            &c,
            &tls,
            Some(&pw),
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        );
        ok(&o, "verify-full", true);
        assert_eq!(o.stdout.trim(), "t", "{role}: not over TLS:\n{o}");
        ok(
            &psql(&c, &repl, Some(&pw), "IDENTIFY_SYSTEM"),
            "replication",
            *role != "norepl_user",
        );
        if *role != "trust_user" {
            ok(
                &psql(&c, &tls, Some("wrong"), "SELECT 1"),
                "wrong password",
                false,
            );
        }
    }
    // md5_user really is stored as md5 (PostgreSQL would otherwise answer with SCRAM).
    let stored = c.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'md5_user';");
    assert_eq!(stored.trim(), "md5");
    // verify-full refuses a name the certificate does not carry.
    let wrong = format!(
        "host=wronghost hostaddr=127.0.0.1 port={} user=trust_user dbname=postgres \
         sslmode=verify-full sslrootcert={}",
        c.port,
        c.ca_cert.display()
    );
    let o = psql(&c, &wrong, None, "SELECT 1");
    assert_ne!(
        o.code,
        Some(0),
        "verify-full with a wrong host name connected:\n{o}"
    );
}

#[test]
fn fixture_backup_copy_starts() {
    let c = Cluster::new(Pg::V15);
    c.psql("CREATE TABLE t AS SELECT generate_series(1, 1000) g;");
    let dir = crate::cluster::scratch_dir();
    let backup = dir.path().join("b");
    crate::cluster::run_ok(
        Command::new(c.bindir.join("pg_basebackup"))
            .arg("-D")
            .arg(&backup)
            .arg("-d")
            .arg(c.socket_conninfo("postgres")),
    );
    c.pg_verifybackup(&backup);
    let copy = c.start_backup_copy(&backup);
    assert_ne!(copy.port, c.port);
    assert_eq!(copy.psql("SELECT sum(g) FROM t;").trim(), "500500");
}
