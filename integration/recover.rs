//! Point-in-time recovery: the WAL record reader checked record for record against `pg_waldump`
//! on real WAL; the per-segment summaries wal-push stores for the planner; `walvault recover`
//! to times (compared row for row with the source's commit timestamps), LSNs, restore points and
//! the end of a backup; and its refusals, each before anything is written to the target.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use walvault_wal::{
    Lsn, RecordReader, SegmentName, TargetEvent, WalFileName, WalSegmentSize, XactEnd,
};

use crate::harness::cmd::run_bounded;
use crate::harness::repo::toml_str;
use crate::harness::s3::{self, REGION};
use crate::harness::{
    free_port, repo_kind_tests, wait_until, Cluster, ClusterConfig, ConfigFile, Repo, RepoKind,
    RunOutput, TestEnv, Walvault,
};

repo_kind_tests!(
    summaries_are_stored_on_push,
    recover_to_times_exactly,
    recover_to_lsn_xid_name_and_immediate,
    recover_across_a_timeline_switch,
    recover_start_fails_when_wal_fetch_fails,
    recover_from_a_delta_chain,
    recover_refusals,
    recover_start_fails_when_target_not_reached,
);

const SEGSIZE_MB: u32 = 1;

fn seg_size() -> WalSegmentSize {
    WalSegmentSize::new(u64::from(SEGSIZE_MB) << 20).unwrap()
}

/// Commits, aborts, a prepared transaction committed and one rolled back, a restore point, rows
/// large enough to span WAL pages, and full-page images after a checkpoint.
fn varied_workload(cluster: &Cluster) {
    cluster.psql("CREATE TABLE t (id int, pad text)");
    cluster.psql("INSERT INTO t SELECT g, repeat('x', 300) FROM generate_series(1, 2000) g");
    cluster.psql("INSERT INTO t VALUES (0, repeat(md5('a'), 500))");
    cluster.psql("BEGIN; INSERT INTO t VALUES (-1, 'gone'); ROLLBACK");
    cluster.psql("BEGIN; INSERT INTO t VALUES (-2, 'p1'); PREPARE TRANSACTION 'p1'");
    cluster.psql("COMMIT PREPARED 'p1'");
    cluster.psql("BEGIN; INSERT INTO t VALUES (-3, 'p2'); PREPARE TRANSACTION 'p2'");
    cluster.psql("ROLLBACK PREPARED 'p2'");
    cluster.psql("SELECT pg_create_restore_point('before update')");
    cluster.psql("CHECKPOINT");
    cluster.psql("UPDATE t SET pad = pad || 'y' WHERE id % 7 = 0");
    for i in 0..20 {
        cluster.psql(&format!("INSERT INTO t VALUES ({i}, 'small')"));
    }
}

/// A target-relevant record as `pg_waldump` prints it: LSN, kind and time (UTC, microseconds).
type Event = (Lsn, String, String);

/// The commit/abort/restore-point records `pg_waldump` finds starting in `segment`, leaving out
/// one that continues into the next segment (the reader skips those by design), and the number
/// of records it printed.
fn waldump_events(cluster: &Cluster, segment: &Path, seg_end: Lsn) -> (Vec<Event>, usize) {
    let out = run_bounded(
        Command::new(cluster.install().program("pg_waldump"))
            .arg(segment)
            .env("TZ", "UTC"),
        Duration::from_secs(60),
    );
    let mut events = Vec::new();
    let mut records = 0;
    for line in out.stdout.lines().filter(|l| l.starts_with("rmgr:")) {
        let field = |name: &str| {
            let rest = &line[line
                .find(name)
                .unwrap_or_else(|| panic!("{name} in {line}"))
                + name.len()..];
            rest.split(',').next().unwrap().trim().to_string()
        };
        let lsn: Lsn = field("lsn: ").parse().unwrap();
        let tot: u64 = field("len (rec/tot): ")
            .split('/')
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        if lsn.0 + tot > seg_end.0 {
            continue;
        }
        records += 1;
        let desc = &line[line.find("desc: ").unwrap() + 6..];
        let (kind, rest) = desc.split_once(' ').unwrap_or((desc, ""));
        let kind = kind.trim_end_matches(';');
        let time = |s: &str| {
            s.split(" UTC")
                .next()
                .unwrap()
                .trim_start_matches(|c: char| !c.is_ascii_digit())
                .to_string()
        };
        if line.starts_with("rmgr: Transaction")
            && ["COMMIT", "ABORT", "COMMIT_PREPARED", "ABORT_PREPARED"].contains(&kind)
        {
            // COMMIT_PREPARED/ABORT_PREPARED print the prepared xid before the time.
            let rest = if kind.ends_with("_PREPARED") {
                rest.split_once(": ").map_or(rest, |(_, t)| t)
            } else {
                rest
            };
            events.push((lsn, kind.to_string(), time(rest)));
        } else if kind == "RESTORE_POINT" {
            events.push((lsn, format!("RESTORE_POINT {}", rest.trim()), String::new()));
        }
    }
    (events, records)
}

