//! `wal-fetch`: what PostgreSQL's `restore_command` runs for every file recovery needs.
//!
//! The outcome must be unambiguous, because PostgreSQL treats any exit from 1 to 125 as "the
//! archive ends here" and promotes: [`Fetched::NotFound`] is returned only when the repository was
//! reached, holds this cluster (its identity object is there and, when `PGDATA/global/pg_control`
//! is readable, names the same system) and said the object does not exist. Every other failure
//! (no or another cluster's identity, network, credentials, a checksum or length that does not
//! match, a history file that does not parse) is retried within a bound where retrying can help
//! and then returned as an error, which the CLI turns into an exit code above 125.
//!
//! Nothing is sized by the repository: a segment's declared length must be the identity's segment
//! size before a byte is written, history files are capped and parsed before they are served.
//! A segment that exists only as fragments streamed by `wal-receive` is served assembled and
//! padded with zeros, like a pg_receivewal `.partial`, so that recovery reaches the newest
//! streamed commit. Segments the [prefetcher](super::prefetch) spooled are served from the spool.

use std::path::{Path, PathBuf};
use std::time::Duration;

use walvault_wal::page::{validate_segment, SIZE_OF_XLOG_LONG_PHD};
use walvault_wal::{SegmentName, WalFileName, WalSegmentSize};

use super::fragments::{self, Partial};
use super::history::{self, BadHistoryFile};
use super::prefetch::Prefetched;
use super::spool;
use crate::repo::identity::{self, Identity, IdentityError};
use crate::repo::layout;
use crate::repo::{publish, temp_beside, LengthRule, RepoError, Repository};

/// Attempts at a fetch that failed for a reason other than "not found", on top of the store's
/// own per-request retries (this also covers a body cut off mid-stream or read back corrupt).
const FETCH_ATTEMPTS: u32 = 3;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fetched {
    /// Written to the destination; `true` when it came from the prefetch spool.
    Found {
        from_spool: bool,
    },
    NotFound,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(
        "repository {repo} holds no cluster (its identity object `repository` is missing): an \
         empty repository or a wrong location cannot say that a file is not archived"
    )]
    NoIdentity { repo: String },
    #[error(
        "{} names cluster {local}, but repository {repo} holds cluster {recorded}: this is not \
         this cluster's repository", pg_control.display()
    )]
    OtherCluster {
        pg_control: PathBuf,
        local: u64,
        repo: String,
        recorded: u64,
    },
    #[error("repository {repo}: its identity gives an invalid WAL segment size {size}")]
    BadSegmentSize { repo: String, size: u32 },
    #[error("object {key} in {repo} is not the segment its name says: {problem}")]
    BadSegment {
        key: String,
        repo: String,
        problem: String,
    },
    #[error("object {key} in {repo}: {source}")]
    BadHistory {
        key: String,
        repo: String,
        #[source]
        source: BadHistoryFile,
    },
}

