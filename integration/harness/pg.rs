//! PostgreSQL installations and throwaway clusters.

use super::cmd::{path_str, run_bounded, RunOutput};
use super::{free_port, give_to_postgres, poll_until, wait_until, TempRoot};
use std::env;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const PG15_BIN: &str = "/usr/lib/postgresql/15/bin";

/// How long PostgreSQL tools (initdb, pgbench, pg_basebackup, ...) may run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(600);

/// One installed PostgreSQL major version.
#[derive(Clone, Debug)]
pub struct PgInstall {
    major: u32,
    bindir: PathBuf,
}

impl PgInstall {
    /// PostgreSQL 15, always required: `/usr/lib/postgresql/15/bin` or `$WALVAULT_TEST_PG15_BIN`.
    pub fn pg15() -> PgInstall {
        let bindir = env::var_os("WALVAULT_TEST_PG15_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(PG15_BIN));
        assert!(
            bindir.join("postgres").is_file(),
            "PostgreSQL 15 not found in {}: run integration/run.sh (or set WALVAULT_TEST_PG15_BIN)",
            bindir.display()
        );
        PgInstall { major: 15, bindir }
    }

    /// Every available major, ascending: 15 plus those in `$WALVAULT_TEST_PG_BINS`
    /// (`major=bindir,major=bindir`, filled by integration/run.sh).
    pub fn all() -> Vec<PgInstall> {
        let mut installs = vec![PgInstall::pg15()];
        let listed = env::var("WALVAULT_TEST_PG_BINS").unwrap_or_default();
        for entry in listed.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (major, bindir) = entry.split_once('=').unwrap_or_else(|| {
                panic!("WALVAULT_TEST_PG_BINS entry {entry:?} is not major=bindir")
            });
            let major: u32 = major
                .parse()
                .unwrap_or_else(|_| panic!("WALVAULT_TEST_PG_BINS entry {entry:?}: bad major"));
            let bindir = PathBuf::from(bindir);
            assert!(
                bindir.join("postgres").is_file(),
                "WALVAULT_TEST_PG_BINS: no postgres in {}",
                bindir.display()
            );
            if installs.iter().all(|i| i.major != major) {
                installs.push(PgInstall { major, bindir });
            }
        }
        installs.sort_by_key(|i| i.major);
        installs
    }

    /// The install of `major`, if available.
    pub fn get(major: u32) -> Option<PgInstall> {
        PgInstall::all().into_iter().find(|i| i.major == major)
    }

    /// The install of `major` for a test that needs that major: `None` when it is not installed
    /// (the test then skips, saying so), but a failure when `$WALVAULT_TEST_REQUIRE_PG` (set by
    /// integration/run.sh to the majors it installed, as in CI) lists it, so a missing major can
    /// never pass as a skipped one there.
    pub fn required_or_skip(major: u32) -> Option<PgInstall> {
        let found = PgInstall::get(major);
        let listed = env::var("WALVAULT_TEST_REQUIRE_PG").unwrap_or_default();
        let required = listed
            .split([' ', ','])
            .any(|m| m.trim() == major.to_string());
        assert!(
            found.is_some() || !required,
            "PostgreSQL {major} is required (WALVAULT_TEST_REQUIRE_PG={listed:?}) but not in \
             WALVAULT_TEST_PG_BINS: run integration/run.sh"
        );
        if found.is_none() {
            println!(
                "skipped: PostgreSQL {major} not installed (integration/run.sh fetches it; \
                 WALVAULT_TEST_EXTRA_PG)"
            );
        }
        found
    }