fn utc_micros(unix_micros: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_micros(u64::try_from(unix_micros).unwrap());
    humantime::format_rfc3339_micros(time)
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}

fn reader_events(segment: &[u8], start: Lsn) -> (Vec<Event>, usize) {
    let mut events = Vec::new();
    let mut records = 0;
    for record in RecordReader::new(segment, start).unwrap() {
        let record = record.unwrap();
        records += 1;
        match record.target_event() {
            Some(TargetEvent::XactEnd { kind, time, .. }) => {
                let kind = match kind {
                    XactEnd::Commit => "COMMIT",
                    XactEnd::Abort => "ABORT",
                    XactEnd::CommitPrepared => "COMMIT_PREPARED",
                    XactEnd::AbortPrepared => "ABORT_PREPARED",
                };
                events.push((record.lsn, kind.to_string(), utc_micros(time.unix_micros())));
            }
            Some(TargetEvent::RestorePoint { name, .. }) => {
                events.push((record.lsn, format!("RESTORE_POINT {name}"), String::new()));
            }
            None => {}
        }
    }
    (events, records)
}

#[test]
fn record_reader_matches_pg_waldump() {
    let env = TestEnv::new("recover-waldump");
    let cluster = env.cluster(
        ClusterConfig::new("src")
            .wal_segsize_mb(SEGSIZE_MB)
            .set("max_prepared_transactions", "4")
            .set("wal_keep_size", "64MB")
            .set("autovacuum", "off"),
    );
    let dir = env.mkdir("segments");
    let first = cluster.switch_wal_and_copy(&dir);
    varied_workload(&cluster);
    let last = cluster.switch_wal_and_copy(&dir);
    let first: SegmentName = segment_name(&first);
    let last: SegmentName = segment_name(&last);
    let mut seg = first.next(seg_size()).unwrap();
    let mut kinds = BTreeSet::new();
    let mut checked = 0;
    // Every segment the workload filled, read in pg_wal (wal_keep_size keeps them there), where
    // pg_waldump also finds the next segment of a record that crosses the boundary.
    while seg <= last {
        let path = cluster.wal_dir().join(seg.to_string());
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let start = seg.start_lsn(seg_size()).unwrap();
        let end = seg.next(seg_size()).unwrap().start_lsn(seg_size()).unwrap();
        let (ours, our_records) = reader_events(&bytes, start);
        let (theirs, their_records) = waldump_events(&cluster, &path, end);
        assert_eq!(ours, theirs, "events of {seg}");
        assert_eq!(our_records, their_records, "record count of {seg}");
        kinds.extend(
            ours.iter()
                .map(|e| e.1.split(' ').next().unwrap().to_string()),
        );
        checked += 1;
        seg = seg.next(seg_size()).unwrap();
    }
    assert!(checked >= 2, "only {checked} segments checked");
    let expected: BTreeSet<String> = [
        "COMMIT",
        "ABORT",
        "COMMIT_PREPARED",
        "ABORT_PREPARED",
        "RESTORE_POINT",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(kinds, expected, "the workload exercises every kind");
}

fn segment_name(path: &Path) -> SegmentName {
    match path
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .parse::<WalFileName>()
    {
        Ok(WalFileName::Segment(seg)) => seg,
        other => panic!("{} is not a segment: {other:?}", path.display()),
    }
}

#[derive(Debug, serde::Deserialize)]
struct Mark {
    lsn: String,
    time_us: i64,
}

#[derive(Debug, serde::Deserialize)]
struct RestorePoint {
    name: String,
    lsn: String,
}

#[derive(Debug, serde::Deserialize)]
struct Summary {
    last_xact_end: Option<Mark>,
    restore_points: Vec<RestorePoint>,
}

/// The JSON content of an object stored without compression: a 20-byte header, one block framed
/// by two u32 lengths, and an 8-byte trailer.
fn uncompressed_content(object: &[u8]) -> &[u8] {
    &object[28..object.len() - 8]
}

fn summaries_are_stored_on_push(kind: RepoKind) {
    let env = TestEnv::new("recover-summaries");
    let repo = env.repo(kind);
    let config = env.write_config(
        "walvault.toml",
        &repo.config().set("compression", "\"none\""),
    );
    let wv = env.walvault(&config);
    let cluster = env.cluster(source_config(&wv));
    cluster.psql("CREATE TABLE t (id int)");
    let rp_end: Lsn = cluster
        .psql("SELECT pg_create_restore_point('rp-one')")
        .parse()
        .unwrap();
    for i in 0..5 {
        cluster.psql(&format!("INSERT INTO t VALUES ({i})"));
    }
    let last_commit: i64 = cluster
        .psql("SELECT (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::bigint FROM t WHERE id = 4")
        .parse()
        .unwrap();
    let last_lsn: Lsn = cluster
        .psql("SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap();
    let segment = cluster.psql("SELECT pg_walfile_name(pg_switch_wal())");
    cluster.wait_for_archived(&segment, Duration::from_secs(60));

    let wal: Vec<String> = repo
        .wal_files()
        .into_iter()
        .filter(|n| n.len() == 24)
        .collect();
    let summaries: Vec<String> = repo
        .objects()
        .into_iter()
        .filter_map(|k| k.strip_prefix("walsummary/").map(String::from))
        .collect();
    assert_eq!(summaries, wal, "one summary per archived segment");
    assert!(wal.contains(&segment), "{segment} archived: {wal:?}");

    let read = |name: &str| -> Summary {
        let object = repo.read(&format!("walsummary/{name}"));
        serde_json::from_slice(uncompressed_content(&object)).unwrap()
    };
    let last = read(&segment);
    let mark = last.last_xact_end.expect("the last segment holds commits");
    assert_eq!(mark.time_us, last_commit, "last commit time");
    assert!(mark.lsn.parse::<Lsn>().unwrap() < last_lsn);
    let points: Vec<(String, Lsn)> = wal
        .iter()
        .flat_map(|name| read(name).restore_points)
        .map(|rp| (rp.name, rp.lsn.parse().unwrap()))
        .collect();
    assert_eq!(points.len(), 1, "{points:?}");
    assert_eq!(points[0].0, "rp-one");
    assert!(
        points[0].1 < rp_end,
        "restore point starts before its end LSN"
    );
}

/// Small segments, commit timestamps on, no autovacuum transactions, archiving with `wv`.
fn source_config(wv: &Walvault) -> ClusterConfig {
    ClusterConfig::new("src")
        .wal_segsize_mb(SEGSIZE_MB)
        .set("track_commit_timestamp", "on")
        .set("autovacuum", "off")
        .archive_with(wv)
}

/// A source cluster archiving into `kind` with commit timestamps on, and its walvault.
pub(crate) fn archiving_source(env: &TestEnv, kind: RepoKind) -> (Repo, Walvault, Cluster) {
    let repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let cluster = env.cluster(source_config(&wv));
    cluster.psql("CREATE TABLE t (id serial PRIMARY KEY, client int)");
    backup_push(env, &wv, &cluster);
    // Backup stop times are whole seconds, and the planner only trusts times a second past one.
    std::thread::sleep(Duration::from_millis(1100));
    (repo, wv, cluster)
}

fn backup_push(env: &TestEnv, wv: &Walvault, cluster: &Cluster) {
    backup_push_with(env, wv, cluster, &[]).assert_success();
}

/// `backup-push` with more arguments, connected to `cluster`.
pub(crate) fn backup_push_with(
    env: &TestEnv,
    wv: &Walvault,
    cluster: &Cluster,
    args: &[&str],
) -> RunOutput {
    let mut all = vec!["backup-push"];
    all.extend_from_slice(args);
    wv.run_with_env(
        &all,
        &backup_env(env, cluster)
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
    )
}

/// The environment `backup-push` connects to `cluster` with.
pub(crate) fn backup_env(env: &TestEnv, cluster: &Cluster) -> Vec<(&'static str, String)> {
    vec![
        ("PGHOST", env.path().to_str().unwrap().to_owned()),
        ("PGPORT", cluster.port().to_string()),
        ("PGUSER", "postgres".to_owned()),
        ("PGDATABASE", "postgres".to_owned()),
        ("PGDATA", cluster.datadir().to_str().unwrap().to_owned()),
    ]
}

/// Ends the current segment (after one more commit) and waits until it is archived, so the WAL
/// after the workload is in the repository; returns the segment's name.
pub(crate) fn archive_everything(cluster: &Cluster) -> String {
    let segment = cluster.switch_wal();
    cluster.wait_for_archived(&segment, Duration::from_secs(60));
    segment
}

/// `recover --start` into a fresh directory; returns the recovered cluster (promoted, running on
/// a port of its own) and the command's stdout.
pub(crate) fn recover_and_start(
    env: &TestEnv,
    wv: &Walvault,
    name: &str,
    target: &[&str],
) -> (Cluster, String) {
    let dir = env.path().join(name);
    let out = recover_start(env, wv, &dir, target);
    out.assert_success();
    // Adopt the running server so the harness stops it; restart it on the adopted port.
    let mut cluster = env.cluster_from_copy(ClusterConfig::new(name), &dir);
    cluster.stop();
    cluster.start();
    (cluster, out.stdout)
}

/// `recover --pgdata dir <target> --start`, the server on a free port with its socket in the
/// test directory.
pub(crate) fn recover_start(
    env: &TestEnv,
    wv: &Walvault,
    dir: &Path,
    target: &[&str],
) -> RunOutput {
    let port = free_port().to_string();
    let mut args = vec!["recover", "--pgdata", dir.to_str().unwrap()];
    args.extend_from_slice(target);
    args.extend_from_slice(&[
        "--start",
        "--port",
        &port,
        "--socket-dir",
        env.path().to_str().unwrap(),
    ]);
    wv.run(&args)
}

/// The commit time of the newest row of `t` (`filter` chooses rows), UTC with a `Z`.
pub(crate) fn last_commit_time(cluster: &Cluster, filter: &str) -> String {
    cluster.psql(&format!(
        "SELECT to_char(max(pg_xact_commit_timestamp(xmin)) AT TIME ZONE 'UTC', \
         'YYYY-MM-DD HH24:MI:SS.US') || 'Z' FROM t {filter}"
    ))
}

/// Waits until a cluster recovering with `recovery_target_action = pause` is paused at its target
/// (it accepts queries as soon as it is consistent, possibly before).
fn wait_for_pause(cluster: &Cluster) {
    wait_until(
        "recovery to pause at the target",
        Duration::from_secs(60),
        || cluster.psql("SELECT pg_is_wal_replay_paused()") == "t",
    );
}

pub(crate) fn ids(cluster: &Cluster, filter: &str) -> String {
    cluster.psql(&format!(
        "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t {filter}"
    ))
}

fn recover_to_times_exactly(kind: RepoKind) {
    let env = TestEnv::new("recover-times");
    let (_repo, wv, source) = archiving_source(&env, kind);
    // Four autocommit clients inserting concurrently: commit order interleaves.
    let script = env.write_file(
        "insert.sql",
        "INSERT INTO t (client) VALUES (:client_id);\n",
    );
    crate::harness::give_to_postgres(&script);
    source.pgbench(&["-n", "-c", "4", "-t", "50", "-f", script.to_str().unwrap()]);
    // A commit after every target, so each target is reachable.
    source.psql("INSERT INTO t (client) VALUES (-1)");
    archive_everything(&source);

    let commit_times = source.psql(
        "SELECT string_agg(to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), ',' \
         ORDER BY ts) FROM (SELECT pg_xact_commit_timestamp(xmin) ts FROM t) s",
    );
    let commit_times: Vec<&str> = commit_times.split(',').collect();
    let n = commit_times.len();
    // Exact commit times (inclusive targets keep them) in each accepted format, and a random
    // time between commits (printed on failure).
    let random_between = source.psql(&format!(
        "SELECT to_char(('{a}+00'::timestamptz + random() * \
         ('{b}+00'::timestamptz - '{a}+00'::timestamptz)) AT TIME ZONE 'UTC', \
         'YYYY-MM-DD HH24:MI:SS.US')",
        a = commit_times[n / 3],
        b = commit_times[2 * n / 3],
    ));
    let targets = [
        commit_times[n / 4].to_string(),
        format!("{random_between}Z"),
        commit_times[3 * n / 4].replace(' ', "T") + "+00:00",
    ];
    // Exclusive: the transactions ending exactly at the target are left out too.
    let (recovered, stdout) = recover_and_start(
        &env,
        &wv,
        "exclusive",
        &["--target-time", &targets[0], "--exclusive"],
    );
    let expected = ids(
        &source,
        &format!("WHERE pg_xact_commit_timestamp(xmin) < '{}+00'", targets[0]),
    );
    assert_ne!(expected, ids(&source, ""));
    assert_eq!(
        ids(&recovered, ""),
        expected,
        "rows recovered to just before {}\n{stdout}",
        targets[0]
    );
    assert!(stdout.contains("exclusive"), "{stdout}");
    for (i, target) in targets.iter().enumerate() {
        let (recovered, stdout) =
            recover_and_start(&env, &wv, &format!("r{i}"), &["--target-time", target]);
        let utc = target
            .trim_end_matches("+00:00")
            .trim_end_matches('Z')
            .replace('T', " ");
        let expected = ids(
            &source,
            &format!("WHERE pg_xact_commit_timestamp(xmin) <= '{utc}+00'"),
        );
        assert!(!expected.is_empty());
        assert_eq!(
            ids(&recovered, ""),
            expected,
            "rows recovered to {target}\n{stdout}"
        );
        assert!(stdout.contains("promoted"), "{stdout}");
    }
}

fn recover_to_lsn_xid_name_and_immediate(kind: RepoKind) {
    let env = TestEnv::new("recover-targets");
    let (_repo, wv, source) = archiving_source(&env, kind);
    let insert = |n: usize| {
        for _ in 0..n {
            source.psql("INSERT INTO t (client) VALUES (0)");
        }
    };
    insert(5);
    source.psql("SELECT pg_create_restore_point('after five')");
    let at_five = ids(&source, "");
    insert(2);
    let xid = source.psql("INSERT INTO t (client) VALUES (7) RETURNING xmin::text");
    let with_xid = ids(&source, "");
    let before_xid = ids(&source, "WHERE client <> 7");
    insert(3);
    let lsn = source.psql("SELECT pg_current_wal_lsn()");
    let at_lsn = ids(&source, "");
    insert(5);
    archive_everything(&source);

    // Paused at the restore point; readable there, and promoted on resume.
    let (r, out) = recover_and_start(
        &env,
        &wv,
        "by-name",
        &["--target-name", "after five", "--target-action", "pause"],
    );
    assert!(out.contains("paused at the target"), "{out}");
    wait_for_pause(&r);
    assert_eq!(ids(&r, ""), at_five, "{out}");
    r.psql("SELECT pg_wal_replay_resume()");
    r.wait_for_promotion(Duration::from_secs(60));
    assert_eq!(ids(&r, ""), at_five, "{out}");

    let (r, out) = recover_and_start(&env, &wv, "by-lsn", &["--target-lsn", &lsn]);
    assert_eq!(ids(&r, ""), at_lsn, "{out}");
    let (r, out) = recover_and_start(&env, &wv, "by-xid", &["--target-xid", &xid]);
    assert_eq!(ids(&r, ""), with_xid, "{out}");
    let (r, out) = recover_and_start(&env, &wv, "immediate", &["--target-immediate"]);
    assert_eq!(
        ids(&r, ""),
        "",
        "the backup was taken before any row\n{out}"
    );

    // Shut down just before the transaction; started again with pause, it replays to the same
    // point and shows what the shutdown kept.
    let dir = env.path().join("shutdown");
    let out = recover_start(
        &env,
        &wv,
        &dir,
        &[
            "--target-xid",
            &xid,
            "--exclusive",
            "--target-action",
            "shutdown",
        ],
    );
    out.assert_success();
    assert!(out.stdout.contains("shut down at the target"), "{out}");
    assert!(!dir.join("postmaster.pid").exists(), "{out}");
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("postgresql.auto.conf"))
        .unwrap();
    std::io::Write::write_all(&mut conf, b"recovery_target_action = 'pause'\n").unwrap();
    let mut r = env.cluster_from_copy(ClusterConfig::new("shutdown"), &dir);
    r.start();
    wait_for_pause(&r);
    assert_eq!(ids(&r, ""), before_xid, "{out}");
}

/// A full backup and a delta on top: the dry run shows the chain, the download and the settings
/// without writing anything; recovery restores the chain and lands on the target.
fn recover_from_a_delta_chain(kind: RepoKind) {
    let env = TestEnv::new("recover-delta");
    let (_repo, wv, source) = archiving_source(&env, kind);
    source.psql("INSERT INTO t (client) SELECT 1 FROM generate_series(1, 500)");
    backup_push(&env, &wv, &source);
    std::thread::sleep(Duration::from_millis(1100)); // past the delta's whole-second stop time
    source.psql("INSERT INTO t (client) SELECT 2 FROM generate_series(1, 500)");
    let target = last_commit_time(&source, "");
    let expected = ids(&source, "");
    source.psql("INSERT INTO t (client) VALUES (3)");
    archive_everything(&source);

    let dir = env.path().join("delta");
    let dry = wv.run(&[
        "recover",
        "--pgdata",
        dir.to_str().unwrap(),
        "--target-time",
        &target,
        "--dry-run",
    ]);
    dry.assert_success();
    for needle in [
        "chain:    base_",
        "(full) <- base_",
        "(delta)",
        "download: ",
        "recovery_target_time = '",
        "restore_command = '",
        "archive_mode = 'off'",
    ] {
        assert!(dry.stdout.contains(needle), "{needle:?} missing:\n{dry}");
    }
    // Every directory the restore writes below is listed (here, the data directory alone).
    let writes: Vec<&str> = dry
        .stdout
        .lines()
        .filter(|l| l.starts_with("writes below "))
        .collect();
    assert_eq!(
        writes,
        [format!(
            "writes below {} (data directory, to be created, mode 0700)",
            dir.display()
        )],
        "{dry}"
    );
    assert!(!dir.exists(), "a dry run writes nothing");
    let (mut r, out) = recover_and_start(&env, &wv, "delta", &["--target-time", &target]);
    assert_eq!(ids(&r, ""), expected, "{out}");

    // Rewinding in place: the recovered server, promoted to a timeline of its own and given a
    // row of its own, is taken to a later point by `recover --delta` over its data directory.
    let later = last_commit_time(&source, "");
    let later_expected = ids(&source, "");
    let delta_args = ["--target-time", later.as_str(), "--delta"];
    recover_start(&env, &wv, &dir, &delta_args)
        .assert_failure()
        .assert_stderr_contains("postmaster.pid");
    r.psql("INSERT INTO t (client) VALUES (4)");
    r.stop();
    let out = recover_start(&env, &wv, &dir, &delta_args);
    out.assert_success();
    assert!(out.stderr.contains("differ and are written"), "{out}");
    let mut again = env.cluster_from_copy(ClusterConfig::new("delta-again"), &dir);
    again.stop();
    again.start();
    assert_eq!(ids(&again, ""), later_expected, "{out}");
}

/// Every refusal names its reason and the window and leaves the target directory untouched.
fn recover_refusals(kind: RepoKind) {
    let env = TestEnv::new("recover-refusals");
    let (repo, wv, source) = archiving_source(&env, kind);
    let before_backup = "2000-01-01 00:00:00Z";
    for _ in 0..3 {
        source.psql("INSERT INTO t (client) VALUES (0)");
        archive_everything(&source);
    }
    let dir = env.path().join("target");
    let pgdata = dir.to_str().unwrap();
    let refused = |args: &[&str], needle: &str| {
        let mut all = vec!["recover", "--pgdata", pgdata];
        all.extend_from_slice(args);
        let out = wv.run(&all);
        out.assert_failure().assert_stderr_contains(needle);
        out
    };
    let window = "recoverable window: from ";
    refused(
        &["--target-time", before_backup],
        "is before the end of the oldest backup",
    )
    .assert_stderr_contains(window);
    assert!(!dir.exists());
    refused(
        &["--target-time", "2999-01-01 00:00:00Z"],
        "after the last archived transaction end",
    )
    .assert_stderr_contains(window);
    assert!(!dir.exists());
    refused(
        &["--backup", "base_nosuch", "--target-immediate"],
        "not found",
    );
    assert!(!dir.exists());

    // backup-list shows the same window.
    let listed = wv.run(&["backup-list"]);
    listed.assert_success();
    assert!(
        listed
            .stdout
            .contains("recoverable window (latest timeline): from ")
            && listed.stdout.contains("the last archived transaction end"),
        "{listed}"
    );

    // A gap: the planner needs every segment from the backup's start.
    let mut segments: Vec<String> = repo
        .wal_files()
        .into_iter()
        .filter(|n| n.len() == 24)
        .collect();
    segments.sort();
    let middle = segments[segments.len() - 2].clone();
    repo.delete(&format!("wal/{middle}"));
    // The last row's commit is in the newest segment: reaching it needs the deleted one.
    let last_commit = last_commit_time(&source, "");
    refused(&["--target-time", &last_commit], "missing from the archive")
        .assert_stderr_contains(&middle)
        .assert_stderr_contains(window);
    assert!(!dir.exists());

    // A non-empty directory is refused before planning, and left as it was.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keep"), "x").unwrap();
    refused(&["--target-immediate"], "is not empty");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["keep"]);
}

