//! Base backups end to end: backup-push (full and deltas), backup-fetch of every backup of a
//! chain, recovery from the archive, and the restored data compared with what the source held
//! when each backup was taken; plus the failures a user must get a clear answer to.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{
    give_to_postgres, repo_kind_tests, Cluster, ClusterConfig, PgInstall, Repo, RepoKind, TestEnv,
    Walvault,
};

/// The libpq environment that reaches `cluster` through its socket in the test dir.
pub(crate) fn pg_env<'a>(
    env: &'a TestEnv,
    cluster: &'a Cluster,
    port: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("PGHOST", env.path().to_str().unwrap()),
        ("PGPORT", port),
        ("PGUSER", "postgres"),
        ("PGDATABASE", "postgres"),
        ("PGDATA", cluster.datadir().to_str().unwrap()),
    ]
}

pub(crate) fn backup_push(
    env: &TestEnv,
    wv: &Walvault,
    cluster: &Cluster,
    args: &[&str],
) -> String {
    let port = cluster.port().to_string();
    let mut all = vec!["backup-push"];
    all.extend_from_slice(args);
    let out = wv.run_with_env(&all, &pg_env(env, cluster, &port));
    out.assert_success();
    out.stderr
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct Listed {
    pub(crate) name: String,
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) parent: Option<String>,
    start_time: String,
    pub(crate) stop_time: String,
    start_lsn: String,
    stop_lsn: String,
    timeline: u32,
    original_size: u64,
    stored_size: u64,
    page_checksum_failures: u64,
    /// "wal" or "scan" for a delta.
    #[serde(default)]
    pub(crate) delta_source: Option<String>,
}

pub(crate) fn backup_list(wv: &Walvault) -> Vec<Listed> {
    let out = wv.run(&["backup-list", "--json"]);
    out.assert_success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("backup-list --json: {e}\n{out}"))
}

/// md5 of every user table's rows, by table name.
pub(crate) fn table_md5s(cluster: &Cluster) -> BTreeMap<String, String> {
    let tables = cluster.psql(
        "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND n.nspname = 'public' ORDER BY 1",
    );
    tables
        .lines()
        .map(|t| {
            let md5 = cluster.psql(&format!(
                "SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {t} t"
            ));
            (t.to_string(), md5)
        })
        .collect()
}

/// Checks every B-tree index (with heapallindexed) and returns how many were checked.
pub(crate) fn amcheck(cluster: &Cluster) -> u64 {
    cluster
        .psql(
            "SELECT count(*) FROM (SELECT bt_index_check(c.oid, true) FROM pg_class c \
             JOIN pg_am am ON am.oid = c.relam WHERE am.amname = 'btree' AND c.relkind = 'i' \
             AND c.relpersistence = 'p') s",
        )
        .parse()
        .unwrap()
}

