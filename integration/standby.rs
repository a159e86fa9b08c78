//! Backups from a streaming standby: full and delta backups taken on a standby (made with
//! `pg_basebackup -R` of a primary archiving with walvault) while pgbench writes on the primary,
//! deltas whose parent was taken on the other server, each restored and recovered to a time
//! after it (rows compared with the primary's commit timestamps); and the bounded failure when
//! the primary does not archive.

use std::time::{Duration, Instant};

use crate::harness::{
    repo_kind_tests, wait_until, Cluster, ClusterConfig, RepoKind, TestEnv, Walvault,
};

repo_kind_tests!(
    standby_backups_restore_exactly,
    standby_backup_fails_in_bound_without_archiving
);

/// A primary (small segments, commit timestamps, no autovacuum) archiving with `wv` when given.
fn primary_config(wv: Option<&Walvault>) -> ClusterConfig {
    let config = ClusterConfig::new("primary")
        .wal_segsize_mb(1)
        .set("track_commit_timestamp", "on")
        .set("autovacuum", "off")
        .set("wal_level", "replica");
    match wv {
        Some(wv) => config.archive_with(wv),
        None => config,
    }
}

/// A streaming standby of `primary`: `pg_basebackup -R`, started, replaying.
fn standby_of(env: &TestEnv, primary: &Cluster) -> Cluster {
    let dir = env.path().join("standby");
    primary.pg_basebackup(&dir, &["-R", "-X", "stream"]);
    let mut standby = env.cluster_from_copy(ClusterConfig::new("standby"), &dir);
    standby.start();
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    standby
}

/// libpq settings reaching `cluster` over the test's socket directory.
fn conninfo(env: &TestEnv, cluster: &Cluster) -> String {
    format!(
        "host={} port={} user=postgres dbname=postgres",
        env.path().display(),
        cluster.port()
    )
}

/// `backup-push <extra>` against `cluster`'s server and data directory.
fn push(
    env: &TestEnv,
    wv: &Walvault,
    cluster: &Cluster,
    extra: &[&str],
) -> crate::harness::RunOutput {
    let mut args = vec!["backup-push"];
    args.extend_from_slice(extra);
    wv.run_with_env(
        &args,
        &[
            ("PGHOST", env.path().to_str().unwrap()),
            ("PGPORT", &cluster.port().to_string()),
            ("PGUSER", "postgres"),
            ("PGDATABASE", "postgres"),
            ("PGDATA", cluster.datadir().to_str().unwrap()),
        ],
    )
}

#[derive(Debug, serde::Deserialize)]
struct Listed {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    parent: Option<String>,
}

fn newest_backup(wv: &Walvault) -> Listed {
    let out = wv.run(&["backup-list", "--json"]);
    out.assert_success();
    let mut listed: Vec<Listed> =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("backup-list: {e}\n{out}"));
    listed.pop().expect("a backup")
}

/// Waits until the standby has replayed everything the primary has written so far.
fn wait_for_replay(primary: &Cluster, standby: &Cluster) {
    let lsn = primary.psql("SELECT pg_current_wal_lsn()");
    wait_until("the standby to replay", Duration::from_secs(60), || {
        standby.psql(&format!(
            "SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
        )) == "t"
    });
}

/// One fingerprint of every table the test writes.
fn fingerprint(cluster: &Cluster, t_filter: &str) -> String {
    cluster.psql(&format!(
        "SELECT (SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a) || ' ' || \
         (SELECT md5(coalesce(string_agg(h::text, ',' ORDER BY h::text), '')) FROM pgbench_history h) || ' ' || \
         (SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t {t_filter})"
    ))
}

/// Runs pgbench on `primary` for a few seconds while `during` runs.
fn under_load<T>(primary: &Cluster, during: impl FnOnce() -> T) -> T {
    std::thread::scope(|s| {
        let load = s.spawn(|| primary.pgbench(&["-n", "-c", "2", "-T", "6"]));
        let result = during();
        load.join().expect("pgbench thread");
        result
    })
}

