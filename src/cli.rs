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
    /// Re-read every object and check its checksum; check every backup against its packs and WAL
    Verify {
        /// Objects read in parallel
        #[arg(long, default_value_t = 4, value_name = "N")]
        concurrency: usize,
    },
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
}
