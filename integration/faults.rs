//! walvault on a bad day: its S3 and PostgreSQL connections through the fault-injecting proxy
//! (resets, 500 and 503 SlowDown answers, stalls mid-answer, black holes, slow answers, requests
//! cut off part-way) while a loaded cluster archives, backs up, streams and recovers. Every
//! segment must end up archived and verified, no wal-push may run past its configured bound,
//! no retry may meet a spurious overwrite conflict, no wal-fetch may end recovery early, and
//! restores must equal the source. Each scenario appends its figures to
//! `target/tmp/faults-summary.txt` (quoted in RELIABILITY.md).

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backup::{pg_env, table_md5s};
use crate::harness::cmd::path_str;
use crate::harness::garage::GarageCluster;
use crate::harness::proxy::{Fault, Proxy, ProxyStats, Schedule, ALL_FAULTS, STREAM_FAULTS};
use crate::harness::repo::toml_str;
use crate::harness::tmpfs::Tmpfs;
use crate::harness::{
    give_to_postgres, s3_kind_tests, wait_until, ClusterConfig, ConfigFile, Repo, RepoKind,
    TestEnv, Walvault,
};
use crate::stream::{
    assert_no_gap, background_pgbench, base_backup, digest, primary_config, receiver_walvault,
    recover, wait_child, wait_durable,
};

s3_kind_tests!(
    archive_backup_and_recovery_through_faults,
    retried_writes_and_stalled_downloads,
);

/// `s3.timeout` through the proxy: short, so stalls cost little test time.
const S3_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per S3 call through the proxy: with up to 30% of connections faulty, all attempts
/// of one call fail with a chance of 0.3^8 (under 1 in 10,000), so a scenario of a few hundred
/// calls completes; a call that does fail exits as it should (wal-fetch above 125), and the
/// test then fails on the restore.
const S3_ATTEMPTS: u32 = 8;

/// A config for `repo` whose S3 endpoint is a fault-injecting proxy in front of the real one.
fn through_proxy(env: &TestEnv, repo: &Repo, schedule: Schedule, name: &str) -> (Proxy, Walvault) {
    let endpoint = repo.s3_endpoint().expect("an S3 repository");
    let proxy = Proxy::start(endpoint.trim_start_matches("http://"), schedule);
    let config = repo
        .config()
        .set_s3("endpoint", &toml_str(&proxy.endpoint()))
        .set_s3("timeout", &toml_str(&format!("{}s", S3_TIMEOUT.as_secs())))
        .set_s3("max_attempts", &S3_ATTEMPTS.to_string());
    let path = env.write_config(&format!("{name}.toml"), &config);
    (proxy, env.walvault(&path))
}

/// A wrapper script around `walvault` that appends `<args> <exit code> <milliseconds>` to `log`
/// for every call, so a test can check each call PostgreSQL made.
fn timed_walvault(env: &TestEnv, wv: &Walvault, name: &str, log: &Path) -> PathBuf {
    let script = format!(
        "#!/bin/sh\nstart=$(date +%s%N)\n{} \"$@\"\nrc=$?\n\
         echo \"$* $rc $(( ($(date +%s%N) - start) / 1000000 ))\" >> {}\nexit $rc\n",
        wv.shell_prefix(),
        path_str(log)
    );
    let path = env.write_file(name, script);
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// One logged call: its arguments, exit code and duration.
struct Call {
    args: Vec<String>,
    code: i32,
    took: Duration,
}

fn calls(log: &Path) -> Vec<Call> {
    let text = fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .map(|line| {
            let mut parts: Vec<&str> = line.split(' ').collect();
            let ms: u64 = parts.pop().unwrap().parse().unwrap();
            let code: i32 = parts.pop().unwrap().parse().unwrap();
            Call {
                args: parts.iter().map(|s| s.to_string()).collect(),
                code,
                took: Duration::from_millis(ms),
            }
        })
        .collect()
}

/// The longest one S3 call may take: every attempt timing out, plus the SDK's backoffs.
fn call_bound() -> Duration {
    S3_TIMEOUT * (S3_ATTEMPTS + 1) + Duration::from_secs(5)
}

/// Appends a scenario's figures to the summary file and prints them.
/// `other_faults` counts faults not made by a proxy (a node stopped).
fn record(
    scenario: &str,
    kind: RepoKind,
    stats: &[&ProxyStats],
    other_faults: usize,
    over_bound: usize,
    lost: usize,
) {
    let faults: usize = other_faults + stats.iter().map(|s| s.total_faults()).sum::<usize>();
    let detail: Vec<String> = stats.iter().map(|s| s.to_string()).collect();
    let line = format!(
        "{scenario} ({kind:?}): faults injected {faults}; calls over their bound {over_bound}; \
         segments lost {lost} [{}]",
        detail.join("; ")
    );
    eprintln!("FAULTS {line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults-summary.txt");
    if let Ok(mut file) = fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(file, "{line}");
    }
}

