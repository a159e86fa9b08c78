//! Checks of the harness itself.

use super::repo::{frame_object, lz4_slack, object_content};
use super::{ClusterConfig, PgInstall, RepoKind, TestEnv};

/// Every available PostgreSQL major (15, plus `$WALVAULT_TEST_PG_BINS`) makes a cluster that
/// starts and answers, so version-matrix tests can rely on [`PgInstall::all`].
#[test]
fn every_pg_install_runs_a_cluster() {
    let env = TestEnv::new("pg-installs");
    for install in PgInstall::all() {
        let major = install.major();
        let cluster = env.cluster(ClusterConfig::new(&format!("pg{major}")).install(install));
        let version: u32 = cluster.psql("SHOW server_version_num").parse().unwrap();
        assert_eq!(
            version / 10000,
            major,
            "cluster of {}",
            cluster.install().bindir().display()
        );
    }
}

/// `corrupt` changes what an object holds even where the byte asked for sits in lz4's slack (a
/// match offset into a run of zeros, whose flip copies the same zeros): a backup-failure test
/// once flipped such a byte of a pack, and the restore it expected to fail rightly succeeded.
#[test]
fn corrupt_always_changes_the_content() {
    let env = TestEnv::new("corrupt");
    let repo = env.repo(RepoKind::Local);
    let mut content = vec![0u8; 64 << 10];
    content.extend_from_slice(b"a page header, then more zeros");
    content.extend_from_slice(&[0u8; 8 << 10]);
    let framed = frame_object(&content, true);
    let slack = (0..framed.len())
        .find(|&at| lz4_slack(&framed, at))
        .expect("an lz4 block of zeros has a byte whose flip changes nothing");
    repo.put_object("x", b"");
    repo.write("x", framed);
    repo.corrupt("x", slack);
    let damaged = repo.read("x");
    assert!(
        std::panic::catch_unwind(|| object_content(&damaged)).map_or(true, |c| c != content),
        "corrupt({slack}) left the content as it was"
    );
}
