//! The PostgreSQL connections of backup-push and wal-receive as libpq makes them: TLS with each
//! sslmode against a server that accepts only TLS (hostssl, scram-sha-256), the password from a
//! password file, and bounds on a server that stops answering.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::cmd::{path_str, RunOutput, Walvault};
use crate::harness::repo::toml_str;
use crate::harness::{give_to_postgres, ClusterConfig, RepoKind, TestEnv};

/// Runs openssl in `dir`, panicking with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>.crt`, `<name>.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
    dir.join(format!("{name}.crt"))
}

/// A server certificate for the name `localhost` only (no IP address), signed by `ca`; the key is
/// the PostgreSQL user's, mode 0600, as the server demands.
fn make_server_cert(dir: &Path, ca: &str) -> (PathBuf, PathBuf) {
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName = DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    for f in [&cert, &key] {
        give_to_postgres(f);
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (cert, key)
}

/// A password file for the PostgreSQL user, mode 0600.
fn write_passfile(env: &TestEnv, name: &str, text: &str) -> PathBuf {
    let path = env.write_file(name, text);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// verify-full works for backup-push and wal-receive against a TLS-only server, with the
/// password from PGPASSFILE; a wrong CA, a wrong host name and sslmode=disable each fail and
/// say why; verify-ca checks the chain but not the name.
#[test]
fn tls_modes_against_a_tls_only_server() {
    let env = TestEnv::new("pg-tls");
    let repo = env.repo(RepoKind::Local);
    let spool = env.mkdir("spool");
    let config = repo.config().set("spool_dir", &toml_str(path_str(&spool)));
    let wv = env.walvault(&env.write_config("tls.toml", &config));
    let certs = env.mkdir("certs");
    let ca = make_ca(&certs, "ca");
    let wrong_ca = make_ca(&certs, "other-ca");
    let (cert, key) = make_server_cert(&certs, "ca");
    let cluster = env.cluster(
        ClusterConfig::new("tls")
            .archive_with(&wv)
            .set("ssl", "on")
            .set("ssl_cert_file", path_str(&cert))
            .set("ssl_key_file", path_str(&key))
            .set("password_encryption", "scram-sha-256"),
    );
    // Over TCP only TLS with a SCRAM password; the harness keeps its own socket access.
    std::fs::write(
        cluster.datadir().join("pg_hba.conf"),
        "local all all trust\n\
         hostssl all backup_user 127.0.0.1/32 scram-sha-256\n\
         hostssl replication backup_user 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    cluster.psql("CREATE ROLE backup_user SUPERUSER LOGIN REPLICATION PASSWORD 'right'");
    cluster.psql("SELECT pg_reload_conf()");
    let port = cluster.port().to_string();
    let passfile = write_passfile(
        &env,
        "pgpass",
        &format!("localhost:{port}:*:backup_user:right\n127.0.0.1:{port}:*:backup_user:right\n"),
    );
    let conninfo = |host: &str, mode: &str, root: &Path| {
        format!(
            "host={host} port={port} user=backup_user dbname=postgres sslmode={mode} \
             sslrootcert={}",
            root.display()
        )
    };
    let envs = [
        ("PGPASSFILE", path_str(&passfile)),
        ("PGDATA", path_str(cluster.datadir())),
    ];
    let backup = |dbname: &str| wv.run_with_env(&["backup-push", "--dbname", dbname], &envs);
    let receive = |dbname: &str| {
        wv.run_with_env(&["wal-receive", "--create-slot", "--dbname", dbname], &envs)
    };

    // verify-full: the backup is taken and the receiver streams, both over TLS.
    backup(&conninfo("localhost", "verify-full", &ca)).assert_success();
    let mut running = wv.spawn(
        &[
            "wal-receive",
            "--create-slot",
            "--dbname",
            &conninfo("localhost", "verify-full", &ca),
        ],
        &envs,
    );
    running.wait_for_stderr("streaming from", Duration::from_secs(60));
    assert_eq!(
        cluster.psql("SELECT ssl FROM pg_stat_ssl JOIN pg_stat_replication USING (pid)"),
        "t"
    );
    running.kill();

    // A CA that did not sign the server's certificate.
    let wrong = conninfo("localhost", "verify-full", &wrong_ca);
    backup(&wrong)
        .assert_failure()
        .assert_stderr_contains("invalid peer certificate");
    receive(&wrong)
        .assert_failure()
        .assert_stderr_contains("invalid peer certificate");

    // A host name the certificate does not name; verify-ca does not check it.
    let by_address = conninfo("127.0.0.1", "verify-full", &ca);
    backup(&by_address)
        .assert_failure()
        .assert_stderr_contains("not valid for name");
    receive(&by_address)
        .assert_failure()
        .assert_stderr_contains("not valid for name");
    backup(&conninfo("127.0.0.1", "verify-ca", &ca)).assert_success();

    // No TLS: the server refuses, and says so.
    let clear = conninfo("localhost", "disable", &ca);
    backup(&clear)
        .assert_failure()
        .assert_stderr_contains("no encryption");
    receive(&clear)
        .assert_failure()
        .assert_stderr_contains("no encryption");

    // Without the password file the server's question has no answer.
    wv.run_with_env(
        &[
            "wal-receive",
            "--dbname",
            &conninfo("localhost", "verify-full", &ca),
        ],
        &[("PGPASSFILE", "/nonexistent")],
    )
    .assert_failure()
    .assert_stderr_contains("password file");
}

/// sslmode=require never sends the password to a server without TLS: the receiver (which used
/// to) and backup-push stop before authenticating.
#[test]
fn require_refuses_a_server_without_tls() {
    let env = TestEnv::new("pg-no-tls");
    let repo = env.repo(RepoKind::Local);
    let spool = env.mkdir("spool");
    let config = repo.config().set("spool_dir", &toml_str(path_str(&spool)));
    let wv = env.walvault(&env.write_config("plain.toml", &config));
    let cluster = env.cluster(
        ClusterConfig::new("plain")
            .archive_with(&wv)
            .set("password_encryption", "scram-sha-256")
            .set("log_connections", "on"),
    );
    std::fs::write(
        cluster.datadir().join("pg_hba.conf"),
        "local all all trust\n\
         host all backup_user 127.0.0.1/32 password\n\
         host replication backup_user 127.0.0.1/32 password\n",
    )
    .unwrap();
    cluster.psql("CREATE ROLE backup_user SUPERUSER LOGIN REPLICATION PASSWORD 'right'");
    cluster.psql("SELECT pg_reload_conf()");
    let dbname = format!(
        "host=127.0.0.1 port={} user=backup_user dbname=postgres sslmode=require \
         password=right",
        cluster.port()
    );
    let envs = [("PGDATA", path_str(cluster.datadir()))];
    for command in ["backup-push", "wal-receive"] {
        wv.run_with_env(&[command, "--dbname", &dbname], &envs)
            .assert_failure()
            .assert_stderr_contains("TLS");
    }
    // The server never got as far as a connection that could carry a password.
    assert!(
        !cluster.log().contains("authorized: user=backup_user"),
        "{}",
        cluster.log_tail(20)
    );
}

/// A server on 127.0.0.1 that runs `greet` on each connection and, when it succeeds, holds the
/// connection open without another word. Returns its port.
fn mute_server(greet: fn(&mut TcpStream) -> std::io::Result<()>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    thread::spawn(move || {
        let mut held = Vec::new();
        for mut socket in listener.incoming().flatten() {
            if greet(&mut socket).is_ok() {
                held.push(socket);
            }
        }
    });
    port
}

/// backup-push as `postgres` against the server on 127.0.0.1 at `port`, with `bound` (a
/// variable and its value) in the environment, fails saying `expected`, well within 20 s.
fn backup_push_gives_up(wv: &Walvault, port: &str, bound: (&str, &str), expected: &str) {
    let started = Instant::now();
    wv.run_with_env(
        &["backup-push"],
        &[
            ("PGHOST", "127.0.0.1"),
            ("PGPORT", port),
            ("PGUSER", "postgres"),
            bound,
        ],
    )
    .assert_failure()
    .assert_stderr_contains(expected);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

/// A server that accepts the connection and then says nothing: backup-push gives up within its
/// connect timeout instead of hanging.
#[test]
fn a_silent_server_does_not_hang_backup_push() {
    let env = TestEnv::new("pg-silent");
    let repo = env.repo(RepoKind::Local);
    let wv = env.walvault(repo.config_path());
    // Hold every connection open, never answering.
    let port = mute_server(|_| Ok(()));
    // prefer: one attempt with a TLS request; the bound holds for it.
    backup_push_gives_up(
        &wv,
        &port,
        ("PGCONNECT_TIMEOUT", "2"),
        "did not answer within 2s",
    );
}

/// Reads one startup packet (an SSLRequest first, answered "no TLS"), then answers
/// AuthenticationOk and ReadyForQuery.
fn startup_then_ready(socket: &mut TcpStream) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    socket.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
    socket.read_exact(&mut body)?;
    if body[..4] == [0x04, 0xd2, 0x16, 0x2f] {
        let _ = socket.write_all(b"N");
        socket.read_exact(&mut len)?;
        let mut startup = vec![0u8; u32::from_be_bytes(len) as usize - 4];
        socket.read_exact(&mut startup)?;
    }
    let _ = socket.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I']);
    Ok(())
}

/// A server that completes the startup exchange and then never answers a query: every call on
/// the session is bounded by pg_timeout.
#[test]
fn a_server_that_stops_answering_queries_is_given_up_on() {
    let env = TestEnv::new("pg-mute");
    let repo = env.repo(RepoKind::Local);
    let wv = env.walvault(repo.config_path());
    // Whatever comes after the startup exchange is read and left unanswered.
    let port = mute_server(startup_then_ready);
    backup_push_gives_up(
        &wv,
        &port,
        ("WALVAULT_PG_TIMEOUT", "2s"),
        "did not answer within 2s (reading server settings)",
    );
}

/// A backup-push of a cluster archiving with `archive_command`, within `backup_stop_timeout`.
fn push_archiving_with(env: &TestEnv, archive_command: &str, stop_timeout: &str) -> RunOutput {
    let repo = env.repo(RepoKind::Local);
    let wv = env.walvault(repo.config_path());
    let cluster = env.cluster(
        ClusterConfig::new("archiving")
            .set("wal_level", "replica")
            .set("archive_mode", "on")
            .set("archive_command", archive_command),
    );
    let port = cluster.port().to_string();
    wv.run_with_env(
        &["backup-push"],
        &[
            ("PGHOST", path_str(env.path())),
            ("PGPORT", &port),
            ("PGUSER", "postgres"),
            ("PGDATA", path_str(cluster.datadir())),
            ("WALVAULT_BACKUP_STOP_TIMEOUT", stop_timeout),
        ],
    )
}

/// While archive_command fails, backup-push waits for the stop segment, reports the segment
/// archiving fails on and gives up after backup_stop_timeout.
#[test]
fn backup_stop_gives_up_when_archiving_fails() {
    let env = TestEnv::new("pg-stop-bound");
    let started = Instant::now();
    push_archiving_with(&env, "false", "6s")
        .assert_failure()
        .assert_stderr_contains("did not reach the repository within 6s (backup_stop_timeout)")
        .assert_stderr_contains("archive_command is failing on WAL segment 00000001000000000000000")
        .assert_stderr_contains("still waiting for WAL archiving");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

/// An archive_command that ships elsewhere (as `pg_backup_stop`'s own wait allowed): the backup
/// completes once the archiver is done with the stop segment, and says the WAL is not in the
/// repository.
#[test]
fn backup_stop_accepts_archiving_elsewhere_with_a_warning() {
    let env = TestEnv::new("pg-stop-elsewhere");
    let elsewhere = env.unique_dir("elsewhere");
    give_to_postgres(&elsewhere);
    let command = format!("cp %p {}/%f", elsewhere.display());
    let started = Instant::now();
    push_archiving_with(&env, &command, "10m")
        .assert_success()
        .assert_stderr_contains("was archived by archive_command, but not into");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}
