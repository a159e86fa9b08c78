#!/usr/bin/env python3
"""Deltas from the WAL's block maps, side by side in one run on one pgbench cluster:

- full backup vs a delta after ~3% of pgbench_accounts' pages changed, read from the block maps
  (`delta_source` wal) and by the page scan (one summary removed from the range forces it), and a
  delta with no change at all;
- the floors under those deltas, each measured alone: PostgreSQL's part of any backup (psql doing
  only pg_backup_start and pg_backup_stop, then the archiver delivering the stop segment) and
  reading cold just the pages the update changed (found beforehand with pageinspect);
- wal-push throughput of the same segments with block maps (this build) and without (an older
  build given with --without, e.g. the main branch's release binary);
- `backup-fetch --delta` over a restore that differs by ~3% vs a fresh `backup-fetch`;
- with --pg17 (the bin directory of a PostgreSQL 17 server, e.g. the npm build integration/run.sh
  unpacks into .test-tools/pg/17/native/bin): on a PostgreSQL 17 cluster with `summarize_wal`, a
  walvault delta from block maps vs PostgreSQL's own `pg_basebackup --incremental` (wall, CPU,
  bytes written), both after the same ~3% change and with no change. The npm build has no
  client tools, so pg_basebackup 17 comes from Debian 13's packages, downloaded once into the
  work directory's cache and run with their own loader and libraries.

Standalone (standard library plus common.py); run as root:

    bench/blockmap.py --walvault target/release/walvault --without /work/main/target/release/walvault \
        --scale 100 --out /tmp/blockmap.md
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (PGBIN, drop_caches, log, med, mkdir_pg, must, run, timed, wait_for)  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--walvault", required=True)
    ap.add_argument("--without", help="a walvault build without block maps, for wal-push")
    ap.add_argument("--scale", type=int, default=100)
    ap.add_argument("--segments", type=int, default=40, help="segments pushed per wal-push run")
    ap.add_argument("--work", default="/var/tmp/walvault-blockmap-bench")
    ap.add_argument("--pg17", help="bin directory of a PostgreSQL 17 server: compare with pg_basebackup --incremental")
    ap.add_argument("--only-pg17", action="store_true", help="run only the PostgreSQL 17 comparison")
    ap.add_argument("--out")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    work = mkdir_pg(a.work, 0o755)
    wv = os.path.join(work, "walvault")
    shutil.copy(a.walvault, wv)
    os.chmod(wv, 0o755)
    results = {"scale": a.scale}
    if a.pg17:
        results["pg17"] = pg17(a, work, wv)
    if a.only_pg17:
        return finish(a, work, results)
    c = Cluster(work, wv)
    try:
        c.start()
        c.psql("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        log(f"pgbench -i -s {a.scale}")
        must(timed([f"{PGBIN}/pgbench", "-i", "-q", "-s", str(a.scale), "postgres"], env=c.env()), "pgbench -i")
        c.psql("VACUUM (FREEZE, ANALYZE)")
        c.psql("CHECKPOINT")
        results["db_bytes"] = int(c.psql("SELECT pg_database_size('postgres')"))
        results["backups"] = backups(c)
        results["restore"] = restore_delta(c)
        results["wal_push"] = wal_push(c, a)
    finally:
        c.stop()
    finish(a, work, results)


def finish(a, work, results):
    report = render(results)
    print(report)
    if a.out:
        open(a.out, "w").write(report)
    json.dump(results, open(os.path.join(work, "results.json"), "w"), indent=1)


class Cluster:
    def __init__(self, work, wv, bindir=PGBIN, name="data", settings=""):
        self.work, self.wv, self.bindir, self.settings = work, wv, bindir, settings
        self.data = os.path.join(work, name)
        self.repo = mkdir_pg(os.path.join(work, f"repo-{name}"))
        self.port = 55000 + os.getpid() % 1000
        self.sock = work

    def env(self):
        e = dict(os.environ, PGHOST=self.sock, PGPORT=str(self.port), PGUSER="postgres",
                 PGDATABASE="postgres", PGDATA=self.data)
        return e

    def start(self):
        run([f"{self.bindir}/initdb", "-D", self.data, "-k"], env=self.env())
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as f:
            f.write(f"port = {self.port}\nunix_socket_directories = '{self.sock}'\nlisten_addresses = ''\n"
                    f"archive_mode = on\narchive_command = '{self.wv} -q --repo file://{self.repo} wal-push %p'\n"
                    f"max_wal_size = 4GB\nshared_buffers = 256MB\n{self.settings}")
        run([f"{self.bindir}/pg_ctl", "-D", self.data, "-l", os.path.join(self.work, f"{os.path.basename(self.data)}.log"),
             "-w", "start"], env=self.env())

    def stop(self):
        run([f"{self.bindir}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"], env=self.env(), check=False)

    def psql(self, sql):
        return run([f"{PGBIN}/psql", "-X", "-A", "-t", "-q", "-c", sql], env=self.env()).stdout.strip()

    def walvault(self, *args, env=None):
        return timed([self.wv, "-q", "--repo", f"file://{self.repo}", *args], env=env or self.env(),
                     cwd=self.work)

    def listed(self):
        return json.loads(run([self.wv, "--repo", f"file://{self.repo}", "backup-list", "--json"],
                              env=self.env()).stdout)


def touch(c, pct=3.0):
    """UPDATEs one row on about pct% of pgbench_accounts' heap pages."""
    relpages = int(c.psql("SELECT pg_relation_size('pgbench_accounts') / 8192"))
    per_page = int(c.psql("SELECT count(*) FROM pgbench_accounts")) / relpages
    n = max(2, int(round(per_page / (pct / 100))))
    k = int(time.time()) % n
    c.psql(f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % {n} = {k}")
    c.psql("CHECKPOINT")


def push(c, kind, verify=False):
    drop_caches()
    args = ["backup-push", "--full" if kind == "full" else "--delta"]
    env = dict(c.env(), WALVAULT_VERIFY_MAP="1") if verify else None
    r = must(c.walvault(*args, env=env), f"backup-push {kind}")
    b = c.listed()[-1]
    return {"wall": r.wall, "cpu": r.cpu, "stored": b["stored_size"], "source": b.get("delta_source"),
            "name": b["name"], "read": r.read_bytes}


def segment_of(lsn):
    """The name of the timeline-1 segment holding lsn (the bench's clusters never change timeline)."""
    hi, lo = lsn.split("/")
    segno = ((int(hi, 16) << 32) | int(lo, 16)) >> 24
    return f"{1:08X}{segno >> 8:08X}{segno & 0xFF:08X}"


def backups(c):
    out = {"full": [], "wal": [], "scan": [], "nochange": [], "floor_pg": [], "floor_read": []}
    for i in range(2):
        log(f"full {i + 1}")
        out["full"].append(push(c, "full"))
        touch(c)
        log("reading alone the pages the 3% update changed")
        out["floor_read"].append(read_floor(changed_pages(c, c.listed()[-1]["start_lsn"])))
        log("delta from block maps after 3%")
        out["wal"].append(push(c, "delta"))
        log("delta with no change")
        c.psql("CHECKPOINT")
        out["nochange"].append(push(c, "delta"))
        log("PostgreSQL's part of a backup alone")
        out["floor_pg"].append(pg_floor(c))
        touch(c)
        # Losing one summary in the range makes the next delta scan every page.
        name = segment_of(c.listed()[-1]["start_lsn"])
        os.remove(os.path.join(c.repo, "walsummary", name))
        log("delta by page scan after 3%")
        out["scan"].append(push(c, "delta"))
    return out


def pg_floor(c):
    """What no backup can skip, done by psql alone from a cold page cache: connecting,
    pg_backup_start with a fast checkpoint, pg_backup_stop without waiting for the archive, then
    the archiver delivering the stop segment (its .done file), which a backup must wait for."""
    drop_caches()
    start = time.monotonic()
    r = must(timed([f"{PGBIN}/psql", "-X", "-A", "-t", "-q", "-c", "SELECT pg_backup_start('bench floor', true)",
                    "-c", "SELECT lsn FROM pg_backup_stop(false)"], env=c.env()), "psql backup start and stop")
    done = os.path.join(c.data, "pg_wal", "archive_status", segment_of(r.out.split()[-1]) + ".done")
    wait_for(lambda: os.path.exists(done), 60, done, interval=0.001)
    return {"wall": time.monotonic() - start, "cpu": r.cpu}


def changed_pages(c, since):
    """The blocks of pgbench_accounts and its primary key whose page LSN is past `since`, as
    (file, offset) pairs. pageinspect reads the pages raw, so looking sets no hint bit."""
    c.psql("CREATE EXTENSION IF NOT EXISTS pageinspect")
    pages = []
    for rel in ("pgbench_accounts", "pgbench_accounts_pkey"):
        path = os.path.join(c.data, c.psql(f"SELECT pg_relation_filepath('{rel}')"))
        listed = c.psql(f"SELECT string_agg(b::text, ',') "
                        f"FROM generate_series(0, pg_relation_size('{rel}') / 8192 - 1) b "
                        f"WHERE (page_header(get_raw_page('{rel}', b))).lsn > '{since}'::pg_lsn")
        for b in (int(x) for x in listed.split(",") if x):
            seg, blk = divmod(b, 131072)  # 1 GiB relation segments of 8 KiB blocks
            pages.append((path + (f".{seg}" if seg else ""), blk * 8192))
    return sorted(pages)


def read_floor(pages, threads=4):
    """Reads the given blocks from a cold page cache and nothing else, the fastest way tried on
    the bench machine: WILLNEED advice for every block, then `threads` readers. Files are opened
    before the clock starts. Returns wall, the CPU this process spent, and the block count."""
    drop_caches()
    fds = {path: os.open(path, os.O_RDONLY) for path in {p for p, _ in pages}}
    located = [(fds[p], off) for p, off in pages]

    def read(part):
        for fd, off in part:
            os.pread(fd, 8192, off)

    before, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    for fd, off in located:
        os.posix_fadvise(fd, off, 8192, os.POSIX_FADV_WILLNEED)
    readers = [threading.Thread(target=read, args=(located[i::threads],)) for i in range(threads)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    wall, after = time.monotonic() - start, resource.getrusage(resource.RUSAGE_SELF)
    for fd in fds.values():
        os.close(fd)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "pages": len(pages)}


def restore_delta(c):
    """Fresh backup-fetch of the newest backup vs --delta over a restore of the one before it."""
    names = [b["name"] for b in c.listed()]
    base = os.path.join(c.work, "restore")
    out = {"fresh": [], "delta": []}
    for i in range(2):
        for d in ("stale", "fresh"):
            shutil.rmtree(os.path.join(base, d), ignore_errors=True)
        mkdir_pg(base, 0o755)
        must(c.walvault("backup-fetch", names[-3], os.path.join(base, "stale")), "fetch stale")
        drop_caches()
        r = must(c.walvault("backup-fetch", names[-1], os.path.join(base, "fresh")), "fetch fresh")
        out["fresh"].append({"wall": r.wall, "cpu": r.cpu})
        drop_caches()
        r = must(c.walvault("backup-fetch", "--delta", names[-1], os.path.join(base, "stale")), "fetch --delta")
        out["delta"].append({"wall": r.wall, "cpu": r.cpu})
    shutil.rmtree(base, ignore_errors=True)
    return out


def wal_push(c, a):
    """The same archived segments pushed again into fresh repositories by each build."""
    src = os.path.join(c.work, "segments")
    mkdir_pg(src)
    # The archived segments (pg_wal recycles them), fetched back from the repository.
    segs = sorted(s for s in os.listdir(os.path.join(c.repo, "wal")) if len(s) == 24)[-a.segments:]
    for s in segs:
        must(timed([c.wv, "-q", "--repo", f"file://{c.repo}", "wal-fetch", s, os.path.join(src, s)],
                   env=dict(c.env(), WALVAULT_PREFETCH="0"), cwd=c.work), "wal-fetch")
    builds = {"with block maps": c.wv}
    if a.without:
        old = os.path.join(c.work, "walvault-without")
        shutil.copy(a.without, old)
        os.chmod(old, 0o755)
        builds["without"] = old
    out = {}
    for label, binary in builds.items():
        runs = []
        for i in range(2):
            repo = tempfile.mkdtemp(dir=c.work)
            os.chown(repo, *pg_ids())
            drop_caches()
            t0 = time.monotonic()
            cpu = 0.0
            for s in segs:
                r = must(timed([binary, "-q", "--repo", f"file://{repo}", "wal-push", os.path.join(src, s)],
                               env=c.env(), cwd=c.work), "wal-push")
                cpu += r.cpu
            wall = time.monotonic() - t0
            runs.append({"wall": wall, "cpu": cpu, "mib_s": len(segs) * 16 / wall})
            shutil.rmtree(repo)
        out[label] = runs
    out["segments"] = len(segs)
    return out


# Debian 13's packages that pg_basebackup 17 and its loader need (bookworm's glibc is too old
# for its binaries, so they run with trixie's own loader and libraries).
TRIXIE_DEBS = ["postgresql-client-17", "libpq5", "libc6", "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3",
               "libkrb5support0", "libcom-err2", "libkeyutils1", "libldap2", "libsasl2-2", "libgnutls30t64",
               "libssl3t64", "libzstd1", "liblz4-1", "zlib1g", "libreadline8t64", "libtinfo6", "libidn2-0",
               "libunistring5", "libtasn1-6", "libnettle8t64", "libhogweed6t64", "libgmp10", "libp11-kit0",
               "libffi8"]


def pg_basebackup17(cache):
    """The command prefix that runs Debian 13's pg_basebackup 17, downloaded once into `cache`
    (apt with its own lists and cache there: the system's apt state is untouched)."""
    root = os.path.join(cache, "root")
    lib = os.path.join(root, "usr", "lib", "x86_64-linux-gnu")
    binary = os.path.join(root, "usr", "lib", "postgresql", "17", "bin", "pg_basebackup")
    if not os.path.exists(binary):
        log("downloading pg_basebackup 17 from Debian 13 (trixie)")
        for d in ("lists/partial", "cache/archives/partial", "debs"):
            os.makedirs(os.path.join(cache, d), exist_ok=True)
        sources = os.path.join(cache, "trixie.list")
        with open(sources, "w") as f:
            f.write("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                    "http://deb.debian.org/debian trixie main\n")
        status = os.path.join(cache, "status")
        open(status, "a").close()
        opts = ["-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=-",
                "-o", f"Dir::State::Lists={cache}/lists", "-o", f"Dir::Cache={cache}/cache",
                "-o", f"Dir::State::status={status}"]
        run(["apt-get", *opts, "update"], user=None)
        debs = os.path.join(cache, "debs")
        run(["apt-get", *opts, "download", *TRIXIE_DEBS], user=None, cwd=debs)
        for deb in sorted(os.listdir(debs)):
            run(["dpkg-deb", "-x", os.path.join(debs, deb), root], user=None)
    return [os.path.join(lib, "ld-linux-x86-64.so.2"), "--library-path", lib, binary]


def pg17(a, work, wv):
    """walvault's delta from block maps against pg_basebackup --incremental on PostgreSQL 17, on
    the same cluster after the same change; each tool's full backup is its delta's parent."""
    basebackup = pg_basebackup17(os.path.join(os.path.dirname(os.path.abspath(a.work)), "walvault-bench-pg17"))
    c = Cluster(work, wv, bindir=a.pg17, name="pg17", settings="summarize_wal = on\n")
    out = {"walvault": {"full": [], "delta": [], "nochange": []},
           "pg_basebackup": {"full": [], "delta": [], "nochange": []}}
    dirs = mkdir_pg(os.path.join(work, "pg17-backups"), 0o755)

    def basebackup_run(kind, dest, parent=None):
        shutil.rmtree(dest, ignore_errors=True)
        args = [*basebackup, "-D", dest, "-c", "fast", "-X", "none"]
        if parent:
            args.append(f"--incremental={parent}/backup_manifest")
        drop_caches()
        r = must(timed(args, env=c.env(), cwd=work), f"pg_basebackup {kind}")
        written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dest) for f in fs)
        return {"wall": r.wall, "cpu": r.cpu, "stored": written}

    try:
        c.start()
        log(f"PostgreSQL 17: pgbench -i -s {a.scale}")
        must(timed([f"{PGBIN}/pgbench", "-i", "-q", "-s", str(a.scale), "postgres"], env=c.env()), "pgbench -i")
        c.psql("VACUUM (FREEZE, ANALYZE)")
        c.psql("CHECKPOINT")
        out["db_bytes"] = int(c.psql("SELECT pg_database_size('postgres')"))
        for i in range(2):
            log(f"PostgreSQL 17: full backups {i + 1}")
            out["walvault"]["full"].append(push(c, "full"))
            full = os.path.join(dirs, "full")
            out["pg_basebackup"]["full"].append(basebackup_run("full", full))
            touch(c)
            log("PostgreSQL 17: deltas after 3%")
            out["walvault"]["delta"].append(push(c, "delta"))
            incr = os.path.join(dirs, "incr")
            out["pg_basebackup"]["delta"].append(basebackup_run("--incremental", incr, parent=full))
            c.psql("CHECKPOINT")
            log("PostgreSQL 17: deltas with no change")
            out["walvault"]["nochange"].append(push(c, "delta"))
            again = os.path.join(dirs, "incr-again")
            out["pg_basebackup"]["nochange"].append(basebackup_run("--incremental", again, parent=incr))
    finally:
        c.stop()
        shutil.rmtree(dirs, ignore_errors=True)
    return out


