//! WAL archiving: `wal-push` as archive_command, `wal-fetch` as restore_command, `verify`, and the
//! ways they must fail (bad input, corrupt objects, unreachable storage, bad config, a crash
//! mid-upload) without damaging the repository.

use crate::harness::repo::toml_str;
use crate::harness::{
    free_port, pseudo_random_bytes, repo_kind_tests, Cluster, ClusterConfig, ConfigFile, RepoKind,
    RunOutput, TestEnv, Walvault,
};
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// WAL segment size of the test clusters: 1 MiB makes 100+ segments cheap.
const SEGSIZE_MB: u32 = 1;

/// Bound on one walvault call against an unreachable S3 endpoint.
const UNREACHABLE_BOUND: Duration = Duration::from_secs(60);

repo_kind_tests!(
    archive_under_load_then_restore,
    bad_wal_is_refused_and_repository_unchanged,
    wal_fetch_missing_and_corrupt,
    push_killed_before_commit_exposes_nothing,
    config_errors_are_reported,
    full_size_segments_in_parts,
    wal_fetch_says_not_found_only_for_this_clusters_repository,
);

fn small_segments(name: &str) -> ClusterConfig {
    ClusterConfig::new(name).wal_segsize_mb(SEGSIZE_MB)
}

fn file_name(path: &Path) -> &str {
    path.file_name().unwrap().to_str().unwrap()
}

/// Copies of `count` completed segments of a new, non-archiving cluster `name`, and its system
/// identifier. The copies sit in a directory of their own (no `archive_status/`).
fn segments_of_new_cluster(env: &TestEnv, name: &str, count: usize) -> (Vec<PathBuf>, String) {
    let cluster = env.cluster(small_segments(name));
    let dir = env.mkdir(format!("{name}-segments"));
    let segments = (0..count)
        .map(|_| cluster.switch_wal_and_copy(&dir))
        .collect();
    (segments, cluster.system_identifier())
}

/// A destination for `wal-fetch` laid out like PostgreSQL's: `<fresh pgdata>/pg_wal/<name>`.
fn fetch_target(env: &TestEnv, name: &str) -> PathBuf {
    let pg_wal = env.mkdir(env.unique_dir("fetch").join("pg_wal"));
    pg_wal.join(name)
}

/// A failed `wal-fetch` must leave nothing in pg_wal: no destination, no temporary file.
fn assert_nothing_written(dest: &Path) {
    let left: Vec<_> = fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "failed wal-fetch left {left:?} next to {}",
        dest.display()
    );
}

/// `wal-fetch` into a fresh pg_wal; returns the fetched bytes.
fn fetch(env: &TestEnv, walvault: &Walvault, name: &str) -> Vec<u8> {
    let dest = fetch_target(env, name);
    walvault.wal_fetch(name, &dest).assert_success();
    fs::read(&dest).unwrap_or_else(|e| panic!("wal-fetch succeeded but {}: {e}", dest.display()))
}

/// Parses the summary line `verify: N objects checked, ..., P problems` into (N, P).
fn verify_summary(out: &RunOutput) -> (u64, u64) {
    let line = out
        .stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("verify:"))
        .unwrap_or_else(|| panic!("no `verify:` summary line:\n{out}"));
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || ",;:()".contains(c))
        .filter(|w| !w.is_empty())
        .collect();
    let count_before = |noun: &str| {
        words
            .windows(2)
            .find(|w| w[1].starts_with(noun))
            .and_then(|w| w[0].parse().ok())
            .unwrap_or_else(|| panic!("no `<N> {noun}...` in summary {line:?}:\n{out}"))
    };
    (count_before("object"), count_before("problem"))
}