/// A full and a delta from the standby under load (the delta's parent taken on the primary, and
/// a later delta on the primary whose parent was taken on the standby); each restores and
/// recovers to a time after it exactly.
fn standby_backups_restore_exactly(kind: RepoKind) {
    let env = TestEnv::new("standby-backups");
    let repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let primary = env.cluster(primary_config(Some(&wv)));
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    primary.psql("CREATE TABLE t (id serial PRIMARY KEY, at text)");
    let standby = standby_of(&env, &primary);
    let primary_info = conninfo(&env, &primary);
    let from_standby = ["--primary-conninfo", primary_info.as_str()];

    push(&env, &wv, &primary, &["--full"]).assert_success();
    let primary_full = newest_backup(&wv);
    // A checkpoint after it, replayed by the standby, gives the standby's backup a start (its
    // restartpoint) after the primary backup's stop: a delta can build on it.
    primary.psql("CHECKPOINT");
    wait_for_replay(&primary, &standby);

    let mut taken = Vec::new();
    for extra in [&[][..], &["--full"][..]] {
        let mut args = from_standby.to_vec();
        args.extend_from_slice(extra);
        let out = under_load(&primary, || push(&env, &wv, &standby, &args));
        out.assert_success();
        taken.push(newest_backup(&wv));
        std::thread::sleep(Duration::from_millis(1100)); // whole-second stop times
    }
    let (standby_delta, standby_full) = (&taken[0], &taken[1]);
    assert_eq!(standby_delta.kind, "delta", "{standby_delta:?}");
    assert_eq!(
        standby_delta.parent.as_deref(),
        Some(primary_full.name.as_str())
    );
    assert_eq!(standby_full.kind, "full");

    // And the other way round: a delta on the primary over the standby's full backup.
    let out = under_load(&primary, || push(&env, &wv, &primary, &[]));
    out.assert_success();
    let primary_delta = newest_backup(&wv);
    assert_eq!(primary_delta.kind, "delta", "{primary_delta:?}");
    assert_eq!(
        primary_delta.parent.as_deref(),
        Some(standby_full.name.as_str())
    );
    std::thread::sleep(Duration::from_millis(1100));

    // The target: a commit after every backup; one more after it, then everything archived.
    primary.psql("INSERT INTO t (at) VALUES ('target')");
    let target = primary.psql(
        "SELECT to_char(max(pg_xact_commit_timestamp(xmin)) AT TIME ZONE 'UTC', \
         'YYYY-MM-DD HH24:MI:SS.US') || 'Z' FROM t",
    );
    let expected = fingerprint(&primary, "");
    primary.psql("INSERT INTO t (at) VALUES ('after')");
    let segment = primary.switch_wal();
    primary.wait_for_archived(&segment, Duration::from_secs(60));
    assert_ne!(expected, fingerprint(&primary, ""));

    for backup in [standby_delta, standby_full, &primary_delta] {
        let dir = env.path().join(format!("r-{}", backup.name));
        let port = crate::harness::free_port().to_string();
        let out = wv.run(&[
            "recover",
            "--pgdata",
            dir.to_str().unwrap(),
            "--backup",
            &backup.name,
            "--target-time",
            &target,
            "--start",
            "--port",
            &port,
            "--socket-dir",
            env.path().to_str().unwrap(),
        ]);
        out.assert_success();
        let mut recovered = env.cluster_from_copy(ClusterConfig::new(&backup.name), &dir);
        recovered.stop();
        recovered.start();
        assert_eq!(
            fingerprint(&recovered, ""),
            expected,
            "recovered from {} to {target}\n{out}",
            backup.name
        );
    }
}

/// A standby whose primary does not archive: backup-push waits for the stop segment within
/// --wal-wait-timeout, then fails naming the segment and the reason.
fn standby_backup_fails_in_bound_without_archiving(kind: RepoKind) {
    let env = TestEnv::new("standby-no-archive");
    let repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let primary = env.cluster(primary_config(None));
    primary.psql("CREATE TABLE t (id int)");
    let standby = standby_of(&env, &primary);
    primary.psql("INSERT INTO t SELECT generate_series(1, 1000)");
    wait_for_replay(&primary, &standby);

    let started = Instant::now();
    let out = push(&env, &wv, &standby, &["--wal-wait-timeout", "4s"]);
    let took = started.elapsed();
    out.assert_failure();
    out.assert_stderr_contains("did not receive WAL segment 00000001");
    out.assert_stderr_contains("within 4s (--wal-wait-timeout)");
    out.assert_stderr_contains("a standby does not archive the primary's WAL");
    assert!(took < Duration::from_secs(60), "took {took:?}\n{out}");
    assert!(
        !repo.keys().iter().any(|k| k.ends_with("/manifest")),
        "no backup may exist: {:?}",
        repo.keys()
    );
}
