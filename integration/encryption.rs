//! Encryption at rest (age): a cluster archiving and backing up into an encrypted repository
//! leaves no plaintext in it (the same check finds it in a plain one), recovers exactly with the
//! identity, and without one (or with the wrong one) fails before writing anything, `wal-fetch`
//! above 125; writers that disagree with the repository are refused and change nothing; key
//! rotation keeps old objects readable, `verify` counts objects per key and `reencrypt` moves
//! them to the new one; a plain repository migrates by archiving into both; S3 server-side
//! encryption and storage classes reach every upload.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use age::secrecy::ExposeSecret;
use sha2::Digest;

use crate::harness::repo::toml_str;
use crate::harness::{
    free_port, garage, pseudo_random_bytes, repo_kind_tests, s3, Cluster, ClusterConfig,
    ConfigFile, RepoKind, RunOutput, TestEnv, Walvault,
};

repo_kind_tests!(
    encrypted_repository_end_to_end,
    writers_without_recipients_change_nothing,
    rotation_keeps_old_objects_readable_and_verify_counts_them,
);

/// An age key pair: the identity in a file only its owner reads, the recipient, its fingerprint.
struct Key {
    identity: PathBuf,
    recipient: String,
    fingerprint: String,
}

fn key(env: &TestEnv, name: &str) -> Key {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let path = env.write_file(
        format!("{name}.key"),
        format!("# {name}\n{}\n", identity.to_string().expose_secret()),
    );
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let digest = sha2::Sha256::digest(recipient.as_bytes());
    let fingerprint = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Key {
        identity: path,
        recipient,
        fingerprint,
    }
}

/// `config` with the given recipients (writers) and identity files (readers).
fn with_keys(config: ConfigFile, recipients: &[&Key], identities: &[&Key]) -> ConfigFile {
    let list = |items: Vec<&str>| {
        let quoted: Vec<String> = items.into_iter().map(toml_str).collect();
        format!("[{}]", quoted.join(", "))
    };
    let mut config = config;
    if !recipients.is_empty() {
        config = config.set(
            "encryption.recipients",
            &list(recipients.iter().map(|k| k.recipient.as_str()).collect()),
        );
    }
    if !identities.is_empty() {
        config = config.set(
            "encryption.identity_file",
            &list(
                identities
                    .iter()
                    .map(|k| k.identity.to_str().unwrap())
                    .collect(),
            ),
        );
    }
    config
}

/// A walvault bound to a config file `name` written from `config`.
fn walvault(env: &TestEnv, name: &str, config: &ConfigFile) -> Walvault {
    env.walvault(&env.write_config(name, config))
}

/// A cluster with 1 MiB segments and commit timestamps, archiving with `wv`, with table `t`.
fn source(env: &TestEnv, wv: &Walvault) -> Cluster {
    let cluster = env.cluster(
        ClusterConfig::new("src")
            .wal_segsize_mb(1)
            .set("track_commit_timestamp", "on")
            .set("autovacuum", "off")
            .archive_with(wv),
    );
    cluster.psql("CREATE TABLE t (id serial PRIMARY KEY, note text)");
    cluster
}

fn backup_push(env: &TestEnv, wv: &Walvault, cluster: &Cluster) -> RunOutput {
    let port = cluster.port().to_string();
    wv.run_with_env(
        &["backup-push"],
        &[
            ("PGHOST", env.path().to_str().unwrap()),
            ("PGPORT", &port),
            ("PGUSER", "postgres"),
            ("PGDATABASE", "postgres"),
            ("PGDATA", cluster.datadir().to_str().unwrap()),
        ],
    )
}