/// Turns data checksums on in a stopped cluster (pg_checksums), so backups verify pages.
pub(crate) fn enable_checksums(cluster: &mut Cluster) {
    cluster.stop();
    let tool = cluster.install().program("pg_checksums");
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(tool);
        c
    } else {
        Command::new(tool)
    };
    let out = cmd
        .args(["--enable", "--no-sync", "-D"])
        .arg(cluster.datadir())
        .output()
        .expect("run pg_checksums");
    assert!(
        out.status.success(),
        "pg_checksums: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.start();
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Restores `name` into a new directory, recovers it to the backup's end with WAL from the
/// archive, and returns the running cluster.
pub(crate) fn restore(
    env: &TestEnv,
    wv: &Walvault,
    name: &str,
    install: &PgInstall,
    tablespace: Option<(&str, &Path)>,
) -> Cluster {
    let dir = env.unique_dir("restored");
    let mut args = vec![
        "backup-fetch".to_string(),
        name.to_string(),
        dir.display().to_string(),
    ];
    if let Some((oid, ts_dir)) = tablespace {
        args.push("--tablespace".into());
        args.push(format!("{oid}={}", ts_dir.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    wv.run(&args).assert_success();
    assert!(dir.join("backup_label").is_file());
    let config = ClusterConfig::new(dir.file_name().unwrap().to_str().unwrap())
        .install(install.clone())
        .set("archive_mode", "off")
        .set("restore_command", wv.restore_command())
        .set("recovery_target", "immediate")
        .set("recovery_target_action", "promote");
    let mut restored = env.cluster_from_copy(config, &dir);
    restored.touch("recovery.signal");
    restored.start();
    restored.wait_for_promotion(Duration::from_secs(120));
    restored
}

fn backup_chain(kind: RepoKind) {
    let env = TestEnv::new("backup-chain");
    let repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let mut src = env.cluster(ClusterConfig::new("src").archive_with(&wv));
    enable_checksums(&mut src);
    let ts_dir = env.mkdir("ts1");
    src.psql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_dir.display()
    ));
    let ts_oid = src.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'");
    src.psql("CREATE EXTENSION amcheck");
    src.pgbench(&["-i", "-q", "-s", "3"]);
    src.psql(
        "CREATE TABLE t_keep (id int PRIMARY KEY, v text); \
         INSERT INTO t_keep SELECT g, md5(g::text) FROM generate_series(1, 20000) g; \
         CREATE TABLE t_drop AS SELECT g AS id FROM generate_series(1, 5000) g; \
         CREATE TABLE t_trunc (id int PRIMARY KEY, v text); \
         INSERT INTO t_trunc SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g; \
         CREATE TABLE t_ts (id int PRIMARY KEY, v text) TABLESPACE ts1; \
         INSERT INTO t_ts SELECT g, md5(g::text) FROM generate_series(1, 10000) g; \
         CREATE TABLE t_shrink (id int, v text); \
         INSERT INTO t_shrink SELECT g, md5(g::text) FROM generate_series(1, 20000) g; \
         CREATE UNLOGGED TABLE t_unlogged AS SELECT g FROM generate_series(1, 1000) g",
    );

    // Set hint bits and visibility first: with data checksums the first hint-bit write to a
    // page after a checkpoint is WAL-logged, which would make every page read after the full
    // backup count as changed.
    src.psql("VACUUM (FREEZE, ANALYZE)");
    let mut expected = vec![table_md5s(&src)];
    backup_push(&env, &wv, &src, &[]);

    // A few percent of pgbench_accounts' pages and some rows elsewhere.
    src.pgbench(&["-n", "-c", "1", "-t", "300", "-b", "simple-update"]);
    src.psql(
        "UPDATE t_keep SET v = 'one' WHERE id % 100 = 0; UPDATE t_ts SET v = 'one' WHERE id < 50",
    );
    expected.push(table_md5s(&src));
    backup_push(&env, &wv, &src, &[]);

    src.psql(
        "CREATE TABLE t_new (id int PRIMARY KEY, v text); \
         INSERT INTO t_new SELECT g, md5(g::text) FROM generate_series(1, 30000) g; \
         INSERT INTO t_ts SELECT g, 'two' FROM generate_series(10001, 12000) g",
    );
    expected.push(table_md5s(&src));
    backup_push(&env, &wv, &src, &[]);

    src.psql("DROP TABLE t_drop; TRUNCATE t_trunc; UPDATE t_keep SET v = 'three' WHERE id % 7 = 0");
    src.psql("INSERT INTO t_trunc VALUES (1, 'after truncate')");
    // VACUUM gives the empty tail of t_shrink back: the same file, shorter.
    let keep_file = src.psql("SELECT pg_relation_filepath('t_shrink')");
    let keep_path = src.datadir().join(&keep_file);
    let before = std::fs::metadata(&keep_path).unwrap().len();
    src.psql("DELETE FROM t_shrink WHERE id > 5000");
    src.psql("VACUUM t_shrink");
    let after = std::fs::metadata(&keep_path).unwrap().len();
    assert!(
        after < before,
        "VACUUM did not shorten {keep_file} ({before} -> {after})"
    );
    expected.push(table_md5s(&src));
    backup_push(&env, &wv, &src, &[]);

    let listed = backup_list(&wv);
    let kinds: Vec<&str> = listed.iter().map(|b| b.kind.as_str()).collect();
    assert_eq!(kinds, ["full", "delta", "delta", "delta"], "{listed:#?}");
    for pair in listed.windows(2) {
        assert_eq!(pair[1].parent.as_deref(), Some(pair[0].name.as_str()));
        assert!(pair[0].start_time <= pair[1].start_time);
        assert!(pair[0].stop_time <= pair[1].stop_time);
    }
    for b in &listed {
        assert_eq!(b.timeline, 1);
        assert!(b.start_lsn.contains('/') && b.stop_lsn.contains('/'));
    }
    let (full, delta) = (&listed[0], &listed[1]);
    assert!(
        delta.stored_size * 5 < full.stored_size,
        "delta after a small workload stored {} bytes, the full backup {}",
        delta.stored_size,
        full.stored_size
    );
    assert!(delta.original_size > full.original_size / 2);

    for (i, backup) in listed.iter().enumerate() {
        let ts_restore = env.path().join(format!("ts-restored-{i}"));
        let restored = restore(
            &env,
            &wv,
            &backup.name,
            src.install(),
            Some((&ts_oid, &ts_restore)),
        );
        assert_eq!(
            table_md5s(&restored),
            expected[i],
            "data restored from {} ({}) differs from the source at that backup",
            backup.name,
            backup.kind
        );
        assert!(amcheck(&restored) > 10);
        // The tablespace came back where it was asked to, with its table.
        assert!(std::fs::read_dir(&ts_restore).unwrap().next().is_some());
        assert_eq!(restored.psql("SELECT count(*) > 0 FROM t_ts"), "t");
        assert_eq!(restored.psql("SELECT count(*) FROM t_unlogged"), "0");
    }
    // LATEST is the newest delta.
    let latest = env.unique_dir("latest");
    let ts_latest = env.path().join("ts-latest");
    let ts_arg = format!("{ts_oid}={}", ts_latest.display());
    wv.run(&[
        "backup-fetch",
        "LATEST",
        latest.to_str().unwrap(),
        "--tablespace",
        &ts_arg,
    ])
    .assert_success();
    wv.run(&["verify"]).assert_success();
}

fn backup_failures(kind: RepoKind) {
    let env = TestEnv::new("backup-failures");
    let repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let mut src = env.cluster(ClusterConfig::new("src").archive_with(&wv));
    src.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 100000) g");
    src.psql("CREATE TABLE t_bad AS SELECT g FROM generate_series(1, 10000) g");
    // A damaged page on disk in a cluster with data checksums: found, reported, not fatal.
    let bad_file = src
        .datadir()
        .join(src.psql("SELECT pg_relation_filepath('t_bad')"));
    enable_checksums(&mut src);
    src.stop();
    let mut bytes = std::fs::read(&bad_file).unwrap();
    bytes[5 * 8192 + 4000] ^= 0xFF;
    std::fs::write(&bad_file, bytes).unwrap();
    src.start();
    let port = src.port().to_string();

    // PostgreSQL down: a clear error naming the connection.
    let dead_port = crate::harness::free_port().to_string();
    let mut down = pg_env(&env, &src, &dead_port);
    down.retain(|(k, _)| *k != "PGDATA");
    let out = wv.run_with_env(&["backup-push"], &down);
    out.assert_failure()
        .assert_stderr_contains("cannot connect to PostgreSQL");

    // Wrong PGDATA: refused before anything is stored.
    let elsewhere = env.mkdir("not-pgdata");
    let mut wrong = pg_env(&env, &src, &port);
    wrong.retain(|(k, _)| *k != "PGDATA");
    wrong.push(("PGDATA", elsewhere.to_str().unwrap()));
    let out = wv.run_with_env(&["backup-push"], &wrong);
    out.assert_failure().assert_stderr_contains("not-pgdata");
    assert!(backup_list(&wv).is_empty());

    let log = backup_push(&env, &wv, &src, &[]);
    assert!(log.contains("data checksum failures"), "{log}");
    assert_eq!(backup_list(&wv)[0].page_checksum_failures, 1);

    // Another cluster into this repository: refused, nothing stored.
    let other = env.cluster(ClusterConfig::new("other"));
    let other_port = other.port().to_string();
    let out = wv.run_with_env(&["backup-push"], &pg_env(&env, &other, &other_port));
    out.assert_failure()
        .assert_stderr_contains("belongs to a different cluster");
    drop(other);
    assert_eq!(backup_list(&wv).len(), 1);

    // Killed while storing: not listed, and the next push works.
    let mut envs = pg_env(&env, &src, &port);
    envs.push(("WALVAULT_FAILPOINTS", "store-before-commit"));
    let mut running = wv.spawn(&["backup-push", "--full"], &envs);
    running.wait_for_stderr(
        "failpoint store-before-commit reached",
        Duration::from_secs(60),
    );
    running.kill();
    assert_eq!(backup_list(&wv).len(), 1);
    backup_push(&env, &wv, &src, &["--full"]);
    let listed = backup_list(&wv);
    assert_eq!(listed.len(), 2);

    // Into a non-empty directory: refused, nothing touched.
    let busy = env.mkdir("busy");
    let keep = busy.join("keep-me");
    std::fs::write(&keep, "x").unwrap();
    give_to_postgres(&keep);
    let out = wv.run(&["backup-fetch", "LATEST", busy.to_str().unwrap()]);
    out.assert_failure().assert_stderr_contains("not empty");
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);

    // A corrupted pack: the restore fails and names the pack and a file in it.
    let pack = format!("backups/{}/packs/000000", listed[1].name);
    let size = repo.read(&pack).len();
    repo.corrupt(&pack, size / 2);
    let target = env.path().join("from-corrupt");
    let out = wv.run(&["backup-fetch", &listed[1].name, target.to_str().unwrap()]);
    out.assert_failure().assert_stderr_contains(&pack);
    assert!(
        out.stderr.contains("restoring ") || out.stderr.contains("do not match"),
        "the error names no file:\n{out}"
    );
    // verify reports the damaged backup too.
    wv.run(&["verify"]).assert_failure();
    // The other backup still restores.
    let fine = restore(&env, &wv, &listed[0].name, src.install(), None);
    assert_eq!(fine.psql("SELECT count(*) FROM t"), "100000");
}

