//! wal-receive: streaming WAL into the repository through a replication slot. RPO under load,
//! crashes of the primary with and without `--synchronous` followed by recovery from the
//! repository alone, the receiver killed and restarted mid-load, and the errors it must stop on.

use crate::harness::cmd::{path_str, Running};
use crate::harness::repo::toml_str;
use crate::harness::{
    repo_kind_tests, wait_until, Cluster, ClusterConfig, PgInstall, RepoKind, TestEnv, Walvault,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// WAL segment size of the test clusters: 1 MiB, so loads complete many segments.
const SEGSIZE_MB: u32 = 1;
/// The receiver's flush interval in these tests (its default).
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Allowance on top of the flush interval for one store and the feedback, on 2 shared cores.
const MARGIN: Duration = Duration::from_millis(1500);
/// The test S3 server (moto, one Python process shared by the tests running in parallel) has
/// latency spikes of its own; a real object store does not need this.
const S3_EXTRA_MARGIN: Duration = Duration::from_secs(1);

/// How long received WAL may take to be durable in a repository of `kind`.
fn rpo_bound(kind: RepoKind) -> Duration {
    match kind {
        RepoKind::Local => FLUSH_INTERVAL + MARGIN,
        RepoKind::S3 => FLUSH_INTERVAL + MARGIN + S3_EXTRA_MARGIN,
    }
}
const APP: &str = "walvault";

repo_kind_tests!(
    rpo_under_load,
    crash_synchronous_loses_no_acknowledged_commit,
    crash_asynchronous_loss_is_bounded,
    receiver_killed_and_restarted_leaves_no_gap,
    timeline_switch_lands_in_repository,
);

/// A primary that a receiver can stream from: 1 MiB segments, a little WAL kept.
pub(crate) fn primary_config(name: &str) -> ClusterConfig {
    ClusterConfig::new(name)
        .wal_segsize_mb(SEGSIZE_MB)
        .set("wal_level", "replica")
        .set("max_wal_size", "64MB")
        .set("min_wal_size", "4MB")
}

/// walvault with the test repository plus a spool directory, as wal-receive needs.
pub(crate) fn receiver_walvault(env: &TestEnv, repo: &crate::harness::Repo) -> Walvault {
    let spool = env.mkdir("spool");
    let config = repo.config().set("spool_dir", &toml_str(path_str(&spool)));
    env.walvault(&env.write_config("receive.toml", &config))
}

/// Starts `wal-receive` against `cluster` (over its Unix socket) and waits until it streams.
pub(crate) fn start_receiver(
    env: &TestEnv,
    walvault: &Walvault,
    cluster: &Cluster,
    extra: &[&str],
) -> Running {
    let port = cluster.port().to_string();
    let mut args = vec!["wal-receive", "--create-slot"];
    args.extend_from_slice(extra);
    let mut running = walvault.spawn(
        &args,
        &[
            ("PGHOST", path_str(env.path())),
            ("PGPORT", &port),
            ("PGUSER", "postgres"),
        ],
    );
    running.wait_for_stderr("streaming from", Duration::from_secs(60));
    running
}

/// A client program of the cluster's installation, connected over TCP as `postgres` (these run
/// as the test's own user, which trust authentication accepts).
fn client(cluster: &Cluster, program: &str) -> Command {
    let mut cmd = Command::new(cluster.install().program(program));
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &cluster.port().to_string(),
        "-U",
        "postgres",
    ])
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(Stdio::null());
    cmd
}