fn is_segment_name(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The segment number of a segment file name.
fn segment_number(name: &str) -> u64 {
    let segments_per_xlogid = 0x1_0000_0000 / (u64::from(SEGSIZE_MB) << 20);
    let hex = |range: std::ops::Range<usize>| u64::from_str_radix(&name[range], 16).unwrap();
    hex(8..16) * segments_per_xlogid + hex(16..24)
}

/// The tables compared between a cluster and its restored copy, with a total order for each.
const COMPARED_TABLES: [(&str, &str); 5] = [
    ("pgbench_accounts", "aid"),
    ("pgbench_branches", "bid"),
    ("pgbench_tellers", "tid"),
    ("pgbench_history", "t::text"),
    ("random_data", "id"),
];

/// Row count and a digest of every row's text, in order.
fn table_digest(cluster: &Cluster, table: &str, order: &str) -> String {
    cluster.psql(&format!(
        "SELECT count(*) || ' ' || coalesce(md5(string_agg(md5(t::text), '' ORDER BY {order})), '-') \
         FROM {table} t"
    ))
}

/// A cluster archiving through walvault under a pgbench load fills the repository with 100+
/// segments, all verified; a cluster restored from a base backup taken before the load, with
/// walvault as restore_command, recovers to the end of the archive with identical data.
fn archive_under_load_then_restore(kind: RepoKind) {
    let env = TestEnv::new("archive-restore");
    let repo = env.repo(kind);
    let walvault = env.walvault(repo.config_path());
    let source = env.cluster(
        small_segments("source")
            .archive_with(&walvault)
            .set("max_wal_size", "32MB")
            .set("min_wal_size", "4MB"),
    );

    // Without WAL (-X none): the archive must supply every segment the restore needs.
    let restored_dir = env.path().join("restored");
    source.pg_basebackup(&restored_dir, &["-X", "none"]);

    source.psql(
        "CREATE TABLE random_data AS SELECT g AS id, md5(random()::text) AS payload, \
         random() AS r FROM generate_series(1, 20000) g",
    );
    source.pgbench(&["-i", "-s", "10", "-q"]);
    source.pgbench(&["-n", "-c", "4", "-j", "2", "-t", "250"]);
    let last = source.switch_wal();
    source.wait_for_archived(&last, Duration::from_secs(600));
    assert_eq!(
        source.psql("SELECT failed_count FROM pg_stat_archiver"),
        "0",
        "archive_command failed; server log:\n{}",
        source.log_tail(30)
    );

    let segments: Vec<String> = repo
        .wal_files()
        .into_iter()
        .filter(|n| is_segment_name(n))
        .collect();
    assert!(
        segments.len() >= 100,
        "only {} segments archived",
        segments.len()
    );
    let first = segment_number(&segments[0]);
    let missing: Vec<u64> = (first..=segment_number(&last))
        .filter(|n| !segments.iter().any(|s| segment_number(s) == *n))
        .collect();
    assert!(
        missing.is_empty(),
        "segment numbers missing from the archive: {missing:x?}"
    );

    let verify = walvault.run(&["verify"]);
    verify.assert_success();
    let (checked, problems) = verify_summary(&verify);
    assert_eq!(problems, 0, "{verify}");
    assert!(
        checked >= segments.len() as u64,
        "verify checked only {checked} objects:\n{verify}"
    );

    let mut restored = env.cluster_from_copy(
        ClusterConfig::new("restored")
            .set("archive_mode", "off")
            .set("restore_command", walvault.restore_command())
            .set("recovery_target_timeline", "latest"),
        &restored_dir,
    );
    restored.touch("recovery.signal");
    restored.start();
    restored.wait_for_promotion(Duration::from_secs(600));
    assert!(
        restored
            .log()
            .contains(&format!("restored log file \"{last}\" from archive")),
        "recovery did not replay the last archived segment {last}:\n{}",
        restored.log_tail(40)
    );

    assert_eq!(
        source.psql("SELECT count(*) FROM pgbench_accounts"),
        "1000000"
    );
    assert_eq!(source.psql("SELECT count(*) FROM pgbench_history"), "1000");
    for (table, order) in COMPARED_TABLES {
        assert_eq!(
            table_digest(&restored, table, order),
            table_digest(&source, table, order),
            "table {table} differs between source and restored cluster"
        );
    }
}

/// wal-push refuses what is not WAL of this cluster, and a second version of an archived file,
/// leaving the repository untouched; an identical re-push succeeds.
fn bad_wal_is_refused_and_repository_unchanged(kind: RepoKind) {
    let env = TestEnv::new("bad-wal");
    let repo = env.repo(kind);
    let walvault = env.walvault(repo.config_path());
    let (ours, our_sysid) = segments_of_new_cluster(&env, "ours", 2);
    let (foreign, foreign_sysid) = segments_of_new_cluster(&env, "foreign", 4);
    let (segment, next) = (&ours[0], file_name(&ours[1]));
    let name = file_name(segment);
    let original = fs::read(segment).unwrap();

    walvault.wal_push(segment).assert_success();
    assert_eq!(repo.wal_files(), vec![name.to_string()]);
    let stored = repo.snapshot();

    walvault.wal_push(segment).assert_success();
    stored.assert_unchanged(&repo.snapshot(), "re-push of identical content");

    // Same name, one byte changed past the page header.
    // The message names the file and both content checksums (CRC-32 of the WAL bytes).
    let mut altered = original.clone();
    altered[8192 + 100] ^= 0xff;
    let checksums = [&original, &altered].map(|data| format!("{:08x}", crc32fast::hash(data)));
    let altered = env.write_file(format!("altered/{name}"), altered);
    walvault
        .wal_push(&altered)
        .assert_failure()
        .assert_stderr_contains(name)
        .assert_stderr_contains(&checksums[0])
        .assert_stderr_contains(&checksums[1]);
    stored.assert_unchanged(&repo.snapshot(), "re-push of different content");
    assert_eq!(
        fetch(&env, &walvault, name),
        original,
        "stored segment changed"
    );

    let garbage_name = "0000000100000000000000F0";
    let garbage = env.write_file(
        format!("garbage/{garbage_name}"),
        pseudo_random_bytes(original.len(), 7),
    );
    walvault
        .wal_push(&garbage)
        .assert_failure()
        .assert_stderr_contains(garbage_name);
    stored.assert_unchanged(&repo.snapshot(), "push of garbage named like a segment");

    // A real segment of this cluster under the next segment's name: page address mismatch.
    let renamed = env.write_file(format!("renamed/{next}"), &original);
    walvault
        .wal_push(&renamed)
        .assert_failure()
        .assert_stderr_contains(next);
    stored.assert_unchanged(&repo.snapshot(), "push of a segment under another name");

    let foreign_segment = foreign.last().unwrap();
    let foreign_name = file_name(foreign_segment);
    assert!(!ours.iter().any(|s| file_name(s) == foreign_name));
    let out = walvault.wal_push(foreign_segment);
    out.assert_failure().assert_stderr_contains(foreign_name);
    assert!(
        out.stderr.contains(&foreign_sysid) || out.stderr.contains(&our_sysid),
        "the message should name the system identifiers ({our_sysid} vs {foreign_sysid}):\n{out}"
    );
    stored.assert_unchanged(&repo.snapshot(), "push of another cluster's segment");
}

/// wal-fetch: a missing file is a clean "not found" (exit 1); a corrupt object is fatal for
/// recovery (exit above 125); neither writes anything; `verify` names the corrupt object.
fn wal_fetch_missing_and_corrupt(kind: RepoKind) {
    let env = TestEnv::new("fetch-errors");
    let repo = env.repo(kind);
    let walvault = env.walvault(repo.config_path());
    let (segments, _) = segments_of_new_cluster(&env, "source", 2);
    for segment in &segments {
        walvault.wal_push(segment).assert_success();
    }
    let (intact, damaged) = (file_name(&segments[0]), file_name(&segments[1]));
    let damaged_key = format!("wal/{damaged}");
    let size = repo.read(&damaged_key).len();
    assert!(size > 64, "object {damaged_key} is only {size} bytes");
    repo.corrupt(&damaged_key, size / 2);
    let snapshot = repo.snapshot();

    // Recovery probes history files of future timelines, and segments past the end.
    for missing in ["0000000100000000000000A0", "00000002.history"] {
        let dest = fetch_target(&env, missing);
        walvault.wal_fetch(missing, &dest).assert_code(1);
        assert_nothing_written(&dest);
    }

    let dest = fetch_target(&env, damaged);
    walvault
        .wal_fetch(damaged, &dest)
        .assert_fatal_for_recovery()
        .assert_stderr_contains(damaged);
    assert_nothing_written(&dest);

    assert_eq!(
        fetch(&env, &walvault, intact),
        fs::read(&segments[0]).unwrap()
    );
    snapshot.assert_unchanged(&repo.snapshot(), "wal-fetch");

    let verify = walvault.run(&["verify"]);
    verify.assert_failure();
    assert!(
        format!("{}{}", verify.stdout, verify.stderr).contains(damaged),
        "verify does not name the corrupt object {damaged_key}:\n{verify}"
    );
    let (_, problems) = verify_summary(&verify);
    assert!(problems >= 1, "{verify}");
}

/// A destination for `wal-fetch` in a data directory whose `global/pg_control` is `pg_control`'s.
fn fetch_target_in(env: &TestEnv, name: &str, pg_control: &Path) -> PathBuf {
    let dest = fetch_target(env, name);
    let data_dir = dest.parent().unwrap().parent().unwrap();
    env.write_file(
        data_dir.join("global/pg_control"),
        fs::read(pg_control).unwrap(),
    );
    dest
}

/// PostgreSQL ends recovery on "not found" (exit 1): wal-fetch says it only when the repository
/// holds this cluster. An empty repository, a wrong location (another prefix or directory in the
/// same store) and another cluster's repository (by PGDATA's pg_control) are fatal instead,
/// for segments and for the history files recovery probes.
fn wal_fetch_says_not_found_only_for_this_clusters_repository(kind: RepoKind) {
    let env = TestEnv::new("fetch-identity");
    let repo = env.repo(kind);
    let walvault = env.walvault(repo.config_path());
    let missing = ["0000000100000000000000A0", "00000002.history"];
    let assert_fatal = |out: RunOutput, what: &str, dest: &Path| {
        out.assert_fatal_for_recovery().assert_stderr_contains(what);
        assert_nothing_written(dest);
    };
    for name in missing {
        let dest = fetch_target(&env, name);
        assert_fatal(walvault.wal_fetch(name, &dest), "identity", &dest);
    }

    let source = env.cluster(small_segments("source"));
    let segment = source.switch_wal_and_copy(&env.mkdir("segments"));
    walvault.wal_push(&segment).assert_success();
    let ours = source.datadir().join("global/pg_control");
    let other = env.cluster(small_segments("other"));
    let theirs = other.datadir().join("global/pg_control");
    let elsewhere = format!("{}-elsewhere", repo.url());
    if let Some(dir) = elsewhere.strip_prefix("file://") {
        env.mkdir(dir);
    }
    for name in missing {
        let dest = fetch_target(&env, name);
        walvault.wal_fetch(name, &dest).assert_code(1);
        let dest = fetch_target_in(&env, name, &ours);
        walvault.wal_fetch(name, &dest).assert_code(1);
        assert_nothing_written(&dest);

        let dest = fetch_target_in(&env, name, &theirs);
        let out = walvault.wal_fetch(name, &dest);
        assert_fatal(out, &other.system_identifier(), &dest);

        let dest = fetch_target_in(&env, name, &ours);
        let out = walvault.run(&[
            "--repo",
            &elsewhere,
            "wal-fetch",
            name,
            dest.to_str().unwrap(),
        ]);
        assert_fatal(out, "identity", &dest);
    }
    // The segment this cluster archived is served into its own data directory.
    let name = file_name(&segment);
    let dest = fetch_target_in(&env, name, &ours);
    walvault.wal_fetch(name, &dest).assert_success();
    assert_eq!(fs::read(&dest).unwrap(), fs::read(&segment).unwrap());
}

/// A panic in wal-fetch (here forced by a failpoint) must not look like "not found" to
/// PostgreSQL: it exits above 125 with one log line naming the command, the place and the
/// message, and writes nothing.
#[test]
fn a_panic_in_wal_fetch_is_fatal_for_recovery() {
    let env = TestEnv::new("fetch-panic");
    let repo = env.repo(RepoKind::Local);
    let walvault = env.walvault(repo.config_path());
    let name = "000000010000000000000001";
    let dest = fetch_target(&env, name);
    let out = walvault.run_with_env(
        &["wal-fetch", name, dest.to_str().unwrap()],
        &[("WALVAULT_FAILPOINTS", "wal-fetch=panic")],
    );
    out.assert_fatal_for_recovery();
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one log line:\n{out}");
    for part in [
        "walvault wal-fetch ERROR",
        "src/failpoint.rs:",
        "failpoint wal-fetch reached",
    ] {
        assert!(lines[0].contains(part), "{part:?} missing:\n{out}");
    }
    assert_nothing_written(&dest);
}

/// A wal-push SIGKILLed right before it commits leaves no visible object; pushing again
/// succeeds and stores the exact bytes.
fn push_killed_before_commit_exposes_nothing(kind: RepoKind) {
    let env = TestEnv::new("push-killed");
    let repo = env.repo(kind);
    let walvault = env.walvault(repo.config_path());
    let (segments, _) = segments_of_new_cluster(&env, "source", 2);

    // The first push also creates the repository identity; the second finds it.
    for (i, segment) in segments.iter().enumerate() {
        let name = file_name(segment);
        let visible = repo.objects();
        let mut push = walvault.spawn(
            &["wal-push", segment.to_str().unwrap()],
            &[("WALVAULT_FAILPOINTS", "store-before-commit")],
        );
        push.wait_for_stderr(
            "failpoint store-before-commit reached",
            Duration::from_secs(60),
        );
        assert_eq!(
            repo.objects(),
            visible,
            "wal-push of {name} exposed an uncommitted object"
        );
        push.kill();
        assert_eq!(
            repo.objects(),
            visible,
            "killed wal-push of {name} exposed an object"
        );
        if i > 0 {
            let dest = fetch_target(&env, name);
            walvault.wal_fetch(name, &dest).assert_code(1);
            assert_nothing_written(&dest);
        }

        walvault.wal_push(segment).assert_success();
        assert_eq!(fetch(&env, &walvault, name), fs::read(segment).unwrap());
    }

    let verify = walvault.run(&["verify"]);
    verify.assert_success();
    assert_eq!(verify_summary(&verify).1, 0, "{verify}");
}

/// A missing or malformed config file fails both commands, naming the file or the key; wal-fetch
/// fails as fatal for recovery, never as "not found".
fn config_errors_are_reported(kind: RepoKind) {
    let env = TestEnv::new("config-errors");
    let repo = env.repo(kind);
    let walvault = env.walvault(repo.config_path());
    let (segments, _) = segments_of_new_cluster(&env, "source", 1);
    let name = file_name(&segments[0]);

    let cases = [
        (env.path().join("missing.toml"), "missing.toml"),
        (
            env.write_file(
                "broken.toml",
                format!("this is not toml\n{}", repo.config().render()),
            ),
            "broken.toml",
        ),
        (
            env.write_config(
                "bad-value.toml",
                &repo.config().set("push_concurrency", &toml_str("many")),
            ),
            "push_concurrency",
        ),
    ];
    for (config, needle) in &cases {
        let misconfigured = walvault.with_config(config);
        misconfigured
            .wal_push(&segments[0])
            .assert_failure()
            .assert_stderr_contains(needle);
        let dest = fetch_target(&env, name);
        misconfigured
            .wal_fetch(name, &dest)
            .assert_fatal_for_recovery()
            .assert_stderr_contains(needle);
        assert_nothing_written(&dest);
    }
    assert_eq!(
        repo.keys(),
        Vec::<String>::new(),
        "misconfigured walvault wrote to the repository"
    );
}

/// An S3 endpoint that refuses connections, and one that accepts them and never answers: wal-push
/// fails and wal-fetch fails fatally for recovery, both within a bounded time.
#[test]
fn unreachable_s3_endpoint_fails_in_bounded_time() {
    let env = TestEnv::new("s3-unreachable");
    let (segments, _) = segments_of_new_cluster(&env, "source", 1);
    let name = file_name(&segments[0]);
    // Bound but never accepting: connections complete, requests get no answer.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoints = [
        ("refusing", free_port()),
        ("silent", silent.local_addr().unwrap().port()),
    ];
    for (what, port) in endpoints {
        let config = ConfigFile::s3(
            "s3://walvault-unreachable/cluster",
            &format!("http://127.0.0.1:{port}"),
        )
        .set_s3("timeout", &toml_str("2s"))
        .set_s3("max_attempts", "2");
        let walvault = env.walvault(&env.write_config(&format!("{what}.toml"), &config));

        let push = walvault.wal_push(&segments[0]);
        push.assert_failure();
        assert!(
            push.elapsed < UNREACHABLE_BOUND,
            "{what} endpoint: wal-push too slow:\n{push}"
        );
        assert!(
            !push.stderr.trim().is_empty(),
            "{what} endpoint: no message:\n{push}"
        );

        let dest = fetch_target(&env, name);
        let fetched = walvault.wal_fetch(name, &dest);
        fetched.assert_fatal_for_recovery();
        assert!(
            fetched.elapsed < UNREACHABLE_BOUND,
            "{what} endpoint: wal-fetch too slow:\n{fetched}"
        );
        assert_nothing_written(&dest);
    }
}

