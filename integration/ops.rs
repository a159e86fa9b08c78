//! Operations on a live setup: `check` green on a good one, warnings only on a standby, and red,
//! with the reason, when archiving fails, when the repository holds another cluster and when the
//! newest backup is too old; `metrics` and `status` against backup-list and the source's last commit; drills that pass,
//! that fail (a corrupted pack, a missing segment) leaving nothing running and no scratch behind,
//! and a random-time drill compared with the source's commit timestamps; hooks' JSON.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{
    repo_kind_tests, Cluster, ClusterConfig, RepoKind, RunOutput, TestEnv, Walvault,
};

repo_kind_tests!(
    check_is_green_then_red_with_the_reason,
    metrics_match_backup_list_and_the_window,
    drills_pass_and_fail_cleanly,
    a_random_time_drill_is_exact,
);

/// The libpq environment that reaches `cluster` (socket in the test directory).
fn pg_env(env: &TestEnv, cluster: &Cluster) -> Vec<(&'static str, String)> {
    vec![
        ("PGHOST", env.path().to_str().unwrap().to_owned()),
        ("PGPORT", cluster.port().to_string()),
        ("PGUSER", "postgres".to_owned()),
        ("PGDATABASE", "postgres".to_owned()),
        ("PGDATA", cluster.datadir().to_str().unwrap().to_owned()),
    ]
}

fn run_pg(wv: &Walvault, env: &TestEnv, cluster: &Cluster, args: &[&str]) -> RunOutput {
    run_pg_with(wv, env, cluster, args, &[])
}

fn run_pg_with(
    wv: &Walvault,
    env: &TestEnv,
    cluster: &Cluster,
    args: &[&str],
    extra: &[(&str, &str)],
) -> RunOutput {
    let vars = pg_env(env, cluster);
    let mut envs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    envs.extend_from_slice(extra);
    wv.run_with_env(args, &envs)
}

/// A source archiving with `wv` (small segments, commit timestamps), a table `t` and a backup.
fn source(env: &TestEnv, wv: &Walvault, name: &str) -> Cluster {
    let cluster = env.cluster(
        ClusterConfig::new(name)
            .wal_segsize_mb(1)
            .set("track_commit_timestamp", "on")
            .set("autovacuum", "off")
            .archive_with(wv),
    );
    cluster.psql("CREATE TABLE t (id serial PRIMARY KEY, client int, pad text)");
    cluster.psql(
        "INSERT INTO t (client, pad) SELECT 0, repeat('x', 3000) FROM generate_series(1, 50)",
    );
    run_pg(wv, env, &cluster, &["backup-push"]).assert_success();
    // Backup stop times are whole seconds: targets a second past are trusted by the planner.
    std::thread::sleep(Duration::from_millis(1100));
    cluster
}

fn archive_everything(cluster: &Cluster) -> String {
    let segment = cluster.switch_wal();
    cluster.wait_for_archived(&segment, Duration::from_secs(60));
    segment
}

fn json(out: &RunOutput) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// The verdict `check --json` gave `name`, and its message.
fn verdict<'a>(report: &'a Value, name: &str) -> (&'a str, &'a str) {
    let line = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"));
    (
        line["verdict"].as_str().unwrap(),
        line["message"].as_str().unwrap(),
    )
}