    pub fn major(&self) -> u32 {
        self.major
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A program of this install; client tools missing from it (the npm builds ship only
    /// initdb, pg_ctl and postgres) come from PostgreSQL 15.
    pub fn program(&self, name: &str) -> PathBuf {
        let own = self.bindir.join(name);
        if own.is_file() {
            own
        } else {
            PgInstall::pg15().bindir.join(name)
        }
    }
}

/// How to make a cluster: name (its directory in the test dir), version, initdb options and
/// postgresql.conf settings.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    name: String,
    install: PgInstall,
    wal_segsize_mb: Option<u32>,
    settings: Vec<(String, String)>,
}

impl ClusterConfig {
    pub fn new(name: &str) -> ClusterConfig {
        ClusterConfig {
            name: name.to_string(),
            install: PgInstall::pg15(),
            wal_segsize_mb: None,
            settings: Vec::new(),
        }
    }

    pub fn install(mut self, install: PgInstall) -> Self {
        self.install = install;
        self
    }

    /// `initdb --wal-segsize` (MiB, a power of two); PostgreSQL's default is 16.
    pub fn wal_segsize_mb(mut self, mb: u32) -> Self {
        self.wal_segsize_mb = Some(mb);
        self
    }

    /// A postgresql.conf setting (the value is quoted for you).
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.settings.push((key.to_string(), value.into()));
        self
    }

    /// Archive every WAL file with `walvault wal-push`.
    pub fn archive_with(self, walvault: &super::Walvault) -> Self {
        self.set("wal_level", "replica")
            .set("archive_mode", "on")
            .set("archive_command", walvault.archive_command())
    }
}

/// A PostgreSQL cluster in the test dir; stopped (immediate mode) when dropped.
pub struct Cluster {
    root: Arc<TempRoot>,
    install: PgInstall,
    name: String,
    datadir: PathBuf,
    port: u16,
    log: PathBuf,
}

impl Cluster {
    /// initdb, then configure.
    pub(crate) fn init(root: Arc<TempRoot>, config: ClusterConfig) -> Cluster {
        let datadir = root.path().join(&config.name);
        let mut initdb = root.command(config.install.program("initdb"));
        initdb
            .args([
                "--no-sync",
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg("-D")
            .arg(&datadir);
        if let Some(mb) = config.wal_segsize_mb {
            initdb.arg(format!("--wal-segsize={mb}"));
        }
        let out = run_bounded(&mut initdb, TOOL_TIMEOUT);
        assert!(out.status.success(), "initdb failed:\n{out}");
        Cluster::adopt(root, config, datadir)
    }

    /// Configures an existing data directory (appends to its postgresql.conf).
    pub(crate) fn adopt(root: Arc<TempRoot>, config: ClusterConfig, datadir: PathBuf) -> Cluster {
        let port = free_port();
        let mut settings: Vec<(String, String)> = vec![
            ("port".into(), port.to_string()),
            ("listen_addresses".into(), "127.0.0.1".into()),
            (
                "unix_socket_directories".into(),
                path_str(root.path()).into(),
            ),
            // Throwaway clusters: no need to survive an OS crash.
            ("fsync".into(), "off".into()),
            ("max_connections".into(), "30".into()),
            ("shared_buffers".into(), "32MB".into()),
        ];
        settings.extend(config.settings);
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(datadir.join("postgresql.conf"))
            .unwrap_or_else(|e| panic!("open postgresql.conf in {}: {e}", datadir.display()));
        writeln!(conf, "\n# walvault integration test settings").unwrap();
        for (key, value) in &settings {
            writeln!(conf, "{key} = '{}'", value.replace('\'', "''")).unwrap();
        }
        let log = root.path().join(format!("{}.log", config.name));
        Cluster {
            root,
            install: config.install,
            name: config.name,
            datadir,
            port,
            log,
        }
    }

    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.datadir.join("pg_wal")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn install(&self) -> &PgInstall {
        &self.install
    }

    /// Creates an empty file in the data directory (`recovery.signal`, `standby.signal`).
    pub fn touch(&self, name: &str) {
        let path = self.datadir.join(name);
        fs::write(&path, "").unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        give_to_postgres(&path);
    }

    fn command(&self, program: &str) -> Command {
        self.root.command(self.install.program(program))
    }

    fn pg_ctl(&self, args: &[&str]) -> RunOutput {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&self.datadir).args(args);
        run_bounded(&mut cmd, TOOL_TIMEOUT)
    }

    /// `pg_ctl start -w`: returns once the server accepts connections (during recovery too).
    pub fn start(&mut self) {
        let out = self.pg_ctl(&["-l", path_str(&self.log), "-w", "-t", "60", "start"]);
        assert!(
            out.status.success(),
            "cluster {} did not start:\n{out}\nserver log:\n{}",
            self.name,
            self.log_tail(40)
        );
    }

    /// `pg_ctl start -w`, for a data directory PostgreSQL may refuse: the outcome, not a panic.
    pub fn try_start(&mut self) -> RunOutput {
        self.pg_ctl(&["-l", path_str(&self.log), "-w", "-t", "60", "start"])
    }

    /// Clean shutdown (fast mode).
    pub fn stop(&mut self) {
        let out = self.pg_ctl(&["-w", "-t", "60", "-m", "fast", "stop"]);
        assert!(
            out.status.success(),
            "cluster {} did not stop:\n{out}",
            self.name
        );
    }

    /// Crash-like shutdown (immediate mode); no-op when not running.
    pub fn stop_immediate(&mut self) {
        if self.datadir.join("postmaster.pid").exists() {
            let _ = self.pg_ctl(&["-w", "-t", "60", "-m", "immediate", "stop"]);
        }
    }

    /// Whether the postmaster answers.
    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"]).status.success()
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The whole server log.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn client(&self, program: &str) -> Command {
        let mut cmd = self.command(program);
        cmd.arg("-h")
            .arg(self.root.path())
            .arg("-p")
            .arg(self.port.to_string())
            .env("PGCONNECT_TIMEOUT", "10");
        cmd
    }

    /// Runs SQL in database `postgres`, returns the unaligned, tuples-only output, trimmed.
    pub fn try_psql(&self, sql: &str) -> Result<String, RunOutput> {
        let mut cmd = self.client("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            "postgres",
            "-c",
            sql,
        ]);
        let out = run_bounded(&mut cmd, TOOL_TIMEOUT);
        if out.status.success() {
            Ok(out.stdout.trim().to_string())
        } else {
            Err(out)
        }
    }

