//! `walvault check`: an end-to-end test of the live setup, one verdict per check: the server's
//! archive settings, the repository's identity against the cluster, a forced WAL switch that
//! must reach the repository within the timeout, the newest backup's age, the archive lag and
//! WAL continuity from the oldest backup to the newest segment.
//!
//! On a standby (`pg_is_in_recovery()`), the forced switch is skipped (`pg_switch_wal` cannot run
//! during recovery; the primary's check covers it) and `archive_mode` must be `always` for the
//! standby itself to archive; everything else applies as on a primary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backup::window::{Missing, Recoverable, TimelineChoice};
use crate::config::{FlagValues, Settings};
use crate::pg::{self, BackupSession, ConnTarget, Timeouts};
use crate::repo::identity::{self, Identity};
use crate::repo::{layout, Repository};
use crate::time::UnixMicros;
use crate::wal::newest;

use super::status::age;

/// What `check` is asked to hold the setup to.
pub(crate) struct CheckOptions {
    pub(crate) dbname: Option<String>,
    /// How long the switched segment may take to reach the repository.
    pub(crate) timeout: Duration,
    pub(crate) max_backup_age: Duration,
    pub(crate) max_archive_lag: Duration,
    pub(crate) pg_timeout: Duration,
}

/// Ordered from best to worst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum Verdict {
    Ok,
    Skip,
    Warn,
    Fail,
}

/// One check's verdict and why.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Line {
    pub(crate) check: &'static str,
    pub(crate) verdict: Verdict,
    pub(crate) message: String,
}

/// Every check's verdict, in order.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) checks: Vec<Line>,
}

impl Report {
    fn push(&mut self, check: &'static str, verdict: Verdict, message: impl Into<String>) {
        self.checks.push(Line {
            check,
            verdict,
            message: message.into(),
        });
    }

    /// The worst verdict: `Fail` if any check failed, `Warn` if any warned, else `Ok`.
    pub(crate) fn worst(&self) -> Verdict {
        self.checks
            .iter()
            .map(|l| l.verdict)
            .max()
            .filter(|v| *v != Verdict::Skip)
            .unwrap_or(Verdict::Ok)
    }
}

/// Runs every check against the server `opts` names and `repo`.
pub(crate) async fn check(
    repo: &Arc<Repository>,
    settings: &Settings,
    opts: &CheckOptions,
) -> Report {
    let mut report = Report::default();
    let session = connect(opts).await;
    match &session {
        Ok(s) => {
            let info = s.info();
            report.push(
                "connect",
                Verdict::Ok,
                format!(
                    "{} (PostgreSQL {}.{}, {})",
                    s.target(),
                    info.major(),
                    info.version_num % 10_000,
                    if info.in_recovery {
                        "standby"
                    } else {
                        "primary"
                    }
                ),
            );
        }
        Err(e) => report.push("connect", Verdict::Fail, e.to_string()),
    }
    let session = session.ok();
    if let Some(s) = &session {
        settings_check(&mut report, s, settings, opts).await;
    }
    let recorded = identity_check(&mut report, repo, session.as_ref()).await;
    match &session {
        Some(s) if s.info().in_recovery => report.push(
            "wal-switch",
            Verdict::Skip,
            "standby: pg_switch_wal cannot run during recovery (the primary's check covers it)",
        ),
        Some(s) if recorded.is_some() => switch_check(&mut report, repo, s, opts).await,
        _ => report.push(
            "wal-switch",
            Verdict::Skip,
            "needs a connection and a repository of this cluster",
        ),
    }
    backup_age_check(&mut report, repo, opts).await;
    archive_lag_check(&mut report, repo, opts).await;
    continuity_check(&mut report, repo).await;
    report
}

async fn connect(opts: &CheckOptions) -> Result<BackupSession, pg::PgError> {
    let target = ConnTarget::resolve(opts.dbname.as_deref())?;
    BackupSession::connect(
        &target,
        Timeouts {
            reply: opts.pg_timeout,
            backup_stop: opts.pg_timeout,
        },
    )
    .await
}