/// 16 MiB segments stored uncompressed in 5 MiB parts: on S3 each push is a multipart upload, and
/// one killed before `CompleteMultipartUpload` must expose nothing.
fn full_size_segments_in_parts(kind: RepoKind) {
    let env = TestEnv::new("multipart");
    let repo = env.repo(kind);
    let config = repo
        .config()
        .set("compression", &toml_str("none"))
        .set_s3("part_size", &(5u64 << 20).to_string());
    let walvault = env.walvault(&env.write_config("parts.toml", &config));
    let source = env.cluster(ClusterConfig::new("source").wal_segsize_mb(16));
    let dir = env.mkdir("segments");
    let first = source.switch_wal_and_copy(&dir);
    let second = source.switch_wal_and_copy(&dir);
    walvault.wal_push(&first).assert_success();

    let visible = repo.objects();
    let mut push = walvault.spawn(
        &["wal-push", second.to_str().unwrap()],
        &[("WALVAULT_FAILPOINTS", "store-before-commit")],
    );
    push.wait_for_stderr(
        "failpoint store-before-commit reached",
        Duration::from_secs(60),
    );
    push.kill();
    assert_eq!(
        repo.objects(),
        visible,
        "a killed multipart upload exposed an object"
    );

    walvault.wal_push(&second).assert_success();
    for segment in [&first, &second] {
        let content = fs::read(segment).unwrap();
        assert_eq!(content.len(), 16 << 20);
        assert_eq!(fetch(&env, &walvault, file_name(segment)), content);
    }
    let verify = walvault.run(&["verify"]);
    verify.assert_success();
    // The identity, two segments, their two summaries and the status object.
    assert_eq!(verify_summary(&verify), (6, 0), "{verify}");
}

