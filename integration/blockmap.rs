//! Deltas from the WAL's block maps: after a full backup, a workload with every kind of
//! relation change (updates, bulk inserts, both CREATE DATABASE strategies, tables and databases
//! moved between tablespaces, TRUNCATE, VACUUM FULL, CLUSTER, REINDEX, DROP, unlogged to logged,
//! new indexes, a relation extended and then truncated by VACUUM, sequences), two deltas read
//! from the maps (`delta_source` "wal", each checked against the page scan by the suite's
//! `WALVAULT_VERIFY_MAP`) restore to exactly what the source held; a lost summary makes the
//! next delta fall back to the scan, still correct.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::backup::{amcheck, backup_push, enable_checksums, restore};
use crate::harness::{
    cmd::{path_str, RunOutput},
    give_to_postgres, repo_kind_tests, wait_until, Cluster, ClusterConfig, Repo, RepoKind, TestEnv,
    Walvault,
};
use crate::recover::{archiving_source, backup_env};

/// (name, delta_source, start_lsn) of every backup, oldest first.
fn listed(wv: &Walvault) -> Vec<(String, Option<String>, String)> {
    let out = wv.run(&["backup-list", "--json"]);
    out.assert_success();
    let all: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["delta_source"].as_str().map(String::from),
                b["start_lsn"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The WAL segment name (timeline 1, 16 MiB segments) holding `lsn` (`X/Y`).
fn segment_of(lsn: &str) -> String {
    let (hi, lo) = lsn.split_once('/').unwrap();
    let lsn = u64::from_str_radix(hi, 16).unwrap() << 32 | u64::from_str_radix(lo, 16).unwrap();
    let segno = lsn >> 24;
    format!("{:08X}{:08X}{:08X}", 1, segno >> 8, segno & 0xFF)
}

fn workload_one(src: &Cluster, ts: &str) {
    src.pgbench(&["-n", "-c", "1", "-t", "300", "-b", "simple-update"]);
    src.psql("INSERT INTO t_bulk SELECT g, md5(g::text) FROM generate_series(1, 30000) g");
    src.psql("CREATE INDEX t_bulk_v ON t_bulk (v)");
    src.psql("CREATE DATABASE db_wal STRATEGY wal_log");
    src.psql("CREATE DATABASE db_copy STRATEGY file_copy");
    src.psql_in(
        "db_copy",
        "CREATE TABLE c (id int PRIMARY KEY); INSERT INTO c SELECT generate_series(1, 3000)",
    );
    src.psql("CREATE DATABASE db_move");
    src.psql(&format!("ALTER DATABASE db_move SET TABLESPACE {ts}"));
    src.psql(&format!("ALTER TABLE t_move SET TABLESPACE {ts}"));
    src.psql("TRUNCATE t_trunc");
    src.psql("INSERT INTO t_trunc VALUES (1, 'after truncate')");
    src.psql("UPDATE t_vf SET v = v || 'x' WHERE id % 3 = 0");
    src.psql("VACUUM FULL t_vf");
    src.psql("CLUSTER t_cluster USING t_cluster_pkey");
    src.psql("REINDEX TABLE t_keep");
    src.psql("DROP TABLE t_drop");
    src.psql("ALTER TABLE t_unl SET LOGGED");
    // Extended, then its empty tail given back by VACUUM.
    src.psql("INSERT INTO t_ext SELECT g, repeat('e', 200) FROM generate_series(1, 20000) g");
    src.psql("DELETE FROM t_ext WHERE id > 1000");
    src.psql("VACUUM t_ext");
    src.psql("SELECT count(nextval('s1')) FROM generate_series(1, 500)");
}

fn workload_two(src: &Cluster) {
    src.pgbench(&["-n", "-c", "1", "-t", "200", "-b", "simple-update"]);
    src.psql("UPDATE t_keep SET v = 'two' WHERE id % 11 = 0");
    src.psql("DROP DATABASE db_wal");
    src.psql("TRUNCATE t_bulk");
    src.psql_in("db_copy", "UPDATE c SET id = id + 100000 WHERE id < 100");
    src.psql("SELECT count(nextval('s1')) FROM generate_series(1, 50)");
}

fn push_delta(env: &TestEnv, wv: &Walvault, src: &Cluster) -> String {
    backup_push(env, wv, src, &["--delta"])
}

fn check_restores(
    env: &TestEnv,
    wv: &Walvault,
    src: &Cluster,
    backups: &[(String, String)],
    ts_oid: &str,
) {
    for (i, (name, expected)) in backups.iter().enumerate() {
        let ts_dir = env.path().join(format!("ts-restored-{i}"));
        let restored = restore(env, wv, name, src.install(), Some((ts_oid, &ts_dir)));
        let got = restored.pg_dumpall();
        let differ: Vec<(&str, &str)> = got
            .lines()
            .zip(expected.lines())
            .filter(|(a, b)| a != b)
            .take(5)
            .collect();
        assert!(
            got == *expected,
            "data restored from {name} differs from the source at that backup ({} vs {} \
             lines): {differ:?}",
            got.lines().count(),
            expected.lines().count()
        );
        assert!(amcheck(&restored) > 5);
    }
}

fn delta_from_block_maps(kind: RepoKind) {
    let env = TestEnv::new("blockmap");
    let repo: Repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let mut src = env.cluster(ClusterConfig::new("src").archive_with(&wv));
    // With data checksums, hint-bit writes are WAL-logged as full-page images for hints.
    enable_checksums(&mut src);
    let ts_dir = env.mkdir("ts1");
    src.psql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_dir.display()
    ));
    let ts_oid = src.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'");
    src.psql("CREATE EXTENSION amcheck");
    src.pgbench(&["-i", "-q", "-s", "2"]);
    src.psql(
        "CREATE TABLE t_keep (id int PRIMARY KEY, v text); \
         INSERT INTO t_keep SELECT g, md5(g::text) FROM generate_series(1, 20000) g; \
         CREATE TABLE t_bulk (id int, v text); \
         CREATE TABLE t_move (id int PRIMARY KEY, v text); \
         INSERT INTO t_move SELECT g, md5(g::text) FROM generate_series(1, 5000) g; \
         CREATE TABLE t_trunc (id int PRIMARY KEY, v text); \
         INSERT INTO t_trunc SELECT g, repeat('t', 100) FROM generate_series(1, 10000) g; \
         CREATE TABLE t_vf (id int PRIMARY KEY, v text); \
         INSERT INTO t_vf SELECT g, md5(g::text) FROM generate_series(1, 10000) g; \
         CREATE TABLE t_cluster (id int PRIMARY KEY, v text); \
         INSERT INTO t_cluster SELECT g, md5(g::text) FROM generate_series(10000, 1, -1) g; \
         CREATE TABLE t_drop AS SELECT g AS id FROM generate_series(1, 5000) g; \
         CREATE UNLOGGED TABLE t_unl (id int PRIMARY KEY, v text); \
         CREATE TABLE t_ext (id int, v text); \
         CREATE SEQUENCE s1",
    );
    src.psql("VACUUM (FREEZE, ANALYZE)");
    let mut backups = vec![];
    backup_push(&env, &wv, &src, &["--full"]);
    backups.push(src.pg_dumpall());
    // Rows written without WAL, logged only when the table becomes logged.
    src.psql("INSERT INTO t_unl SELECT g, md5(g::text) FROM generate_series(1, 3000) g");

    workload_one(&src, "ts1");
    backups.push(src.pg_dumpall());
    let out = push_delta(&env, &wv, &src);
    assert!(out.contains("--verify-map: the page scan"), "{out}");
    // The summary line says what was read, not the size of the cluster.
    let (covered, read) = sizes_of_push(&out);
    assert!(
        read < covered / 2.0,
        "read {read} of {covered} bytes:\n{out}"
    );

    workload_two(&src);
    backups.push(src.pg_dumpall());
    push_delta(&env, &wv, &src);

    let list = listed(&wv);
    let sources: Vec<Option<&str>> = list.iter().map(|b| b.1.as_deref()).collect();
    assert_eq!(sources, [None, Some("wal"), Some("wal")], "{list:?}");

    // A summary lost in the next delta's range: that delta reads every page instead.
    src.pgbench(&["-n", "-c", "1", "-t", "100", "-b", "simple-update"]);
    let switched = src.switch_wal();
    src.wait_for_archived(&switched, Duration::from_secs(60));
    let lost = format!("walsummary/{}", segment_of(&list[2].2));
    assert!(repo.objects().contains(&lost), "{lost} not stored");
    repo.delete(&lost);
    backups.push(src.pg_dumpall());
    let out = push_delta(&env, &wv, &src);
    assert!(out.contains("delta by page scan"), "{out}");
    let list = listed(&wv);
    assert_eq!(list[3].1.as_deref(), Some("scan"), "{list:?}");

    let named: Vec<(String, String)> = list.iter().map(|b| b.0.clone()).zip(backups).collect();
    check_restores(&env, &wv, &src, &named, &ts_oid);
    wv.run(&["verify"]).assert_success();
    restore_delta_over_a_stale_copy(&env, &wv, &repo, &named, &ts_oid);
    restore_delta_fetches_only_differing_pages(&env, &wv, &repo, &named, &ts_oid);
}

