//! A cluster made the Debian and Ubuntu way (`pg_createcluster`), whose `postgresql.conf`,
//! `pg_hba.conf`, `pg_ident.conf` and `conf.d/` live in `/etc/postgresql/<major>/<name>`:
//! archived and backed up with walvault, then `recover --start` into a new directory just works,
//! reads only the restored configuration, and holds the same data. Needs postgresql-common
//! (`pg_createcluster`), which Debian's postgresql-15 brings; without it the test fails. Also,
//! on 16 (an npm build from integration/run.sh), an `hba_file` outside the data directory whose
//! `include` and `include_dir` records name more files: the restore reads their backed-up copies.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::backup::backup_push;
use crate::harness::cmd::{path_str, run_bounded};
use crate::harness::{
    free_port, give_to_postgres, repo_kind_tests, wait_until, ClusterConfig, PgInstall, RepoKind,
    TestEnv,
};
use crate::recover::recover_start;

repo_kind_tests!(debian_cluster_recovers_with_its_configuration);

const MAJOR: &str = "15";

/// A `pg_createcluster` cluster, dropped (`pg_dropcluster --stop`) when the test ends, passed
/// or failed.
struct DebianCluster {
    name: String,
    port: u16,
    socket_dir: PathBuf,
    config_dir: PathBuf,
}

impl DebianCluster {
    fn create(env: &TestEnv) -> DebianCluster {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "walvault-test-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let port = free_port();
        let socket_dir = env.path().to_path_buf();
        let data_dir = env.path().join("debian-data");
        let out = run_bounded(
            Command::new("pg_createcluster")
                .args([MAJOR, &name, "-p", &port.to_string()])
                .arg("-d")
                .arg(&data_dir)
                .arg("-s")
                .arg(&socket_dir)
                .args(["--", "--no-sync"]),
            Duration::from_secs(120),
        );
        let cluster = DebianCluster {
            config_dir: PathBuf::from(format!("/etc/postgresql/{MAJOR}/{name}")),
            name,
            port,
            socket_dir,
        };
        assert!(
            out.status.success(),
            "pg_createcluster (postgresql-common) is needed for this test:\n{out}"
        );
        cluster
    }

    /// Starts the server as Debian's pg_ctlcluster does: `-D` names the configuration directory.
    fn start(&self, env: &TestEnv) {
        let log = env.path().join("debian.log");
        let out = self.pg_ctl(
            env,
            &["-l", log.to_str().unwrap(), "-w", "-t", "60", "start"],
        );
        assert!(
            out.status.success(),
            "{out}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn pg_ctl(&self, env: &TestEnv, args: &[&str]) -> crate::harness::RunOutput {
        let mut cmd = env.command(format!("/usr/lib/postgresql/{MAJOR}/bin/pg_ctl"));
        cmd.arg("-D").arg(&self.config_dir).args(args);
        run_bounded(&mut cmd, Duration::from_secs(90))
    }

    fn psql(&self, env: &TestEnv, sql: &str) -> String {
        psql(env, &self.socket_dir, self.port, sql)
    }
}

impl Drop for DebianCluster {
    fn drop(&mut self) {
        let out = run_bounded(
            Command::new("pg_dropcluster").args(["--stop", MAJOR, &self.name]),
            Duration::from_secs(120),
        );
        if !out.status.success() {
            eprintln!("pg_dropcluster {} failed:\n{out}", self.name);
        }
        // pg_dropcluster leaves files it did not write (conf.d/walvault.conf) behind.
        if let Err(e) = std::fs::remove_dir_all(&self.config_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("remove {}: {e}", self.config_dir.display());
            }
        }
    }
}

fn psql(env: &TestEnv, socket_dir: &Path, port: u16, sql: &str) -> String {
    let mut cmd = env.command(format!("/usr/lib/postgresql/{MAJOR}/bin/psql"));
    cmd.arg("-h")
        .arg(socket_dir)
        .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql]);
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "psql {sql}:\n{out}");
    out.stdout.trim().to_owned()
}

