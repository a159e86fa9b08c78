//! Command-line syntax (clap). Values that belong to the layered configuration stay text here and
//! are parsed in `walvault::config`, so a bad value gets the same message from a flag, the
//! environment or the config file.

use std::path::PathBuf;

use clap::{ArgAction, Parser, Subcommand};

/// The heading of the options every command takes, so a command's help lists its own first.
const GLOBAL: &str = "Global options";

#[derive(Parser, Debug)]
#[command(
    name = "walvault",
    version,
    about = "PostgreSQL WAL archiving and point-in-time recovery",
    after_help = "Configuration: flags > environment (WALVAULT_*) > config file (TOML). \
                  Repository URLs: file:///abs/path or s3://bucket/prefix."
)]
pub struct Cli {
    /// Config file (TOML); also WALVAULT_CONFIG
    #[arg(long, global = true, value_name = "FILE", help_heading = GLOBAL)]
    pub(crate) config: Option<PathBuf>,
    /// Repository URL: file:///abs/path or s3://bucket/prefix; also WALVAULT_REPO
    #[arg(long, global = true, value_name = "URL", help_heading = GLOBAL)]
    pub(crate) repo: Option<String>,
    /// More detail in logs (repeat for more)
    #[arg(
        short,
        long,
        global = true,
        action = ArgAction::Count,
        conflicts_with = "quiet",
        help_heading = GLOBAL
    )]
    pub verbose: u8,
    /// Only warnings and errors
    #[arg(short, long, global = true, help_heading = GLOBAL)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Archive one WAL file: archive_command = 'walvault wal-push %p'
    ///
    /// Exits 0 only once the file is durable in the repository. Also pushes the next segments
    /// PostgreSQL has marked ready, so its following calls return at once.
    WalPush {
        /// The WAL file (%p)
        path: PathBuf,
        /// Files pushed in parallel, this one included; also WALVAULT_PUSH_CONCURRENCY
        #[arg(long, value_name = "N")]
        concurrency: Option<String>,
    },
    /// Restore one WAL file: restore_command = 'walvault wal-fetch %f %p'
    ///
    /// Exit 0: restored. Exit 1: not in the archive. Exit 128: any other failure (also a
    /// usage error), so that PostgreSQL stops recovery instead of ending it early.
    WalFetch {
        /// The WAL file name (%f)
        name: String,
        /// Where to write it (%p)
        dest: PathBuf,
        /// Segments to prefetch ahead of recovery (0 disables); also WALVAULT_PREFETCH
        #[arg(long, value_name = "N")]
        prefetch: Option<String>,
    },
    /// Stream WAL into the repository through a replication slot (a long-running service)
    ///
    /// Connects like libpq (PG* variables, ~/.pgpass, sslmode, or --dbname) with
    /// replication=true. Received WAL becomes durable in the repository within --flush-interval;
    /// the slot advances only to what is durable. Keeps a local spool (see --spool-dir). Exits
    /// only on permanent errors; SIGTERM/SIGINT store what was received, then exit 0.
    WalReceive(ReceiveArgs),
    /// Take a base backup of the running cluster on this host (full or page-level delta)
    ///
    /// Connects like libpq (PG* variables, ~/.pgpass, sslmode, or --dbname), runs a
    /// non-exclusive backup (fast checkpoint unless --spread-checkpoint) and reads the files from
    /// PGDATA. Takes a delta when a parent exists and its chain is shorter than --delta-max-steps.
    BackupPush(BackupPushArgs),
    /// Restore a base backup (and its delta chain) into an empty or absent directory
    BackupFetch {
        /// Backup name, or LATEST
        name: String,
        /// The directory to restore into (created with mode 0700)
        dir: PathBuf,
        /// Restore tablespace OID into DIR instead of its recorded location (repeatable)
        #[arg(long = "tablespace", value_name = "OID=DIR")]
        tablespaces: Vec<String>,
        /// Packs read and written in parallel (default 4); also WALVAULT_BACKUP_CONCURRENCY
        #[arg(long, value_name = "N")]
        concurrency: Option<String>,
        /// Check the backup and the directories, list every directory the restore would write
        /// below, and write nothing
        #[arg(long)]
        dry_run: bool,
        /// Where configuration the source kept outside its data directory (Debian's
        /// /etc/postgresql/...) goes (default: DIR/walvault_external_config)
        #[arg(long, value_name = "DIR")]
        config_dir: Option<PathBuf>,
        /// Restore over an existing, stopped data directory of the same cluster: write only
        /// what differs from the backup, remove what it does not have
        #[arg(long, conflicts_with = "dry_run")]
        delta: bool,
    },
    /// Point-in-time recovery: restore the right backup into DIR and configure recovery
    ///
    /// Plans before writing anything: the newest backup that ends before the target, every WAL
    /// segment from its start to the target archived (across timeline switches), and a target
    /// the archive can reach. Refusals print the reason and the recoverable window. Without a
    /// target, recovery replays all archived WAL.
    Recover(RecoverArgs),
    /// List base backups, oldest first, and the recoverable window
    BackupList {
        /// One JSON array for scripts
        #[arg(long)]
        json: bool,
    },
    /// Retention: delete the backups and WAL the policy no longer keeps
    ///
    /// Applies [retention] from the configuration (these flags override its rules), keeping
    /// pinned backups, whole chains and the WAL every kept backup and the window need. Plans
    /// first and proves the result recoverable; refuses (exit 1, nothing deleted) when no backup
    /// would remain or the plan cannot be proven. One delete at a time per repository.
    Delete(DeleteArgs),
    /// Pin a backup (and its chain) so retention never deletes it, or release the pin
    BackupMark {
        /// Backup name, or LATEST
        name: String,
        /// Pin the backup
        #[arg(long, conflicts_with = "release", required_unless_present = "release")]
        keep: bool,
        /// Remove the pin
        #[arg(long)]
        release: bool,
    },
    /// Re-read every object and check its checksum; check every backup against its packs and WAL
    Verify {
        /// Objects read in parallel
        #[arg(long, default_value_t = 4, value_name = "N")]
        concurrency: usize,
    },
    /// Repository, backups, recoverable window, archive lag, last drill and size, cheaply
    Status {
        /// One JSON object for scripts
        #[arg(long)]
        json: bool,
    },
    /// End-to-end test of the live setup: settings, a forced WAL switch, identity, ages, gaps
    ///
    /// Connects like backup-push. One line per check (OK, WARN, FAIL or SKIP). Exit 0: all OK;
    /// 1: a check failed; 2: usage error; 3: warnings only (Nagios: OK, CRITICAL, UNKNOWN,
    /// WARNING). On a standby the forced WAL switch is skipped.
    Check(CheckArgs),
    /// Prometheus metrics of the repository: printed once, or served with --listen
    Metrics {
        /// Serve the metrics over HTTP on this address (e.g. 127.0.0.1:9188) until stopped
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Restore test: recover into a scratch directory, check the data, report the RTO
    ///
    /// Recovers as recover --start does, on a spare port, checks every database (connect,
    /// amcheck on btree indexes when available, a full read of every table, --check-sql),
    /// stores the report in the repository (drills/<time>), then stops the server and removes
    /// the scratch directory, pass or fail. Exit 0 only if every step passed.
    Drill(DrillArgs),
    /// Rewrite every object not encrypted to the current recipients (after a key rotation)
    Reencrypt {
        /// Objects rewritten in parallel
        #[arg(long, default_value_t = 4, value_name = "N")]
        concurrency: usize,
        /// Only count what would be rewritten, per key
        #[arg(long)]
        dry_run: bool,
    },
    /// Internal: the background prefetcher started by wal-fetch
    #[command(hide = true)]
    WalPrefetch {
        #[arg(long)]
        spool: PathBuf,
        segments: Vec<String>,
    },
    /// Internal: the background pusher started by wal-push
    #[command(hide = true)]
    WalPushAhead {
        #[arg(long)]
        spool: PathBuf,
        #[arg(long, value_name = "N")]
        concurrency: Option<String>,
        /// The pg_wal directory whose ready segments to store
        wal_dir: PathBuf,
    },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::WalPush { .. } => "wal-push",
            Command::WalFetch { .. } => "wal-fetch",
            Command::WalReceive { .. } => "wal-receive",
            Command::BackupPush { .. } => "backup-push",
            Command::BackupFetch { .. } => "backup-fetch",
            Command::BackupList { .. } => "backup-list",
            Command::Recover(_) => "recover",
            Command::Verify { .. } => "verify",
            Command::Delete(_) => "delete",
            Command::BackupMark { .. } => "backup-mark",
            Command::Status { .. } => "status",
            Command::Check(_) => "check",
            Command::Metrics { .. } => "metrics",
            Command::Drill(_) => "drill",
            Command::Reencrypt { .. } => "reencrypt",
            Command::WalPrefetch { .. } => "wal-prefetch",
            Command::WalPushAhead { .. } => "wal-push-ahead",
        }
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be greater than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e} (examples: 1s, 500ms)")),
    }
}