/// From backup-push's last line, "complete: N files of SIZE, SIZE read, ...": the bytes the
/// backup covers and the bytes it read, as their rounded sizes say.
fn sizes_of_push(out: &str) -> (f64, f64) {
    let size = |text: &str| -> f64 {
        let (value, unit) = text
            .trim()
            .split_once(' ')
            .unwrap_or_else(|| panic!("{text}"));
        let scale = match unit {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            _ => panic!("unit of {text}"),
        };
        value.parse::<f64>().unwrap() * scale
    };
    let line = out
        .lines()
        .find(|l| l.contains(") complete: "))
        .unwrap_or_else(|| panic!("no summary line:\n{out}"));
    let rest = line
        .split(" files of ")
        .nth(1)
        .unwrap_or_else(|| panic!("{line}"));
    let mut parts = rest.split(", ");
    let covered = size(parts.next().unwrap());
    let read = size(parts.next().unwrap().trim_end_matches(" read"));
    (covered, read)
}

/// Every file below `dir` (links by target, not followed) with its content.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(rel, b"link".to_vec());
            } else if meta.is_dir() {
                out.insert(rel, b"dir".to_vec());
                walk(root, &path, out);
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `backup-fetch --delta` over an older restore that was then damaged and littered equals a
/// fresh restore, byte for byte, also with the newest backup's page sums lost (its pieces are
/// then compared whole); a running server's directory is refused.
fn restore_delta_over_a_stale_copy(
    env: &TestEnv,
    wv: &Walvault,
    repo: &Repo,
    named: &[(String, String)],
    ts_oid: &str,
) {
    let older = named[1].0.as_str();
    let fetch =
        |name: &str, dir: &Path, ts: &Path, delta: bool| fetch_to(wv, ts_oid, name, dir, ts, delta);
    let (stale, stale_ts) = (env.unique_dir("stale"), env.path().join("stale-ts"));
    fetch(older, &stale, &stale_ts, false).assert_success();
    // Litter and damage: files and directories the backup lacks, a truncated and a changed file.
    std::fs::write(stale.join("base/1/999999"), b"junk").unwrap();
    std::fs::create_dir_all(stale.join("base/777777/x")).unwrap();
    std::fs::write(stale.join("base/777777/x/1"), b"junk").unwrap();
    for junk in ["base/777777", "base/777777/x", "base/777777/x/1"] {
        give_to_postgres(&stale.join(junk));
    }
    // Another cluster's version directory in the same tablespace directory is not ours.
    let foreign = stale_ts.join("PG_99_202601011/5");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("16384"), b"someone else's").unwrap();
    std::fs::write(stale.join("pg_wal/000000010000000000000001"), b"old wal").unwrap();
    let (fresh, fresh_ts) = (env.unique_dir("fresh"), env.path().join("fresh-ts"));
    fetch("LATEST", &fresh, &fresh_ts, false).assert_success();
    let victim = tree(&fresh)
        .into_iter()
        .find(|(p, c)| p.starts_with("base/") && c.len() > 16384 && stale.join(p).exists())
        .map(|(p, _)| p)
        .unwrap();
    let mut changed = std::fs::read(stale.join(&victim)).unwrap();
    changed[9000] ^= 0xFF;
    changed.truncate(changed.len() - 8192);
    std::fs::write(stale.join(&victim), changed).unwrap();

    std::fs::write(stale.join("postmaster.pid"), b"4242").unwrap();
    fetch("LATEST", &stale, &stale_ts, true)
        .assert_failure()
        .assert_stderr_contains("postmaster.pid");
    std::fs::remove_file(stale.join("postmaster.pid")).unwrap();
    let newest_sums = format!("backups/{}/pagesums/", named[named.len() - 1].0);
    delete_all_under(repo, &newest_sums);
    // verify names what is gone.
    wv.run(&["verify"]).assert_problem_names(&newest_sums);
    let out = fetch("LATEST", &stale, &stale_ts, true);
    out.assert_success();
    assert!(out.stderr.contains("entries removed"), "{out}");
    assert!(out.stderr.contains("compared whole"), "{out}");
    assert_eq!(tree(&stale), tree(&fresh), "data directory after --delta");
    assert_eq!(
        std::fs::read(foreign.join("16384")).unwrap(),
        b"someone else's"
    );
    std::fs::remove_dir_all(stale_ts.join("PG_99_202601011")).unwrap();
    assert_eq!(tree(&stale_ts), tree(&fresh_ts), "tablespace after --delta");
}