def pg_ids():
    import pwd
    p = pwd.getpwnam("postgres")
    return p.pw_uid, p.pw_gid


def render(r):
    lines = render_pg17(r["pg17"]) if "pg17" in r else []
    if "backups" not in r:
        return "\n".join(lines) + "\n"
    b = r["backups"]
    m = lambda xs, k: med([x[k] for x in xs])  # noqa: E731
    full_wall, full_cpu = m(b["full"], "wall"), m(b["full"], "cpu")
    lines += [
        f"## Deltas from block maps: pgbench scale {r['scale']} ({r['db_bytes'] / 2**20:.0f} MiB), "
        "2 runs each, page cache dropped before each",
        "",
        "| measurement | wall s | CPU s | read from disk MiB | stored MiB | wall / full | CPU / full | delta_source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, label in [("full", "full"), ("wal", "delta after 3%, block maps"),
                       ("scan", "delta after 3%, page scan (a summary removed)"),
                       ("nochange", "delta with no change, block maps")]:
        xs = b[key]
        # Runs recorded before the read column have none.
        read = f"{m(xs, 'read') / 2**20:.1f}" if all("read" in x for x in xs) else "-"
        lines.append(f"| {label} | {m(xs, 'wall'):.2f} | {m(xs, 'cpu'):.2f} | {read} | "
                     f"{m(xs, 'stored') / 2**20:.1f} | {m(xs, 'wall') / full_wall:.2f}× | "
                     f"{m(xs, 'cpu') / full_cpu:.2f}× | {', '.join(sorted(set(str(x['source']) for x in xs)))} |")
    if b.get("floor_pg"):
        lines += floors(b, r["db_bytes"], full_wall, full_cpu)
    rs = r["restore"]
    lines += ["", "| restore | wall s | CPU s |", "|---|---|---|",
              f"| backup-fetch (fresh) | {m(rs['fresh'], 'wall'):.2f} | {m(rs['fresh'], 'cpu'):.2f} |",
              f"| backup-fetch --delta over a copy ~3% older | {m(rs['delta'], 'wall'):.2f} | "
              f"{m(rs['delta'], 'cpu'):.2f} |",
              f"| ratio | {m(rs['delta'], 'wall') / m(rs['fresh'], 'wall'):.2f}× | |"]
    wp = r["wal_push"]
    lines += ["", f"| wal-push, {wp['segments']} segments, serial | wall s | CPU s | MiB/s |", "|---|---|---|---|"]
    for label, runs in wp.items():
        if label == "segments":
            continue
        lines.append(f"| {label} | {m(runs, 'wall'):.2f} | {m(runs, 'cpu'):.2f} | {m(runs, 'mib_s'):.0f} |")
    return "\n".join(lines) + "\n"