/// A mistyped command gets suggestions of commands a user can run, never the internal helpers
/// (`wal-prefetch`, `wal-push-ahead`).
#[test]
fn typo_suggestions_name_only_user_commands() {
    let env = TestEnv::new("typo-suggestions");
    let repo = env.repo(RepoKind::Local);
    let walvault = env.walvault(repo.config_path());
    for (typo, meant, helper) in [
        ("wal-fetc", "'wal-fetch'", "wal-prefetch"),
        ("wal-push-ahea", "'wal-push'", "wal-push-ahead"),
    ] {
        let out = walvault.run(&[typo]);
        out.assert_code(2).assert_stderr_contains(meant);
        assert!(!out.stderr.contains(helper), "{out}");
    }
}

/// A command's help lists its own options first and the options every command takes apart,
/// under their own heading.
#[test]
fn command_help_keeps_global_options_apart() {
    let env = TestEnv::new("help-headings");
    let repo = env.repo(RepoKind::Local);
    let walvault = env.walvault(repo.config_path());
    let out = walvault.run(&["help", "recover"]);
    out.assert_success();
    let at = |needle: &str| {
        out.stdout
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in the help:\n{out}"))
    };
    assert!(at("--pgdata") < at("Global options:"), "{out}");
    assert!(at("Global options:") < at("--config <FILE>"), "{out}");
}
