//! kill -9 everywhere: each command that writes is stopped at each of its failpoints (the table
//! in `src/failpoint.rs`, included here so a new point cannot go untested) and SIGKILLed there;
//! then WAL archiving and backups are killed at seeded random times under a pgbench load. After
//! every kill: nothing half-written is visible (a fetch finds the whole object or none), `verify`
//! passes (every object re-read against its checksum), a re-run completes; a killed restore never
//! looks complete (no `pg_control`, or PostgreSQL refuses to start it, and `recover` refuses the
//! directory). At the end, every segment PostgreSQL saw archived is in the repository and a
//! recovery from the archive equals the source (`pg_dumpall`).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{
    free_port, repo_kind_tests, wait_until, Cluster, ClusterConfig, RepoKind, TestEnv, Walvault,
};

#[path = "../src/failpoint.rs"]
#[allow(dead_code)]
mod failpoint;

repo_kind_tests!(
    kills_at_every_failpoint_and_at_random_under_load,
    wal_receive_killed_at_every_failpoint,
);

/// Longest wait for a command to reach its failpoint; generous, the machine is shared.
const PAUSE: Duration = Duration::from_secs(90);

/// Failpoints the main test does not pause at, and what covers them instead.
const ELSEWHERE: &[(&str, &str)] = &[
    (
        "delete-before-backups",
        "retention::delete_killed_at_each_step_completes_when_run_again",
    ),
    (
        "delete-after-manifest",
        "retention::delete_killed_at_each_step_completes_when_run_again",
    ),
    (
        "delete-before-wal",
        "retention::delete_killed_at_each_step_completes_when_run_again",
    ),
    (
        "delete-wal-batch",
        "retention::delete_killed_at_each_step_completes_when_run_again",
    ),
    (
        "delete-before-garbage",
        "retention::delete_killed_at_each_step_completes_when_run_again",
    ),
    (
        "receive-fragment-stored",
        "wal_receive_killed_at_every_failpoint",
    ),
    (
        "receive-segment-stored",
        "wal_receive_killed_at_every_failpoint",
    ),
    (
        "receive-slot-advanced",
        "wal_receive_killed_at_every_failpoint",
    ),
];

/// The libpq environment that reaches `cluster` through its socket in the test dir.
fn pg_env<'a>(env: &'a TestEnv, cluster: &'a Cluster, port: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("PGHOST", env.path().to_str().unwrap()),
        ("PGPORT", port),
        ("PGUSER", "postgres"),
        ("PGDATABASE", "postgres"),
        ("PGDATA", cluster.datadir().to_str().unwrap()),
    ]
}

/// Runs walvault with `failpoint` set, waits until it pauses there, SIGKILLs it.
fn kill_at(wv: &Walvault, failpoint: &str, args: &[&str], envs: &[(&str, &str)]) {
    let mut envs = envs.to_vec();
    envs.push(("WALVAULT_FAILPOINTS", failpoint));
    let mut running = wv.spawn(args, &envs);
    running.wait_for_stderr(&format!("failpoint {failpoint} reached"), PAUSE);
    running.kill();
}

/// Processes whose command line holds every one of `parts` (this test's own paths among them).
fn pids_with(parts: &[&str]) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if parts.iter().all(|p| args.iter().any(|a| a == p)) {
            pids.push(pid);
        }
    }
    pids
}