/// The `recover` flags (see `walvault recover --help`).
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").multiple(false).args([
    "target_time", "target_lsn", "target_xid", "target_name", "target_immediate"
])))]
#[command(group(clap::ArgGroup::new("exclusive_target").multiple(false).args([
    "target_time", "target_lsn", "target_xid"
])))]
pub struct RecoverArgs {
    /// The directory to restore into (empty or absent)
    #[arg(long, value_name = "DIR")]
    pub(crate) pgdata: PathBuf,
    /// Stop at the first transaction end after this time: RFC 3339, YYYY-MM-DD
    /// HH:MM:SS[.ffffff][±TZ] (local time without a zone) or -15m (before now)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub(crate) target_time: Option<String>,
    /// Stop at this WAL location (X/Y)
    #[arg(long, value_name = "LSN")]
    pub(crate) target_lsn: Option<String>,
    /// Stop after this transaction ends
    #[arg(long, value_name = "XID")]
    pub(crate) target_xid: Option<u32>,
    /// Stop at this restore point (pg_create_restore_point)
    #[arg(long, value_name = "NAME")]
    pub(crate) target_name: Option<String>,
    /// Stop as soon as the backup is consistent
    #[arg(long)]
    pub(crate) target_immediate: bool,
    /// Stop just before the target transaction end instead of just after it
    /// (recovery_target_inclusive = off); with --target-time, --target-lsn or --target-xid
    #[arg(long, requires = "exclusive_target")]
    pub(crate) exclusive: bool,
    /// What the server does at the target
    #[arg(long, value_enum, default_value = "promote")]
    pub(crate) target_action: crate::recover::settings::TargetAction,
    /// Timeline to recover along: latest or a number
    #[arg(long, default_value = "latest", value_name = "TLI")]
    pub(crate) target_timeline: String,
    /// Restore this backup (or LATEST) instead of the planner's choice
    #[arg(long, value_name = "NAME")]
    pub(crate) backup: Option<String>,
    /// Print the plan and stop
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Restore over the existing, stopped data directory of the same cluster, writing only
    /// what differs from the backup (see backup-fetch --delta)
    #[arg(long)]
    pub(crate) delta: bool,
    /// Start PostgreSQL on DIR and follow recovery to its end
    #[arg(long)]
    pub(crate) start: bool,
    /// Keep the backup's archive_mode (default: archive_mode = off in the restored cluster)
    #[arg(long)]
    pub(crate) keep_archive_command: bool,
    /// With --start: directory of pg_ctl (default: PATH, then /usr/lib/postgresql/<major>/bin)
    #[arg(long, value_name = "DIR")]
    pub(crate) pg_bin: Option<PathBuf>,
    /// With --start: the server's port (default: the restored configuration's port when it is
    /// free, else a free one; printed either way)
    #[arg(long)]
    pub(crate) port: Option<u16>,
    /// With --start: the server's socket directory (default: /var/run/postgresql, else /tmp)
    #[arg(long, value_name = "DIR")]
    pub(crate) socket_dir: Option<PathBuf>,
    /// With --start: more server options, passed to pg_ctl -o (repeatable)
    #[arg(long = "pg-option", value_name = "OPTION", allow_hyphen_values = true)]
    pub(crate) pg_options: Vec<String>,
    /// Restore tablespace OID into DIR instead of its recorded location (repeatable)
    #[arg(long = "tablespace", value_name = "OID=DIR")]
    pub(crate) tablespaces: Vec<String>,
    /// Where configuration the source kept outside its data directory (Debian's
    /// /etc/postgresql/...) goes (default: <pgdata>/walvault_external_config)
    #[arg(long, value_name = "DIR")]
    pub(crate) config_dir: Option<PathBuf>,
    /// Packs read and written in parallel (default 4); also WALVAULT_BACKUP_CONCURRENCY
    #[arg(long, value_name = "N")]
    pub(crate) concurrency: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct ReceiveArgs {
    /// Physical replication slot to stream through
    #[arg(long, default_value = "walvault", value_name = "NAME")]
    pub(crate) slot: String,
    /// Create the slot (reserving WAL at once) if it does not exist
    #[arg(long)]
    pub(crate) create_slot: bool,
    /// Longest time received WAL waits before it is stored (e.g. 1s, 500ms)
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) flush_interval: std::time::Duration,
    /// Store every message at once and report it durable right after, so the receiver can
    /// be named in synchronous_standby_names (RPO zero)
    #[arg(long)]
    pub(crate) synchronous: bool,
    /// Name shown in pg_stat_replication and matched by synchronous_standby_names
    #[arg(long, default_value = "walvault", value_name = "NAME")]
    pub(crate) application_name: String,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9187)
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Connection string (key=value or postgresql:// URI); PG* variables fill the rest
    #[arg(long, value_name = "CONNINFO")]
    pub(crate) dbname: Option<String>,
    /// MiB in the local spool (received, not yet stored whole) beyond which reading pauses
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    pub(crate) spool_max_mib: u64,
    /// Local spool of received WAL (default: <spool_dir>/receive when spool_dir is set, else
    /// receive-<slot> under $STATE_DIRECTORY (systemd), $XDG_STATE_HOME/walvault or
    /// ~/.local/state/walvault)
    #[arg(long, value_name = "DIR")]
    pub(crate) spool_dir: Option<std::path::PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct BackupPushArgs {
    /// The cluster's data directory; default: PGDATA, else the server's data_directory
    #[arg(long, env = "PGDATA", value_name = "DIR")]
    pub(crate) pgdata: Option<PathBuf>,
    /// Connection string (key=value or postgresql:// URI) or database name
    #[arg(long, value_name = "CONNINFO")]
    pub(crate) dbname: Option<String>,
    /// Take a full backup whatever exists already
    #[arg(long, conflicts_with = "delta")]
    pub(crate) full: bool,
    /// Take a delta even past --delta-max-steps (full when there is no usable parent)
    #[arg(long)]
    pub(crate) delta: bool,
    /// Deltas after a full backup before the next full one (default 6); also
    /// WALVAULT_DELTA_MAX_STEPS
    #[arg(long, value_name = "N")]
    pub(crate) delta_max_steps: Option<String>,
    /// Files read, packs compressed and uploaded in parallel (default 4); also
    /// WALVAULT_BACKUP_CONCURRENCY
    #[arg(long, value_name = "N")]
    pub(crate) concurrency: Option<String>,
    /// Let the backup's checkpoint spread its writes instead of running at full speed
    #[arg(long)]
    pub(crate) spread_checkpoint: bool,
    /// On a standby: how long to wait after the stop for the primary's archiving to bring the
    /// backup's last WAL segment into the repository; also WALVAULT_WAL_WAIT_TIMEOUT
    #[arg(long, value_name = "DURATION", env = "WALVAULT_WAL_WAIT_TIMEOUT",
          default_value = "5m", value_parser = parse_duration)]
    pub(crate) wal_wait_timeout: std::time::Duration,
    /// On a standby: connection to the primary (key=value or URI), to run pg_switch_wal() there
    /// so the backup's last WAL segment is archived at once
    #[arg(long, value_name = "CONNINFO")]
    pub(crate) primary_conninfo: Option<String>,
    /// Pin the new backup: retention keeps it until `backup-mark NAME --release`
    #[arg(long)]
    pub(crate) keep: bool,
    /// For a delta read from the WAL's block maps, also read every page and fail if the map
    /// missed one the page scan would store (a self-check); also WALVAULT_VERIFY_MAP=1
    #[arg(long)]
    pub(crate) verify_map: bool,
}

