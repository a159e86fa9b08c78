//! A cluster made the Debian and Ubuntu way (`pg_createcluster`), whose `postgresql.conf`,
//! `pg_hba.conf`, `pg_ident.conf` and `conf.d/` live in `/etc/postgresql/<major>/<name>`:
//! archived and backed up with walvault, then `recover --start` into a new directory just works,
//! reads only the restored configuration, and holds the same data. Needs postgresql-common
//! (`pg_createcluster`), which Debian's postgresql-15 brings; without it the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::harness::cmd::run_bounded;
use crate::harness::{free_port, repo_kind_tests, wait_until, ClusterConfig, RepoKind, TestEnv};

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