/// `archive_mode`, `wal_level`, `archive_timeout` and whether `archive_command` calls walvault
/// with this repository.
async fn settings_check(
    report: &mut Report,
    session: &BackupSession,
    settings: &Settings,
    opts: &CheckOptions,
) {
    let row = pg::bounded(
        session.target(),
        "reading archive settings",
        opts.pg_timeout,
        session.client().query_one(
            "SELECT current_setting('archive_mode'), current_setting('archive_command'), \
             current_setting('wal_level'), current_setting('archive_timeout')",
            &[],
        ),
    )
    .await;
    let row = match row {
        Ok(row) => row,
        Err(e) => return report.push("settings", Verdict::Fail, e.to_string()),
    };
    let (mode, command, level, timeout): (String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let standby = session.info().in_recovery;
    // archive_command itself is not repeated: it may carry credentials, and this report goes
    // to hooks (webhooks) and monitoring.
    let described = format!(
        "archive_mode={mode}, wal_level={level}, archive_timeout={timeout}{}",
        if command.is_empty() {
            ", archive_command empty"
        } else {
            ""
        }
    );
    if level == "minimal" {
        return report.push(
            "settings",
            Verdict::Fail,
            format!("wal_level=minimal cannot be archived: {described}"),
        );
    }
    match mode.as_str() {
        "off" => {
            return report.push(
                "settings",
                Verdict::Fail,
                format!("archiving is off: {described}"),
            )
        }
        "on" if standby => {
            return report.push(
                "settings",
                Verdict::Warn,
                format!(
                    "a standby archives only with archive_mode=always (the primary must archive \
                     meanwhile): {described}"
                ),
            )
        }
        _ => {}
    }
    match archive_command_repo(&command) {
        ArchiveCommand::NotWalvault => report.push(
            "settings",
            Verdict::Warn,
            format!("archive_command does not call walvault wal-push: {described}"),
        ),
        ArchiveCommand::Repo(Ok(url)) if url != settings.repo.to_string() => report.push(
            "settings",
            Verdict::Warn,
            format!(
                "archive_command archives into {url}, not {}: {described}",
                settings.repo
            ),
        ),
        ArchiveCommand::Repo(Err(e)) => report.push(
            "settings",
            Verdict::Warn,
            format!("cannot tell which repository archive_command uses ({e}): {described}"),
        ),
        ArchiveCommand::Repo(Ok(_)) => report.push(
            "settings",
            Verdict::Ok,
            format!("archiving into this repository: {described}"),
        ),
        ArchiveCommand::Unnamed => report.push(
            "settings",
            Verdict::Ok,
            format!(
                "archive_command calls walvault wal-push (its repository comes from the server's \
                 environment): {described}"
            ),
        ),
    }
}

enum ArchiveCommand {
    NotWalvault,
    /// The repository it names with `--repo` or through `--config`.
    Repo(Result<String, String>),
    /// walvault, with the repository from the environment.
    Unnamed,
}

/// Which repository an `archive_command` line archives into, as far as its words tell.
fn archive_command_repo(command: &str) -> ArchiveCommand {
    let words: Vec<&str> = command
        .split_whitespace()
        .map(|w| w.trim_matches(|c| c == '\'' || c == '"'))
        .collect();
    if !words.iter().any(|w| w.contains("walvault")) || !words.contains(&"wal-push") {
        return ArchiveCommand::NotWalvault;
    }
    let after = |flag: &str| {
        words.iter().enumerate().find_map(|(i, w)| {
            w.strip_prefix(&format!("{flag}="))
                .or_else(|| (*w == flag).then(|| words.get(i + 1).copied()).flatten())
        })
    };
    if let Some(url) = after("--repo") {
        return ArchiveCommand::Repo(Ok(url.to_owned()));
    }
    if let Some(config) = after("--config") {
        let flags = FlagValues {
            config: Some(config.into()),
            ..Default::default()
        };
        return ArchiveCommand::Repo(
            Settings::load(&flags)
                .map(|s| s.repo.to_string())
                .map_err(|e| e.to_string()),
        );
    }
    ArchiveCommand::Unnamed
}

/// The repository's identity against the server's; returns the recorded identity.
async fn identity_check(
    report: &mut Report,
    repo: &Repository,
    session: Option<&BackupSession>,
) -> Option<Identity> {
    let recorded = match identity::load(repo).await {
        Ok(Some(recorded)) => recorded,
        Ok(None) => {
            report.push(
                "identity",
                Verdict::Fail,
                format!(
                    "repository {} holds no cluster yet: nothing was ever archived into it",
                    repo.url()
                ),
            );
            return None;
        }
        Err(e) => {
            report.push("identity", Verdict::Fail, e.to_string());
            return None;
        }
    };
    let Some(session) = session else {
        report.push(
            "identity",
            Verdict::Skip,
            format!(
                "repository holds cluster {} (no server to compare with)",
                recorded.system_identifier
            ),
        );
        return Some(recorded);
    };
    let info = session.info();
    let found = Identity {
        system_identifier: info.system_identifier,
        pg_major: info.major(),
        wal_segment_size: info.wal_segment_size,
        created_at: String::new(),
    };
    match identity::check(&recorded, &found, "the server", repo.url()) {
        Ok(()) => {
            report.push(
                "identity",
                Verdict::Ok,
                format!(
                    "repository and server are cluster {} (PostgreSQL {})",
                    recorded.system_identifier, recorded.pg_major
                ),
            );
            Some(recorded)
        }
        Err(e) => {
            report.push("identity", Verdict::Fail, e.to_string());
            None
        }
    }
}

/// Forces a segment switch after one commit and waits until that segment is in the repository.
async fn switch_check(
    report: &mut Report,
    repo: &Repository,
    session: &BackupSession,
    opts: &CheckOptions,
) {
    let client = session.client();
    // A commit first, so the switch always ends a segment with fresh WAL in it.
    let switched = async {
        pg::bounded(
            session.target(),
            "committing a transaction",
            opts.pg_timeout,
            client.batch_execute("SELECT pg_current_xact_id()"),
        )
        .await?;
        pg::bounded(
            session.target(),
            "switching WAL (pg_switch_wal)",
            opts.pg_timeout,
            client.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]),
        )
        .await
    }
    .await;
    let segment: String = match switched {
        Ok(row) => row.get(0),
        Err(e) => return report.push("wal-switch", Verdict::Fail, e.to_string()),
    };
    let Ok(name) = segment.parse::<walvault_wal::SegmentName>() else {
        return report.push(
            "wal-switch",
            Verdict::Fail,
            format!("the server named segment {segment:?}, which is not a segment name"),
        );
    };
    let key = layout::segment(&name);
    let started = Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        match repo.head(&key).await {
            Ok(Some(_)) => {
                return report.push(
                    "wal-switch",
                    Verdict::Ok,
                    format!(
                        "segment {segment} reached the repository in {:.1} s",
                        started.elapsed().as_secs_f64()
                    ),
                )
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("looking for {key}: {e}"),
        }
        if started.elapsed() >= opts.timeout {
            let conn = ConnTarget::resolve(opts.dbname.as_deref());
            let archiver = match conn {
                Ok(conn) => pg::describe_archiver(&conn, opts.pg_timeout).await,
                Err(e) => format!("archiver status unknown ({e})"),
            };
            return report.push(
                "wal-switch",
                Verdict::Fail,
                format!(
                    "segment {segment} did not reach the repository within {}; pg_stat_archiver: \
                     {archiver}",
                    humantime::format_duration(opts.timeout)
                ),
            );
        }
        tokio::time::sleep(pause.min(opts.timeout.saturating_sub(started.elapsed()))).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

async fn backup_age_check(report: &mut Report, repo: &Repository, opts: &CheckOptions) {
    let backups = match crate::backup::catalog::list(repo).await {
        Ok(backups) => backups,
        Err(e) => return report.push("backup-age", Verdict::Fail, e.to_string()),
    };
    let Some(newest) = backups.last() else {
        return report.push(
            "backup-age",
            Verdict::Fail,
            "the repository has no backups (take one with backup-push)",
        );
    };
    let Some(stop) = UnixMicros::parse_rfc3339(&newest.stop_time) else {
        return report.push(
            "backup-age",
            Verdict::Fail,
            format!(
                "backup {} records an unreadable stop time {:?}",
                newest.name, newest.stop_time
            ),
        );
    };
    let age = age(UnixMicros::now(), stop);
    let verdict = if age > opts.max_backup_age.as_secs_f64() {
        Verdict::Fail
    } else {
        Verdict::Ok
    };
    report.push(
        "backup-age",
        verdict,
        format!(
            "newest backup {} ended {} ({:.0} s ago; at most {} allowed)",
            newest.name,
            newest.stop_time,
            age,
            humantime::format_duration(opts.max_backup_age)
        ),
    );
}

async fn archive_lag_check(report: &mut Report, repo: &Repository, opts: &CheckOptions) {
    let Some(newest) = newest::load(repo).await else {
        return report.push(
            "archive-lag",
            Verdict::Fail,
            format!(
                "no archived segment recorded in {} (nothing archived since status tracking began)",
                layout::status_wal()
            ),
        );
    };
    let lag = age(UnixMicros::now(), UnixMicros(newest.archived_at_us));
    let verdict = if lag > opts.max_archive_lag.as_secs_f64() {
        Verdict::Fail
    } else {
        Verdict::Ok
    };
    report.push(
        "archive-lag",
        verdict,
        format!(
            "newest segment {} stored {:.0} s ago (at most {} allowed)",
            newest.segment,
            lag,
            humantime::format_duration(opts.max_archive_lag)
        ),
    );
}

/// Every segment from the oldest usable backup's start to the newest archived one is archived.
async fn continuity_check(report: &mut Report, repo: &Arc<Repository>) {
    let recoverable = match Recoverable::load(repo, TimelineChoice::Latest).await {
        Ok(r) => r,
        Err(e) => return report.push("wal-continuity", Verdict::Fail, e.to_string()),
    };
    let Some(oldest) = recoverable.backups.iter().find(|b| recoverable.usable(b)) else {
        return report.push(
            "wal-continuity",
            Verdict::Fail,
            "no backup lies on the latest timeline's history",
        );
    };
    let seg_size = recoverable.archive.seg_size();
    let first = oldest.start_lsn.segment_number(seg_size);
    let Some(last) = recoverable
        .window
        .newest_segment
        .and_then(|s| recoverable.archive.segno(&s))
    else {
        return report.push(
            "wal-continuity",
            Verdict::Fail,
            format!("no WAL archived after backup {}", oldest.name),
        );
    };
    let walk = recoverable.walk(repo);
    let mut segno = first;
    while segno <= last {
        match walk.segment(segno) {
            Ok(_) => {}
            Err(Missing::Gap(name) | Missing::End(name)) => {
                return report.push(
                    "wal-continuity",
                    Verdict::Fail,
                    format!(
                        "segment {name} is missing: recovery from backup {} cannot pass it",
                        oldest.name
                    ),
                )
            }
            Err(Missing::OutOfRange(n)) => {
                return report.push(
                    "wal-continuity",
                    Verdict::Fail,
                    format!("segment number {} has no name on the timeline history", n.0),
                )
            }
        }
        segno = segno.next();
    }
    report.push(
        "wal-continuity",
        Verdict::Ok,
        format!(
            "{} segments archived without a gap from backup {} to the newest",
            last.0 - first.0 + 1,
            oldest.name
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_an_archive_command_names() {
        let repo = |c: &str| match archive_command_repo(c) {
            ArchiveCommand::Repo(r) => Some(r),
            _ => None,
        };
        assert!(matches!(
            archive_command_repo("cp %p /archive/%f"),
            ArchiveCommand::NotWalvault
        ));
        assert!(matches!(
            archive_command_repo("/usr/bin/walvault wal-push %p"),
            ArchiveCommand::Unnamed
        ));
        assert_eq!(
            repo("walvault --repo 's3://b/p' wal-push %p"),
            Some(Ok("s3://b/p".into()))
        );
        assert_eq!(
            repo("walvault --repo=file:///r wal-push %p"),
            Some(Ok("file:///r".into()))
        );
        assert!(matches!(
            repo("walvault --config /nonexistent.toml wal-push %p"),
            Some(Err(_))
        ));
    }

    #[test]
    fn warnings_only_are_not_failures() {
        let mut report = Report::default();
        report.push("a", Verdict::Ok, "");
        report.push("b", Verdict::Skip, "");
        assert_eq!(report.worst(), Verdict::Ok);
        report.push("c", Verdict::Warn, "");
        assert_eq!(report.worst(), Verdict::Warn);
        report.push("d", Verdict::Fail, "");
        assert_eq!(report.worst(), Verdict::Fail);
    }
}