/// PostgreSQL 13 and 14 use the older backup functions; each of them available gets a full and a
/// delta backup restored and compared (newer majors get theirs in the version matrix).
#[test]
fn older_majors_back_up_and_restore() {
    let installs: Vec<PgInstall> = PgInstall::all()
        .into_iter()
        .filter(|i| i.major() < 15)
        .collect();
    if installs.is_empty() {
        eprintln!("no other PostgreSQL major available (integration/run.sh installs one)");
    }
    for install in installs {
        let env = TestEnv::new(&format!("backup-pg{}", install.major()));
        let repo = env.repo(RepoKind::Local);
        let wv = env.walvault(repo.config_path());
        let src = env.cluster(
            ClusterConfig::new("src")
                .install(install.clone())
                .archive_with(&wv),
        );
        src.psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 50000) g");
        backup_push(&env, &wv, &src, &[]);
        src.psql("UPDATE t SET v = 'changed' WHERE id % 50 = 0; CREATE TABLE t2 AS SELECT 1 AS x");
        // Database and storage records differ between majors: a database created and dropped,
        // a relation truncated.
        src.psql("CREATE DATABASE d2");
        src.psql("DROP DATABASE d2");
        src.psql("TRUNCATE t2");
        backup_push(&env, &wv, &src, &[]);
        let expected = table_md5s(&src);
        let listed = backup_list(&wv);
        assert_eq!(listed[1].kind, "delta");
        // Read from the WAL's block maps, and checked against the page scan (the harness sets
        // WALVAULT_VERIFY_MAP).
        assert_eq!(
            listed[1].delta_source.as_deref(),
            Some("wal"),
            "PostgreSQL {}",
            install.major()
        );
        let restored = restore(&env, &wv, &listed[1].name, &install, None);
        assert_eq!(
            table_md5s(&restored),
            expected,
            "PostgreSQL {}",
            install.major()
        );
    }
}