fn debian_cluster_recovers_with_its_configuration(kind: RepoKind) {
    let env = TestEnv::new("debian");
    let repo = env.repo(kind);
    let wv = env.walvault(repo.config_path());
    let source = DebianCluster::create(&env);
    // Archiving configured the packaged way: a file in conf.d, which postgresql.conf includes.
    let conf_d = source.config_dir.join("conf.d/walvault.conf");
    std::fs::write(
        &conf_d,
        format!(
            "wal_level = replica\narchive_mode = on\narchive_command = '{}'\n\
             listen_addresses = ''\nssl = off\nfsync = off\nmax_connections = 20\n",
            wv.archive_command()
        ),
    )
    .unwrap();
    crate::harness::give_to_postgres(&conf_d);
    // And a file included by absolute path, which the restored copy must not read.
    let extra = source.config_dir.join("extra.conf");
    std::fs::write(&extra, "work_mem = '7MB'\n").unwrap();
    crate::harness::give_to_postgres(&extra);
    let main_conf = source.config_dir.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&main_conf).unwrap();
    text.push_str(&format!("include = '{}'\n", extra.display()));
    std::fs::write(&main_conf, text).unwrap();
    // pg_hba.conf naming a user list by absolute path (`@file`), in a rule no connection meets:
    // the restored cluster must read the list's restored copy, not the source's.
    let users = source.config_dir.join("walvault_users");
    std::fs::write(&users, "walvault_probe\n").unwrap();
    crate::harness::give_to_postgres(&users);
    let hba = source.config_dir.join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba).unwrap();
    text.push_str(&format!("local all @{} reject\n", users.display()));
    std::fs::write(&hba, text).unwrap();
    source.start(&env);
    assert_eq!(
        source.psql(&env, "SHOW config_file"),
        source.config_dir.join("postgresql.conf").to_str().unwrap()
    );
    source.psql(
        &env,
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 5000) g",
    );
    let pg_env = [
        ("PGHOST", env.path().to_str().unwrap().to_owned()),
        ("PGPORT", source.port.to_string()),
        ("PGUSER", "postgres".to_owned()),
        ("PGDATABASE", "postgres".to_owned()),
    ];
    let pg_env: Vec<(&str, &str)> = pg_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let pushed = wv.run_with_env(&["backup-push"], &pg_env);
    pushed.assert_success();
    assert!(
        pushed
            .stderr
            .contains("configuration outside the data directory"),
        "{pushed}"
    );
    std::fs::write(&users, "changed_after_the_backup\n").unwrap();
    source.psql(
        &env,
        "INSERT INTO t SELECT g, 'after' FROM generate_series(5001, 6000) g",
    );
    let expected = source.psql(
        &env,
        "SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM t",
    );
    let segment = source.psql(&env, "SELECT pg_walfile_name(pg_switch_wal())");
    wait_until("the last segment archived", Duration::from_secs(60), || {
        source.psql(
            &env,
            "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
        ) >= segment
    });

    let target = env.path().join("restored");
    // The copies go inside the restored directory by default; one run names a place of its own.
    let config_dir = env.path().join("restored-config");
    let (copies, extra_args) = match kind {
        RepoKind::Local => (target.join("walvault_external_config"), vec![]),
        RepoKind::S3 | RepoKind::Garage => (
            config_dir.clone(),
            vec!["--config-dir", config_dir.to_str().unwrap()],
        ),
    };
    let mut dry_args = vec!["recover", "--pgdata", target.to_str().unwrap(), "--dry-run"];
    dry_args.extend_from_slice(&extra_args);
    let dry = wv.run(&dry_args);
    dry.assert_success();
    let copy = copies.join(main_conf.strip_prefix("/").unwrap());
    assert!(dry.stdout.contains(copy.to_str().unwrap()), "{dry}");
    assert!(!target.exists() && !config_dir.exists());

    let port = free_port().to_string();
    let mut args = vec![
        "recover",
        "--pgdata",
        target.to_str().unwrap(),
        "--start",
        "--port",
        &port,
        "--socket-dir",
        env.path().to_str().unwrap(),
    ];
    args.extend_from_slice(&extra_args);
    let out = wv.run(&args);
    out.assert_success();
    let restored_sql = |sql: &str| psql(&env, env.path(), port.parse().unwrap(), sql);
    assert_eq!(
        restored_sql("SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM t"),
        expected
    );
    // Every configuration file it reads is a restored copy, none the source's.
    let ours =
        |file: &str| Path::new(file).starts_with(&target) || Path::new(file).starts_with(&copies);
    let read = restored_sql("SELECT string_agg(DISTINCT sourcefile, ',') FROM pg_file_settings");
    assert!(read.contains("extra.conf"), "{read}");
    for file in read.split(',') {
        assert!(ours(file), "{file} read\n{out}");
    }
    assert_eq!(restored_sql("SHOW work_mem"), "7MB");
    assert_eq!(
        restored_sql(
            "SELECT string_agg(array_to_string(user_name, ','), ';') FROM pg_hba_file_rules \
             WHERE auth_method = 'reject'"
        ),
        "walvault_probe"
    );
    assert_eq!(
        restored_sql("SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL"),
        "0"
    );
    for setting in ["config_file", "hba_file", "ident_file", "data_directory"] {
        let value = restored_sql(&format!("SHOW {setting}"));
        assert!(ours(&value), "{setting} = {value}\n{out}");
    }
    // Its own postgresql.conf includes the copy of the source's.
    let own = target.join("postgresql.conf");
    assert_eq!(restored_sql("SHOW config_file"), own.to_str().unwrap());
    assert!(
        read.split(',').any(|f| f == copy.to_str().unwrap()),
        "{read}"
    );
    assert_eq!(
        restored_sql("SHOW data_directory"),
        target.to_str().unwrap()
    );
    assert!(copies.join(conf_d.strip_prefix("/").unwrap()).is_file());
    // A later plain pg_ctl start of the restored directory works too.
    let mut restored = env.cluster_from_copy(ClusterConfig::new("restored"), &target);
    restored.stop();
    restored.start();
    assert_eq!(
        restored.psql("SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM t"),
        expected
    );
}