    /// Like [`Cluster::try_psql`], panicking on error.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|out| {
            panic!(
                "psql on cluster {} failed:\n{out}\nserver log:\n{}",
                self.name,
                self.log_tail(20)
            )
        })
    }

    /// Runs SQL in database `db` (outside a transaction block, one statement), panicking on error.
    pub fn psql_in(&self, db: &str, sql: &str) -> String {
        let mut cmd = self.client("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-c",
            sql,
        ]);
        let out = run_bounded(&mut cmd, TOOL_TIMEOUT);
        assert!(out.status.success(), "psql in {db} failed:\n{out}");
        out.stdout.trim().to_string()
    }

    /// `pg_dumpall` without its per-run `\restrict` keys, comments and tablespace locations
    /// (a restore may put tablespaces elsewhere), for comparing two clusters' content.
    pub fn pg_dumpall(&self) -> String {
        let mut cmd = self.client("pg_dumpall");
        cmd.args(["-U", "postgres"]);
        let out = run_bounded(&mut cmd, TOOL_TIMEOUT);
        assert!(out.status.success(), "pg_dumpall failed:\n{out}");
        out.stdout
            .lines()
            .filter(|l| {
                !(l.starts_with("\\restrict")
                    || l.starts_with("\\unrestrict")
                    || l.starts_with("--")
                    || l.starts_with("CREATE TABLESPACE"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `pgbench <args> postgres`, panicking on failure; returns stdout.
    pub fn pgbench(&self, args: &[&str]) -> String {
        let mut cmd = self.client("pgbench");
        cmd.args(args).arg("postgres");
        let out = run_bounded(&mut cmd, TOOL_TIMEOUT);
        assert!(out.status.success(), "pgbench failed:\n{out}");
        out.stdout
    }

    /// `pg_dumpall` of every database, without the lines that differ between two dumps of the
    /// same data (`\\restrict`/`\\unrestrict` keys, `--` comments) and sequence positions
    /// (WAL-logged up to 32 values ahead, so a recovered cluster's may be further on): for
    /// comparing a restore.
    pub fn dumpall(&self) -> String {
        let mut cmd = self.client("pg_dumpall");
        cmd.args(["-U", "postgres"]);
        let out = run_bounded(&mut cmd, TOOL_TIMEOUT);
        assert!(out.status.success(), "pg_dumpall failed:\n{out}");
        out.stdout
            .lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .filter(|l| !l.starts_with("--") && !l.starts_with("SELECT pg_catalog.setval("))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `pg_basebackup -D dest --checkpoint=fast --no-sync <args>` (plain format).
    pub fn pg_basebackup(&self, dest: &Path, args: &[&str]) {
        let mut cmd = self.client("pg_basebackup");
        cmd.arg("-D")
            .arg(dest)
            .args(["--checkpoint=fast", "--no-sync"])
            .args(args);
        let out = run_bounded(&mut cmd, TOOL_TIMEOUT);
        assert!(out.status.success(), "pg_basebackup failed:\n{out}");
    }

    /// The cluster's system identifier.
    pub fn system_identifier(&self) -> String {
        self.psql("SELECT system_identifier FROM pg_control_system()")
    }

    /// Writes a little WAL, switches to a new segment and returns the name of the segment just
    /// completed.
    pub fn switch_wal(&self) -> String {
        self.psql("CREATE TABLE IF NOT EXISTS walvault_test_switch (at timestamptz)");
        self.psql("INSERT INTO walvault_test_switch VALUES (now())");
        self.psql("SELECT pg_walfile_name(pg_switch_wal())")
    }

    /// Completes a segment ([`Cluster::switch_wal`]) and copies it to `dest_dir`; returns the copy.
    pub fn switch_wal_and_copy(&self, dest_dir: &Path) -> PathBuf {
        let name = self.switch_wal();
        let dest = dest_dir.join(&name);
        fs::copy(self.wal_dir().join(&name), &dest)
            .unwrap_or_else(|e| panic!("copy segment {name}: {e}"));
        give_to_postgres(&dest);
        dest
    }

    /// Waits until `pg_stat_archiver.last_archived_wal` reaches `wal_file` (same timeline).
    pub fn wait_for_archived(&self, wal_file: &str, timeout: Duration) {
        let mut last = String::new();
        let archived = poll_until(timeout, || {
            last = self.psql(
                // '-' sorts before every WAL file name; an empty first field would be trimmed
                // away by psql, and "failed=..." would then compare as "archived".
                "SELECT coalesce(last_archived_wal, '-') || ' failed=' || failed_count || \
                 ' last_failed=' || coalesce(last_failed_wal, '') FROM pg_stat_archiver",
            );
            last.split(' ').next().unwrap_or("") >= wal_file
        });
        assert!(
            archived,
            "cluster {} did not archive {wal_file} within {timeout:?}\npg_stat_archiver: {last}\n\
             server log:\n{}",
            self.name,
            self.log_tail(30)
        );
    }

    /// Waits until recovery has ended (`pg_is_in_recovery()` false); panics early, with the log,
    /// when the server goes away.
    pub fn wait_for_promotion(&self, timeout: Duration) {
        let what = format!("cluster {} to finish recovery", self.name);
        wait_until(&what, timeout, || {
            match self.try_psql("SELECT pg_is_in_recovery()") {
                Ok(in_recovery) => in_recovery == "f",
                Err(out) => {
                    assert!(
                        self.is_running(),
                        "cluster {} stopped during recovery:\n{out}\nserver log:\n{}",
                        self.name,
                        self.log_tail(40)
                    );
                    false
                }
            }
        });
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_immediate();
    }
}