fn schedule(seed: u64, per_mille: u64, faults: &[Fault]) -> Schedule {
    Schedule {
        seed,
        per_mille,
        faults: faults.to_vec(),
        max_offset: 64 * 1024,
        stall: S3_TIMEOUT * 2,
        spare_first: 0,
    }
}

/// A loaded cluster archives through the proxy, a backup is pushed and fetched through it, and a
/// recovery fetches its WAL through it: every segment is archived and verifies, no wal-push ran
/// past its bound or met a conflict, no wal-fetch said "absent" for a stored segment, and the
/// restored data equals the source's.
fn archive_backup_and_recovery_through_faults(kind: RepoKind) {
    let env = TestEnv::new("faults-archive");
    let repo = env.repo(kind);
    let direct = env.walvault(repo.config_path());
    // Garage keeps connections open far longer than moto, so each must more often carry a
    // fault for a comparable number of faults.
    let per_mille = if kind == RepoKind::Garage { 300 } else { 150 };
    let faults = schedule(0x5eed_0001, per_mille, ALL_FAULTS);
    let (proxy, wv) = through_proxy(&env, &repo, faults, "proxy");
    let push_log = env.path().join("wal-push.log");
    let fetch_log = env.path().join("wal-fetch.log");
    for log in [&push_log, &fetch_log] {
        env.write_file(log.file_name().unwrap(), "");
        give_to_postgres(log);
    }
    let script = timed_walvault(&env, &wv, "timed-walvault", &push_log);
    let mut src = env.cluster(
        ClusterConfig::new("src")
            .wal_segsize_mb(1)
            .set("wal_level", "replica")
            .set("archive_mode", "on")
            .set(
                "archive_command",
                format!("{} wal-push %p", path_str(&script)),
            )
            .set("archive_timeout", "0"),
    );
    src.pgbench(&["-i", "-q", "-s", "3"]);
    let port = src.port().to_string();
    wv.run_with_env(&["backup-push"], &pg_env(&env, &src, &port))
        .assert_success();
    let mut load = background_pgbench(&src, 20, 200);
    wait_child(&mut load, Duration::from_secs(120));
    src.psql("CREATE TABLE marker AS SELECT 'end' AS note");
    let last = src.switch_wal();
    src.wait_for_archived(&last, Duration::from_secs(300));
    let expected = table_md5s(&src);
    let name = backup_name(&direct);

    // Restore through the proxy: backup-fetch, then wal-fetch for every segment.
    let fetch_script = timed_walvault(&env, &wv, "timed-fetch", &fetch_log);
    let fetching = wv.with_config(wv.config());
    let restored = restore_with(&env, &fetching, &fetch_script, &name);
    assert_eq!(restored.psql("SELECT note FROM marker"), "end");
    assert_eq!(table_md5s(&restored), expected, "restored data differs");

    direct.run(&["verify"]).assert_success();
    let stored: BTreeSet<String> = repo.wal_files().into_iter().collect();
    let pushes = calls(&push_log);
    let pushed: BTreeSet<String> = pushes
        .iter()
        .filter(|c| c.code == 0)
        .filter_map(|c| c.args.get(1))
        .filter_map(|p| Path::new(p).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    let lost: Vec<&String> = pushed.difference(&stored).collect();
    let over: Vec<(String, Duration)> = pushes
        .iter()
        .filter(|c| c.took > call_bound())
        .map(|c| (c.args.join(" "), c.took))
        .collect();
    // A wal-fetch that said "absent" (1..=125) for a segment the repository holds would have
    // ended recovery early.
    let early: Vec<String> = calls(&fetch_log)
        .iter()
        .filter(|c| (1..=125).contains(&c.code))
        .filter_map(|c| c.args.get(1).cloned())
        .filter(|n| stored.contains(n))
        .collect();
    let log = src.log();
    let conflicts = log.matches("different content").count();
    let replaced = log.matches("is damaged").count();
    eprintln!("damaged objects found and replaced while archiving: {replaced}");
    record(
        "archive, backup-push/fetch and recovery through faults",
        kind,
        &[&proxy.stats()],
        0,
        over.len(),
        lost.len() + early.len(),
    );
    assert!(lost.is_empty(), "acknowledged segments missing: {lost:?}");
    assert!(
        over.is_empty(),
        "wal-push calls past {:?}: {over:?}",
        call_bound()
    );
    assert!(
        early.is_empty(),
        "wal-fetch said absent for stored {early:?}"
    );
    assert_eq!(conflicts, 0, "spurious overwrite conflicts:\n{log}");
    assert!(
        proxy.stats().total_faults() >= 5,
        "too few faults to prove anything: {}",
        proxy.stats()
    );
    src.stop();
}

/// The name of the newest backup.
fn backup_name(wv: &Walvault) -> String {
    let out = wv.run(&["backup-list", "--json"]);
    out.assert_success();
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    list.as_array()
        .and_then(|a| a.last())
        .and_then(|b| b["name"].as_str())
        .unwrap_or_else(|| panic!("no backup listed: {out}"))
        .to_string()
}

/// backup-fetch `name` with `wv`, then recovery with `script` as the WAL fetcher.
fn restore_with(
    env: &TestEnv,
    wv: &Walvault,
    script: &Path,
    name: &str,
) -> crate::harness::Cluster {
    let dir = env.unique_dir("restored");
    wv.run(&["backup-fetch", name, path_str(&dir)])
        .assert_success();
    let config = ClusterConfig::new(dir.file_name().unwrap().to_str().unwrap())
        .set("archive_mode", "off")
        .set(
            "restore_command",
            format!("{} wal-fetch %f %p", path_str(script)),
        );
    let mut restored = env.cluster_from_copy(config, &dir);
    restored.touch("recovery.signal");
    restored.start();
    restored.wait_for_promotion(Duration::from_secs(300));
    restored
}

/// The two faults seen to break backups: a PUT stored whose answer is lost (the SDK's retry then
/// meets the object it just wrote), and answers that stall mid-body while a pack downloads.
/// backup-push goes through a proxy that resets many connections in the middle of an answer,
/// backup-fetch through one that stalls answers past `s3.timeout`; both must complete, and the
/// restore equal the source.
fn retried_writes_and_stalled_downloads(kind: RepoKind) {
    let env = TestEnv::new("faults-retried");
    let repo = env.repo(kind);
    let direct = env.walvault(repo.config_path());
    // Resets somewhere in a connection's first answers: a server that keeps a connection open
    // for many requests (Garage) has one of them lose its answer after the request was done.
    let lost_answers = Schedule {
        max_offset: 8 << 10,
        ..schedule(0x5eed_0002, 600, &[Fault::Reset])
    };
    let (pushing, push_wv) = through_proxy(&env, &repo, lost_answers, "lost-answers");
    let stalls = Schedule {
        max_offset: 256 * 1024,
        ..schedule(0x5eed_0003, 500, &[Fault::Stall])
    };
    let (fetching, fetch_wv) = through_proxy(&env, &repo, stalls, "stalls");
    let mut src = env.cluster(ClusterConfig::new("src").archive_with(&direct));
    src.pgbench(&["-i", "-q", "-s", "4"]);
    let port = src.port().to_string();
    push_wv
        .run_with_env(&["backup-push"], &pg_env(&env, &src, &port))
        .assert_success();
    let expected = table_md5s(&src);
    let name = backup_name(&direct);
    let dir = env.unique_dir("fetched");
    fetch_wv
        .run(&["backup-fetch", &name, path_str(&dir)])
        .assert_success();
    direct.run(&["verify"]).assert_success();
    record(
        "retried writes and stalled downloads",
        kind,
        &[&pushing.stats(), &fetching.stats()],
        0,
        0,
        0,
    );
    assert!(pushing.stats().total_faults() > 0 && fetching.stats().total_faults() > 0);
    let restored = {
        let config = ClusterConfig::new(dir.file_name().unwrap().to_str().unwrap())
            .set("archive_mode", "off")
            .set("restore_command", direct.restore_command())
            .set("recovery_target", "immediate")
            .set("recovery_target_action", "promote");
        let mut c = env.cluster_from_copy(config, &dir);
        c.touch("recovery.signal");
        c.start();
        c.wait_for_promotion(Duration::from_secs(120));
        c
    };
    assert_eq!(table_md5s(&restored), expected, "restored data differs");
    src.stop();
}

/// wal-receive's replication and SQL connections go through a proxy that resets, stalls, black
/// holes, slows and cuts them off under load: the receiver reconnects, the repository has no
/// gap, the slot is never ahead of what the repository holds, and recovery equals the source.
#[test]
fn wal_receive_through_faults() {
    let env = TestEnv::new("faults-receive");
    let repo = env.repo(RepoKind::Local);
    let walvault = receiver_walvault(&env, &repo);
    let primary = env.cluster(primary_config("primary"));
    let proxy = Proxy::start(
        &format!("127.0.0.1:{}", primary.port()),
        Schedule {
            seed: 0x5eed_0004,
            // One long-lived connection at a time: each meets a fault somewhere in its first
            // 512 KiB of stream (or at once).
            per_mille: 1000,
            // Every stream fault, resets and stalls mid-stream twice as often.
            faults: [STREAM_FAULTS, &[Fault::Reset, Fault::Stall]].concat(),
            max_offset: 512 << 10,
            stall: Duration::from_secs(8),
            spare_first: 0,
        },
    );
    let backup = base_backup(&env, &primary);
    let port = proxy.port().to_string();
    let mut receiver = walvault.spawn(
        &["wal-receive", "--create-slot"],
        &[
            ("PGHOST", "127.0.0.1"),
            ("PGPORT", &port),
            ("PGUSER", "postgres"),
            ("PGCONNECT_TIMEOUT", "5"),
        ],
    );
    receiver.wait_for_stderr("streaming from", Duration::from_secs(120));
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    let mut load = background_pgbench(&primary, 40, 200);
    // While the load runs: the slot never promises more than the repository holds.
    let mut checks = 0;
    let started = Instant::now();
    while matches!(load.try_wait(), Ok(None)) && started.elapsed() < Duration::from_secs(120) {
        slot_not_ahead(&primary, &repo);
        checks += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_child(&mut load, Duration::from_secs(120));
    primary.psql("CREATE TABLE marker AS SELECT 'end of load' AS note");
    let end = primary.psql("SELECT pg_current_wal_lsn()");
    // Faults off for the tail, so the test ends in bounded time once everything is through.
    proxy.set_enabled(false);
    wait_durable(&primary, &end);
    slot_not_ahead(&primary, &repo);
    assert_no_gap(&repo);
    walvault.run(&["verify"]).assert_success();
    let stats = proxy.stats();
    record(
        "wal-receive through faults",
        RepoKind::Local,
        &[&stats],
        0,
        0,
        0,
    );
    assert!(checks > 5, "the slot was checked only {checks} times");
    assert!(stats.total_faults() >= 3, "too few faults: {stats}");
    drop(receiver);
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

/// The slot promises no more than the repository holds: the segment holding the byte just before
/// its restart LSN is stored whole or in fragments reaching that byte (the slot is read first:
/// the repository only grows). Gaps below it are checked at the end ([`assert_no_gap`]).
fn slot_not_ahead(primary: &crate::harness::Cluster, repo: &Repo) {
    let slot = primary.psql(
        "SELECT coalesce((SELECT pg_walfile_name(restart_lsn - 1) || ' ' || \
         ((restart_lsn - 1 - '0/0'::pg_lsn) % 1048576)::bigint FROM pg_replication_slots \
         WHERE restart_lsn > '0/2000000' LIMIT 1), '')",
    );
    let Some((segment, offset)) = slot.split_once(' ') else {
        return;
    };
    let offset: u64 = offset.parse().unwrap();
    let objects = repo.objects();
    let whole = objects.iter().any(|k| k == &format!("wal/{segment}"));
    let reached = objects
        .iter()
        .filter_map(|k| k.strip_prefix(&format!("stream/{segment}/")))
        .filter_map(|range| range.split_once('-'))
        .filter_map(|(_, end)| u64::from_str_radix(end, 16).ok())
        .max();
    assert!(
        whole || reached.is_some_and(|end| end > offset),
        "the slot promises byte {offset:#x} of {segment}, the repository holds up to {reached:?} \
         of it (whole: {whole})"
    );
}

/// Disk full, on the repository and then on the restore target (small tmpfs each): the failing
/// command says which file and that the device is full, nothing half-written is visible (the
/// repository verifies, no temporary file is left; the restore has no `pg_control` or
/// `backup_label`), and once space returns the next run completes.
#[test]
fn disk_full_on_repository_and_restore_target() {
    let env = TestEnv::new("faults-diskfull");
    let repo = env.repo(RepoKind::Local);
    let wv = env.walvault(repo.config_path());
    let full_repo = Tmpfs::mount(&env.path().join("repo"), 3 * 1024);
    let src = env.cluster(
        ClusterConfig::new("src")
            .wal_segsize_mb(1)
            .archive_with(&wv),
    );
    src.psql(
        "CREATE TABLE r AS SELECT md5(random()::text) || md5(random()::text) AS v \
         FROM generate_series(1, 60000)",
    );
    let last = src.switch_wal();
    wait_until(
        "archiving to fail on the full repository",
        Duration::from_secs(120),
        || src.psql("SELECT failed_count > 0 FROM pg_stat_archiver") == "t",
    );
    let log = src.log();
    let complaint = log
        .lines()
        .find(|l| l.contains("No space left on device"))
        .unwrap_or_else(|| panic!("no disk-full error in the server log:\n{log}"));
    assert!(
        complaint.contains(path_str(full_repo.path())) || complaint.contains("wal/"),
        "the error names no file: {complaint}"
    );
    // A temporary file (`.NAME.tmp.PID.SEQ`) may belong to a store in progress (the detached
    // pusher goes on trying); none may be left by a process that has ended.
    let leftovers: Vec<String> = repo
        .keys()
        .into_iter()
        .filter(|k| {
            let name = k.rsplit('/').next().unwrap_or("");
            let pid = name.rsplit('.').nth(1).unwrap_or("");
            name.contains(".tmp.") && !Path::new(&format!("/proc/{pid}")).exists()
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files of ended processes: {leftovers:?}"
    );
    wv.run(&["verify"]).assert_success();
    let stored_when_full = repo.wal_files().len();

    full_repo.resize(256 * 1024);
    src.wait_for_archived(&last, Duration::from_secs(120));
    assert!(repo.wal_files().len() > stored_when_full);
    wv.run(&["verify"]).assert_success();

    // The restore target.
    let port = src.port().to_string();
    wv.run_with_env(&["backup-push"], &pg_env(&env, &src, &port))
        .assert_success();
    let expected = table_md5s(&src);
    let name = backup_name(&wv);
    let target = env.mkdir("target");
    let full_target = Tmpfs::mount(&target, 8 * 1024);
    let out = wv.run(&["backup-fetch", &name, path_str(&target)]);
    out.assert_failure();
    assert!(
        out.stderr.contains("No space left on device") && out.stderr.contains(path_str(&target)),
        "unclear disk-full error:\n{out}"
    );
    for made_last in ["global/pg_control", "backup_label"] {
        assert!(
            !target.join(made_last).exists(),
            "{made_last} exists in a restore that failed"
        );
    }
    full_target.resize(512 * 1024);
    clear_dir(&target);
    wv.run(&["backup-fetch", &name, path_str(&target)])
        .assert_success();
    let config = ClusterConfig::new("target")
        .set("archive_mode", "off")
        .set("restore_command", wv.restore_command())
        .set("recovery_target", "immediate")
        .set("recovery_target_action", "promote");
    let mut restored = env.cluster_from_copy(config, &target);
    restored.touch("recovery.signal");
    restored.start();
    restored.wait_for_promotion(Duration::from_secs(120));
    assert_eq!(table_md5s(&restored), expected, "restored data differs");
    restored.stop();
    drop(restored);
    drop(full_target);
}

/// Removes everything inside `dir`, keeping `dir`.
fn clear_dir(dir: &Path) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            fs::remove_dir_all(&path).unwrap();
        } else {
            fs::remove_file(&path).unwrap();
        }
    }
}

/// A three-node Garage with replication factor 3 loses a node in the middle of archiving a
/// loaded cluster: archiving goes on through the other two, no segment is missing, the
/// repository verifies and a recovery from it equals the source.
#[test]
fn garage_node_loss_while_archiving() {
    let env = TestEnv::new("faults-garage-loss");
    let garage_dir = env.path().join("garage");
    let mut garage = GarageCluster::start(&garage_dir, 3).unwrap_or_else(|e| panic!("{e}"));
    let client = garage.client(0);
    let bucket = client.new_bucket();
    let url = format!("s3://{bucket}/main");
    let config = ConfigFile::s3_on(&url, &client).set("compression", &toml_str("lz4"));
    let wv = env.walvault(&env.write_config("garage3.toml", &config));
    let src = env.cluster(
        ClusterConfig::new("src")
            .wal_segsize_mb(1)
            .archive_with(&wv)
            .set("archive_timeout", "0"),
    );
    src.pgbench(&["-i", "-q", "-s", "2"]);
    let port = src.port().to_string();
    wv.run_with_env(&["backup-push"], &pg_env(&env, &src, &port))
        .assert_success();
    let mut load = background_pgbench(&src, 30, 200);
    let wal = |c: &crate::harness::s3::S3Server| c.list(&bucket, "main/wal/").len();
    let before = wal(&client);
    wait_until(
        "segments archived under load",
        Duration::from_secs(120),
        || wal(&client) >= before + 3,
    );
    garage.kill_node(2);
    let at_loss = wal(&client);
    wait_child(&mut load, Duration::from_secs(120));
    src.psql("CREATE TABLE marker AS SELECT 'after the node loss' AS note");
    let last = src.switch_wal();
    src.wait_for_archived(&last, Duration::from_secs(300));
    let names: Vec<String> = client
        .list(&bucket, "main/wal/")
        .into_iter()
        .map(|k| k["main/wal/".len()..].to_string())
        .filter(|n| n.len() == 24)
        .collect();
    assert!(
        names.len() > at_loss,
        "nothing archived after the node loss"
    );
    let numbers: Vec<u64> = names
        .iter()
        .map(|n| u64::from_str_radix(&n[8..], 16).unwrap())
        .collect();
    let missing: Vec<u64> = (numbers[0]..=*numbers.last().unwrap())
        .filter(|n| !numbers.contains(n))
        .collect();
    record(
        "Garage 3 nodes, one stopped while archiving",
        RepoKind::Garage,
        &[],
        1,
        0,
        missing.len(),
    );
    assert!(missing.is_empty(), "segments missing: {missing:x?}");
    wv.run(&["verify"]).assert_success();
    let expected = table_md5s(&src);
    let name = backup_name(&wv);
    let restored = restore_with(
        &env,
        &wv,
        &timed_walvault(&env, &wv, "fetch", &env.path().join("fetch.log")),
        &name,
    );
    assert_eq!(
        restored.psql("SELECT note FROM marker"),
        "after the node loss"
    );
    assert_eq!(table_md5s(&restored), expected, "recovered data differs");
}

/// wal-receive's spool on a full tmpfs: it says which spool file could not be written, the slot
/// promises nothing it has not stored, and once space returns it catches up without a gap.
#[test]
fn disk_full_on_the_receive_spool() {
    let env = TestEnv::new("faults-spoolfull");
    let repo = env.repo(RepoKind::Local);
    let spool = env.mkdir("small-spool");
    let full = Tmpfs::mount(&spool, 768);
    let config = repo
        .config()
        .set("spool_dir", &toml_str(path_str(full.path())));
    let walvault = env.walvault(&env.write_config("receive.toml", &config));
    let primary = env.cluster(primary_config("primary"));
    let port = primary.port().to_string();
    let mut receiver = walvault.spawn(
        &["wal-receive", "--create-slot"],
        &[
            ("PGHOST", "127.0.0.1"),
            ("PGPORT", &port),
            ("PGUSER", "postgres"),
        ],
    );
    receiver.wait_for_stderr("streaming from", Duration::from_secs(60));
    primary.psql("CREATE TABLE r AS SELECT md5(g::text) AS v FROM generate_series(1, 30000) g");
    primary.switch_wal();
    receiver.wait_for_stderr("No space left on device", Duration::from_secs(60));
    slot_not_ahead(&primary, &repo);
    full.resize(64 * 1024);
    primary.psql("CREATE TABLE marker AS SELECT 'space is back' AS note");
    let end = primary.psql("SELECT pg_current_wal_lsn()");
    wait_durable(&primary, &end);
    slot_not_ahead(&primary, &repo);
    assert_no_gap(&repo);
    walvault.run(&["verify"]).assert_success();
    drop(receiver);
}

/// backup-push's SQL session goes through a proxy that resets, cuts off, stalls, black holes
/// and slows it: every run ends within its bound (PGCONNECT_TIMEOUT and `pg_timeout` per call),
/// succeeding or failing with a message naming the connection, and a failed run lists no
/// backup; with the faults off the next run completes, and the newest backup restores equal to
/// the source.
#[test]
fn backup_push_through_a_faulty_sql_connection() {
    let env = TestEnv::new("faults-sql");
    let (_repo, wv, source) = crate::recover::archiving_source(&env, RepoKind::Local);
    source.psql("INSERT INTO t (client) SELECT 1 FROM generate_series(1, 5000)");
    let proxy = Proxy::start(
        &format!("127.0.0.1:{}", source.port()),
        Schedule {
            seed: 0x5eed_0005,
            per_mille: 1000,
            faults: STREAM_FAULTS.to_vec(),
            // The session's whole conversation is a few KiB: faults land anywhere in it.
            max_offset: 4 << 10,
            stall: Duration::from_secs(8),
            spare_first: 0,
        },
    );
    let port = proxy.port().to_string();
    let datadir = source.datadir().to_str().unwrap().to_owned();
    let sql_env = [
        ("PGHOST", "127.0.0.1"),
        ("PGPORT", port.as_str()),
        ("PGUSER", "postgres"),
        ("PGDATABASE", "postgres"),
        ("PGDATA", datadir.as_str()),
        ("PGCONNECT_TIMEOUT", "3"),
        ("WALVAULT_PG_TIMEOUT", "3s"),
    ];
    // Connecting, the server facts, start, stop: a handful of bounded calls, each retried over
    // libpq's host list at most once, plus reading a small cluster.
    let bound = Duration::from_secs(60);
    let before = crate::backup::backup_list(&wv).len();
    let (mut failed, mut over_bound) = (0, 0);
    for run in 0..6 {
        let started = Instant::now();
        let out = wv.run_with_env(&["backup-push", "--full"], &sql_env);
        if started.elapsed() > bound {
            over_bound += 1;
        }
        let listed = crate::backup::backup_list(&wv).len();
        if out.code() == Some(0) {
            assert_eq!(listed, before + run - failed + 1, "{out}");
        } else {
            failed += 1;
            assert_eq!(
                listed,
                before + run + 1 - failed,
                "a failed backup is listed\n{out}"
            );
            out.assert_stderr_contains("127.0.0.1");
        }
    }
    let stats = proxy.stats();
    record(
        "backup-push through a faulty SQL connection",
        RepoKind::Local,
        &[&stats],
        0,
        over_bound,
        0,
    );
    assert_eq!(over_bound, 0, "a backup-push ran past {bound:?}");
    assert!(failed > 0, "no fault broke a session: {stats}");
    proxy.set_enabled(false);
    wv.run_with_env(&["backup-push", "--full"], &sql_env)
        .assert_success();
    wv.run(&["verify"]).assert_success();
    std::thread::sleep(Duration::from_millis(1100));
    let expected = crate::recover::ids(&source, "");
    let newest = crate::backup::backup_list(&wv).pop().unwrap().name;
    let (restored, out) = crate::recover::recover_and_start(
        &env,
        &wv,
        "restored",
        &["--backup", &newest, "--target-immediate"],
    );
    assert_eq!(crate::recover::ids(&restored, ""), expected, "{out}");
}
