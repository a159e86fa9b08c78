//! Checks of the harness itself.

use super::{ClusterConfig, PgInstall, TestEnv};

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
