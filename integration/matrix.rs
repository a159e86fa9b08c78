//! The version matrix: one smoke scenario per supported PostgreSQL major that crosses every
//! command (archive under load, full and delta backup-push, recover to a time checked against
//! commit timestamps, wal-receive with a tail only it holds served to recovery, verify). One test
//! per major, so a failure names it; majors other than 15 come from integration/run.sh, and the
//! full suite stays on 15 (and 14 for the pre-15 backup API).

use std::fs;
use std::time::Duration;

use crate::backup::{backup_list, backup_push, table_md5s};
use crate::harness::cmd::path_str;
use crate::harness::{
    give_to_postgres, repo_kind_tests, wait_until, Cluster, ClusterConfig, PgInstall, RepoKind,
    TestEnv, Walvault,
};
use crate::recover::recover_start;
use crate::stream::{
    background_pgbench, primary_config, receiver_walvault, start_receiver, wait_child, wait_durable,
};

// Each major runs on one repository kind, alternating, so the matrix covers both without doubling
// its time (every scenario of the full suite runs on both kinds on 15).
#[test]
fn smoke_pg13() {
    smoke(13, RepoKind::S3);
}

#[test]
fn smoke_pg14() {
    smoke(14, RepoKind::Local);
}

#[test]
fn smoke_pg15() {
    smoke(15, RepoKind::S3);
}

#[test]
fn smoke_pg16() {
    smoke(16, RepoKind::Local);
}

#[test]
fn smoke_pg17() {
    smoke(17, RepoKind::S3);
}

#[test]
fn smoke_pg18() {
    smoke(18, RepoKind::Local);
}

repo_kind_tests!(wal_of_a_future_major_is_refused);

/// WAL whose page magic is newer than PostgreSQL 18's (as a future 19 will write) is refused by
/// wal-push, saying so and naming the supported range, and nothing is stored.
fn wal_of_a_future_major_is_refused(kind: RepoKind) {
    let env = TestEnv::new("matrix-future");
    let repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let src = env.cluster(ClusterConfig::new("src"));
    let segment = src.switch_wal_and_copy(&env.mkdir("copies"));
    let mut bytes = fs::read(&segment).unwrap();
    // xlp_magic, the first two bytes of the page header, little-endian: 18's 0xD118 plus two.
    bytes[..2].copy_from_slice(&0xD11Au16.to_le_bytes());
    fs::write(&segment, bytes).unwrap();
    give_to_postgres(&segment);
    wv.wal_push(&segment)
        .assert_failure()
        .assert_stderr_contains("newer than PostgreSQL 18")
        .assert_stderr_contains("13 to 18");
    assert!(repo.wal_files().is_empty(), "{:?}", repo.wal_files());
}