/// Ends the current segment and waits until it is archived; returns its name.
fn archive_everything(cluster: &Cluster) -> String {
    let segment = cluster.switch_wal();
    cluster.wait_for_archived(&segment, Duration::from_secs(60));
    segment
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A marker no object can hold by chance.
fn marker() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let digest = sha2::Sha256::digest(format!("{nanos}-{}", std::process::id()).as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("marker-{hex}")
}

/// The key fingerprints an encrypted object's envelope names (read here independently of
/// walvault: header byte 6 is the encryption code, bytes 8..16 the number of fingerprints, which
/// follow the 20-byte header); `None` for a plain object.
fn envelope_keys(object: &[u8]) -> Option<Vec<String>> {
    assert_eq!(&object[..4], b"WVLT");
    if object[6] == 0 {
        return None;
    }
    assert_eq!(object[6], 1, "age");
    let n = u64::from_le_bytes(object[8..16].try_into().unwrap()) as usize;
    Some(
        object[20..20 + 8 * n]
            .chunks(8)
            .map(|fp| fp.iter().map(|b| format!("{b:02x}")).collect())
            .collect(),
    )
}

/// `recover --start` into `dir` on a free port; the command's output.
fn recover_start(env: &TestEnv, wv: &Walvault, dir: &Path, target: &[&str]) -> RunOutput {
    let port = free_port().to_string();
    let mut args = vec!["recover", "--pgdata", dir.to_str().unwrap()];
    args.extend_from_slice(target);
    args.extend_from_slice(&[
        "--start",
        "--port",
        &port,
        "--socket-dir",
        env.path().to_str().unwrap(),
    ]);
    wv.run(&args)
}

fn ids(cluster: &Cluster, filter: &str) -> String {
    cluster.psql(&format!(
        "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t {filter}"
    ))
}

/// Reads every object of a repository.
type ReadAll = Box<dyn Fn() -> Vec<Vec<u8>>>;

/// The objects of a plain repository of `kind` that `config` (made here) points at.
fn plain_repository(env: &TestEnv, kind: RepoKind) -> (ConfigFile, ReadAll) {
    match kind {
        RepoKind::Local => {
            let dir = env.mkdir("plain-repo");
            let config = ConfigFile::new(&format!("file://{}", dir.display()));
            let read = move || {
                let mut out = Vec::new();
                let mut dirs = vec![dir.clone()];
                while let Some(d) = dirs.pop() {
                    for entry in fs::read_dir(&d).unwrap() {
                        let path = entry.unwrap().path();
                        if path.is_dir() {
                            dirs.push(path);
                        } else {
                            out.push(fs::read(&path).unwrap());
                        }
                    }
                }
                out
            };
            (config, Box::new(read))
        }
        RepoKind::S3 | RepoKind::Garage => {
            let server = match kind {
                RepoKind::Garage => garage::server(),
                _ => s3::server(),
            };
            let bucket = server.new_bucket();
            let config = ConfigFile::s3_on(&format!("s3://{bucket}/plain"), server);
            let read = move || {
                server
                    .list(&bucket, "plain/")
                    .iter()
                    .map(|k| server.get(&bucket, k))
                    .collect()
            };
            (config, Box::new(read))
        }
    }
}

/// Archive and backup into an encrypted repository: no object holds a marker row (a plain
/// backup of the same cluster does), the identity object says "encrypted" without a key, PITR
/// with the identity is exact; without the identity or with a wrong one, wal-fetch exits 128
/// naming the object and its key, and backup-fetch and recover fail before writing anything; a
/// flipped byte is refused.
fn encrypted_repository_end_to_end(kind: RepoKind) {
    let env = TestEnv::new("encryption");
    let repo = env.repo(kind);
    let (a, b) = (key(&env, "a"), key(&env, "b"));
    // Uncompressed, so only encryption can hide the marker (lz4 may split it).
    let uncompressed = |config: ConfigFile| config.set("compression", &toml_str("none"));
    let wv = walvault(
        &env,
        "full.toml",
        &uncompressed(with_keys(repo.config(), &[&a], &[&a])),
    );
    let cluster = source(&env, &wv);
    let marker = marker();
    cluster.psql(&format!("INSERT INTO t (note) VALUES ('{marker}')"));
    backup_push(&env, &wv, &cluster).assert_success();
    // Backup stop times are whole seconds, and the planner trusts times a second past one.
    std::thread::sleep(Duration::from_millis(1100));
    for i in 0..20 {
        cluster.psql(&format!("INSERT INTO t (note) VALUES ('row {i}')"));
    }
    let segment = archive_everything(&cluster);

    let objects = repo.objects();
    assert!(objects.iter().any(|k| k.contains("/packs/")), "{objects:?}");
    for key in &objects {
        let stored = repo.read(key);
        assert!(
            !contains(&stored, marker.as_bytes()),
            "{key} holds the marker"
        );
        let keys = envelope_keys(&stored);
        if key == "repository" {
            assert_eq!(keys, None);
            assert!(
                contains(&stored, b"age-x25519") && contains(&stored, a.fingerprint.as_bytes())
            );
        } else {
            assert_eq!(keys, Some(vec![a.fingerprint.clone()]), "{key}");
        }
    }
    // The same check finds the marker in a plain repository of the same cluster.
    let (plain_config, plain_objects) = plain_repository(&env, kind);
    let plain = walvault(&env, "plain.toml", &uncompressed(plain_config));
    backup_push(&env, &plain, &cluster).assert_success();
    assert!(
        plain_objects()
            .iter()
            .any(|o| contains(o, marker.as_bytes())),
        "a plain backup holds the marker"
    );

    // PITR to a random time between two commits, exact.
    let times = cluster.psql(
        "SELECT to_char(min(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || ',' || \
         to_char(max(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') FROM \
         (SELECT pg_xact_commit_timestamp(xmin) ts FROM t WHERE note LIKE 'row %') s",
    );
    let (first, last) = times.split_once(',').unwrap();
    let target = cluster.psql(&format!(
        "SELECT to_char(('{first}+00'::timestamptz + random() * ('{last}+00'::timestamptz - \
         '{first}+00'::timestamptz)) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
    ));
    let dir = env.path().join("pitr");
    let out = recover_start(&env, &wv, &dir, &["--target-time", &format!("{target}Z")]);
    out.assert_success();
    let mut recovered = env.cluster_from_copy(ClusterConfig::new("pitr"), &dir);
    recovered.stop();
    recovered.start();
    let expected = ids(
        &cluster,
        &format!("WHERE pg_xact_commit_timestamp(xmin) <= '{target}+00'"),
    );
    assert_eq!(
        ids(&recovered, ""),
        expected,
        "recovered to {target}\n{out}"
    );
    recovered.stop();

    // Without the identity, and with a wrong one: nothing is written, wal-fetch exits 128.
    let readers = [
        ("no identity", with_keys(repo.config(), &[&a], &[])),
        ("wrong identity", with_keys(repo.config(), &[&a], &[&b])),
    ];
    for (i, (what, config)) in readers.iter().enumerate() {
        let wv = walvault(&env, &format!("reader{i}.toml"), config);
        let dest = env.path().join(format!("fetched{i}"));
        let out = wv.wal_fetch(&segment, &dest);
        out.assert_code(128)
            .assert_stderr_contains(&format!("wal/{segment}"))
            .assert_stderr_contains(&a.fingerprint);
        assert!(!dest.exists(), "{what}");
        let target = env.path().join(format!("restore{i}"));
        let out = wv.run(&["backup-fetch", "LATEST", target.to_str().unwrap()]);
        out.assert_failure().assert_stderr_contains(&a.fingerprint);
        assert!(
            !target.exists(),
            "{what}: backup-fetch wrote {}",
            target.display()
        );
        let out = wv.run(&[
            "recover",
            "--pgdata",
            target.to_str().unwrap(),
            "--target-immediate",
        ]);
        out.assert_failure().assert_stderr_contains(&a.fingerprint);
        assert!(
            !target.exists(),
            "{what}: recover wrote {}",
            target.display()
        );
    }

    // A flipped byte in the age payload of an archived segment.
    let key = format!("wal/{segment}");
    let len = repo.read(&key).len();
    repo.corrupt(&key, len / 2);
    let dest = env.path().join("flipped");
    wv.wal_fetch(&segment, &dest)
        .assert_code(128)
        .assert_stderr_contains(&key);
    assert!(!dest.exists());
}

/// A writer without recipients against an encrypted repository (wal-push, backup-push) is
/// refused, and the repository is left as it was. A writer with recipients and no identity
/// archives, re-pushes an archived segment (identical: success) and takes a (full) backup.
fn writers_without_recipients_change_nothing(kind: RepoKind) {
    let env = TestEnv::new("encryption-refused");
    let repo = env.repo(kind);
    let a = key(&env, "a");
    let wv = walvault(&env, "full.toml", &with_keys(repo.config(), &[&a], &[&a]));
    let cluster = source(&env, &wv);
    backup_push(&env, &wv, &cluster).assert_success();
    archive_everything(&cluster);
    // Hold archiving back, so the next segment is not in the repository.
    cluster.psql("ALTER SYSTEM SET archive_command = '/bin/false'");
    cluster.psql("SELECT pg_reload_conf()");
    cluster.psql("INSERT INTO t (note) VALUES ('unarchived')");
    let copy = cluster.switch_wal_and_copy(&env.mkdir("copies"));

    let before = repo.snapshot();
    let plain = walvault(&env, "plain.toml", &repo.config());
    plain
        .wal_push(&copy)
        .assert_failure()
        .assert_stderr_contains("is encrypted")
        .assert_stderr_contains(&a.fingerprint);
    backup_push(&env, &plain, &cluster)
        .assert_failure()
        .assert_stderr_contains("nothing was written");
    repo.snapshot()
        .assert_unchanged(&before, "writes without recipients");

    // Public-key writes: recipients only.
    let writer = walvault(&env, "writer.toml", &with_keys(repo.config(), &[&a], &[]));
    writer.wal_push(&copy).assert_success();
    let name = copy.file_name().unwrap().to_str().unwrap();
    let stored = repo.read(&format!("wal/{name}"));
    writer.wal_push(&copy).assert_success();
    assert_eq!(repo.read(&format!("wal/{name}")), stored);
    cluster.psql("ALTER SYSTEM RESET archive_command");
    cluster.psql("SELECT pg_reload_conf()");
    backup_push(&env, &writer, &cluster).assert_success();
    let listed = wv.run(&["backup-list", "--json"]);
    listed.assert_success();
    assert_eq!(listed.stdout.matches("\"name\"").count(), 2, "{listed}");
    assert!(!listed.stdout.contains("\"delta\""), "{listed}");
    // What the writer cannot do: read.
    writer
        .wal_fetch(name, &env.path().join("fetched"))
        .assert_code(128)
        .assert_stderr_contains(&a.fingerprint);
}

/// Rotation: objects under the old key and the new one; both read with both identities, the old
/// ones fail for a reader that kept only the new identity; verify counts objects per key.
fn rotation_keeps_old_objects_readable_and_verify_counts_them(kind: RepoKind) {
    let env = TestEnv::new("encryption-rotation");
    let repo = env.repo(kind);
    let (old, new) = (key(&env, "old"), key(&env, "new"));
    let wv = walvault(
        &env,
        "rot.toml",
        &with_keys(repo.config(), &[&old], &[&old]),
    );
    let cluster = source(&env, &wv);
    backup_push(&env, &wv, &cluster).assert_success();
    cluster.psql("INSERT INTO t (note) VALUES ('before')");
    let old_segment = archive_everything(&cluster);

    // Rotate: the same config file now encrypts to the new key and keeps the old identity.
    env.write_config(
        "rot.toml",
        &with_keys(repo.config(), &[&new], &[&new, &old]),
    );
    cluster.psql("INSERT INTO t (note) VALUES ('after')");
    let new_segment = archive_everything(&cluster);
    backup_push(&env, &wv, &cluster).assert_success();

    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for key in repo.objects() {
        for fp in envelope_keys(&repo.read(&key)).unwrap_or_default() {
            *expected.entry(fp).or_default() += 1;
        }
    }
    assert!(
        expected.get(&old.fingerprint).is_some_and(|n| *n > 0),
        "{expected:?}"
    );
    assert!(
        expected.get(&new.fingerprint).is_some_and(|n| *n > 0),
        "{expected:?}"
    );
    let out = wv.run(&["verify"]);
    out.assert_success();
    for (fp, n) in &expected {
        assert!(
            out.stdout.contains(&format!("key {fp}: {n} objects")),
            "{fp}: {n}\n{out}"
        );
    }
    for segment in [&old_segment, &new_segment] {
        let dest = env.path().join(format!("both-{segment}"));
        wv.wal_fetch(segment, &dest).assert_success();
    }

    let only_new = walvault(&env, "new.toml", &with_keys(repo.config(), &[], &[&new]));
    let dest = env.path().join("new-only");
    only_new.wal_fetch(&new_segment, &dest).assert_success();
    let dest = env.path().join("old-with-new");
    only_new
        .wal_fetch(&old_segment, &dest)
        .assert_code(128)
        .assert_stderr_contains(&old.fingerprint);
    let out = only_new.run(&["verify"]);
    out.assert_failure();
    assert!(out.stdout.contains(&old.fingerprint), "{out}");

    // reencrypt moves everything to the new key; then the old identity can go.
    let before = repo.snapshot();
    let dry = wv.run(&["reencrypt", "--dry-run"]);
    dry.assert_success();
    let n = expected[&old.fingerprint];
    assert!(
        dry.stdout.contains(&format!(
            "would rewrite {n} objects from key {}",
            old.fingerprint
        )),
        "{dry}"
    );
    repo.snapshot()
        .assert_unchanged(&before, "reencrypt --dry-run");
    let out = wv.run(&["reencrypt"]);
    out.assert_success();
    assert!(
        out.stdout.contains(&format!("rewrote {n} objects")),
        "{out}"
    );
    let total: usize = expected.values().sum();
    let out = only_new.run(&["verify"]);
    out.assert_success();
    assert!(
        out.stdout
            .contains(&format!("key {}: {total} objects", new.fingerprint))
            && !out.stdout.contains(&old.fingerprint),
        "{out}"
    );
    let dest = env.path().join("old-after-reencrypt");
    only_new.wal_fetch(&old_segment, &dest).assert_success();
}

/// The documented migration of a plain repository to an encrypted one: the cluster archives into
/// both for the transition (`wal-push` twice in its archive_command), a full backup goes into the
/// new one, and each repository alone then recovers the cluster exactly; the new one holds only
/// encrypted objects.
#[test]
fn migration_archives_into_both_repositories() {
    let env = TestEnv::new("encryption-migration");
    let (old_config, _) = plain_repository(&env, RepoKind::Local);
    let old = walvault(&env, "old.toml", &old_config);
    let cluster = source(&env, &old);
    cluster.psql("INSERT INTO t (note) SELECT 'before ' || g FROM generate_series(1, 100) g");
    backup_push(&env, &old, &cluster).assert_success();

    let repo = env.repo(RepoKind::Local);
    let a = key(&env, "a");
    let new = walvault(&env, "new.toml", &with_keys(repo.config(), &[&a], &[&a]));
    let both = format!("{} && {}", old.archive_command(), new.archive_command());
    cluster.psql(&format!("ALTER SYSTEM SET archive_command = '{both}'"));
    cluster.psql("SELECT pg_reload_conf()");
    archive_everything(&cluster);
    backup_push(&env, &new, &cluster).assert_success();
    // Several 1 MiB segments, so they queue up and each repository's pusher stores ahead.
    cluster.psql("INSERT INTO t (note) SELECT repeat('x', 1000) FROM generate_series(1, 4000)");
    archive_everything(&cluster);
    let expected =
        cluster.psql("SELECT count(*) || ' ' || md5(string_agg(note, ',' ORDER BY id)) FROM t");

    for (name, wv) in [("from-new", &new), ("from-old", &old)] {
        let dir = env.path().join(name);
        // No target: all the WAL the repository holds is replayed.
        recover_start(&env, wv, &dir, &[]).assert_success();
        let mut recovered = env.cluster_from_copy(ClusterConfig::new(name), &dir);
        recovered.stop();
        recovered.start();
        assert_eq!(
            recovered
                .psql("SELECT count(*) || ' ' || md5(string_agg(note, ',' ORDER BY id)) FROM t"),
            expected,
            "recovered {name}"
        );
    }
    for key in repo.objects() {
        if key != "repository" {
            let keys = envelope_keys(&repo.read(&key));
            assert_eq!(keys, Some(vec![a.fingerprint.clone()]), "{key}");
        }
    }
    new.run(&["verify"]).assert_success();
}

/// `s3.sse` and the storage classes reach every single PUT and multipart upload (moto records
/// them; HeadObject shows them), and the objects read back.
#[test]
fn s3_server_side_options_reach_every_upload() {
    let env = TestEnv::new("encryption-s3-options");
    let repo = env.repo(RepoKind::S3);
    let a = key(&env, "a");
    let config = with_keys(repo.config(), &[&a], &[&a])
        .set_s3("sse", &toml_str("AES256"))
        .set_s3("storage_class_wal", &toml_str("STANDARD_IA"))
        .set_s3("storage_class_backup", &toml_str("ONEZONE_IA"))
        .set_s3("part_size", "5242880");
    let wv = walvault(&env, "s3.toml", &config);
    let cluster = source(&env, &wv);
    // Incompressible, so its pack is stored in parts.
    let noise = cluster.datadir().join("noise.bin");
    fs::write(&noise, pseudo_random_bytes(7 << 20, 7)).unwrap();
    crate::harness::give_to_postgres(&noise);
    backup_push(&env, &wv, &cluster).assert_success();
    archive_everything(&cluster);

    let objects = repo.objects();
    let large = objects
        .iter()
        .filter(|k| k.contains("/packs/"))
        .any(|k| repo.read(k).len() > 5 << 20);
    assert!(
        large,
        "no pack went through a multipart upload: {objects:?}"
    );
    for key in &objects {
        let (class, sse) = repo.s3_head(key).unwrap();
        let wal = ["wal/", "walsummary/", "stream/"]
            .iter()
            .any(|p| key.starts_with(p));
        let expected = if wal { "STANDARD_IA" } else { "ONEZONE_IA" };
        assert_eq!(class.as_deref(), Some(expected), "{key}");
        assert_eq!(sse.as_deref(), Some("AES256"), "{key}");
    }
    let target = env.path().join("restored");
    wv.run(&["backup-fetch", "LATEST", target.to_str().unwrap()])
        .assert_success();
    assert_eq!(
        fs::read(target.join("noise.bin")).unwrap(),
        fs::read(&noise).unwrap()
    );
}