/// `backup-fetch --delta` of the newest backup over a restore of the first delta compares
/// pages with the page sums and fetches only what changed since, which the newer deltas hold:
/// it succeeds, byte for byte, with every pack of the full backup gone from the repository
/// (before page sums, each full-backup piece a delta's page cut was fetched whole).
fn restore_delta_fetches_only_differing_pages(
    env: &TestEnv,
    wv: &Walvault,
    repo: &Repo,
    named: &[(String, String)],
    ts_oid: &str,
) {
    let fetch =
        |name: &str, dir: &Path, ts: &Path, delta: bool| fetch_to(wv, ts_oid, name, dir, ts, delta);
    let (older, older_ts) = (env.unique_dir("older"), env.path().join("older-ts"));
    fetch(&named[1].0, &older, &older_ts, false).assert_success();
    let (fresh, fresh_ts) = (env.unique_dir("fresh-2"), env.path().join("fresh-2-ts"));
    fetch("LATEST", &fresh, &fresh_ts, false).assert_success();
    delete_all_under(repo, &format!("backups/{}/packs/", named[0].0));
    fetch("LATEST", &older, &older_ts, true).assert_success();
    assert_eq!(tree(&older), tree(&fresh), "data directory after --delta");
    assert_eq!(tree(&older_ts), tree(&fresh_ts), "tablespace after --delta");
}