fn sigkill(pid: i32) -> bool {
    // The process may have ended meanwhile: then there is nothing to count.
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn verify_passes(wv: &Walvault, after: &str) {
    let out = wv.run(&["verify"]);
    assert_eq!(out.code(), Some(0), "verify after {after}:\n{out}");
}

fn backups(wv: &Walvault) -> usize {
    let out = wv.run(&["backup-list", "--json"]);
    out.assert_success();
    serde_json::from_str::<Vec<serde_json::Value>>(&out.stdout)
        .unwrap()
        .len()
}

/// wal-fetch of `name` finds the whole `expected` or, when `may_be_absent`, nothing at all.
fn fetch_is_whole_or_absent(
    env: &TestEnv,
    wv: &Walvault,
    name: &str,
    expected: &[u8],
    may_be_absent: bool,
) {
    let dir = env.unique_dir("fetched");
    let dest = dir.join(name);
    let out = wv.wal_fetch(name, &dest);
    match out.code() {
        Some(0) => assert!(
            std::fs::read(&dest).unwrap() == expected,
            "{name} fetched different bytes"
        ),
        Some(1) if may_be_absent => assert!(!dest.exists(), "{name}: not found, but written"),
        _ => panic!("wal-fetch {name}:\n{out}"),
    }
}

/// xorshift64, so a failing run can be repeated from the seed it prints.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn kills_at_every_failpoint_and_at_random_under_load(kind: RepoKind) {
    let env = TestEnv::new("crash");
    let repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    // Archiving held back at first: the segments are pushed (and killed) by hand.
    let src = env.cluster(
        ClusterConfig::new("src")
            .wal_segsize_mb(1)
            .set("autovacuum", "off")
            .archive_with(&wv)
            .set("archive_command", "false"),
    );
    src.psql("CREATE TABLE t (id serial PRIMARY KEY, v text)");
    let port = src.port().to_string();
    let pg = pg_env(&env, &src, &port);
    let mut covered: BTreeSet<&str> = BTreeSet::new();
    let mut kills = 0usize;

    // wal-push, at every step of storing a segment and its summary.
    let local_steps = [
        "local-temp-written",
        "local-temp-fsynced",
        "local-linked",
        "local-dir-fsynced",
    ];
    let mut push_points = vec!["wal-push-claim-taken", "store-before-commit"];
    if kind == RepoKind::Local {
        push_points.extend(local_steps);
    }
    push_points.extend(["store-committed", "wal-stored", "summary-written"]);
    let copies = env.mkdir("copies");
    // The repository's identity first, so verify has a repository to check after each kill.
    wv.wal_push(&src.switch_wal_and_copy(&copies))
        .assert_success();
    let mut pushed = Vec::new();
    for point in push_points {
        src.psql("INSERT INTO t (v) SELECT md5(g::text) FROM generate_series(1, 2000) g");
        let segment = src.switch_wal_and_copy(&copies);
        let name = segment.file_name().unwrap().to_str().unwrap().to_owned();
        let bytes = std::fs::read(&segment).unwrap();
        kill_at(&wv, point, &["wal-push", segment.to_str().unwrap()], &[]);
        kills += 1;
        fetch_is_whole_or_absent(&env, &wv, &name, &bytes, true);
        verify_passes(&wv, &format!("wal-push killed at {point}"));
        wv.wal_push(&segment).assert_success();
        fetch_is_whole_or_absent(&env, &wv, &name, &bytes, false);
        pushed.push((name, bytes));
        covered.insert(point);
    }

    // The detached pusher, started by PostgreSQL's own archive_command for the backlog held
    // back above; it inherits the failpoint. Its stderr is closed, so a pause is seen from
    // outside: a claim file held open, or its first marker written.
    let config = repo.config_path().to_str().unwrap().to_owned();
    let pushed_dir = src.datadir().join("walvault_spool/pushed");
    for point in ["pusher-claim-taken", "pusher-marker-written"] {
        for _ in 0..3 {
            src.psql("INSERT INTO t (v) SELECT md5(g::text) FROM generate_series(1, 2000) g");
            src.switch_wal();
        }
        set_archive_command(
            &src,
            &format!("WALVAULT_FAILPOINTS={point} {}", wv.archive_command()),
        );
        wait_until(&format!("the pusher to pause at {point}"), PAUSE, || {
            let pushers = pids_with(&["wal-push-ahead", &config]);
            let paused = match point {
                "pusher-claim-taken" => pushers.iter().any(|p| holds_open(*p, ".claim")),
                _ => marker_written(&pushed_dir),
            };
            !pushers.is_empty() && paused
        });
        set_archive_command(&src, "false");
        // Calls still running may start another pusher: kill until none is left.
        wait_until("every pusher killed", PAUSE, || {
            for pid in pids_with(&["wal-push-ahead", &config]) {
                kills += usize::from(sigkill(pid));
            }
            pids_with(&["wal-push", &config]).is_empty()
                && pids_with(&["wal-push-ahead", &config]).is_empty()
        });
        verify_passes(&wv, &format!("the pusher killed at {point}"));
        covered.insert(point);
    }

    // Archiving on: PostgreSQL archives what was held back (the pushed segments are found
    // identical), then backups are killed at each step.
    set_archive_command(&src, &wv.archive_command());
    let last = src.switch_wal();
    src.wait_for_archived(&last, Duration::from_secs(120));
    for point in [
        "backup-push-started",
        "backup-push-pack-stored",
        "backup-push-stopped",
        "backup-push-manifest-written",
    ] {
        let before = backups(&wv);
        kill_at(&wv, point, &["backup-push", "--full"], &pg);
        kills += 1;
        let complete = usize::from(point == "backup-push-manifest-written");
        assert_eq!(backups(&wv), before + complete, "after a kill at {point}");
        verify_passes(&wv, &format!("backup-push killed at {point}"));
        covered.insert(point);
    }
    let out = wv.run_with_env(&["backup-push", "--full"], &pg);
    out.assert_success();

    // backup-fetch and recover: a killed restore never looks complete.
    for point in [
        "backup-fetch-files-written",
        "backup-fetch-files-fsynced",
        "backup-fetch-pg-control-written",
    ] {
        let target = env.path().join(format!("fetch-{point}"));
        kill_at(
            &wv,
            point,
            &["backup-fetch", "LATEST", target.to_str().unwrap()],
            &[],
        );
        kills += 1;
        let complete = point == "backup-fetch-pg-control-written";
        assert_eq!(
            target.join("global/pg_control").exists(),
            complete,
            "after a kill at {point}"
        );
        let again = wv.run(&["recover", "--pgdata", target.to_str().unwrap()]);
        assert_ne!(
            again.code(),
            Some(0),
            "recover into a killed restore's directory:\n{again}"
        );
        let fresh = env.path().join(format!("refetch-{point}"));
        wv.run(&["backup-fetch", "LATEST", fresh.to_str().unwrap()])
            .assert_success();
        covered.insert(point);
    }
    for point in ["recover-restored", "recover-settings-written"] {
        let target = env.path().join(format!("recover-{point}"));
        kill_at(
            &wv,
            point,
            &["recover", "--pgdata", target.to_str().unwrap()],
            &[],
        );
        kills += 1;
        let again = wv.run(&["recover", "--pgdata", target.to_str().unwrap()]);
        assert_ne!(
            again.code(),
            Some(0),
            "recover into a killed recover's directory:\n{again}"
        );
        if point == "recover-restored" {
            // Restored but not told to recover: PostgreSQL must refuse it rather than start a
            // cluster that never replayed the backup's WAL.
            let mut restored = env.cluster_from_copy(ClusterConfig::new("killed-recover"), &target);
            let start = restored.try_start();
            assert!(
                !start.status.success() || !restored.is_running(),
                "PostgreSQL started a restore that recover never finished:\n{start}"
            );
        }
        covered.insert(point);
    }

    // wal-fetch and the prefetcher: nothing half-written where PostgreSQL looks.
    let (name, bytes) = &pushed[0];
    let fetch_dir = env.mkdir("pg_wal_fetch");
    let dest = fetch_dir.join("RECOVERYXLOG");
    for point in ["wal-fetch", "restored-temp-written"] {
        kill_at(
            &wv,
            point,
            &["wal-fetch", name, dest.to_str().unwrap()],
            &[],
        );
        kills += 1;
        assert!(
            !dest.exists(),
            "a wal-fetch killed at {point} left {}",
            dest.display()
        );
        wv.wal_fetch(name, &dest).assert_success();
        assert!(
            std::fs::read(&dest).unwrap() == *bytes,
            "{name} fetched different bytes"
        );
        std::fs::remove_file(&dest).unwrap();
        covered.insert(point);
    }
    // The prefetcher pauses after its first spooled segment; it is killed there (found by its
    // command line, which names this test's config file), and later fetches still serve whole files.
    let first = src.switch_wal();
    src.psql("INSERT INTO t (v) VALUES ('x')");
    let second = src.switch_wal();
    src.psql("INSERT INTO t (v) VALUES ('y')");
    let third = src.switch_wal();
    src.wait_for_archived(&third, Duration::from_secs(120));
    let spooled = env.mkdir("prefetch/pg_wal");
    let out = wv.run_with_env(
        &[
            "wal-fetch",
            &first,
            spooled.join("RECOVERYXLOG").to_str().unwrap(),
        ],
        &[
            ("WALVAULT_FAILPOINTS", "prefetch-spool-written"),
            ("WALVAULT_PREFETCH", "2"),
        ],
    );
    out.assert_success();
    let mut killed = Vec::new();
    wait_until("the prefetcher to pause", PAUSE, || {
        let spool_files = walk_files(&env.path().join("prefetch"));
        let pids = pids_with(&["wal-prefetch", repo.config_path().to_str().unwrap()]);
        let spooled = spool_files.iter().any(|f| {
            let file = f.rsplit('/').next().unwrap_or(f);
            !file.starts_with('.') && (file.starts_with(&second) || file.starts_with(&third))
        });
        if spooled && !pids.is_empty() {
            killed = pids;
            true
        } else {
            false
        }
    });
    for pid in &killed {
        assert!(sigkill(*pid), "kill -9 {pid}");
        kills += 1;
    }
    for next in [&second, &third] {
        let dest = spooled.join("RECOVERYXLOG");
        let _ = std::fs::remove_file(&dest);
        wv.wal_fetch(next, &dest).assert_success();
        assert_eq!(std::fs::read(&dest).unwrap(), repo_content(&env, &wv, next));
    }
    covered.insert("prefetch-spool-written");

    // Kills at seeded random times under load: PostgreSQL's archive_command (and the pusher it
    // starts), and backup-push.
    let seed = std::env::var("WALVAULT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| (std::process::id() as u64 * 0x9E37_79B9) ^ kind as u64);
    eprintln!("random kills: seed {seed} (WALVAULT_CRASH_SEED to repeat)");
    let mut rng = Rng(seed | 1);
    src.pgbench(&["-i", "-s", "2", "-q"]);
    let load = std::thread::scope(|scope| {
        let bench = scope.spawn(|| src.pgbench(&["-c", "2", "-T", "20", "-n"]));
        let mut random_kills = 0;
        let started = Instant::now();
        while !bench.is_finished() {
            std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
            let mut pids = pids_with(&["wal-push", &config]);
            pids.extend(pids_with(&["wal-push-ahead", &config]));
            if let Some(pid) = pids.get(rng.below(pids.len().max(1) as u64) as usize) {
                random_kills += usize::from(sigkill(*pid));
            }
            if random_kills % 5 == 4 && started.elapsed() < Duration::from_secs(15) {
                let backup = wv.spawn(&["backup-push", "--full"], &pg);
                std::thread::sleep(Duration::from_millis(rng.below(3000)));
                backup.kill();
                random_kills += 1;
            }
        }
        bench.join().unwrap();
        random_kills
    });
    eprintln!("random kills under load: {load}");
    kills += load;

    // The end: everything archived, nothing acknowledged lost, the archive restores the source.
    let out = wv.run_with_env(&["backup-push"], &pg);
    out.assert_success();
    src.switch_wal();
    // Reading pgbench's tables sets hint bits, which (with data checksums) writes WAL: that too
    // is archived before recovery lists the archive, by a switch that adds no row of its own.
    let expected = src.dumpall();
    let last = src.psql("SELECT pg_walfile_name(pg_switch_wal())");
    src.wait_for_archived(&last, Duration::from_secs(180));
    let done: Vec<String> = std::fs::read_dir(src.wal_dir().join("archive_status"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".done")
                .map(str::to_owned)
        })
        .collect();
    let stored: BTreeSet<String> = repo.wal_files().into_iter().collect();
    let lost: Vec<&String> = done.iter().filter(|d| !stored.contains(*d)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged to PostgreSQL but not in the repository: {lost:?}"
    );
    verify_passes(&wv, "the random kills");
    let restored = recover_to_end(&env, &wv);
    let got = restored.dumpall();
    if let Some((i, (a, b))) = expected
        .lines()
        .zip(got.lines())
        .enumerate()
        .find(|(_, (a, b))| a != b)
    {
        panic!("the recovered cluster differs from the source at dump line {i}: {a:?} != {b:?}");
    }
    assert_eq!(
        got.lines().count(),
        expected.lines().count(),
        "the recovered cluster's dump has another length"
    );

    for (point, _) in ELSEWHERE {
        covered.insert(point);
    }
    let all: BTreeSet<&str> = failpoint::FAILPOINTS.iter().map(|(n, _)| *n).collect();
    let local_only: BTreeSet<&str> = local_steps.into_iter().collect();
    let missing: Vec<&&str> = all
        .iter()
        .filter(|p| !(covered.contains(*p) || kind != RepoKind::Local && local_only.contains(*p)))
        .collect();
    assert!(
        missing.is_empty(),
        "failpoints no test kills at: {missing:?}"
    );
    eprintln!("crash figures ({kind:?}): kills {kills}, acknowledged segments lost 0, corrupt objects accepted 0");
}

