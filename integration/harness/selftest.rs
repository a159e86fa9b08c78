//! Checks of the harness itself.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::proxy::{Fault, Proxy, Schedule};
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

/// A PUT the proxy cuts off inside its head stores nothing. moto's HTTP server takes a head cut
/// short for a whole request (an empty PUT, unsigned), which stored an empty object under the
/// key: the retry then met it as other content, and a fault test failed now and then on what
/// no S3 server would do.
#[test]
fn a_request_cut_in_its_head_stores_nothing() {
    let env = TestEnv::new("proxy-cut-head");
    let repo = env.repo(RepoKind::S3);
    let endpoint = repo.s3_endpoint().unwrap();
    let head_len = 400;
    let schedule = Schedule {
        seed: 7,
        per_mille: 1000,
        faults: vec![Fault::PartialWrite],
        max_offset: head_len,
        stall: Duration::from_secs(1),
        spare_first: 0,
    };
    let proxy = Proxy::start(endpoint.trim_start_matches("http://"), schedule);
    let path = repo.url().trim_start_matches("s3://");
    let puts = 20;
    for i in 0..puts {
        let body = b"0123456789";
        let mut head = format!(
            "PUT /{path}/cut-{i} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n",
            proxy.port(),
            body.len()
        );
        // Padding headers put every cut the schedule draws inside the head.
        while head.len() < head_len + 16 {
            head.push_str("x-amz-meta-padding: walvault\r\n");
        }
        head.push_str("\r\n");
        let mut conn = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(body);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = conn.read_to_end(&mut Vec::new());
    }
    assert_eq!(proxy.stats().total_faults(), puts, "{}", proxy.stats());
    let stored: Vec<String> = repo.keys();
    assert!(stored.is_empty(), "cut requests stored {stored:?}");
}