/// `backup-fetch NAME DIR` with the test's tablespace put in `ts`, and `--delta` if asked.
fn fetch_to(
    wv: &Walvault,
    ts_oid: &str,
    name: &str,
    dir: &Path,
    ts: &Path,
    delta: bool,
) -> RunOutput {
    let ts_arg = format!("{ts_oid}={}", ts.display());
    let mut args = vec!["backup-fetch", name, path_str(dir), "--tablespace", &ts_arg];
    if delta {
        args.push("--delta");
    }
    wv.run(&args)
}

/// Deletes every object whose key starts with `prefix`; there must be some.
fn delete_all_under(repo: &Repo, prefix: &str) {
    let doomed: Vec<String> = repo
        .keys()
        .into_iter()
        .filter(|k| k.starts_with(prefix))
        .collect();
    assert!(!doomed.is_empty(), "no objects under {prefix}");
    for key in &doomed {
        repo.delete(key);
    }
}

repo_kind_tests!(delta_from_block_maps);

/// A segment wal-push has stored but not yet summarised (paused between the two, so PostgreSQL
/// still holds its `.ready`) is mapped from pg_wal: the delta still comes from the block maps
/// (the suite's `WALVAULT_VERIFY_MAP` checks it against the page scan) and restores equal.
#[test]
fn a_segment_being_archived_is_mapped_from_pg_wal() {
    let env = TestEnv::new("blockmap-in-flight");
    let (repo, wv, src) = archiving_source(&env, RepoKind::Local);
    let command = src.psql("SHOW archive_command").replace('\'', "''");
    let set_command = |c: &str| {
        src.psql(&format!("ALTER SYSTEM SET archive_command = '{c}'"));
        src.psql("SELECT pg_reload_conf()");
    };
    set_command(&format!("WALVAULT_FAILPOINTS=wal-stored {command}"));
    src.psql("INSERT INTO t (client) SELECT 1 FROM generate_series(1, 2000)");
    let segment = src.switch_wal();
    let (wal, summary) = (format!("wal/{segment}"), format!("walsummary/{segment}"));
    wait_until(
        "the segment stored, its summary not",
        Duration::from_secs(60),
        || {
            let keys = repo.keys();
            keys.contains(&wal) && !keys.contains(&summary)
        },
    );
    set_command(&command);
    let envs = backup_env(&env, &src);
    let args: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut push = wv.spawn(&["backup-push", "--delta"], &args);
    // The map is decided before any file is read; then the archiver may go on.
    push.wait_for_stderr("all files read", Duration::from_secs(120));
    kill_paused_wal_push(&env, &segment);
    let (status, stderr) = push.wait(Duration::from_secs(300));
    let stderr = stderr.join("\n");
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("delta from the WAL's block maps"),
        "{stderr}"
    );
    let newest = listed(&wv).pop().unwrap();
    assert_eq!(newest.1.as_deref(), Some("wal"), "{stderr}");
    let restored = restore(&env, &wv, &newest.0, src.install(), None);
    assert_eq!(
        restored.psql("SELECT count(*), sum(id) FROM t"),
        src.psql("SELECT count(*), sum(id) FROM t")
    );
}

