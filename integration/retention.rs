//! Retention end to end: `delete` under each kind of rule over a history of full and delta
//! backups across two timelines with a pin, then restores of every kept backup, PITR inside the
//! window, a refusal before it, verify; a delete killed at each of its failpoints and run again;
//! a backup-push stopped in the middle while a delete runs.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{repo_kind_tests, wait_until, Cluster, RepoKind, TestEnv, Walvault};
use crate::recover::{
    archive_everything, archiving_source, backup_env, backup_push_with, ids, last_commit_time,
    recover_and_start,
};

repo_kind_tests!(
    delete_keeps_what_recovery_needs,
    delete_killed_at_each_step_completes_when_run_again,
    delete_spares_a_running_backup_push,
);

fn insert(cluster: &Cluster, client: i32, n: usize) {
    for _ in 0..n {
        cluster.psql(&format!("INSERT INTO t (client) VALUES ({client})"));
    }
}

fn json(wv: &Walvault, args: &[&str]) -> Value {
    let out = wv.run(args);
    out.assert_success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", out.stdout))
}

/// backup-list --json: (name, keep, kept_by) per backup, oldest first.
fn listed(wv: &Walvault) -> Vec<(String, bool, Value)> {
    json(wv, &["backup-list", "--json"])
        .as_array()
        .expect("an array")
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["keep"].as_bool().unwrap(),
                b["kept_by"].clone(),
            )
        })
        .collect()
}

fn newest(wv: &Walvault) -> String {
    listed(wv).last().unwrap().0.clone()
}

fn push(env: &TestEnv, wv: &Walvault, cluster: &Cluster, args: &[&str]) -> String {
    backup_push_with(env, wv, cluster, args).assert_success();
    newest(wv)
}