/// Fetches `name` into `dest`, from the prefetch spool when it is there.
pub(crate) async fn fetch(
    repo: &Repository,
    prefetched: &mut Prefetched,
    name: &WalFileName,
    dest: &Path,
) -> Result<Fetched, FetchError> {
    crate::failpoint::pause_if_enabled("wal-fetch").await;
    if let WalFileName::Segment(seg) = name {
        if prefetched.serve(seg, dest).await {
            return Ok(Fetched::Found { from_spool: true });
        }
    }
    let cluster = this_cluster(repo, dest).await?;
    let mut attempt = 1;
    loop {
        match fetch_once(repo, &cluster, name, dest).await {
            Ok(Some(fetched)) => return Ok(fetched),
            // Completed while we looked: fetch the whole segment on the next round.
            Ok(None) if attempt < FETCH_ATTEMPTS => attempt += 1,
            Ok(None) => {
                return Err(FetchError::Repo(RepoError::Changing {
                    what: layout::wal(name),
                    problem: "its streamed fragments changed while being read and the whole \
                              segment is not stored",
                }))
            }
            // A declared length is what the object says, not a failure of the transfer; a
            // missing key does not appear by trying again either.
            Err(FetchError::Repo(e))
                if attempt < FETCH_ATTEMPTS
                    && !matches!(e, RepoError::Length { .. })
                    && !e.is_missing_key() =>
            {
                tracing::warn!(
                    "fetching {name} failed (attempt {attempt} of {FETCH_ATTEMPTS}): {e}"
                );
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One look at the repository. `None` when streamed fragments changed while being read.
async fn fetch_once(
    repo: &Repository,
    cluster: &Cluster,
    name: &WalFileName,
    dest: &Path,
) -> Result<Option<Fetched>, FetchError> {
    let key = layout::wal(name);
    let seg_size = cluster.seg_size;
    let size = u64::from(seg_size.bytes());
    let found = Some(Fetched::Found { from_spool: false });
    match name {
        WalFileName::Segment(seg) => {
            let rule = LengthRule::Exactly(size);
            let fetched = match repo.get_to_file(&key, dest, rule).await? {
                Some(_) => found,
                None => fetch_streamed(repo, seg_size, name, dest).await?,
            };
            if matches!(fetched, Some(Fetched::Found { .. })) {
                check_segment(repo, &key, seg, cluster, dest)?;
            }
            Ok(fetched)
        }
        WalFileName::Partial(_) => match repo
            .get_to_file(&key, dest, LengthRule::AtMost(size))
            .await?
        {
            Some(_) => Ok(found),
            None => Ok(Some(Fetched::NotFound)),
        },
        WalFileName::History(_) | WalFileName::Backup { .. } => {
            let rule = LengthRule::AtMost(history::MAX_LEN);
            let Some(content) = repo.get_bytes_checked(&key, rule).await? else {
                return Ok(Some(Fetched::NotFound));
            };
            history::check(name, &content, Some(seg_size)).map_err(|source| {
                FetchError::BadHistory {
                    key: key.clone(),
                    repo: repo.url().to_owned(),
                    source,
                }
            })?;
            write_file(dest, &content).await?;
            Ok(found)
        }
    }
}

/// What the repository's identity says about the cluster it holds.
struct Cluster {
    system_identifier: u64,
    seg_size: WalSegmentSize,
}

/// Checks that `repo` holds the cluster recovering into `dest` and returns what it says of it.
/// One small read of the repository and one of `pg_control`, paid by every call the spool does
/// not serve: a miss is only a miss in the right repository, and a segment's length is only
/// known from the identity.
async fn this_cluster(repo: &Repository, dest: &Path) -> Result<Cluster, FetchError> {
    let Some(recorded) = identity::load(repo).await? else {
        return Err(FetchError::NoIdentity {
            repo: repo.url().to_owned(),
        });
    };
    if let Some((pg_control, local)) = local_system_identifier(dest) {
        if local != recorded.system_identifier {
            return Err(FetchError::OtherCluster {
                pg_control,
                local,
                repo: repo.url().to_owned(),
                recorded: recorded.system_identifier,
            });
        }
    }
    Ok(Cluster {
        system_identifier: recorded.system_identifier,
        seg_size: segment_size(repo, &recorded)?,
    })
}

/// Deletes the segment restored to `dest` unless its first page names `seg` of this cluster.
/// The checksum vouches only for what was stored under the key; PostgreSQL reads a page address
/// or system other than it expects as the end of WAL, and would end recovery there.
fn check_segment(
    repo: &Repository,
    key: &str,
    seg: &SegmentName,
    cluster: &Cluster,
    dest: &Path,
) -> Result<(), FetchError> {
    use std::io::Read;
    let checked = (|| {
        let mut file = std::fs::File::open(dest).map_err(|e| e.to_string())?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut first = vec![0u8; SIZE_OF_XLOG_LONG_PHD];
        file.read_exact(&mut first).map_err(|e| e.to_string())?;
        let header = validate_segment(seg, &first, len).map_err(|e| e.to_string())?;
        if header.system_identifier != cluster.system_identifier {
            return Err(format!(
                "it is WAL of system {}, not of the repository's system {}",
                header.system_identifier, cluster.system_identifier
            ));
        }
        Ok(())
    })();
    checked.map_err(|problem| {
        let _ = std::fs::remove_file(dest);
        FetchError::BadSegment {
            key: key.to_owned(),
            repo: repo.url().to_owned(),
            problem,
        }
    })
}

pub(super) fn segment_size(
    repo: &Repository,
    recorded: &Identity,
) -> Result<WalSegmentSize, FetchError> {
    recorded
        .segment_size()
        .ok_or_else(|| FetchError::BadSegmentSize {
            repo: repo.url().to_owned(),
            size: recorded.wal_segment_size,
        })
}

/// The system identifier in the `pg_control` of the data directory `dest` (a file in its
/// `pg_wal`) belongs to, with that file's path; `None` when it cannot be read (a destination
/// outside a data directory). It is the first field of `pg_control` in every version.
pub(super) fn local_system_identifier(dest: &Path) -> Option<(PathBuf, u64)> {
    use std::io::Read;
    let path = spool::data_dir_of(spool::wal_dir_of(dest)).join("global/pg_control");
    let mut sysid = [0u8; 8];
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_exact(&mut sysid))
        .ok()?;
    Some((path, u64::from_le_bytes(sysid)))
}

/// Writes a small verified file to `dest` under a temporary name first, like every restore.
async fn write_file(dest: &Path, content: &[u8]) -> Result<(), RepoError> {
    let temp = temp_beside(dest);
    let written = tokio::fs::write(&temp, content)
        .await
        .map_err(|source| RepoError::File {
            op: "write",
            path: temp.clone(),
            source,
        });
    publish(&temp, dest, written).await
}

/// A segment that is not archived whole may exist as fragments streamed by wal-receive: serve
/// them (padded like a `.partial`), so recovery reaches the last streamed commit. `None` when the
/// fragments vanished while being read, which means the segment was just completed.
async fn fetch_streamed(
    repo: &Repository,
    seg_size: WalSegmentSize,
    name: &WalFileName,
    dest: &Path,
) -> Result<Option<Fetched>, RepoError> {
    let WalFileName::Segment(seg) = name else {
        return Ok(Some(Fetched::NotFound));
    };
    match fragments::fetch_partial(repo, seg, u64::from(seg_size.bytes()), dest).await? {
        Partial::Written(bytes) => {
            tracing::info!("{name}: serving the {bytes} bytes streamed so far (partial segment)");
            Ok(Some(Fetched::Found { from_spool: false }))
        }
        // The segment is stored whole before its fragments are deleted, so no fragments after a
        // miss means a true miss unless the segment appeared in between: look once more.
        Partial::None => match repo.head(&layout::wal(name)).await? {
            Some(_) => Ok(None),
            None => Ok(Some(Fetched::NotFound)),
        },
        Partial::Vanished => Ok(None),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The key of WAL file `name`.
    fn key(name: &str) -> String {
        layout::wal(&name.parse().unwrap())
    }
    use crate::config::{FlagValues, Settings};
    use crate::repo::PutMode;
    use crate::wal::push::tests::segment;
    use crate::wal::spool::Spool;

    /// A local repository holding cluster 7 (1 MiB segments, what `segment` makes), and an empty
    /// data directory to recover into.
    pub(crate) struct Setup {
        pub(crate) dir: tempfile::TempDir,
        pub(crate) repo: Repository,
        pub(crate) pg_wal: PathBuf,
    }

    pub(crate) async fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("repo");
        let pg_wal = dir.path().join("data/pg_wal");
        std::fs::create_dir_all(&pg_wal).unwrap();
        std::fs::create_dir(&repo_dir).unwrap();
        let settings = Settings::load(&FlagValues {
            repo: Some(format!("file://{}", repo_dir.display())),
            ..Default::default()
        })
        .unwrap();
        let repo = Repository::open(&settings).await.unwrap();
        let cluster = Identity {
            system_identifier: 7,
            pg_major: 15,
            wal_segment_size: 1 << 20,
            created_at: String::new(),
        };
        identity::ensure(&repo, &cluster, "test").await.unwrap();
        Setup { dir, repo, pg_wal }
    }

    impl Setup {
        async fn put(&self, key: &str, content: &[u8]) {
            self.repo
                .put_bytes(key, content, PutMode::OverwriteDerived)
                .await
                .unwrap();
        }

        /// wal-fetch of `name` into `pg_wal/RECOVERYXLOG`; the destination's content if any.
        async fn fetch(&self, name: &str) -> (Result<Fetched, FetchError>, Option<Vec<u8>>) {
            let dest = self.pg_wal.join("RECOVERYXLOG");
            let _ = std::fs::remove_file(&dest);
            let spool = Spool::locate(None, &self.pg_wal);
            let mut prefetched = Prefetched::read(&spool, self.repo.url());
            let fetched = fetch(&self.repo, &mut prefetched, &name.parse().unwrap(), &dest).await;
            let left: Vec<_> = std::fs::read_dir(&self.pg_wal)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n != "RECOVERYXLOG")
                .collect();
            assert!(left.is_empty(), "{name}: left {left:?} in pg_wal");
            (fetched, std::fs::read(&dest).ok())
        }

        pub(crate) fn write_pg_control(&self, sysid: u64) {
            let global = self.dir.path().join("data/global");
            std::fs::create_dir_all(&global).unwrap();
            let mut control = sysid.to_le_bytes().to_vec();
            control.resize(8192, 0);
            std::fs::write(global.join("pg_control"), control).unwrap();
        }
    }

    const SEG: &str = "000000010000000000000003";

    #[tokio::test]
    async fn a_declared_length_other_than_the_segment_size_writes_nothing() {
        let s = setup().await;
        // Zeros compress to almost nothing: a small object can declare a huge content.
        for len in [2 << 20, 4096] {
            s.put(&key(SEG), &vec![0; len]).await;
            let (fetched, written) = s.fetch(SEG).await;
            assert!(
                matches!(fetched, Err(FetchError::Repo(RepoError::Length { .. }))),
                "{len}: {fetched:?}"
            );
            assert_eq!(written, None);
        }
        s.put(&key("00000002.history"), &vec![b'#'; 2 << 20]).await;
        let (fetched, written) = s.fetch("00000002.history").await;
        assert!(matches!(
            fetched,
            Err(FetchError::Repo(RepoError::Length { .. }))
        ));
        assert_eq!(written, None);

        let content = segment(SEG);
        s.put(&key(SEG), &content).await;
        let (fetched, written) = s.fetch(SEG).await;
        assert_eq!(fetched.unwrap(), Fetched::Found { from_spool: false });
        assert_eq!(written.unwrap(), content);
    }

    #[tokio::test]
    async fn a_stored_segment_must_be_the_segment_its_key_names() {
        let s = setup().await;
        // Another segment's content, and another system's, each with a valid checksum.
        let mut other_system = segment(SEG);
        other_system[24..32].copy_from_slice(&8u64.to_le_bytes());
        for content in [segment("000000010000000000000004"), other_system] {
            s.put(&key(SEG), &content).await;
            let (fetched, written) = s.fetch(SEG).await;
            let err = fetched.unwrap_err();
            assert!(matches!(err, FetchError::BadSegment { .. }), "{err}");
            assert!(err.to_string().contains(&key(SEG)), "{err}");
            assert_eq!(written, None);
        }
    }

    #[tokio::test]
    async fn fragments_must_hold_what_their_names_say_without_holes() {
        let s = setup().await;
        let frag = |seg: &str, start: u64, end: u64| {
            crate::repo::layout::fragment(&seg.parse().unwrap(), start, end)
        };
        let names: Vec<String> = (0x10..0x16)
            .map(|n| format!("0000000100000000000000{n:02X}"))
            .collect();
        let content: Vec<Vec<u8>> = names.iter().map(|n| segment(n)).collect();
        // A name reaching far past its 4 KiB and past the segment.
        s.put(&frag(&names[0], 0, 0x1000_0000), &content[0][..4096])
            .await;
        // A name saying more than is stored.
        s.put(&frag(&names[1], 0, 0x2000), &content[1][..0x1000])
            .await;
        // Overlaps that disagree.
        s.put(&frag(&names[2], 0, 0x2000), &content[2][..0x2000])
            .await;
        let mut other = content[2][0x1000..0x3000].to_vec();
        other[0x800] ^= 1;
        s.put(&frag(&names[2], 0x1000, 0x3000), &other).await;
        // A hole before later WAL.
        s.put(&frag(&names[3], 0, 0x2000), &content[3][..0x2000])
            .await;
        s.put(
            &frag(&names[3], 0x3000, 0x4000),
            &content[3][0x3000..0x4000],
        )
        .await;
        for name in &names[..4] {
            let (fetched, written) = s.fetch(name).await;
            assert!(fetched.is_err(), "{name}: {fetched:?}");
            assert_eq!(written, None, "{name}");
        }
        // Overlaps that agree: served up to the last fragment, padded to the segment size.
        s.put(&frag(&names[4], 0, 0x2000), &content[4][..0x2000])
            .await;
        s.put(
            &frag(&names[4], 0x1000, 0x3000),
            &content[4][0x1000..0x3000],
        )
        .await;
        let (fetched, written) = s.fetch(&names[4]).await;
        assert_eq!(fetched.unwrap(), Fetched::Found { from_spool: false });
        let written = written.unwrap();
        assert_eq!(written.len(), 1 << 20);
        assert_eq!(written[..0x3000], content[4][..0x3000]);
        assert!(written[0x3000..].iter().all(|b| *b == 0));
    }

    #[tokio::test]
    async fn a_stored_history_file_that_does_not_parse_is_not_served() {
        let s = setup().await;
        for bad in [&b""[..], b"2\t0/3000158\tnot a parent\n", b"\xff\xfe"] {
            s.put(&key("00000002.history"), bad).await;
            let (fetched, written) = s.fetch("00000002.history").await;
            let err = fetched.unwrap_err();
            assert!(matches!(err, FetchError::BadHistory { .. }), "{err}");
            assert!(err.to_string().contains(&key("00000002.history")), "{err}");
            assert_eq!(written, None);
        }
        let good = b"1\t0/3000158\tno recovery target specified\n";
        s.put(&key("00000002.history"), good).await;
        let (fetched, written) = s.fetch("00000002.history").await;
        assert_eq!(fetched.unwrap(), Fetched::Found { from_spool: false });
        assert_eq!(written.unwrap(), good);
    }

    #[tokio::test]
    async fn not_found_is_only_said_by_this_clusters_repository() {
        let s = setup().await;
        // The repository holds cluster 7; PGDATA's pg_control is not there yet: a true miss.
        for missing in [SEG, "00000002.history"] {
            assert_eq!(s.fetch(missing).await.0.unwrap(), Fetched::NotFound);
        }
        s.write_pg_control(7);
        assert_eq!(s.fetch(SEG).await.0.unwrap(), Fetched::NotFound);
        s.write_pg_control(8);
        for missing in [SEG, "00000002.history"] {
            let err = s.fetch(missing).await.0.unwrap_err();
            assert!(matches!(err, FetchError::OtherCluster { .. }), "{err}");
        }
        // A repository without an identity (empty, or the wrong place) knows nothing.
        std::fs::remove_file(s.dir.path().join("repo/repository")).unwrap();
        s.write_pg_control(7);
        for missing in [SEG, "00000002.history"] {
            let err = s.fetch(missing).await.0.unwrap_err();
            assert!(matches!(err, FetchError::NoIdentity { .. }), "{err}");
        }
    }
}