/// `ALTER SYSTEM SET archive_command`, then a reload.
fn set_archive_command(cluster: &Cluster, command: &str) {
    cluster.psql(&format!(
        "ALTER SYSTEM SET archive_command = '{}'",
        command.replace('\'', "''")
    ));
    cluster.psql("SELECT pg_reload_conf()");
}

/// Whether process `pid` has a file open whose path ends with `suffix`.
fn holds_open(pid: i32, suffix: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| target.to_string_lossy().ends_with(suffix))
}

/// Whether the pusher recorded a marker (a file named by a segment) in a repository's directory
/// below `dir`.
fn marker_written(dir: &Path) -> bool {
    let mut repositories = std::fs::read_dir(dir).into_iter().flatten().flatten();
    repositories.any(|repo| {
        std::fs::read_dir(repo.path()).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit())
            })
        })
    })
}

/// The content of the archived WAL file `name`, through a plain wal-fetch.
fn repo_content(env: &TestEnv, wv: &Walvault, name: &str) -> Vec<u8> {
    let dest = env.unique_dir("content").join(name);
    wv.wal_fetch(name, &dest).assert_success();
    std::fs::read(dest).unwrap()
}

fn walk_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path.to_string_lossy().into_owned());
        }
    }
    out
}

/// `recover --start` to the end of the archive into a fresh directory; the promoted cluster.
fn recover_to_end(env: &TestEnv, wv: &Walvault) -> Cluster {
    let dir = env.path().join("recovered");
    let port = free_port().to_string();
    let out = wv.run(&[
        "recover",
        "--pgdata",
        dir.to_str().unwrap(),
        "--start",
        "--port",
        &port,
        "--socket-dir",
        env.path().to_str().unwrap(),
    ]);
    out.assert_success();
    let mut cluster = env.cluster_from_copy(ClusterConfig::new("recovered"), &dir);
    cluster.stop();
    cluster.start();
    cluster
}