/// pgbench's invariant holds at every consistent point: what the history table recorded equals
/// the balances of accounts, tellers and branches.
fn pgbench_consistent(cluster: &Cluster) -> bool {
    cluster.psql(
        "SELECT (SELECT coalesce(sum(delta), 0) FROM pgbench_history) = ALL (ARRAY[ \
         (SELECT sum(abalance) FROM pgbench_accounts), \
         (SELECT sum(tbalance) FROM pgbench_tellers), \
         (SELECT sum(bbalance) FROM pgbench_branches)])",
    ) == "t"
}

/// Backups taken while pgbench writes (files grow, pages are written while they are read):
/// the full and the delta both restore to a consistent database with sound indexes.
#[test]
fn backups_under_load() {
    let env = TestEnv::new("backup-load");
    let repo = env.repo(RepoKind::Local);
    let wv = env.walvault(repo.config_path());
    let mut src = env.cluster(ClusterConfig::new("src").archive_with(&wv));
    enable_checksums(&mut src);
    src.psql("CREATE EXTENSION amcheck");
    src.pgbench(&["-i", "-q", "-s", "2"]);
    let mut load = Command::new(src.install().program("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &src.port().to_string(),
            "-U",
            "postgres",
        ])
        .args(["-n", "-c", "2", "-T", "120", "postgres"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start pgbench");
    crate::harness::wait_until("pgbench to commit", Duration::from_secs(30), || {
        src.psql("SELECT count(*) > 100 FROM pgbench_history") == "t"
    });
    backup_push(&env, &wv, &src, &[]);
    backup_push(&env, &wv, &src, &[]);
    let still_running = matches!(load.try_wait(), Ok(None));
    let _ = load.kill();
    let _ = load.wait();
    assert!(still_running, "pgbench ended before the backups did");
    let listed = backup_list(&wv);
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].kind, "delta");
    for backup in &listed {
        let restored = restore(&env, &wv, &backup.name, src.install(), None);
        assert!(
            pgbench_consistent(&restored),
            "{} restored inconsistent",
            backup.name
        );
        assert!(amcheck(&restored) >= 4);
        assert_eq!(
            backup.page_checksum_failures, 0,
            "torn reads reported as damage"
        );
    }
}