def floors(b, db_bytes, full_wall, full_cpu):
    """What no delta can skip, set against the full backup of the same run and issue 17's targets."""
    m = lambda xs, k: med([x[k] for x in xs])  # noqa: E731
    pg, rd = b["floor_pg"], b["floor_read"]
    pages = m(rd, "pages")
    both_wall, both_cpu = m(pg, "wall") + m(rd, "wall"), m(pg, "cpu") + m(rd, "cpu")
    return [
        "", "What no delta can skip, measured alone in the same run (page cache dropped before each):", "",
        "| floor | wall s | CPU s | wall / full | CPU / full |", "|---|---|---|---|---|",
        f"| PostgreSQL's part of any backup, by `psql` alone: connect, `pg_backup_start` (fast), `pg_backup_stop`, "
        f"the archiver delivering the stop segment | {m(pg, 'wall'):.3f} | {m(pg, 'cpu'):.3f} | "
        f"{m(pg, 'wall') / full_wall:.3f}× | {m(pg, 'cpu') / full_cpu:.3f}× |",
        f"| reading alone the {pages:.0f} pages of pgbench_accounts and its key changed by the 3% update "
        f"({pages * 8192 / db_bytes * 100:.1f}% of the database's pages), advised, 4 readers | {m(rd, 'wall'):.3f} | "
        f"{m(rd, 'cpu'):.3f} | {m(rd, 'wall') / full_wall:.3f}× | {m(rd, 'cpu') / full_cpu:.3f}× |",
        f"| the two together: no delta after the 3% update can take less | {both_wall:.3f} | {both_cpu:.3f} | "
        f"{both_wall / full_wall:.3f}× | {both_cpu / full_cpu:.3f}× |",
        "",
        f"Issue 17's targets against these floors: no-change delta ≤ 0.05× the full's wall, floor "
        f"{m(pg, 'wall') / full_wall:.3f}×; delta after 3% ≤ 0.15× its wall, floor {both_wall / full_wall:.3f}×, and "
        f"≤ 0.1× its CPU, floor {both_cpu / full_cpu:.3f}× (the floors leave out loading walvault, the catalog, "
        "the walk of the data directory and compression).",
    ]