/// pgbench in the background for `seconds` at `tps` transactions a second: a steady load that
/// the debug build keeps up with on 2 shared cores, about 2 MB of WAL a second at 300 (its
/// failure when the server dies is expected).
pub(crate) fn background_pgbench(cluster: &Cluster, seconds: u32, tps: u32) -> Child {
    client(cluster, "pgbench")
        .args(["-n", "-c", "2", "-j", "2"])
        .args([
            "-R",
            &tps.to_string(),
            "-T",
            &seconds.to_string(),
            "postgres",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgbench")
}

pub(crate) fn wait_child(child: &mut Child, timeout: Duration) {
    wait_until("a background client to finish", timeout, || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
}

/// Whether the receiver has reported everything up to `lsn` as durable.
fn durable_reached(cluster: &Cluster, lsn: &str) -> bool {
    cluster.psql(&format!(
        "SELECT coalesce((SELECT flush_lsn >= '{lsn}' FROM pg_stat_replication \
         WHERE application_name = '{APP}'), false)"
    )) == "t"
}

pub(crate) fn wait_durable(cluster: &Cluster, lsn: &str) {
    wait_until(
        &format!("the receiver to report {lsn} durable"),
        Duration::from_secs(120),
        || durable_reached(cluster, lsn),
    );
}

/// A base backup without WAL: recovery must get every segment from the repository.
fn base_backup(env: &TestEnv, cluster: &Cluster) -> PathBuf {
    let dir = env.path().join("backup");
    cluster.pg_basebackup(&dir, &["-X", "none"]);
    dir
}

/// Restores `backup` with `walvault wal-fetch` as restore_command and no target, and waits for
/// the end of recovery.
fn recover(env: &TestEnv, fetch: &Walvault, backup: &Path, install: &PgInstall) -> Cluster {
    let mut restored = env.cluster_from_copy(
        ClusterConfig::new("restored")
            .install(install.clone())
            .set("archive_mode", "off")
            .set("synchronous_standby_names", "")
            .set("restore_command", fetch.restore_command()),
        backup,
    );
    restored.touch("recovery.signal");
    restored.start();
    restored.wait_for_promotion(Duration::from_secs(300));
    restored
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Reads the metrics page from the receiver's HTTP endpoint.
fn scrape(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    stream
        .read_to_string(&mut page)
        .expect("read the metrics page");
    page
}

/// Under a pgbench load, WAL becomes durable in the repository within the flush interval plus a
/// small margin: measured inside the server as the time from a WAL position being written to the
/// receiver reporting it durable (what it reports is what the repository holds). Also checks the
/// metrics endpoint.
fn rpo_under_load(kind: RepoKind) {
    let env = TestEnv::new("stream-rpo");
    let repo = env.repo(kind);
    let walvault = receiver_walvault(&env, &repo);
    let primary = env.cluster(primary_config("primary"));
    let metrics_addr = format!("127.0.0.1:{}", crate::harness::free_port());
    let _receiver = start_receiver(
        &env,
        &walvault,
        &primary,
        &["--metrics-addr", &metrics_addr],
    );
    primary.pgbench(&["-i", "-s", "5", "-q"]);
    // Measure the steady state, not the catch-up after the initial load.
    wait_durable(&primary, &primary.psql("SELECT pg_current_wal_lsn()"));
    primary.psql(&format!(
        "CREATE FUNCTION rpo_samples(samples int) RETURNS SETOF float8 LANGUAGE plpgsql AS $$
         DECLARE target pg_lsn; t0 timestamptz; flushed pg_lsn;
         BEGIN
           FOR i IN 1..samples LOOP
             target := pg_current_wal_lsn(); t0 := clock_timestamp();
             LOOP
               SELECT flush_lsn INTO flushed FROM pg_stat_replication
                WHERE application_name = '{APP}';
               EXIT WHEN flushed >= target OR clock_timestamp() - t0 > interval '30 s';
               PERFORM pg_sleep(0.005);
             END LOOP;
             RETURN NEXT extract(epoch FROM clock_timestamp() - t0);
             PERFORM pg_sleep(0.2 * random());
           END LOOP;
         END $$"
    ));
    // The first seconds after pgbench starts are a burst of full-page writes: measure once
    // that has been streamed.
    let mut load = background_pgbench(&primary, 90, 300);
    wait_until("pgbench to run", Duration::from_secs(60), || {
        primary.psql("SELECT count(*) >= 600 FROM pgbench_history") == "t"
    });
    wait_durable(&primary, &primary.psql("SELECT pg_current_wal_lsn()"));
    let mut lags: Vec<f64> = primary
        .psql("SELECT * FROM rpo_samples(30)")
        .lines()
        .map(|l| l.trim().parse().expect("a lag in seconds"))
        .collect();
    let running = load.try_wait().expect("pgbench status").is_none();
    assert!(running, "pgbench ended before the measurement did");
    load.kill().expect("stop pgbench");
    wait_child(&mut load, Duration::from_secs(60));
    lags.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags[lags.len() - 1],
    );
    println!(
        "RPO ({kind:?}, flush interval {FLUSH_INTERVAL:?}, {} samples under pgbench): \
         p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        lags.len(),
        p50 * 1e3,
        p99 * 1e3,
        max * 1e3
    );
    let bound = rpo_bound(kind).as_secs_f64();
    assert!(
        p99 <= bound,
        "p99 lag {p99:.3} s is above {bound} s: {lags:?}"
    );
    assert!(
        repo.wal_files().len() >= 3,
        "pgbench completed segments but the repository holds {:?}",
        repo.wal_files()
    );

    let page = scrape(&metrics_addr);
    for metric in [
        "walvault_receive_stored_lsn",
        "walvault_receive_lag_bytes",
        "walvault_receive_lag_seconds",
        "walvault_receive_store_latency_seconds",
        "walvault_receive_reconnects_total",
        "walvault_receive_errors_total",
    ] {
        assert!(
            page.contains(&format!("\n{metric} ")),
            "{metric} missing:\n{page}"
        );
    }
}

/// A client that inserts 1, 2, 3, ... one transaction each and reports every acknowledged
/// number with the moment it saw the acknowledgement.
struct AckedClient {
    child: Child,
    acked: Arc<Mutex<Vec<(i64, Instant)>>>,
}

impl AckedClient {
    fn start(env: &TestEnv, cluster: &Cluster) -> AckedClient {
        cluster.psql("CREATE TABLE acked (n bigint PRIMARY KEY)");
        let script: String = (1..=200_000)
            .map(|n| format!("INSERT INTO acked VALUES ({n}) RETURNING n;\n"))
            .collect();
        let script_path = env.write_file("acked.sql", script);
        let psql = cluster.install().program("psql");
        // Line-buffered output: each number is printed once its commit returned.
        let mut child = Command::new("stdbuf")
            .arg("-oL")
            .arg(psql)
            .args(["-X", "-A", "-t", "-q", "-h", "127.0.0.1", "-p"])
            .arg(cluster.port().to_string())
            .args(["-U", "postgres", "-d", "postgres", "-f"])
            .arg(&script_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start psql");
        let acked = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&acked);
        let stdout = child.stdout.take().expect("psql stdout");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(n) = line.trim().parse::<i64>() {
                    sink.lock().unwrap().push((n, Instant::now()));
                }
            }
        });
        AckedClient { child, acked }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn acked(&self) -> Vec<(i64, Instant)> {
        self.acked.lock().unwrap().clone()
    }
}

impl Drop for AckedClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs acknowledged inserts under a pgbench load, then kills the receiver and crashes the
/// primary at once (the whole site is lost), recovers a base backup taken before the load from
/// the repository alone, and returns the recovered cluster, the acknowledged numbers and the
/// moment of the crash.
fn crash_and_recover(
    kind: RepoKind,
    name: &str,
    synchronous: bool,
) -> (TestEnv, Cluster, Vec<(i64, Instant)>, Instant) {
    let env = TestEnv::new(name);
    let repo = env.repo(kind);
    let walvault = receiver_walvault(&env, &repo);
    let mut config = primary_config("primary");
    if synchronous {
        config = config.set("synchronous_standby_names", APP);
    }
    let mut primary = env.cluster(config);
    let extra: &[&str] = if synchronous { &["--synchronous"] } else { &[] };
    let receiver = start_receiver(&env, &walvault, &primary, extra);
    let backup = base_backup(&env, &primary);
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    wait_durable(&primary, &primary.psql("SELECT pg_current_wal_lsn()"));
    let mut load = background_pgbench(&primary, 60, 300);
    let client = AckedClient::start(&env, &primary);
    let started = Instant::now();
    wait_until("acknowledged inserts", Duration::from_secs(120), || {
        client.count() >= 200 && started.elapsed() >= Duration::from_secs(4)
    });
    let crash = Instant::now();
    receiver.kill();
    primary.stop_immediate();
    let acked = client.acked();
    drop(client);
    // pgbench ends once its server is gone.
    wait_child(&mut load, Duration::from_secs(60));

    let fetch = env.walvault(repo.config_path());
    let restored = recover(&env, &fetch, &backup, primary.install());
    // The newest WAL usually exists only as streamed fragments (unless the crash fell on a
    // segment boundary).
    println!(
        "recovery was served a streamed partial segment: {}",
        restored.log().contains("(partial segment)")
    );
    (env, restored, acked, crash)
}

/// Acknowledged numbers missing from the recovered cluster.
fn missing_acked(restored: &Cluster, acked: &[(i64, Instant)]) -> Vec<(i64, Instant)> {
    let present: std::collections::HashSet<i64> = restored
        .psql("SELECT n FROM acked")
        .lines()
        .map(|l| l.parse().expect("a number"))
        .collect();
    acked
        .iter()
        .filter(|(n, _)| !present.contains(n))
        .copied()
        .collect()
}

/// With `--synchronous` and the receiver in synchronous_standby_names, every transaction
/// acknowledged before the crash is recovered from the repository.
fn crash_synchronous_loses_no_acknowledged_commit(kind: RepoKind) {
    let (_env, restored, acked, _) = crash_and_recover(kind, "stream-crash-sync", true);
    let missing = missing_acked(&restored, &acked);
    println!(
        "synchronous crash ({kind:?}): {} acknowledged, {} missing after recovery",
        acked.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged commits missing after recovery: {:?}",
        missing.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
}

/// Without `--synchronous`, what recovery misses was acknowledged at most the flush interval
/// (plus a margin) before the crash.
fn crash_asynchronous_loss_is_bounded(kind: RepoKind) {
    let (_env, restored, acked, crash) = crash_and_recover(kind, "stream-crash-async", false);
    let missing = missing_acked(&restored, &acked);
    let bound = rpo_bound(kind);
    let oldest_missing = missing
        .iter()
        .map(|(_, at)| crash.saturating_duration_since(*at))
        .max()
        .unwrap_or_default();
    println!(
        "asynchronous crash ({kind:?}): {} acknowledged, {} missing, the oldest acknowledged \
         {oldest_missing:?} before the crash",
        acked.len(),
        missing.len()
    );
    assert!(
        oldest_missing <= bound,
        "a commit acknowledged {oldest_missing:?} before the crash is missing (bound {bound:?})"
    );
    // The recovered rows are a prefix: nothing after a hole.
    let recovered_max: i64 = restored
        .psql("SELECT coalesce(max(n), 0) FROM acked")
        .parse()
        .unwrap();
    assert_eq!(
        restored.psql("SELECT count(*) FROM acked"),
        recovered_max.to_string(),
        "recovered acknowledged rows have holes"
    );
}

/// Every segment between the first and the last stored one is there (timeline 1).
fn assert_no_gap(repo: &crate::harness::Repo) {
    let segments: Vec<u64> = repo
        .wal_files()
        .iter()
        .filter(|n| n.len() == 24)
        .map(|n| u64::from_str_radix(&n[8..], 16).unwrap())
        .collect();
    assert!(!segments.is_empty(), "no segment in the repository");
    let gaps: Vec<u64> = (segments[0]..=segments[segments.len() - 1])
        .filter(|s| !segments.contains(s))
        .collect();
    assert!(
        gaps.is_empty(),
        "segments missing from the repository: {gaps:x?}"
    );
}

/// Digest of a table's rows, in order.
fn digest(cluster: &Cluster, table: &str, order: &str) -> String {
    cluster.psql(&format!(
        "SELECT count(*) || ' ' || coalesce(md5(string_agg(t::text, ',' ORDER BY {order})), '-') \
         FROM {table} t"
    ))
}

/// SIGKILL of the receiver during writes, then a restart: the repository has every segment
/// from the first to the last without a gap, verifies, and recovery reaches the end.
fn receiver_killed_and_restarted_leaves_no_gap(kind: RepoKind) {
    let env = TestEnv::new("stream-sigkill");
    let repo = env.repo(kind);
    let walvault = receiver_walvault(&env, &repo);
    let primary = env.cluster(primary_config("primary"));
    let receiver = start_receiver(&env, &walvault, &primary, &[]);
    let backup = base_backup(&env, &primary);
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    let mut load = background_pgbench(&primary, 120, 300);
    let stored_before = repo.wal_files().len();
    wait_until(
        "segments streamed during the load",
        Duration::from_secs(120),
        || repo.wal_files().len() >= stored_before + 2,
    );
    receiver.kill();
    // Let WAL accumulate on the server while no receiver runs.
    let lsn = primary.psql("SELECT pg_current_wal_lsn() + 2 * 1048576");
    wait_until(
        "WAL to grow while the receiver is down",
        Duration::from_secs(120),
        || primary.psql(&format!("SELECT pg_current_wal_lsn() >= '{lsn}'")) == "t",
    );
    let _receiver = start_receiver(&env, &walvault, &primary, &[]);
    // It catches up while the load goes on.
    wait_durable(&primary, &primary.psql("SELECT pg_current_wal_lsn()"));
    load.kill().expect("stop pgbench");
    wait_child(&mut load, Duration::from_secs(60));
    primary.psql("CREATE TABLE marker AS SELECT 'end of load' AS note");
    let end = primary.psql("SELECT pg_current_wal_lsn()");
    wait_durable(&primary, &end);

    assert_no_gap(&repo);
    walvault.run(&["verify"]).assert_success();

    // A streamed segment is stored as wal-push stores it: archiving it again finds it identical.
    let finished = primary.switch_wal();
    wait_until(
        &format!("{finished} streamed"),
        Duration::from_secs(60),
        || repo.wal_files().contains(&finished),
    );
    walvault
        .wal_push(&primary.wal_dir().join(&finished))
        .assert_success()
        .assert_stderr_contains("identical");

    let restored = recover(
        &env,
        &env.walvault(repo.config_path()),
        &backup,
        primary.install(),
    );
    assert_eq!(restored.psql("SELECT note FROM marker"), "end of load");
    for (table, order) in [("pgbench_accounts", "aid"), ("pgbench_history", "t::text")] {
        assert_eq!(
            digest(&restored, table, order),
            digest(&primary, table, order),
            "{table} differs after recovery"
        );
    }
}

/// SIGTERM (what `systemctl stop` sends) while received WAL waits for its flush deadline: the
/// receiver stores it at once, logs where it stopped and exits 0, and the repository then holds
/// the server's WAL up to the flush position the server had before the signal.
#[test]
fn sigterm_stores_what_was_received_and_exits_0() {
    let env = TestEnv::new("stream-sigterm");
    let repo = env.repo(RepoKind::Local);
    let walvault = receiver_walvault(&env, &repo);
    let primary = env.cluster(primary_config("primary"));
    // Nothing received is stored within the test, unless the stop stores it.
    let receiver = start_receiver(&env, &walvault, &primary, &["--flush-interval", "1h"]);
    primary.psql("CREATE TABLE before_stop AS SELECT generate_series(1, 20000) AS n");
    let flushed = primary.psql("SELECT pg_current_wal_flush_lsn()");
    wait_until(
        "the receiver to report the server's WAL received",
        Duration::from_secs(60),
        || {
            primary.psql(&format!(
                "SELECT coalesce((SELECT write_lsn >= '{flushed}' FROM pg_stat_replication \
                 WHERE application_name = '{APP}'), false)"
            )) == "t"
        },
    );
    assert!(
        !durable_reached(&primary, &flushed),
        "stored before the stop: this test would prove nothing"
    );

    let (status, stderr) = receiver.terminate(Duration::from_secs(90));
    let log = stderr.join("\n");
    assert_eq!(status.code(), Some(0), "exit after SIGTERM; stderr:\n{log}");
    let stopped = stderr
        .iter()
        .find_map(|line| line.split_once("stopped at "))
        .and_then(|(_, rest)| rest.split([' ', ':']).next())
        .unwrap_or_else(|| panic!("no stop position logged; stderr:\n{log}"));
    assert_eq!(
        primary.psql(&format!("SELECT '{stopped}'::pg_lsn >= '{flushed}'")),
        "t",
        "stopped at {stopped}, before the server's flush position {flushed}"
    );

    // What recovery would get for the segment is the server's WAL, up to that position.
    let row = primary.psql(&format!(
        "SELECT file_name || ' ' || file_offset FROM pg_walfile_name_offset('{flushed}')"
    ));
    let (segment, offset) = row.split_once(' ').unwrap();
    let offset: usize = offset.parse().unwrap();
    let dest = env.mkdir("fetched").join(segment);
    walvault.wal_fetch(segment, &dest).assert_success();
    let fetched = std::fs::read(&dest).unwrap();
    let server = std::fs::read(primary.wal_dir().join(segment)).unwrap();
    assert!(
        fetched[..offset] == server[..offset],
        "{segment} from the repository differs from the server's before offset {offset}"
    );
}

/// The errors wal-receive must stop on, each with a message that says what is wrong.
#[test]
fn permanent_errors_are_reported() {
    let env = TestEnv::new("stream-errors");
    let repo = env.repo(RepoKind::Local);
    let walvault = receiver_walvault(&env, &repo);
    let primary = env.cluster(
        primary_config("primary")
            .set("password_encryption", "scram-sha-256")
            .set("listen_addresses", "127.0.0.1"),
    );
    // Password authentication for replication over TCP: SCRAM for one role, md5 for another.
    let hba = primary.datadir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host replication scram_user 127.0.0.1/32 scram-sha-256\n\
             host replication md5_user 127.0.0.1/32 md5\n{old}"
        ),
    )
    .unwrap();
    primary.psql("CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'right'");
    primary.psql(
        "SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'right'",
    );
    primary.psql("SELECT pg_reload_conf()");
    let port = primary.port().to_string();
    let receive = |args: &[&str], envs: &[(&str, &str)]| {
        let mut all = vec![("PGPORT", port.as_str())];
        all.extend_from_slice(envs);
        walvault.run_with_env(&[&["wal-receive"], args].concat(), &all)
    };
    let tcp = |user: &'static str, password: &'static str| {
        [
            ("PGHOST", "127.0.0.1"),
            ("PGUSER", user),
            ("PGPASSWORD", password),
        ]
    };

    for user in ["scram_user", "md5_user"] {
        receive(&["--create-slot"], &tcp(user, "wrong"))
            .assert_failure()
            .assert_stderr_contains("password authentication failed");
    }
    receive(&[], &tcp("scram_user", "right"))
        .assert_failure()
        .assert_stderr_contains("does not exist")
        .assert_stderr_contains("--create-slot");

    // The right passwords stream (SCRAM and md5); stop each once it streams.
    for user in ["scram_user", "md5_user"] {
        let slot = format!("slot_{user}");
        let mut running = walvault.spawn(
            &["wal-receive", "--create-slot", "--slot", &slot],
            &[
                ("PGPORT", &port),
                ("PGHOST", "127.0.0.1"),
                ("PGUSER", user),
                ("PGPASSWORD", "right"),
            ],
        );
        running.wait_for_stderr("streaming from", Duration::from_secs(60));
        // A second receiver on the same spool would delete the first one's files.
        receive(&[], &tcp("scram_user", "right"))
            .assert_failure()
            .assert_stderr_contains("another wal-receive is using the spool");
        running.kill();
    }

    // A repository that belongs to another cluster.
    let other = env.cluster(primary_config("other"));
    let other_port = other.port().to_string();
    walvault
        .run_with_env(
            &["wal-receive", "--create-slot"],
            &[
                ("PGPORT", &other_port),
                ("PGHOST", path_str(env.path())),
                ("PGUSER", "postgres"),
            ],
        )
        .assert_failure()
        .assert_stderr_contains("different cluster");

    // Something that is not PostgreSQL.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_port = listener.local_addr().unwrap().port().to_string();
    thread::spawn(move || {
        if let Ok((mut socket, _)) = listener.accept() {
            let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            thread::sleep(Duration::from_secs(5));
        }
    });
    walvault
        .run_with_env(
            &["wal-receive"],
            &[
                ("PGPORT", &fake_port),
                ("PGHOST", "127.0.0.1"),
                ("PGUSER", "postgres"),
            ],
        )
        .assert_failure()
        .assert_stderr_contains("is it PostgreSQL");
}