/// Kills this test's wal-push of `segment`, paused at its failpoint (and the shell around it).
fn kill_paused_wal_push(env: &TestEnv, segment: &str) {
    let ours = env.path().display().to_string();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&ours) && cmdline.contains("wal-push") && cmdline.contains(segment) {
            let pid = entry.file_name().to_string_lossy().into_owned();
            let ok = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status()
                .unwrap()
                .success();
            killed += usize::from(ok);
        }
    }
    // The shell PostgreSQL started for archive_command names it too.
    assert!(killed > 0, "no paused wal-push of {segment}");
}

/// One record as `pg_waldump` describes it.
struct Dumped {
    lsn: u64,
    tot_len: u64,
    rmgr: String,
    desc: String,
    /// (spc, db, rel, fork, block) of every block reference.
    blocks: Vec<(u32, u32, u32, u8, u32)>,
}

fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    u64::from_str_radix(hi, 16).unwrap() << 32 | u64::from_str_radix(lo, 16).unwrap()
}

fn fork_number(name: &str) -> u8 {
    match name {
        "main" => 0,
        "fsm" => 1,
        "vm" => 2,
        "init" => 3,
        other => panic!("fork {other}"),
    }
}

fn parse_dump(text: &str) -> Vec<Dumped> {
    text.lines()
        .filter(|l| l.starts_with("rmgr: "))
        .map(|l| {
            let field = |name: &str| {
                let at = l.find(name).unwrap() + name.len();
                l[at..]
                    .trim_start()
                    .split([',', ' '])
                    .next()
                    .unwrap()
                    .to_string()
            };
            let tot = l.split("len (rec/tot):").nth(1).unwrap();
            let tot_len = tot.split(',').next().unwrap().split('/').nth(1).unwrap();
            let desc = l.split("desc: ").nth(1).unwrap_or("");
            let blocks = desc
                .split("blkref #")
                .skip(1)
                .map(|b| {
                    let words: Vec<&str> = b.split([' ', ',']).filter(|w| !w.is_empty()).collect();
                    let rel: Vec<u32> = words[2].split('/').map(|n| n.parse().unwrap()).collect();
                    let (fork, blk) = if words[3] == "fork" {
                        (fork_number(words[4]), words[6])
                    } else {
                        (0, words[4])
                    };
                    (rel[0], rel[1], rel[2], fork, blk.parse().unwrap())
                })
                .collect();
            Dumped {
                lsn: parse_lsn(&field("lsn:")),
                tot_len: tot_len.trim().parse().unwrap(),
                rmgr: field("rmgr:"),
                desc: desc.split(", blkref").next().unwrap().to_string(),
                blocks,
            }
        })
        .collect()
}