fn smoke(major: u32, kind: RepoKind) {
    let Some(install) = PgInstall::required_or_skip(major) else {
        return;
    };
    let env = TestEnv::new(&format!("matrix-pg{major}"));
    let repo = env.repo(kind);
    let wv = receiver_walvault(&env, &repo);
    let mut src = env.cluster(
        primary_config("src")
            .install(install.clone())
            .set("track_commit_timestamp", "on")
            // Exact time targets: no transactions but the test's own.
            .set("autovacuum", "off")
            .archive_with(&wv),
    );
    let receiver = start_receiver(&env, &wv, &src, &[]);

    // Archive under load, with a full and then a delta backup taken while pgbench (PostgreSQL
    // 15's, against this server) writes.
    src.pgbench(&["-i", "-q", "-s", "1"]);
    let mut load = background_pgbench(&src, 300, 150);
    let history_reaches = |rows: u32| {
        wait_until(
            &format!("pgbench to commit {rows} transactions"),
            Duration::from_secs(120),
            || src.psql(&format!("SELECT count(*) >= {rows} FROM pgbench_history")) == "t",
        )
    };
    history_reaches(300);
    backup_push(&env, &wv, &src, &["--full"]);
    let after_full: u32 = src
        .psql("SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap();
    history_reaches(after_full + 300);
    backup_push(&env, &wv, &src, &[]);
    let still_running = matches!(load.try_wait(), Ok(None));
    load.kill().expect("stop pgbench");
    wait_child(&mut load, Duration::from_secs(60));
    assert!(still_running, "pgbench ended before the backups did");
    let listed = backup_list(&wv);
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(
        (listed[0].kind.as_str(), listed[1].kind.as_str()),
        ("full", "delta")
    );
    assert_eq!(listed[1].parent.as_deref(), Some(listed[0].name.as_str()));
    let archiver = src.psql("SELECT archived_count || ' ' || failed_count FROM pg_stat_archiver");
    let (archived, failed) = archiver.split_once(' ').unwrap();
    assert!(archived.parse::<u32>().unwrap() >= 3, "archived {archived}");
    assert_eq!(failed, "0", "archive_command failed under load");

    // Recovery to a time between commits, from the delta: exactly the rows committed up to it.
    // The planner trusts only times at least a second past a backup's (whole-second) stop time.
    let delta_stop = &listed[1].stop_time;
    wait_until(
        "a second past the delta's stop",
        Duration::from_secs(30),
        || {
            src.psql(&format!(
                "SELECT clock_timestamp() > '{delta_stop}'::timestamptz + interval '1.1 s'"
            )) == "t"
        },
    );
    src.psql("CREATE TABLE t (id serial PRIMARY KEY, client int)");
    let script = env.write_file(
        "insert.sql",
        "INSERT INTO t (client) VALUES (:client_id);\n",
    );
    src.pgbench(&["-n", "-c", "2", "-t", "30", "-f", path_str(&script)]);
    let target = src.psql(
        "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || 'Z' FROM \
         (SELECT pg_xact_commit_timestamp(xmin) ts FROM t ORDER BY 1 OFFSET 30 LIMIT 1) s",
    );
    let up_to_target = ids(
        &src,
        &format!("WHERE pg_xact_commit_timestamp(xmin) <= '{target}'"),
    );
    assert_ne!(up_to_target, ids(&src, ""));
    let segment = src.switch_wal();
    src.wait_for_archived(&segment, Duration::from_secs(120));
    let (at_time, stdout) = recover(&env, &wv, &install, "at-time", &["--target-time", &target]);
    assert_eq!(
        ids(&at_time, ""),
        up_to_target,
        "PostgreSQL {major}: rows recovered to {target}\n{stdout}"
    );
    drop(at_time);

    // A tail only wal-receive holds (fragments of a segment archive_command never saw), then a
    // crash: recovery to the end of the repository's WAL finds every commit.
    src.psql("CREATE TABLE tail AS SELECT 'streamed only' AS note");
    let expected = table_md5s(&src);
    // The insert position, never on a segment boundary: the write position can end a segment
    // exactly, and pg_walfile_name names the segment before a boundary (archived whole).
    let current = src.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    wait_durable(&src, &src.psql("SELECT pg_current_wal_lsn()"));
    src.stop_immediate();
    assert!(
        !repo.wal_files().contains(&current),
        "{current} was archived whole: the tail is not fragment-only"
    );
    assert!(
        repo.objects()
            .iter()
            .any(|k| k.starts_with(&format!("stream/{current}/"))),
        "no fragment of {current} in the repository"
    );
    let (at_end, stdout) = recover(&env, &wv, &install, "at-end", &[]);
    assert_eq!(
        table_md5s(&at_end),
        expected,
        "PostgreSQL {major}: recovery to the end of the streamed WAL\n{stdout}"
    );
    drop(at_end);

    let (status, _) = receiver.terminate(Duration::from_secs(90));
    assert!(status.success(), "wal-receive stopped with {status}");
    wv.run(&["verify"]).assert_success();
}

/// `recover --start` with this major's binaries into `<test dir>/name`; returns the promoted
/// cluster, adopted by the harness (which stops it), and the command's stdout.
fn recover(
    env: &TestEnv,
    wv: &Walvault,
    install: &PgInstall,
    name: &str,
    target: &[&str],
) -> (Cluster, String) {
    let dir = env.path().join(name);
    let mut args = target.to_vec();
    args.extend_from_slice(&["--pg-bin", path_str(install.bindir())]);
    let out = recover_start(env, wv, &dir, &args);
    out.assert_success();
    assert!(out.stdout.contains("promoted"), "{out}");
    let mut cluster =
        env.cluster_from_copy(ClusterConfig::new(name).install(install.clone()), &dir);
    cluster.stop();
    cluster.start();
    (cluster, out.stdout)
}

/// The ids of `t`'s rows that `filter` keeps, in order.
fn ids(cluster: &Cluster, filter: &str) -> String {
    cluster.psql(&format!(
        "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t {filter}"
    ))
}