/// Without summaries (segments archived by an older walvault) the planner cannot rule a target
/// out; then `--start` must turn PostgreSQL's "recovery ended before configured recovery target
/// was reached" into a failure.
fn recover_start_fails_when_target_not_reached(kind: RepoKind) {
    let env = TestEnv::new("recover-not-reached");
    let (repo, wv, source) = archiving_source(&env, kind);
    source.psql("INSERT INTO t (client) VALUES (0)");
    archive_everything(&source);
    for key in repo
        .objects()
        .into_iter()
        .filter(|k| k.starts_with("walsummary/"))
    {
        repo.delete(&key);
    }
    let dir = env.path().join("target");
    let target = ["--target-time", "2999-01-01 00:00:00Z"];
    let dry = wv.run(&[
        "recover",
        "--pgdata",
        dir.to_str().unwrap(),
        target[0],
        target[1],
        "--dry-run",
    ]);
    dry.assert_success();
    assert!(dry.stdout.contains("no summary"), "{dry}");
    let out = recover_start(&env, &wv, &dir, &target);
    out.assert_failure()
        .assert_stderr_contains("recovery ended before configured recovery target was reached");
}

/// A backup on timeline 1, a point-in-time recovery that promotes to timeline 2 and archives on
/// into the same repository, then recovery from the timeline-1 backup to a time on timeline 2
/// (the planner must follow `00000002.history` across the switch), to a time on timeline 1
/// before the switch, and along timeline 1 alone to the rows timeline 2 never saw.
fn recover_across_a_timeline_switch(kind: RepoKind) {
    let env = TestEnv::new("recover-timelines");
    let (_repo, wv, mut source) = archiving_source(&env, kind);
    let insert = |cluster: &Cluster, client: i32, n: usize| {
        for _ in 0..n {
            cluster.psql(&format!("INSERT INTO t (client) VALUES ({client})"));
        }
    };
    insert(&source, 1, 3);
    let early = last_commit_time(&source, "");
    let rows_early = ids(&source, "");
    insert(&source, 1, 2);
    source.psql("SELECT pg_create_restore_point('end of one')");
    let rows_one = ids(&source, "");
    // Rows the fork never sees.
    source.psql("INSERT INTO t (client) VALUES (-1)");
    let lost = last_commit_time(&source, "");
    let rows_lost = ids(&source, "");
    archive_everything(&source);
    source.stop();

    // The fork keeps archiving (same archive_command) on timeline 2.
    let (fork, out) = recover_and_start(
        &env,
        &wv,
        "fork",
        &["--target-name", "end of one", "--keep-archive-command"],
    );
    assert_eq!(ids(&fork, ""), rows_one, "{out}");
    assert_eq!(
        fork.psql("SELECT timeline_id FROM pg_control_checkpoint()"),
        "2"
    );
    insert(&fork, 2, 5);
    let last_commit = last_commit_time(&fork, "");
    let rows_two = ids(&fork, "");
    archive_everything(&fork);

    // status shows the window along each timeline: timeline 1 up to where the fork left it.
    let status: serde_json::Value =
        serde_json::from_str(&wv.run(&["status", "--json"]).assert_success().stdout).unwrap();
    assert_eq!(status["window"]["timeline"], 2, "{status:#}");
    let along: Vec<(u64, String)> = status["timelines"]
        .as_array()
        .unwrap_or_else(|| panic!("no timelines in {status:#}"))
        .iter()
        .map(|w| {
            let end = w["end_time"].as_str().unwrap_or_else(|| panic!("{w:#}"));
            (w["timeline"].as_u64().unwrap(), end.replace('T', " "))
        })
        .collect();
    assert_eq!(
        along.iter().map(|w| w.0).collect::<Vec<_>>(),
        [1, 2],
        "{status:#}"
    );
    assert!(
        along[0].1 >= lost,
        "timeline 1 ends at {} before {lost}",
        along[0].1
    );
    assert!(
        along[1].1 >= last_commit,
        "timeline 2 ends at {} before {last_commit}",
        along[1].1
    );

    let (again, out) = recover_and_start(&env, &wv, "again", &["--target-time", &last_commit]);
    assert!(out.contains("timeline: 2"), "{out}");
    assert_eq!(ids(&again, ""), rows_two, "{out}");

    let (r, out) = recover_and_start(&env, &wv, "early", &["--target-time", &early]);
    assert!(out.contains("timeline: 2"), "{out}");
    assert_eq!(ids(&r, ""), rows_early, "{out}");
    let (r, out) = recover_and_start(
        &env,
        &wv,
        "old",
        &["--target-time", &lost, "--target-timeline", "1"],
    );
    assert!(out.contains("timeline: 1"), "{out}");
    assert_eq!(ids(&r, ""), rows_lost, "{out}");
}