def render_pg17(p):
    m = lambda xs, k: med([x[k] for x in xs])  # noqa: E731
    lines = [f"## PostgreSQL 17: walvault's delta from block maps vs `pg_basebackup --incremental` "
             f"({p['db_bytes'] / 2**20:.0f} MiB, `summarize_wal = on`), 2 runs each, page cache dropped before each",
             "",
             "| measurement | walvault wall s | CPU s | stored MiB | pg_basebackup wall s | CPU s | written MiB | "
             "wall walvault / pg_basebackup |",
             "|---|---|---|---|---|---|---|---|"]
    for key, label in [("full", "full"), ("delta", "delta after 3%"), ("nochange", "delta with no change")]:
        w, g = p["walvault"][key], p["pg_basebackup"][key]
        lines.append(f"| {label} | {m(w, 'wall'):.2f} | {m(w, 'cpu'):.2f} | {m(w, 'stored') / 2**20:.1f} | "
                     f"{m(g, 'wall'):.2f} | {m(g, 'cpu'):.2f} | {m(g, 'stored') / 2**20:.1f} | "
                     f"{m(w, 'wall') / m(g, 'wall'):.2f}× |")
    sources = sorted({str(x["source"]) for k in ("delta", "nochange") for x in p["walvault"][k]})
    lines += ["", f"walvault's deltas came from: {', '.join(sources)}. pg_basebackup writes a plain, "
              "uncompressed directory (incremental files hold only the changed blocks); walvault stores lz4 "
              "packs. CPU is the client's (pg_basebackup's; the walsender reading the files is the server's).", ""]
    return lines


if __name__ == "__main__":
    main()