/// `base/5/16384`, `base/5/16384_vm`, `global/1262`, `pg_tblspc/1700/PG_15_x/5/16384` as
/// (spc, db, rel, fork).
fn parse_relpath(path: &str) -> (u32, u32, u32, u8) {
    let parts: Vec<&str> = path.split('/').collect();
    let (spc, db, file) = match parts.as_slice() {
        ["base", db, file] => (1663, db.parse().unwrap(), *file),
        ["global", file] => (1664, 0, *file),
        ["pg_tblspc", spc, _, db, file] => (spc.parse().unwrap(), db.parse().unwrap(), *file),
        _ => panic!("relation path {path}"),
    };
    let (rel, fork) = match file.split_once('_') {
        Some((rel, fork)) => (rel, fork_number(fork)),
        None => (file, 0),
    };
    (spc, db, rel.parse().unwrap(), fork)
}

/// A stored segment summary's block map, decoded independently of walvault.
#[derive(Default, Debug)]
struct StoredMap {
    unusable: Option<String>,
    blocks: std::collections::BTreeSet<(u32, u32, u32, u8, u32)>,
    limits: std::collections::BTreeMap<(u32, u32, u32, u8), u32>,
    databases: Vec<(u32, u32)>,
    pending: bool,
}

fn varint(bytes: &[u8], at: &mut usize) -> u32 {
    let mut v = 0u32;
    let mut shift = 0;
    loop {
        let b = bytes[*at];
        *at += 1;
        v |= u32::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

fn stored_map(repo: &Repo, segment: &str) -> StoredMap {
    let framed = repo.read(&format!("walsummary/{segment}"));
    let json: serde_json::Value =
        serde_json::from_slice(&crate::harness::object_content(&framed)).unwrap();
    let blocks = &json["blocks"];
    let mut map = StoredMap {
        unusable: blocks["unusable"].as_str().map(String::from),
        pending: !blocks["pending"].is_null(),
        ..StoredMap::default()
    };
    for f in blocks["forks"].as_array().unwrap() {
        let n = |k: &str| f[k].as_u64().unwrap() as u32;
        let key = (n("spc"), n("db"), n("rel"), n("fork") as u8);
        if let Some(limit) = f["limit"].as_u64() {
            map.limits.insert(key, limit as u32);
        }
        let text = f["blocks"].as_str().unwrap();
        let bytes: Vec<u8> = (1..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect();
        let mut at = 0;
        let mut add = |b: u32| map.blocks.insert((key.0, key.1, key.2, key.3, b));
        if text.starts_with('b') {
            let first = varint(&bytes, &mut at);
            for (i, byte) in bytes[at..].iter().enumerate() {
                for bit in 0..8 {
                    if byte & 1 << bit != 0 {
                        add(first + i as u32 * 8 + bit);
                    }
                }
            }
        } else {
            let mut end = 0;
            while at < bytes.len() {
                let start = end + varint(&bytes, &mut at);
                let len = varint(&bytes, &mut at) + 1;
                (start..start + len).for_each(|b| {
                    add(b);
                });
                end = start + len;
            }
        }
    }
    for d in blocks["databases"].as_array().unwrap() {
        map.databases
            .push((d[0].as_u64().unwrap() as u32, d[1].as_u64().unwrap() as u32));
    }
    map
}

/// The block map of every segment, on real WAL of every kind of relation change, against
/// `pg_waldump`'s reading of the same segments: each block reference of a record inside the
/// segment is listed, nothing else is, created and truncated forks carry their limit, databases
/// created or dropped and relations dropped at commit are recorded.
fn block_maps_match_pg_waldump(kind: RepoKind) {
    let env = TestEnv::new("blockmap-waldump");
    let repo: Repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let mut src = env.cluster(
        ClusterConfig::new("src")
            .wal_segsize_mb(1)
            .archive_with(&wv),
    );
    enable_checksums(&mut src);
    src.psql("CREATE TABLE warm (id int)");
    let first = src.switch_wal();
    src.psql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    src.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 3000) g");
    src.psql("CREATE TABLE d AS SELECT g FROM generate_series(1, 100) g");
    src.psql("CREATE DATABASE fc STRATEGY file_copy");
    src.psql("CREATE DATABASE wl STRATEGY wal_log");
    src.psql("TRUNCATE t");
    src.psql("DROP TABLE d");
    src.psql("INSERT INTO warm SELECT generate_series(1, 5000)");
    src.psql("DELETE FROM warm WHERE id > 10");
    src.psql("VACUUM warm");
    src.psql("CREATE SEQUENCE s; SELECT nextval('s')");
    src.psql("DROP DATABASE fc");
    let last = src.switch_wal();
    src.wait_for_archived(&last, Duration::from_secs(60));

    let dir = env.mkdir("segments");
    let (first_no, last_no) = (
        u64::from_str_radix(&first[16..], 16).unwrap() + 1,
        u64::from_str_radix(&last[16..], 16).unwrap(),
    );
    let names: Vec<String> = (first_no..=last_no)
        .map(|n| format!("{}{n:08X}", &first[..16]))
        .collect();
    for name in &names {
        wv.wal_fetch(name, &dir.join(name)).assert_success();
    }
    let out = std::process::Command::new(src.install().program("pg_waldump"))
        .arg("-p")
        .arg(&dir)
        .arg(&names[0])
        .arg(names.last().unwrap())
        .output()
        .unwrap();
    let dumped = parse_dump(&String::from_utf8_lossy(&out.stdout));
    assert!(
        dumped.len() > 1000,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let seg_size = 1u64 << 20;
    let (mut creates, mut truncates, mut dbs, mut dropped, mut split) = (0, 0, 0, 0, 0);
    for name in &names {
        let seg_start = u64::from_str_radix(&name[16..], 16).unwrap() * seg_size;
        let map = stored_map(&repo, name);
        assert_eq!(map.unusable, None, "{name}");
        split += usize::from(map.pending);
        let here: Vec<&Dumped> = dumped
            .iter()
            .filter(|d| d.lsn >= seg_start && d.lsn < seg_start + seg_size)
            .collect();
        // Every listed block is one a record starting here references.
        for b in &map.blocks {
            assert!(
                here.iter().any(|d| d.blocks.contains(b)),
                "{name} lists {b:?}, which no record of it references"
            );
        }
        // Records that surely end in the segment (page headers counted generously).
        let inside = here
            .iter()
            .filter(|d| d.lsn + d.tot_len + 24 * (d.tot_len / 8000 + 2) < seg_start + seg_size);
        for d in inside {
            for b in &d.blocks {
                assert!(map.blocks.contains(b), "{name} misses {b:?} of {:X}", d.lsn);
            }
            let words: Vec<&str> = d.desc.split_whitespace().collect();
            match (d.rmgr.as_str(), words.first().copied()) {
                ("Storage", Some("CREATE")) => {
                    creates += 1;
                    assert_eq!(
                        map.limits.get(&parse_relpath(words[1])),
                        Some(&0),
                        "{}",
                        d.desc
                    );
                }
                ("Storage", Some("TRUNCATE")) => {
                    truncates += 1;
                    let blocks: u32 = words[3].parse().unwrap();
                    let limit = map.limits.get(&parse_relpath(words[1]));
                    assert!(limit.is_some_and(|l| *l <= blocks), "{}", d.desc);
                }
                ("Database", _) => {
                    dbs += 1;
                    let pair = |p: &str| {
                        let (s, d) = p.split_once('/').unwrap();
                        (s.parse().unwrap(), d.parse().unwrap())
                    };
                    // The target of a copy, the directory created or each directory dropped.
                    let targets: Vec<(u32, u32)> = match words[0] {
                        "CREATE_FILE_COPY" => vec![pair(words[5])],
                        "CREATE_WAL_LOG" => vec![pair(words[3])],
                        _ => words.iter().skip(2).map(|w| pair(w)).collect(),
                    };
                    for t in targets {
                        assert!(map.databases.contains(&t), "{} not in {name}", d.desc);
                    }
                }
                ("Transaction", _) if d.desc.contains("rels:") => {
                    let rels = d
                        .desc
                        .split("rels:")
                        .nth(1)
                        .unwrap()
                        .split(';')
                        .next()
                        .unwrap();
                    for path in rels.split_whitespace() {
                        dropped += 1;
                        assert_eq!(map.limits.get(&parse_relpath(path)), Some(&0), "{}", d.desc);
                    }
                }
                _ => {}
            }
        }
    }
    assert!(
        creates > 3 && truncates > 0 && dbs >= 3 && dropped > 1,
        "{creates} {truncates} {dbs} {dropped}"
    );
    assert!(split > 0, "no record crossed a segment boundary");
}

repo_kind_tests!(block_maps_match_pg_waldump);