/// PostgreSQL 16's `include` and `include_dir` records in an `hba_file` outside the data
/// directory: the backup stores the files they name, and the recovered cluster reads those
/// copies, not the source's files, which change after the backup.
#[test]
fn hba_include_records_outside_the_data_directory_pg16() {
    let Some(install) = PgInstall::required_or_skip(16) else {
        return;
    };
    let env = TestEnv::new("hba-include");
    let repo = env.repo(RepoKind::Local);
    let wv = env.walvault(repo.config_path());
    let etc = env.path().join("etc");
    let rules_dir = etc.join("hba.d");
    std::fs::create_dir_all(&rules_dir).unwrap();
    let hba = etc.join("pg_hba.conf");
    let included = etc.join("walvault_rules.conf");
    let in_dir = rules_dir.join("10-walvault.conf");
    // Reject rules no connection meets (the trust rules come first): they show only in
    // pg_hba_file_rules, which names the user and the file each rule was read from.
    for (path, text) in [
        (
            &hba,
            format!(
                "local all all trust\nhost all all 127.0.0.1/32 trust\n\
                 include {}\ninclude_dir {}\n",
                included.display(),
                rules_dir.display()
            ),
        ),
        (&included, "local all walvault_probe reject\n".to_owned()),
        (&in_dir, "local all walvault_probe_dir reject\n".to_owned()),
    ] {
        std::fs::write(path, text).unwrap();
    }
    for path in [&etc, &rules_dir, &hba, &included, &in_dir] {
        give_to_postgres(path);
    }
    let source = env.cluster(
        ClusterConfig::new("src")
            .install(install.clone())
            .set("hba_file", path_str(&hba))
            .archive_with(&wv),
    );
    let rejected = "SELECT string_agg(array_to_string(user_name, ','), ';' ORDER BY rule_number) \
                    FROM pg_hba_file_rules WHERE auth_method = 'reject'";
    assert_eq!(source.psql(rejected), "walvault_probe;walvault_probe_dir");
    source.psql(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 3000) g",
    );
    let pushed = backup_push(&env, &wv, &source, &["--full"]);
    assert!(
        pushed.contains("configuration outside the data directory"),
        "{pushed}"
    );
    std::fs::write(&included, "local all changed_after_the_backup reject\n").unwrap();
    std::fs::write(&in_dir, "local all changed_after_the_backup_dir reject\n").unwrap();
    source.psql("INSERT INTO t SELECT g, 'after' FROM generate_series(3001, 4000) g");
    let expected = source.psql("SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM t");
    let segment = source.psql("SELECT pg_walfile_name(pg_switch_wal())");
    wait_until("the last segment archived", Duration::from_secs(60), || {
        source.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") >= segment
    });

    let target = env.path().join("restored");
    let out = recover_start(
        &env,
        &wv,
        &target,
        &["--pg-bin", path_str(install.bindir())],
    );
    out.assert_success();
    let mut restored =
        env.cluster_from_copy(ClusterConfig::new("restored").install(install), &target);
    restored.stop();
    restored.start();
    assert_eq!(
        restored.psql("SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM t"),
        expected
    );
    assert_eq!(restored.psql(rejected), "walvault_probe;walvault_probe_dir");
    assert_eq!(
        restored.psql("SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL"),
        "0"
    );
    let files = restored.psql("SELECT string_agg(DISTINCT file_name, ',') FROM pg_hba_file_rules");
    let hba_file = restored.psql("SHOW hba_file");
    for file in files.split(',').chain([hba_file.as_str()]) {
        assert!(Path::new(file).starts_with(&target), "{file} read\n{out}");
    }
}