/// A corrupt archived segment makes wal-fetch fail (not "not found") in the middle of recovery:
/// `--start` must fail naming the segment, and leave a server that has neither promoted nor
/// kept running at a point short of the target.
fn recover_start_fails_when_wal_fetch_fails(kind: RepoKind) {
    let env = TestEnv::new("recover-fetch-fails");
    let (repo, wv, source) = archiving_source(&env, kind);
    for _ in 0..3 {
        source.psql("INSERT INTO t (client) VALUES (0)");
    }
    let target = last_commit_time(&source, "");
    let segment = archive_everything(&source);
    let key = format!("wal/{segment}");
    let len = repo.read(&key).len();
    repo.corrupt(&key, len / 2);

    let dir = env.path().join("target");
    let out = recover_start(&env, &wv, &dir, &["--target-time", &target]);
    out.assert_failure()
        .assert_stderr_contains(&format!(
            "the server stopped during recovery: fetching {segment} from"
        ))
        .assert_stderr_contains("did not promote");
    assert!(!dir.join("postmaster.pid").exists(), "{out}");
    let control = run_bounded(
        Command::new(source.install().program("pg_controldata")).arg(&dir),
        Duration::from_secs(60),
    );
    assert!(
        control.stdout.contains("in archive recovery"),
        "the cluster must still be in recovery:\n{control}"
    );
}