/// wal-receive killed after a fragment is stored, after a whole segment is, and after it told
/// the server a new flush position: each time the repository verifies, and a restarted receiver
/// goes on so that a recovery from the repository equals the primary.
fn wal_receive_killed_at_every_failpoint(kind: RepoKind) {
    use crate::stream::{
        base_backup, primary_config, receiver_walvault, recover, start_receiver, wait_durable,
    };
    let env = TestEnv::new("crash-receive");
    let repo = env.repo(kind);
    let wv = receiver_walvault(&env, &repo);
    let primary = env.cluster(primary_config("primary"));
    primary.psql("CREATE TABLE t (id serial PRIMARY KEY, v text)");
    let port = primary.port().to_string();
    let pg = [
        ("PGHOST", env.path().to_str().unwrap()),
        ("PGPORT", port.as_str()),
        ("PGUSER", "postgres"),
    ];
    let receiver = start_receiver(&env, &wv, &primary, &[]);
    let backup = base_backup(&env, &primary);
    drop(receiver);
    for point in [
        "receive-fragment-stored",
        "receive-segment-stored",
        "receive-slot-advanced",
    ] {
        let mut envs = pg.to_vec();
        envs.push(("WALVAULT_FAILPOINTS", point));
        let mut running = wv.spawn(&["wal-receive", "--create-slot"], &envs);
        running.wait_for_stderr("streaming from", PAUSE);
        primary.psql("INSERT INTO t (v) SELECT md5(g::text) FROM generate_series(1, 5000) g");
        primary.switch_wal();
        running.wait_for_stderr(&format!("failpoint {point} reached"), PAUSE);
        running.kill();
        verify_passes(&wv, &format!("wal-receive killed at {point}"));
    }
    let _receiver = start_receiver(&env, &wv, &primary, &[]);
    primary.psql("INSERT INTO t (v) VALUES ('end')");
    let expected = primary.dumpall();
    wait_durable(&primary, &primary.psql("SELECT pg_current_wal_lsn()"));
    verify_passes(&wv, "the wal-receive kills");
    let restored = recover(
        &env,
        &env.walvault(repo.config_path()),
        &backup,
        primary.install(),
    );
    assert_eq!(
        restored.psql("SELECT v FROM t ORDER BY id DESC LIMIT 1"),
        "end"
    );
    let got = restored.dumpall();
    let first_difference = expected.lines().zip(got.lines()).find(|(a, b)| a != b);
    assert!(
        got == expected,
        "the recovered cluster differs from the primary: {first_difference:?}"
    );
}