fn check_is_green_then_red_with_the_reason(kind: RepoKind) {
    let env = TestEnv::new("ops-check");
    let repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let cluster = source(&env, &wv, "src");
    archive_everything(&cluster);

    let hook_out = env.path().join("hook.json");
    let hook = format!(
        "{{ echo \"$WALVAULT_EVENT $WALVAULT_STATUS\"; cat; }} > {}",
        hook_out.display()
    );
    let out = run_pg_with(
        &wv,
        &env,
        &cluster,
        &["check"],
        &[
            ("WALVAULT_HOOKS_ON_SUCCESS", &hook),
            ("WALVAULT_HOOKS_ON_FAILURE", &hook),
        ],
    );
    out.assert_code(0);
    for name in [
        "connect",
        "settings",
        "identity",
        "wal-switch",
        "backup-age",
        "archive-lag",
        "wal-continuity",
    ] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with("OK") && l.contains(name)),
            "{name} not OK:\n{out}"
        );
    }
    // The hook got the report on stdin and the event in its environment.
    let hooked = std::fs::read_to_string(&hook_out).unwrap();
    let (first, rest) = hooked.split_once('\n').unwrap();
    assert_eq!(first, "check success");
    let report: Value = serde_json::from_str(rest).unwrap();
    assert_eq!(report["status"], "OK", "{report:#}");

    // A standby (archive_mode=on copied from the primary): no forced switch, a warning that it
    // does not archive itself, everything else OK: exit 3, warnings only.
    let standby_dir = env.path().join("standby");
    cluster.pg_basebackup(&standby_dir, &["-R", "-X", "stream"]);
    let mut standby = env.cluster_from_copy(ClusterConfig::new("standby"), &standby_dir);
    standby.start();
    let out = run_pg(&wv, &env, &standby, &["check", "--json"]);
    out.assert_code(3);
    let report = json(&out);
    assert_eq!(report["status"], "WARN");
    let (v, message) = verdict(&report, "wal-switch");
    assert_eq!(v, "SKIP", "{message}");
    assert!(message.starts_with("standby"), "{message}");
    let (v, message) = verdict(&report, "settings");
    assert_eq!(v, "WARN", "{message}");
    assert!(message.contains("archive_mode=always"), "{message}");
    for name in ["identity", "backup-age", "archive-lag", "wal-continuity"] {
        assert_eq!(verdict(&report, name).0, "OK", "{name}: {report:#}");
    }
    standby.stop();

    // Too old a backup: FAIL, exit 1, and the on_failure hook hears of it.
    let out = run_pg_with(
        &wv,
        &env,
        &cluster,
        &["check", "--json", "--max-backup-age", "1s"],
        &[("WALVAULT_HOOKS_ON_FAILURE", &hook)],
    );
    out.assert_code(1);
    let report = json(&out);
    let (v, message) = verdict(&report, "backup-age");
    assert_eq!(v, "FAIL", "{message}");
    assert!(message.contains("at most 1s allowed"), "{message}");
    assert_eq!(verdict(&report, "wal-switch").0, "OK");
    assert!(std::fs::read_to_string(&hook_out)
        .unwrap()
        .starts_with("check failure\n"));

    // Another cluster's repository: the identity check names both clusters.
    let other_env = TestEnv::new("ops-check-other");
    let other_repo = other_env.repo(kind);
    let other_wv = other_env.walvault(other_repo.config_path());
    let other = other_env.cluster(
        ClusterConfig::new("other")
            .wal_segsize_mb(1)
            .archive_with(&other_wv),
    );
    archive_everything(&other);
    let out = run_pg(
        &other_wv,
        &env,
        &cluster,
        &["check", "--json", "--timeout", "5s"],
    );
    out.assert_code(1);
    let report = json(&out);
    let (v, message) = verdict(&report, "identity");
    assert_eq!(v, "FAIL");
    assert!(
        message.contains("belongs to a different cluster")
            && message.contains(&cluster.system_identifier())
            && message.contains(&other.system_identifier()),
        "{message}"
    );
    // archive_command names the source's own config, so this repository is not the one it uses.
    assert_eq!(verdict(&report, "settings").0, "WARN", "{report:#}");
    assert_eq!(verdict(&report, "wal-switch").0, "SKIP");

    // A failing archive_command: the switched segment never arrives; the check names it and
    // pg_stat_archiver's failure.
    cluster.psql("ALTER SYSTEM SET archive_command = 'false'");
    cluster.psql("SELECT pg_reload_conf()");
    let out = run_pg(&wv, &env, &cluster, &["check", "--json", "--timeout", "3s"]);
    out.assert_code(1);
    let report = json(&out);
    let (v, message) = verdict(&report, "wal-switch");
    assert_eq!(v, "FAIL");
    let segment = message
        .strip_prefix("segment ")
        .and_then(|m| m.split_whitespace().next())
        .unwrap_or_else(|| panic!("{message}"));
    assert_eq!(segment.len(), 24, "{message}");
    assert!(
        message.contains("did not reach the repository within 3s")
            && message.contains(&format!(
                "archive_command is failing on WAL segment {segment}"
            )),
        "{message}"
    );
    assert_eq!(verdict(&report, "settings").0, "WARN");
}