/// The receiver follows a standby; when the standby is promoted, the new timeline's history
/// file and WAL land in the repository.
fn timeline_switch_lands_in_repository(kind: RepoKind) {
    let env = TestEnv::new("stream-timeline");
    let repo = env.repo(kind);
    let walvault = receiver_walvault(&env, &repo);
    let primary = env.cluster(primary_config("primary"));
    let standby_dir = env.path().join("standby");
    primary.pg_basebackup(&standby_dir, &["-R", "-X", "stream"]);
    let mut standby = env.cluster_from_copy(ClusterConfig::new("standby"), &standby_dir);
    standby.start();
    let mut receiver = start_receiver(&env, &walvault, &standby, &[]);

    primary.psql("CREATE TABLE before_promotion AS SELECT generate_series(1, 10000) AS n");
    let lsn = primary.psql("SELECT pg_current_wal_lsn()");
    wait_until(
        "the standby to replay the primary's WAL",
        Duration::from_secs(60),
        || standby.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'")) == "t",
    );
    wait_durable(&standby, &lsn);

    standby.psql("SELECT pg_promote(true, 60)");
    receiver.wait_for_stderr("timeline 2 starts at", Duration::from_secs(60));
    standby.psql("CREATE TABLE after_promotion AS SELECT generate_series(1, 10000) AS n");
    let segment = standby.switch_wal();
    assert!(segment.starts_with("00000002"), "{segment}");
    let lsn = standby.psql("SELECT pg_current_wal_lsn()");
    wait_durable(&standby, &lsn);
    wait_until(
        &format!("{segment} in the repository"),
        Duration::from_secs(60),
        || repo.wal_files().contains(&segment),
    );

    let history = std::fs::read(standby.wal_dir().join("00000002.history")).unwrap();
    let fetched = env.mkdir("fetched").join("00000002.history");
    env.walvault(repo.config_path())
        .wal_fetch("00000002.history", &fetched)
        .assert_success();
    assert_eq!(
        std::fs::read(&fetched).unwrap(),
        history,
        "stored history differs"
    );
}