repo_kind_tests!(backup_chain, backup_failures);

/// A backup made up by a test and stored behind walvault's back: one pack holding every file
/// whole (one piece per file), and a manifest listing `dirs`, `files` and `tablespaces`.
struct Forged<'a> {
    name: &'a str,
    start_time: &'a str,
    tablespaces: Vec<(u32, String)>,
    dirs: Vec<(&'a str, u32)>,
    files: Vec<(&'a str, u32, Vec<u8>)>,
}

impl<'a> Forged<'a> {
    /// A data directory with `global/pg_control` and one relation file, modes as PostgreSQL's.
    fn new(name: &'a str, start_time: &'a str) -> Forged<'a> {
        Forged {
            name,
            start_time,
            tablespaces: Vec::new(),
            dirs: vec![("global", 0o700), ("base", 0o700), ("base/1", 0o700)],
            files: vec![
                ("global/pg_control", 0o600, b"control".to_vec()),
                ("base/1/1259", 0o600, b"relation".to_vec()),
            ],
        }
    }

    fn name(&self) -> String {
        format!("base_{}", self.name)
    }

    fn store(&self, repo: &Repo) {
        let mut pack = Vec::new();
        let mut files = Vec::new();
        for (path, mode, content) in &self.files {
            files.push(serde_json::json!({
                "path": path, "size": content.len(), "mode": mode, "storage": "whole",
                "crc32": crc32fast::hash(content),
                "pieces": [{"pack": 0, "at": pack.len(), "len": content.len(),
                            "file_offset": 0, "crc32": crc32fast::hash(content)}],
            }));
            pack.extend_from_slice(content);
        }
        let manifest = serde_json::json!({
            "format": 1, "name": self.name(), "type": "full", "parent": null,
            "delta_base_lsn": null, "delta_depth": 0,
            "start_time": self.start_time, "stop_time": self.start_time,
            "start_lsn": "0/2000028", "stop_lsn": "0/2000100", "timeline": 1,
            "pg_version_num": 150000, "system_identifier": 1, "wal_segment_size": 16777216,
            "data_checksums": false, "original_size": pack.len(), "stored_size": pack.len(),
            "packs": 1, "page_checksum_failures": [],
            "backup_label": "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n",
            "tablespace_map": null,
            "tablespaces": self.tablespaces.iter()
                .map(|(oid, location)| serde_json::json!({"oid": oid, "location": location}))
                .collect::<Vec<_>>(),
            "dirs": self.dirs.iter()
                .map(|(path, mode)| serde_json::json!({"path": path, "mode": mode}))
                .collect::<Vec<_>>(),
            "files": files,
        });
        let name = self.name();
        repo.put_object(&format!("backups/{name}/packs/000000"), &pack);
        repo.put_object(
            &format!("backups/{name}/manifest"),
            &serde_json::to_vec(&manifest).unwrap(),
        );
    }
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A manifest's tablespace locations cannot make a restore write or chmod anything outside the
/// target and tablespace directories that are absent or empty: not into a non-empty directory,
/// not through a symbolic link, not files beside the tablespace's `PG_*` directory (the
/// `authorized_keys` attack), and an existing empty directory keeps its mode. `--dry-run`
/// lists every directory written below.
#[test]
fn forged_tablespace_locations_write_nothing_outside() {
    let env = TestEnv::new("backup-forged-ts");
    let repo = env.repo(RepoKind::Local);
    let wv = env.walvault(repo.config_path());
    let fetch = |forged: &Forged, target: &Path| {
        wv.run(&["backup-fetch", &forged.name(), target.to_str().unwrap()])
    };
    let with_tablespace = |name, location: &Path, inner: &'static str| {
        let mut forged = Forged::new(name, "2026-01-01T00:00:00Z");
        forged.tablespaces = vec![(16390, location.display().to_string())];
        forged.dirs.push(("pg_tblspc", 0o700));
        forged.dirs.push(("pg_tblspc/16390", 0o700));
        forged.dirs.push(("pg_tblspc/16390/PG_15_1", 0o700));
        forged.dirs.push(("pg_tblspc/16390/PG_15_1/1", 0o700));
        forged
            .files
            .push((inner, 0o600, b"ssh-ed25519 AAAA attacker".to_vec()));
        forged.store(&repo);
        forged
    };

    // Files beside the version directory, in a location the restore would create.
    let home = env.mkdir("home");
    set_mode(&home, 0o755);
    let ssh = home.join(".ssh");
    let forged = with_tablespace("keys", &ssh, "pg_tblspc/16390/authorized_keys");
    let target = env.path().join("restore-keys");
    fetch(&forged, &target)
        .assert_failure()
        .assert_stderr_contains("authorized_keys");
    assert!(!ssh.exists(), "{} was created", ssh.display());
    assert!(!target.exists());

    // A non-empty directory.
    let full = env.mkdir("full");
    set_mode(&full, 0o755);
    std::fs::write(full.join("keep"), "x").unwrap();
    let forged = with_tablespace("full", &full, "pg_tblspc/16390/PG_15_1/1/2");
    fetch(&forged, &env.path().join("restore-full"))
        .assert_failure()
        .assert_stderr_contains("not empty");
    assert_eq!(mode_of(&full), 0o755);
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1);

    // A symbolic link to an empty directory.
    let victim = env.mkdir("victim");
    set_mode(&victim, 0o755);
    let link = env.path().join("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let forged = with_tablespace("link", &link, "pg_tblspc/16390/PG_15_1/1/2");
    fetch(&forged, &env.path().join("restore-link"))
        .assert_failure()
        .assert_stderr_contains("symbolic link");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
    assert_eq!(mode_of(&victim), 0o755);

    // An existing empty directory: restored into, its mode left alone; listed by --dry-run.
    let empty = env.mkdir("empty");
    set_mode(&empty, 0o755);
    let forged = with_tablespace("empty", &empty, "pg_tblspc/16390/PG_15_1/1/2");
    let target = env.path().join("restore-empty");
    let out = wv.run(&[
        "backup-fetch",
        &forged.name(),
        target.to_str().unwrap(),
        "--dry-run",
    ]);
    out.assert_success();
    for dir in [&target, &empty] {
        assert!(
            out.stdout
                .contains(&format!("writes below {} ", dir.display())),
            "{out}"
        );
    }
    assert_eq!(out.stdout.lines().count(), 2, "{out}");
    assert!(!target.exists(), "--dry-run created the target");
    fetch(&forged, &target).assert_success();
    assert_eq!(mode_of(&empty), 0o755);
    assert_eq!(mode_of(&empty.join("PG_15_1")), 0o700);
    assert!(empty.join("PG_15_1/1/2").is_file());
    assert_eq!(
        std::fs::read_link(target.join("pg_tblspc/16390")).unwrap(),
        empty
    );
}