/// A sample's value in a Prometheus page (`name` with its labels, as printed).
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn rfc3339_seconds(text: &str) -> f64 {
    let t = humantime::parse_rfc3339_weak(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn metrics_match_backup_list_and_the_window(kind: RepoKind) {
    let env = TestEnv::new("ops-metrics");
    let repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let cluster = source(&env, &wv, "src");
    cluster.psql("INSERT INTO t (client) VALUES (1)");
    // backup-push runs its hook with the backup's JSON.
    let hook_out = env.path().join("hook.json");
    let hook = format!(
        "{{ echo \"$WALVAULT_EVENT $WALVAULT_STATUS\"; cat; }} > {}",
        hook_out.display()
    );
    run_pg_with(
        &wv,
        &env,
        &cluster,
        &["backup-push"],
        &[("WALVAULT_HOOKS_ON_SUCCESS", &hook)],
    )
    .assert_success();
    let hooked = std::fs::read_to_string(&hook_out).unwrap();
    let (first, rest) = hooked.split_once('\n').unwrap();
    assert_eq!(first, "backup-push success");
    let hooked: Value = serde_json::from_str(rest).unwrap();
    assert_eq!(hooked["backup"]["type"], "delta", "{hooked:#}");
    cluster.psql("INSERT INTO t (client) VALUES (2)");
    // Its last commit is in the segment it switches away from.
    let last_segment = archive_everything(&cluster);
    let last_commit: f64 = cluster
        .psql("SELECT extract(epoch FROM (pg_last_committed_xact()).timestamp)")
        .parse()
        .unwrap();

    let out = wv.run(&["metrics"]);
    out.assert_success();
    let page = &out.stdout;
    let listed = json(&wv.run(&["backup-list", "--json"]));
    let listed = listed.as_array().unwrap();
    let of = |t: &str| listed.iter().filter(|b| b["type"] == t).collect::<Vec<_>>();
    for t in ["full", "delta"] {
        assert_eq!(
            sample(page, &format!("walvault_backups{{type=\"{t}\"}}")),
            Some(of(t).len() as f64),
            "{page}"
        );
        let newest = of(t).last().unwrap()["stop_time"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            sample(
                page,
                &format!("walvault_backup_last_timestamp_seconds{{type=\"{t}\"}}")
            ),
            Some(rfc3339_seconds(&newest)),
            "{page}"
        );
    }
    let newest = listed.last().unwrap();
    for kind in ["original", "stored"] {
        assert_eq!(
            sample(
                page,
                &format!("walvault_backup_last_size_bytes{{kind=\"{kind}\"}}")
            ),
            newest[format!("{kind}_size")].as_f64(),
            "{page}"
        );
    }
    // The window: from the oldest backup's end to the last commit archived.
    let oldest = listed[0]["stop_time"].as_str().unwrap();
    assert_eq!(
        sample(page, "walvault_recovery_window_start_timestamp_seconds"),
        Some(rfc3339_seconds(oldest))
    );
    let end = sample(page, "walvault_recovery_window_end_timestamp_seconds").unwrap();
    assert!(
        (end - last_commit).abs() < 1e-5,
        "{end} vs {last_commit}\n{page}"
    );
    let archived = sample(page, "walvault_wal_last_archived_timestamp_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(archived <= now && now - archived < 120.0, "{archived}");
    let wal_objects = repo
        .objects()
        .iter()
        .filter(|k| k.starts_with("wal/") && !k.contains('.'))
        .count();
    assert_eq!(
        sample(page, "walvault_repository_objects{kind=\"wal\"}"),
        Some(wal_objects as f64),
        "{page}"
    );
    assert!(page.contains("# TYPE walvault_repository_size_bytes gauge"));
    // No drill yet: no drill series rather than made-up ones.
    assert_eq!(sample(page, "walvault_drill_last_success"), None);

    let status = json(&wv.run(&["status", "--json"]));
    assert_eq!(status["backups"]["full"], 1);
    assert_eq!(status["backups"]["delta"], 1);
    assert_eq!(
        status["repository"]["system_identifier"],
        cluster.system_identifier()
    );
    assert_eq!(status["wal"]["newest_segment"], last_segment, "{status:#}");
    assert!(status.get("retention").is_none());

    let listed_delta = of("delta")[0]["name"].clone();
    assert_eq!(hooked["backup"]["name"], listed_delta);

    // Served over HTTP too.
    let port = crate::harness::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut served = wv.spawn(&["metrics", "--listen", &addr], &[]);
    served.wait_for_stderr("metrics on http://", Duration::from_secs(30));
    let page = http_get(&addr);
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.contains("walvault_backups{type=\"full\"} 1"), "{page}");
    served.kill();
}

fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    socket.read_to_string(&mut page).unwrap();
    page
}

/// Runs a drill into `scratch` with its socket in the test directory.
fn drill(env: &TestEnv, wv: &Walvault, scratch: &Path, extra: &[&str]) -> RunOutput {
    let port = crate::harness::free_port().to_string();
    let mut args = vec![
        "drill",
        "--json",
        "--scratch",
        scratch.to_str().unwrap(),
        "--port",
        &port,
        "--socket-dir",
        env.path().to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = wv.run(&args);
    // Nothing left behind, pass or fail: no scratch, no server socket.
    assert!(
        !scratch.exists(),
        "scratch {} left behind\n{out}",
        scratch.display()
    );
    assert!(
        !env.path().join(format!(".s.PGSQL.{port}")).exists(),
        "a scratch server still runs on {port}\n{out}"
    );
    out
}

fn drills_pass_and_fail_cleanly(kind: RepoKind) {
    let env = TestEnv::new("ops-drill");
    let repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let cluster = source(&env, &wv, "src");
    cluster.psql("CREATE INDEX ON t (client)");
    cluster.psql("INSERT INTO t (client) VALUES (7)");
    archive_everything(&cluster);
    let rows = cluster.psql("SELECT count(*) FROM t");

    let out = drill(
        &env,
        &wv,
        &env.path().join("scratch1"),
        &["--latest", "--check-sql", "SELECT count(*) FROM t"],
    );
    out.assert_success();
    let report = json(&out);
    assert_eq!(report["success"], true, "{report:#}");
    assert_eq!(
        report["check_sql"][0]["rows"][0],
        rows.as_str(),
        "{report:#}"
    );
    let postgres = report["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "postgres")
        .unwrap();
    assert!(
        postgres["btree_indexes_checked"].as_u64().unwrap() >= 2,
        "{report:#}"
    );
    assert!(
        postgres["bytes_read"].as_u64().unwrap() >= 150_000,
        "{report:#}"
    );
    assert!(report["rto_seconds"].as_f64().unwrap() > 0.0);
    let key = report["key"].as_str().unwrap();
    assert!(repo.objects().iter().any(|k| k == key), "{key} not stored");
    let page = wv.run(&["metrics"]).stdout;
    assert_eq!(
        sample(&page, "walvault_drill_last_success"),
        Some(1.0),
        "{page}"
    );

    // A check query returning nothing fails the drill.
    std::thread::sleep(Duration::from_millis(1100));
    let out = drill(
        &env,
        &wv,
        &env.path().join("scratch2"),
        &["--check-sql", "SELECT 1 WHERE false"],
    );
    out.assert_code(1);
    assert!(json(&out)["failures"][0]
        .as_str()
        .unwrap()
        .contains("SELECT 1 WHERE false"));

    // A corrupted pack: the restore fails, named.
    let pack = repo
        .objects()
        .into_iter()
        .find(|k| k.contains("/packs/"))
        .unwrap();
    let original = repo.read(&pack);
    repo.corrupt(&pack, original.len() / 2);
    std::thread::sleep(Duration::from_millis(1100));
    let out = drill(&env, &wv, &env.path().join("scratch3"), &[]);
    out.assert_code(1);
    let report = json(&out);
    assert_eq!(report["success"], false);
    let failure = report["failures"][0].as_str().unwrap();
    assert!(failure.starts_with("restoring base_"), "{failure}");
    let page = wv.run(&["metrics"]).stdout;
    assert_eq!(
        sample(&page, "walvault_drill_last_success"),
        Some(0.0),
        "{page}"
    );
    let status = wv.run(&["status"]).stdout;
    assert!(
        status.contains("last drill:") && status.contains("FAILED"),
        "{status}"
    );
    repo.write(&pack, original);

    // A missing segment after the backups: recovery to the end cannot pass it.
    let segments: Vec<String> = repo
        .wal_files()
        .into_iter()
        .filter(|n| n.len() == 24)
        .collect();
    let gap = &segments[segments.len() - 2];
    repo.delete(&format!("wal/{gap}"));
    std::thread::sleep(Duration::from_millis(1100));
    let out = drill(&env, &wv, &env.path().join("scratch4"), &[]);
    out.assert_code(1);
    let failure = json(&out)["failures"][0].as_str().unwrap().to_owned();
    assert!(failure.contains(gap.as_str()), "{failure}");
}

fn a_random_time_drill_is_exact(kind: RepoKind) {
    let env = TestEnv::new("ops-drill-random");
    let repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let cluster = source(&env, &wv, "src");
    // Commits spread over a few seconds, so a random instant falls among them.
    for i in 0..30 {
        cluster.psql(&format!("INSERT INTO t (client) VALUES ({i})"));
        std::thread::sleep(Duration::from_millis(100));
    }
    archive_everything(&cluster);
    let ids = "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t";
    let out = drill(
        &env,
        &wv,
        &env.path().join("scratch"),
        &["--random-time", "--check-sql", ids],
    );
    let report = json(&out);
    out.assert_success();
    let target = report["target_time"].as_str().unwrap();
    let expected = cluster.psql(&format!(
        "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t \
         WHERE pg_xact_commit_timestamp(xmin) <= '{target}'"
    ));
    assert_eq!(
        report["check_sql"][0]["rows"][0].as_str().unwrap(),
        expected,
        "rows at {target}: {report:#}"
    );
}