/// Backups B1 (full, pinned at creation), B2 (delta), B3 (full) on timeline 1; a PITR fork to
/// timeline 2 with B4 (full) and B5 (delta). `delete --retain-full 1` must keep B4 and B5 (the
/// newest full and its delta) and B1 (pinned), delete B2 and B3, and prove it.
fn delete_keeps_what_recovery_needs(kind: RepoKind) {
    let env = TestEnv::new("retention-policies");
    let (repo, wv, mut source) = archiving_source(&env, kind);
    // archiving_source took a first backup: it expires under every policy below.
    insert(&source, 1, 2);
    let b1 = push(&env, &wv, &source, &["--full", "--keep"]);
    let b1_rows = ids(&source, "");
    insert(&source, 1, 3);
    archive_everything(&source);
    push(&env, &wv, &source, &["--delta"]);
    insert(&source, 1, 2);
    let b3 = push(&env, &wv, &source, &["--full"]);
    insert(&source, 1, 2);
    let before_window = last_commit_time(&source, "");
    source.psql("SELECT pg_create_restore_point('fork')");
    insert(&source, -1, 1);
    archive_everything(&source);
    source.stop();

    let (fork, out) = recover_and_start(
        &env,
        &wv,
        "fork",
        &["--target-name", "fork", "--keep-archive-command"],
    );
    assert_eq!(
        fork.psql("SELECT timeline_id FROM pg_control_checkpoint()"),
        "2",
        "{out}"
    );
    let b4 = push(&env, &wv, &fork, &["--full"]);
    // Stop times are whole seconds: the planner trusts only targets a second past one.
    std::thread::sleep(Duration::from_millis(1100));
    insert(&fork, 2, 3);
    let inside = last_commit_time(&fork, "");
    let inside_rows = ids(&fork, "");
    insert(&fork, 2, 2);
    let b5 = push(&env, &wv, &fork, &["--delta"]);
    let b5_rows = ids(&fork, "");
    insert(&fork, 2, 2);
    archive_everything(&fork);

    // Daily 1 alone keeps today's newest backup (B5, with B4 as its parent) and the pin.
    let plan = json(&wv, &["delete", "--keep-daily", "1", "--dry-run", "--json"]);
    let verdict = |plan: &Value, name: &str| -> Vec<String> {
        let b = plan["backups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {plan}"));
        b["kept_by"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(verdict(&plan, &b5), ["daily"], "{plan}");
    assert_eq!(verdict(&plan, &b4), ["daily"], "{plan}");
    assert_eq!(verdict(&plan, &b1), ["pinned"], "{plan}");
    assert!(verdict(&plan, &b3).is_empty(), "{plan}");

    // A window reaching back past every backup keeps them all; the dry run changes nothing.
    let keys_before = repo.keys();
    let plan = json(
        &wv,
        &["delete", "--retain-window", "30d", "--dry-run", "--json"],
    );
    assert_eq!(
        plan["delete"]["backups"].as_array().unwrap().len(),
        0,
        "{plan}"
    );
    let plan = json(
        &wv,
        &["delete", "--retain-full", "1", "--dry-run", "--json"],
    );
    assert_eq!(plan["dry_run"], true);
    assert_eq!(
        plan["delete"]["backups"].as_array().unwrap().len(),
        3,
        "{plan}"
    );
    assert_eq!(repo.keys(), keys_before, "a dry run deleted something");
    // status shows the configured policy's verdict: the backups that delete would expire.
    let status = wv.run_with_env(&["status", "--json"], &[("WALVAULT_RETENTION_FULL", "1")]);
    status.assert_success();
    let status: Value = serde_json::from_str(&status.stdout).unwrap();
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v
            .as_array()
            .unwrap_or_else(|| panic!("an array: {v}"))
            .iter()
            .map(|b| b.as_str().or(b["name"].as_str()).unwrap().to_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(
        names(&status["retention"]["expires"]),
        names(&plan["delete"]["backups"]),
        "{status}"
    );

    // Without a policy, delete refuses.
    let out = wv.run(&["delete"]);
    out.assert_failure();
    out.assert_stderr_contains("no retention policy");

    let done = json(&wv, &["delete", "--retain-full", "1", "--json"]);
    assert_eq!(done["deleted"]["backups"], 3, "{done}");
    assert!(
        done["delete"]["wal_objects"].as_u64().unwrap() > 0,
        "{done}"
    );
    let names: Vec<(String, bool, Value)> = listed(&wv);
    assert_eq!(
        names.iter().map(|n| n.0.as_str()).collect::<Vec<_>>(),
        [b1.as_str(), b4.as_str(), b5.as_str()]
    );
    assert!(names[0].1, "B1 is pinned: {names:?}");
    // Nothing of a deleted backup stays: its packs' page sums went with them.
    let kept: Vec<String> = names.iter().map(|n| format!("backups/{}/", n.0)).collect();
    let left: Vec<String> = repo
        .objects()
        .into_iter()
        .filter(|k| k.starts_with("backups/") && !kept.iter().any(|n| k.starts_with(n)))
        .collect();
    assert!(left.is_empty(), "objects of deleted backups: {left:?}");
    wv.run(&["verify"]).assert_success();

    // Every kept backup restores to its own end, equal to the source then.
    let (r, out) = recover_and_start(&env, &wv, "r1", &["--backup", &b1, "--target-immediate"]);
    assert_eq!(ids(&r, ""), b1_rows, "{out}");
    let (r, out) = recover_and_start(&env, &wv, "r5", &["--backup", &b5, "--target-immediate"]);
    assert_eq!(ids(&r, ""), b5_rows, "{out}");
    // PITR inside the window is exact.
    let (r, out) = recover_and_start(&env, &wv, "inside", &["--target-time", &inside]);
    assert_eq!(ids(&r, ""), inside_rows, "{out}");
    // Before the window (after B1's end, before B4's): refused, naming the window.
    let out = wv.run(&[
        "recover",
        "--pgdata",
        env.path().join("before").to_str().unwrap(),
        "--target-time",
        &before_window,
        "--dry-run",
    ]);
    out.assert_failure();
    let b4_stop = json(&wv, &["backup-list", "--json"])[1]["stop_time"]
        .as_str()
        .unwrap()
        .to_owned();
    out.assert_stderr_contains(&format!("recoverable window: from {b4_stop}"));

    // Applied again, the policy finds nothing more to delete.
    let again = json(&wv, &["delete", "--retain-full", "1", "--json"]);
    assert_eq!(again["deleted"]["objects"], 0, "{again}");
    // Released, B1 goes with the next delete.
    wv.run(&["backup-mark", &b1, "--release"]).assert_success();
    let done = json(&wv, &["delete", "--retain-full", "1", "--json"]);
    assert_eq!(done["deleted"]["backups"], 1, "{done}");
    wv.run(&["verify"]).assert_success();

    // With a policy configured, backup-push applies it after the backup and logs one line.
    let mut envs = backup_env(&env, &fork);
    envs.push(("WALVAULT_RETENTION_FULL", "1".to_owned()));
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = wv.run_with_env(&["backup-push", "--full"], &envs);
    out.assert_success();
    out.assert_stderr_contains("retention (full = 1): deleted 2 backups");
    assert_eq!(listed(&wv).len(), 1);
    wv.run(&["verify"]).assert_success();
}

/// A delete killed (SIGKILL) at each of its failpoints leaves a repository that verifies, and the
/// next delete completes the job (orphaned packs go once past the grace period).
fn delete_killed_at_each_step_completes_when_run_again(kind: RepoKind) {
    let env = TestEnv::new("retention-kill");
    let (_repo, wv, source) = archiving_source(&env, kind);
    // With the backup archiving_source took, six fulls: each step below expires one.
    for _ in 0..5 {
        insert(&source, 1, 2);
        archive_everything(&source);
        push(&env, &wv, &source, &["--full"]);
    }
    // Stop times are whole seconds: the planner trusts only targets a second past one.
    std::thread::sleep(Duration::from_millis(1100));
    insert(&source, 1, 2);
    let last = last_commit_time(&source, "");
    let rows = ids(&source, "");
    archive_everything(&source);
    for (point, keep) in [
        ("delete-before-backups", "5"),
        ("delete-after-manifest", "4"),
        ("delete-before-wal", "3"),
        ("delete-wal-batch", "2"),
        ("delete-before-garbage", "1"),
    ] {
        let mut running = wv.spawn(
            &["delete", "--retain-full", keep],
            &[("WALVAULT_FAILPOINTS", point)],
        );
        running.wait_for_stderr(
            &format!("failpoint {point} reached"),
            Duration::from_secs(120),
        );
        // A second delete while the first runs refuses, naming the holder.
        let out = wv.run(&["delete", "--retain-full", keep]);
        out.assert_failure();
        out.assert_stderr_contains(&format!(
            "another delete holds the repository's retention lock (held by process {}",
            running.pid()
        ));
        running.kill();
        wv.run(&["verify"]).assert_success();
        let out = wv.run_with_env(
            &["delete", "--retain-full", keep, "--json"],
            &[("WALVAULT_RETENTION_GRACE", "0s")],
        );
        out.assert_success();
        wv.run(&["verify"]).assert_success();
    }
    assert_eq!(listed(&wv).len(), 1);
    let (r, out) = recover_and_start(&env, &wv, "last", &["--target-time", &last]);
    assert_eq!(ids(&r, ""), rows, "{out}");
}

/// A backup-push stopped (SIGSTOP) after its first packs are stored survives a delete: its packs
/// are younger than the grace period, and it completes once resumed.
fn delete_spares_a_running_backup_push(kind: RepoKind) {
    let env = TestEnv::new("retention-running-push");
    let (repo, wv, source) = archiving_source(&env, kind);
    // About 60 MiB of rows that do not compress, so the push stores several packs.
    source.psql(
        "CREATE TABLE big AS SELECT g, md5(g::text) || md5((g * 7)::text) AS pad \
         FROM generate_series(1, 600000) g",
    );
    archive_everything(&source);
    push(&env, &wv, &source, &["--full"]);
    let before = listed(&wv);

    let envs = backup_env(&env, &source);
    let mut args: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    args.push(("WALVAULT_BACKUP_CONCURRENCY", "1"));
    let running = wv.spawn(&["backup-push", "--full"], &args);
    let manifests = |keys: &[String]| keys.iter().filter(|k| k.ends_with("/manifest")).count();
    // Packs (and a local store's temp files) under a backup that has no manifest yet.
    let orphan_packs = |keys: &[String]| -> Vec<String> {
        let complete: Vec<&str> = keys
            .iter()
            .filter_map(|k| k.strip_suffix("/manifest"))
            .collect();
        keys.iter()
            .filter(|k| k.contains("/packs/") && !complete.iter().any(|c| k.starts_with(c)))
            .cloned()
            .collect()
    };
    wait_until(
        "a pack of the running backup",
        Duration::from_secs(120),
        || !orphan_packs(&repo.keys()).is_empty(),
    );
    signal("STOP", running.pid());
    // Listed again once stopped: a temp file seen before the signal may since have been
    // renamed to its pack, which is the push's progress, not a deletion.
    let keys = repo.keys();
    let orphan_packs = orphan_packs(&keys);
    assert!(!orphan_packs.is_empty(), "no pack of the running push");
    assert_eq!(manifests(&keys), before.len(), "the push finished too soon");

    let done = json(&wv, &["delete", "--retain-full", "1", "--json"]);
    assert_eq!(done["deleted"]["backups"], 1, "{done}");
    let keys = repo.keys();
    for pack in &orphan_packs {
        assert!(
            keys.contains(pack),
            "{pack} of the running push was deleted"
        );
    }
    signal("CONT", running.pid());
    let (status, stderr) = running.wait(Duration::from_secs(300));
    assert!(status.success(), "{}", stderr.join("\n"));
    let name = newest(&wv);
    assert_eq!(listed(&wv).len(), 2);
    let (r, out) = recover_and_start(
        &env,
        &wv,
        "pushed",
        &["--backup", &name, "--target-immediate"],
    );
    assert_eq!(r.psql("SELECT count(*) FROM big"), "600000", "{out}");
    wv.run(&["verify"]).assert_success();
}

fn signal(which: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([&format!("-{which}"), &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{which} {pid}");
}