/// The `delete` flags (see `walvault delete --help`).
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    /// Keep the newest N full backups, their deltas and all WAL from the oldest on; also
    /// retention.full
    #[arg(long, value_name = "N")]
    pub(crate) retain_full: Option<String>,
    /// Keep what recovery to any instant of the last DURATION needs (e.g. 14d); also
    /// retention.window
    #[arg(long, value_name = "DURATION")]
    pub(crate) retain_window: Option<String>,
    /// Keep the newest backup of each of the last N days (UTC) that have one
    #[arg(long, value_name = "N")]
    pub(crate) keep_daily: Option<String>,
    /// Keep the newest backup of each of the last N ISO weeks that have one
    #[arg(long, value_name = "N")]
    pub(crate) keep_weekly: Option<String>,
    /// Keep the newest backup of each of the last N months that have one
    #[arg(long, value_name = "N")]
    pub(crate) keep_monthly: Option<String>,
    /// Keep the newest backup of each of the last N years that have one
    #[arg(long, value_name = "N")]
    pub(crate) keep_yearly: Option<String>,
    /// Print the plan and delete nothing
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Print the plan (and what was deleted) as one JSON object
    #[arg(long)]
    pub(crate) json: bool,
}

/// The `check` flags.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Connection string (key=value or postgresql:// URI) or database name
    #[arg(long, value_name = "CONNINFO")]
    pub(crate) dbname: Option<String>,
    /// How long the switched WAL segment may take to reach the repository
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) timeout: std::time::Duration,
    /// Fail when the newest backup ended longer ago than this
    #[arg(long, default_value = "26h", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) max_backup_age: std::time::Duration,
    /// Fail when the newest archived segment was stored longer ago than this
    #[arg(long, default_value = "15m", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) max_archive_lag: std::time::Duration,
    /// One JSON object for scripts
    #[arg(long)]
    pub(crate) json: bool,
}