/// A TCP proxy in front of the S3 server that the test can take down (every connection is cut
/// and new ones are closed at once) and bring back.
struct Outage {
    port: u16,
    down: Arc<std::sync::atomic::AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Outage {
    fn start(target: String) -> Outage {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (down2, open2) = (Arc::clone(&down), Arc::clone(&open));
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if down2.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut open = open2.lock().unwrap();
                open.push(client.try_clone().unwrap());
                open.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Outage { port, down, open }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            for stream in self.open.lock().unwrap().drain(..) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// The S3 repository goes away for a while: the receiver keeps running and receiving, the
/// slot and the reported flush position stay at what was stored, and everything lands once the
/// repository is back. Then the server restarts, and the receiver follows.
#[test]
fn repository_outage_is_survived() {
    let env = TestEnv::new("stream-outage");
    let repo = env.repo(RepoKind::S3);
    let server = crate::harness::s3::server();
    let outage = Outage::start(server.endpoint().trim_start_matches("http://").to_string());
    let spool = env.mkdir("spool");
    let config = repo
        .config()
        .set("spool_dir", &toml_str(path_str(&spool)))
        .set_s3("endpoint", &toml_str(&outage.endpoint()))
        .set_s3("timeout", &toml_str("2s"))
        .set_s3("max_attempts", "2");
    let walvault = env.walvault(&env.write_config("receive.toml", &config));
    let mut primary = env.cluster(primary_config("primary"));
    let mut receiver = start_receiver(&env, &walvault, &primary, &[]);
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    wait_durable(&primary, &primary.psql("SELECT pg_current_wal_lsn()"));

    outage.set_down(true);
    primary.psql("CREATE TABLE during_outage AS SELECT generate_series(1, 50000) AS n");
    receiver.wait_for_stderr("storing streamed WAL failed", Duration::from_secs(60));
    let slot_during = primary.psql("SELECT restart_lsn FROM pg_replication_slots");
    let end_during = primary.psql("SELECT pg_current_wal_lsn()");
    wait_until(
        "the receiver to keep receiving into its spool",
        Duration::from_secs(60),
        || {
            primary.psql(&format!(
                "SELECT write_lsn >= '{end_during}' FROM pg_stat_replication \
             WHERE application_name = '{APP}'"
            )) == "t"
        },
    );
    assert!(
        !durable_reached(&primary, &end_during),
        "flush reported past what the repository could store"
    );
    assert_eq!(
        primary.psql("SELECT restart_lsn FROM pg_replication_slots"),
        slot_during,
        "the slot advanced while the repository was down"
    );
    assert!(
        primary.psql(&format!("SELECT '{slot_during}'::pg_lsn < '{end_during}'")) == "t",
        "the slot is past WAL written during the outage"
    );

    outage.set_down(false);
    primary.psql("CREATE TABLE after_outage AS SELECT 1 AS n");
    let end = primary.psql("SELECT pg_current_wal_lsn()");
    wait_durable(&primary, &end);

    // A server restart: the receiver reconnects and goes on where it stopped (mid-segment).
    primary.stop();
    primary.start();
    receiver.wait_for_stderr("reconnecting", Duration::from_secs(60));
    primary.psql("CREATE TABLE after_restart AS SELECT 1 AS n");
    let end = primary.psql("SELECT pg_current_wal_lsn()");
    wait_durable(&primary, &end);
    assert_no_gap(&repo);
    env.walvault(repo.config_path())
        .run(&["verify"])
        .assert_success();
}

/// PostgreSQL 14 has no READ_REPLICATION_SLOT: the slot is created with the keyword syntax, and
/// a restarted receiver resumes from what the repository holds, without a gap. Skipped when
/// integration/run.sh did not install PostgreSQL 14.
#[test]
fn pg14_resumes_from_the_repository() {
    let Some(pg14) = PgInstall::required_or_skip(14) else {
        return;
    };
    let env = TestEnv::new("stream-pg14");
    let repo = env.repo(RepoKind::Local);
    let walvault = receiver_walvault(&env, &repo);
    let primary = env.cluster(primary_config("primary").install(pg14));
    let receiver = start_receiver(&env, &walvault, &primary, &[]);
    let backup = base_backup(&env, &primary);
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    wait_durable(&primary, &primary.psql("SELECT pg_current_wal_lsn()"));
    receiver.kill();

    primary.psql("CREATE TABLE while_down AS SELECT generate_series(1, 100000) AS n");
    let port = primary.port().to_string();
    let envs = [
        ("PGHOST", path_str(env.path())),
        ("PGPORT", port.as_str()),
        ("PGUSER", "postgres"),
    ];
    walvault
        .run_with_env(&["wal-receive", "--slot", "missing"], &envs)
        .assert_failure()
        .assert_stderr_contains("does not exist");
    let mut restarted = walvault.spawn(&["wal-receive"], &envs);
    restarted.wait_for_stderr("streaming from", Duration::from_secs(60));
    primary.psql("CREATE TABLE marker AS SELECT 'end' AS note");
    wait_durable(&primary, &primary.psql("SELECT pg_current_wal_lsn()"));
    assert_no_gap(&repo);
    walvault.run(&["verify"]).assert_success();

    let restored = recover(
        &env,
        &env.walvault(repo.config_path()),
        &backup,
        primary.install(),
    );
    assert_eq!(restored.psql("SELECT note FROM marker"), "end");
    assert_eq!(restored.psql("SELECT count(*) FROM while_down"), "100000");
}

/// Without `spool_dir` or `--spool-dir`, wal-receive keeps its spool under the user's state
/// directory (as pg_receivewal needs only `-D`) instead of refusing to start.
#[test]
fn wal_receive_has_a_default_spool() {
    let env = TestEnv::new("stream-default-spool");
    let repo = env.repo(RepoKind::Local);
    let walvault = env.walvault(repo.config_path());
    let primary = env.cluster(primary_config("primary"));
    let home = env.mkdir("home");
    let port = primary.port().to_string();
    walvault
        .run_with_env(
            &["wal-receive", "--slot", "absent"],
            &[
                ("PGHOST", path_str(env.path())),
                ("PGPORT", &port),
                ("PGUSER", "postgres"),
                ("HOME", path_str(&home)),
                ("XDG_STATE_HOME", ""),
                ("STATE_DIRECTORY", ""),
            ],
        )
        .assert_failure()
        .assert_stderr_contains("does not exist");
    assert!(home.join(".local/state/walvault/receive-absent").is_dir());
}