/// Issue 12, findings 8 and 17: a restore point name holding `\` and `'` reaches PostgreSQL as
/// written, injecting no setting into `postgresql.auto.conf`; and settings `recover` got only from
/// its environment reach the restored cluster's `restore_command` (whose environment lacks them)
/// through `walvault-recovery.toml`, which holds no credentials.
#[test]
fn recover_quotes_names_and_carries_environment_settings() {
    let env = TestEnv::new("recover-carried");
    let (repo, _wv, source) = archiving_source(&env, RepoKind::S3);
    let name = r"x\' restore_command = 'false' #";
    source.psql(&format!(
        "SELECT pg_create_restore_point('{}')",
        name.replace('\'', "''")
    ));
    archive_everything(&source);

    // Credentials in the config file, where to find the server only in the environment.
    let (key_id, secret) = ("AKIDCARRIEDKEY", "CarriedSecretValue");
    let partial = ConfigFile::new(repo.url())
        .set_s3("region", &toml_str(REGION))
        .set_s3("access_key_id", &toml_str(key_id))
        .set_s3("secret_access_key", &toml_str(secret));
    let wv = env.walvault(&env.write_config("partial.toml", &partial));
    let dir = env.path().join("carried");
    let port = free_port().to_string();
    let socket_dir = env.path().to_str().unwrap();
    let args = [
        "recover",
        "--pgdata",
        dir.to_str().unwrap(),
        "--target-name",
        name,
        "--target-action",
        "pause",
        "--start",
        "--port",
        &port,
        "--socket-dir",
        socket_dir,
    ];
    let endpoint = s3::server().endpoint();
    let out = wv.run_with_env(
        &args,
        &[
            ("WALVAULT_S3_ENDPOINT", endpoint),
            ("WALVAULT_S3_FORCE_PATH_STYLE", "true"),
        ],
    );
    out.assert_success();
    let mut recovered = env.cluster_from_copy(ClusterConfig::new("carried"), &dir);
    recovered.stop();
    recovered.start();
    assert_eq!(recovered.psql("SHOW recovery_target_name"), name);
    let restore_command = recovered.psql("SHOW restore_command");
    assert!(
        restore_command.contains("walvault-recovery.toml") && restore_command.ends_with("%f %p"),
        "{restore_command}"
    );

    let carried_path = dir.join("walvault-recovery.toml");
    let carried = std::fs::read_to_string(&carried_path).unwrap();
    assert!(carried.contains(endpoint), "{carried}");
    assert!(
        !carried.contains(secret) && !carried.contains(key_id),
        "{carried}"
    );
    let mode = std::fs::metadata(&carried_path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// `recover --start` without `--port` beside the running source, whose port the restored
/// configuration names: the recovered server gets another, free port, and says which.
#[test]
fn recover_start_without_a_port_does_not_collide_with_the_source() {
    let env = TestEnv::new("recover-free-port");
    let (_repo, wv, source) = archiving_source(&env, RepoKind::Local);
    source.psql("INSERT INTO t (client) VALUES (1)");
    archive_everything(&source);
    let dir = env.path().join("recovered");
    let out = wv.run(&[
        "recover",
        "--pgdata",
        dir.to_str().unwrap(),
        "--start",
        "--socket-dir",
        env.path().to_str().unwrap(),
    ]);
    // Adopted before the assertions, so that dropping it stops the server whatever they say.
    let _recovered = dir
        .join("postgresql.conf")
        .exists()
        .then(|| env.cluster_from_copy(ClusterConfig::new("recovered"), &dir));
    out.assert_success();
    let announced: u16 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("starting PostgreSQL on port "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port announced:\n{out}"));
    assert_ne!(announced, source.port(), "{out}");
    // postmaster.pid's fourth line is the port the server listens on.
    let pid_file = std::fs::read_to_string(dir.join("postmaster.pid")).unwrap();
    assert_eq!(
        pid_file.lines().nth(3),
        Some(announced.to_string().as_str())
    );
    assert_eq!(source.psql("SELECT count(*) FROM t"), "1");
}

/// Visibility map bits cleared by a DELETE change the map page in place, without a new page
/// LSN; a delta by page scan must still store that page, or a restore of it says "all visible"
/// for heap pages with deleted rows, and index-only scans return those rows.
#[test]
fn a_scan_delta_keeps_visibility_map_bits_cleared_without_a_new_lsn() {
    let env = TestEnv::new("delta-visibility-map");
    let (repo, wv, source) = archiving_source(&env, RepoKind::Local);
    source.psql("CREATE EXTENSION pg_visibility");
    source.psql("INSERT INTO t (client) SELECT 1 FROM generate_series(1, 20000)");
    source.psql("VACUUM (FREEZE) t");
    backup_push_with(&env, &wv, &source, &["--delta"]).assert_success();
    // Only the DELETE's heap records change the map now: its pages keep the VACUUM's LSN.
    source.psql("DELETE FROM t WHERE id % 7 = 0");
    // Without summaries the next delta cannot use block maps: it scans pages.
    for key in repo.keys() {
        if key.starts_with("walsummary/") {
            repo.delete(&key);
        }
    }
    backup_push_with(&env, &wv, &source, &["--delta"]).assert_success();
    let listed = crate::backup::backup_list(&wv);
    let newest = listed.last().unwrap();
    assert_eq!(newest.delta_source.as_deref(), Some("scan"), "{listed:?}");
    let expected = source.psql("SELECT count(*) FROM t");

    let (r, out) = recover_and_start(
        &env,
        &wv,
        "restored",
        &["--backup", &newest.name, "--target-immediate"],
    );
    assert_eq!(
        r.psql("SELECT count(*) FROM pg_check_visible('t')"),
        "0",
        "the restored visibility map calls pages with deleted rows all-visible\n{out}"
    );
    let index_only = "SET enable_seqscan = off; SET enable_bitmapscan = off; \
                      SELECT count(*) FROM t WHERE id > 0";
    assert_eq!(r.psql(index_only), expected, "{out}");
}