/// The `drill` flags.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("point").multiple(false).args([
    "target_time", "random_time", "latest"
])))]
pub struct DrillArgs {
    /// Recover to this time (formats as recover --target-time)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub(crate) target_time: Option<String>,
    /// Recover to a random instant of the recoverable window
    #[arg(long)]
    pub(crate) random_time: bool,
    /// Recover to the end of the archive (the default)
    #[arg(long)]
    pub(crate) latest: bool,
    /// Scratch directory, empty or absent (default: a new directory beside the spool, else in
    /// the system's temporary directory)
    #[arg(long, value_name = "DIR")]
    pub(crate) scratch: Option<PathBuf>,
    /// The scratch server's port (default: a free one)
    #[arg(long)]
    pub(crate) port: Option<u16>,
    /// The scratch server's socket directory (default: /var/run/postgresql, else /tmp)
    #[arg(long, value_name = "DIR")]
    pub(crate) socket_dir: Option<PathBuf>,
    /// Directory of pg_ctl (default: PATH, then /usr/lib/postgresql/<major>/bin)
    #[arg(long, value_name = "DIR")]
    pub(crate) pg_bin: Option<PathBuf>,
    /// A query that must succeed and return rows, run in database postgres (repeatable)
    #[arg(long = "check-sql", value_name = "SQL")]
    pub(crate) check_sql: Vec<String>,
    /// Bound on each check query (one index, one table, one --check-sql)
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) check_timeout: std::time::Duration,
    /// Keep the scratch directory (the server is stopped either way)
    #[arg(long)]
    pub(crate) keep: bool,
    /// The report as JSON
    #[arg(long)]
    pub(crate) json: bool,
    /// Packs read and written in parallel (default 4); also WALVAULT_BACKUP_CONCURRENCY
    #[arg(long, value_name = "N")]
    pub(crate) concurrency: Option<String>,
}