/// Modes in a manifest are masked: directories at most 0700, files at most 0600, and
/// backup_label and tablespace_map are 0600 too.
#[test]
fn forged_modes_restore_as_0700_and_0600() {
    let env = TestEnv::new("backup-forged-modes");
    let repo = env.repo(RepoKind::Local);
    let wv = env.walvault(repo.config_path());
    let mut forged = Forged::new("modes", "2026-01-01T00:00:00Z");
    for dir in &mut forged.dirs {
        dir.1 = 0o7777;
    }
    for file in &mut forged.files {
        file.1 = 0o7777;
    }
    forged.store(&repo);
    let target = env.path().join("restored");
    wv.run(&["backup-fetch", &forged.name(), target.to_str().unwrap()])
        .assert_success();
    assert_eq!(mode_of(&target), 0o700);
    for dir in ["global", "base", "base/1", "pg_tblspc"] {
        assert_eq!(mode_of(&target.join(dir)), 0o700, "{dir}");
    }
    for file in ["global/pg_control", "base/1/1259", "backup_label"] {
        assert_eq!(mode_of(&target.join(file)), 0o600, "{file}");
    }
}

/// A manifest that cannot be read is reported (naming its object) and skipped: backup-list
/// and LATEST go on with the others; verify still fails on it.
#[test]
fn an_unreadable_manifest_is_skipped_with_a_warning() {
    let env = TestEnv::new("backup-unreadable");
    let repo = env.repo(RepoKind::Local);
    let wv = env.walvault(repo.config_path());
    let good = Forged::new("good", "2026-01-01T00:00:00Z");
    good.store(&repo);
    let bad = Forged::new("later", "2026-01-02T00:00:00Z");
    bad.store(&repo);
    // Framed whole, so only reading it as a manifest fails (verify's object pass is happy).
    let key = format!("backups/{}/manifest", bad.name());
    repo.put_object(&key, b"{\"format\": 1, \"name\": ");

    let out = wv.run(&["backup-list", "--json"]);
    out.assert_success().assert_stderr_contains(&key);
    let listed: Vec<Listed> = serde_json::from_str(&out.stdout).unwrap();
    let names: Vec<&str> = listed.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, [good.name()]);
    let target = env.path().join("latest");
    let out = wv.run(&["backup-fetch", "LATEST", target.to_str().unwrap()]);
    out.assert_success().assert_stderr_contains(&key);
    assert_eq!(
        std::fs::read(target.join("base/1/1259")).unwrap(),
        b"relation"
    );
    wv.run(&["verify"]).assert_problem_names(&key);
}

/// A piece larger than walvault ever writes (one 8 MiB chunk) is refused when the manifest is
/// read, before any pack is fetched, so a restore never holds an unbounded piece in memory.
#[test]
fn an_oversized_piece_is_refused_before_download() {
    let env = TestEnv::new("backup-oversized");
    let repo = env.repo(RepoKind::Local);
    let wv = env.walvault(repo.config_path());
    let mut forged = Forged::new("big", "2026-01-01T00:00:00Z");
    forged
        .files
        .push(("base/1/2", 0o600, vec![7u8; (8 << 20) + 1]));
    forged.store(&repo);
    let target = env.path().join("restored");
    wv.run(&["backup-fetch", &forged.name(), target.to_str().unwrap()])
        .assert_failure()
        .assert_stderr_contains("larger than walvault writes");
    assert!(!target.exists());
}
