#!/usr/bin/env python3
"""walvault benchmark suite: walvault side by side with pgBackRest and PostgreSQL's own tools.

One command (as root, on a Debian 12 host with PostgreSQL 15):

    bench/run.py --out bench/RESULTS.md

See bench/README.md for what is measured and how. Python 3 standard library only.
"""

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

PGBIN = "/usr/lib/postgresql/15/bin"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG = 16 * 1024 * 1024
MiB = 1024 * 1024
SECTIONS = ["archive", "restore", "backup", "pitr", "rss"]
PG_USER = "postgres"
T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# processes


def pg_env(extra=None):
    pw = pwd.getpwnam(PG_USER)
    env = {
        "PATH": f"{PGBIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": pw.pw_dir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "USER": PG_USER,
        "LOGNAME": PG_USER,
    }
    if extra:
        env.update(extra)
    return env


def run(cmd, *, cwd=None, env=None, check=True, user=PG_USER, input=None, timeout=None):
    """Runs cmd (list, or str for sh -c) as `user`; returns CompletedProcess with text output."""
    if isinstance(cmd, str):
        cmd = ["sh", "-c", cmd]
    kw = {}
    if user:
        kw = {"user": user, "group": user, "extra_groups": []}
    p = subprocess.run(cmd, cwd=cwd, env=env or pg_env(), input=input, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise BenchError(f"command failed (exit {p.returncode}): {' '.join(cmd)}\n"
                         f"stdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}")
    return p


class Timed:
    """Result of one measured process: exit code, wall seconds, CPU seconds (user+sys of the
    process and every descendant it waited for), peak RSS in KiB (max over the same tree)."""

    def __init__(self, rc, wall, cpu, maxrss_kib, out, err):
        self.rc, self.wall, self.cpu, self.maxrss_kib, self.out, self.err = rc, wall, cpu, maxrss_kib, out, err


def timed(cmd, *, cwd=None, env=None, user=PG_USER, errfile=None, capture=True):
    """Runs cmd (list, or str for `sh -c`) and measures it with wait4(): wall time from fork to
    reap, CPU and peak RSS of the process tree it waited for. capture=False sends stdout to
    /dev/null and stderr to errfile (append), for tight loops."""
    if isinstance(cmd, str):
        cmd = ["sh", "-c", cmd]
    kw = {"user": user, "group": user, "extra_groups": []} if user else {}
    if capture:
        out_f = open(os.path.join(RUNTMP, "timed.out"), "w+")
        err_f = open(os.path.join(RUNTMP, "timed.err"), "w+")
    else:
        out_f = subprocess.DEVNULL
        err_f = open(errfile, "a") if errfile else subprocess.DEVNULL
    start = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=env or pg_env(), stdin=subprocess.DEVNULL,
                         stdout=out_f, stderr=err_f, **kw)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - start
    p.returncode = os.waitstatus_to_exitcode(status)
    out = err = ""
    if capture:
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
        out_f.close()
        err_f.close()
    elif err_f is not subprocess.DEVNULL:
        err_f.close()
    return Timed(p.returncode, wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss, out, err)


def must(t, what):
    if t.rc != 0:
        raise BenchError(f"{what} failed (exit {t.rc})\nstdout: {t.out[-3000:]}\nstderr: {t.err[-3000:]}")
    return t


def wait_for(cond, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        log(f"WARNING: cannot drop the page cache ({e})")
        return False


def ensure_free(path, nbytes, what):
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if free < nbytes:
        raise BenchError(f"not enough disk space for {what}: {free / MiB:.0f} MiB free under {path}, "
                         f"{nbytes / MiB:.0f} MiB needed (stopping before the disk fills up)")


def mkdir_pg(path, mode=0o700):
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)
    shutil.chown(path, PG_USER, PG_USER)
    return path


def write_pg(path, text, mode=0o600):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    shutil.chown(path, PG_USER, PG_USER)


def rmtree(path):
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def du_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def q(s):
    return "'" + s.replace("'", "'\"'\"'") + "'"


# --------------------------------------------------------------------------------------------
# PostgreSQL clusters


STARTED = []


class Cluster:
    def __init__(self, datadir, port, sockdir, logfile):
        self.datadir, self.port, self.sockdir, self.logfile = datadir, port, sockdir, logfile

    def env(self, extra=None):
        e = pg_env({"PGHOST": self.sockdir, "PGPORT": str(self.port), "PGUSER": PG_USER,
                    "PGDATABASE": "postgres", "PGDATA": self.datadir})
        if extra:
            e.update(extra)
        return e

    def initdb(self, conf):
        mkdir_pg(self.datadir)
        run([f"{PGBIN}/initdb", "-D", self.datadir, "-U", PG_USER, "-k", "-A", "trust",
             "--no-instructions"], env=self.env())
        with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
            f.write("\n# walvault bench\n" + "".join(f"{k} = {v}\n" for k, v in conf.items()))

    def start(self, options=""):
        run([f"{PGBIN}/pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "-t", "300",
             "-o", f"-p {self.port} -k {self.sockdir} -c listen_addresses='' {options}", "start"],
            env=self.env())
        STARTED.append(self)

    def running(self):
        return os.path.exists(os.path.join(self.datadir, "postmaster.pid"))

    def stop(self, mode="fast"):
        if self.running():
            run([f"{PGBIN}/pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", "300", "stop"],
                env=self.env(), check=False)
        if self in STARTED:
            STARTED.remove(self)

    def psql(self, sql, db="postgres", check=True):
        p = run([f"{PGBIN}/psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql],
                env=self.env(), check=check)
        return p.stdout.strip()

    def set(self, name, value):
        self.psql(f"ALTER SYSTEM SET {name} = {sqlstr(value)}")
        self.psql("SELECT pg_reload_conf()")
        wait_for(lambda: self.psql(f"SHOW {name}") == str(value), 30, f"{name} to be reloaded")

    def sysid(self):
        return self.psql("SELECT system_identifier FROM pg_control_system()")


def sqlstr(v):
    return "'" + str(v).replace("'", "''") + "'"


def stop_all():
    for c in list(STARTED):
        try:
            c.stop("fast")
        except Exception as e:  # noqa: BLE001
            print(f"cleanup: {e}", file=sys.stderr)


atexit.register(stop_all)


def on_signal(sig, _frame):
    stop_all()
    sys.exit(128 + sig)


# --------------------------------------------------------------------------------------------
# helpers: WAL names, stats


def seg_next(name, n=1):
    tli, log_, seg = int(name[:8], 16), int(name[8:16], 16), int(name[16:24], 16)
    x = log_ * 256 + seg + n
    return f"{tli:08X}{x // 256:08X}{x % 256:08X}"


def is_seg(name):
    return len(name) == 24 and all(c in "0123456789ABCDEF" for c in name)


def med(xs):
    return statistics.median(xs) if xs else None


def p95(xs):
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


def fmt(v, digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def mmm(xs, digits=1):
    """median (min–max)"""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return fmt(xs[0], digits)
    return f"{fmt(med(xs), digits)} ({fmt(min(xs), digits)}–{fmt(max(xs), digits)})"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}×"


# --------------------------------------------------------------------------------------------
# the bench


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.work)
        self.cache = os.path.join(self.work, "cache")
        self.runduring = os.path.join(self.work, f"run-{os.getpid()}")
        self.quick = args.quick
        self.nsegs = args.segments or (40 if self.quick else 200)
        self.scale = args.scale or (10 if self.quick else 100)
        self.small_scale = 1 if self.quick else 10
        self.repeat = args.repeat
        self.pitr_wal_mib = args.pitr_wal_mib or (96 if self.quick else 600)
        self.results = {"sections": {}, "notes": []}
        self.wv = None
        self.main = None
        self.db = None  # repositories of the backup/pitr sections
        self.cp_drop = True

    # ---------------------------------------------------------------- setup

    def setup(self):
        global RUNTMP
        os.makedirs(self.work, exist_ok=True)
        os.chmod(self.work, 0o755)
        mkdir_pg(self.cache, 0o755)
        for d in os.listdir(self.work):  # run directories of runs that are gone
            if d.startswith("run-") and d[4:].isdigit() and not os.path.exists(f"/proc/{d[4:]}"):
                rmtree(os.path.join(self.work, d))
        rmtree(self.runduring_dir())
        mkdir_pg(self.runduring_dir(), 0o755)
        RUNTMP = mkdir_pg(self.p("tmp"))
        self.sock = mkdir_pg(self.p("sock"), 0o755)
        self.logs = mkdir_pg(self.p("logs"), 0o755)
        self.segbase = self.cache
        need = 4 * self.nsegs * SEG + (12 if self.scale >= 100 else 2) * 1024 * MiB
        st = os.statvfs(self.work)
        free = st.f_bavail * st.f_frsize
        if self.args.segments_dir:
            self.segbase = mkdir_pg(self.args.segments_dir, 0o755)
        elif free < need and os.path.isdir("/dev/shm"):
            shm = os.statvfs("/dev/shm")
            if shm.f_bavail * shm.f_frsize > 2 * self.nsegs * SEG:
                self.segbase = mkdir_pg("/dev/shm/walvault-bench-cache", 0o755)
                log(f"only {free / 1024 / MiB:.1f} GiB free under {self.work}: keeping the WAL segments "
                    f"in {self.segbase} (tmpfs; rebuilt after a reboot)")
        for d in os.listdir(self.segbase):  # segment-side run directories of runs that are gone
            if d.startswith("run-") and d[4:].isdigit() and not os.path.exists(f"/proc/{d[4:]}"):
                rmtree(os.path.join(self.segbase, d))
        self.ensure_packages()
        self.wv = self.install_walvault()
        self.results["facts"] = self.machine_facts()

    def runduring_dir(self):
        return self.runduring

    def p(self, *parts):
        return os.path.join(self.runduring, *parts)

    def ensure_packages(self):
        missing = []
        if not shutil.which("pgbackrest"):
            missing.append("pgbackrest")
        if not os.path.exists(f"{PGBIN}/postgres"):
            missing += ["postgresql-15", "postgresql-contrib"]
        if not missing:
            return
        cmd = ["apt-get", "install", "-y"] + missing
        if self.args.no_install:
            raise BenchError("missing packages; run: apt-get update && " + " ".join(cmd))
        log(f"installing {' '.join(missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(cmd, env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=True)
            subprocess.run(cmd, env=env, check=True)

    def install_walvault(self):
        src = self.args.walvault
        if not src:
            log("building walvault: cargo build --release")
            subprocess.run(["cargo", "build", "--release"], cwd=REPO_ROOT, check=True)
            src = os.path.join(REPO_ROOT, "target", "release", "walvault")
        bindir = mkdir_pg(self.p("bin"), 0o755)
        dst = os.path.join(bindir, "walvault")
        shutil.copy2(src, dst)
        os.chmod(dst, 0o755)
        self.wv_src = src
        return dst

    def machine_facts(self):
        def sh(c):
            try:
                return subprocess.run(c, shell=True, text=True, capture_output=True).stdout.strip()
            except Exception:  # noqa: BLE001
                return "?"
        cpu = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        mem = "?"
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        fs = sh(f"df -T {q(self.work)} | tail -1 | awk '{{print $2\" on \"$1}}'")
        commit = sh(f"git -C {q(REPO_ROOT)} log -1 --format=%h -- src crates Cargo.toml Cargo.lock")
        dirty = sh(f"git -C {q(REPO_ROOT)} status --porcelain -- src Cargo.toml Cargo.lock crates")
        return {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": os.cpu_count(),
            "cpu": cpu,
            "memory": mem,
            "filesystem": fs,
            "kernel": platform.release(),
            "postgresql": sh(f"{PGBIN}/postgres --version"),
            "pgbackrest": sh("pgbackrest version"),
            "walvault": sh(f"{q(self.wv)} --version") + f" (source at git {commit}{', modified' if dirty else ''})",
            "loadavg": open("/proc/loadavg").read().split()[:3],
        }

    # ---------------------------------------------------------------- clusters

    def cluster_conf(self):
        return {
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": "'/bin/true'",
            "max_wal_size": "'1GB'",
            "min_wal_size": "'80MB'",
            "checkpoint_timeout": "'30min'",
            "track_commit_timestamp": "on",
            "autovacuum": "off",
            "max_wal_senders": "10",
            "log_checkpoints": "on",
        }

    def cluster(self, scale, port):
        """A cached pgbench cluster of the given scale (created on first use), started."""
        base = mkdir_pg(os.path.join(self.cache, f"s{scale}"), 0o755)
        meta_path = os.path.join(base, "meta.json")
        c = Cluster(os.path.join(base, "pgdata"), port, self.sock, os.path.join(self.logs, f"s{scale}.log"))
        meta = None
        if os.path.exists(meta_path) and os.path.exists(os.path.join(c.datadir, "PG_VERSION")):
            meta = json.load(open(meta_path))
        if meta is None:
            log(f"creating the scale-{scale} pgbench cluster (cached in {base})")
            rmtree(c.datadir)
            rmtree(os.path.join(base, "segments"))
            c.initdb(self.cluster_conf())
            c.start()
            self.pgbench_init(c, scale)
            meta = {"scale": scale, "sysid": c.sysid(), "counter": 0}
            meta["size"] = int(c.psql("SELECT pg_database_size('postgres')"))
            json.dump(meta, open(meta_path, "w"))
        else:
            c.start()
            size = int(c.psql("SELECT pg_database_size('postgres')"))
            if size > 1.3 * meta["size"]:
                log(f"scale-{scale} database grew to {size / MiB:.0f} MiB: re-initializing pgbench")
                self.pgbench_init(c, scale)
                meta["size"] = int(c.psql("SELECT pg_database_size('postgres')"))
                json.dump(meta, open(meta_path, "w"))
        c.set("archive_command", "/bin/true")
        c.meta, c.meta_path, c.base, c.scale = meta, meta_path, base, scale
        return c

    def pgbench_init(self, c, scale):
        t = time.monotonic()
        run([f"{PGBIN}/pgbench", "-i", "-q", "-s", str(scale), "postgres"], env=c.env())
        c.psql("CHECKPOINT")
        log(f"pgbench -i -s {scale}: {time.monotonic() - t:.0f} s")

    def main_cluster(self):
        if self.main is None:
            self.main = self.cluster(self.scale, 55432)
        return self.main

    # ---------------------------------------------------------------- segments

    def segments(self):
        """self.nsegs consecutive real segments from the main cluster, cached."""
        c = self.main_cluster()
        segdir = os.path.join(self.segbase, f"s{c.scale}-segments")
        idfile = os.path.join(segdir, "SYSID")
        have = []
        if os.path.isdir(segdir) and os.path.exists(idfile) and open(idfile).read().strip() == c.meta["sysid"]:
            have = sorted(f for f in os.listdir(segdir) if is_seg(f))
        run_ = self.consecutive(have)
        if len(run_) >= self.nsegs:
            return segdir, run_[: self.nsegs]
        log(f"generating {self.nsegs} WAL segments (pgbench + bulk updates, archived with cp into {segdir})")
        rmtree(segdir)
        mkdir_pg(segdir)
        write_pg(idfile, c.meta["sysid"] + "\n", 0o644)
        c.psql("SELECT pg_switch_wal()")
        c.set("archive_command", f"test ! -f {segdir}/%f && cp %p {segdir}/%f.tmp && mv {segdir}/%f.tmp {segdir}/%f")
        c.psql("SELECT pg_switch_wal()")
        start_lsn = c.psql("SELECT pg_current_wal_lsn()")
        need = (self.nsegs + 3) * SEG
        self.walgen_setup(c)
        self.walgen(c, lambda: int(c.psql(f"SELECT pg_current_wal_lsn() - '{start_lsn}'::pg_lsn")) >= need)
        c.psql("DROP TABLE bench_walgen")
        last = c.psql("SELECT pg_walfile_name(pg_switch_wal())")
        wait_for(lambda: (c.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") or "") >= last,
                 600, f"{last} to be archived", interval=0.2)
        c.set("archive_command", "/bin/true")
        names = sorted(f for f in os.listdir(segdir) if is_seg(f))
        # the first one may have been cut short by pg_switch_wal: skip it
        run_ = self.consecutive(names[1:])
        if len(run_) < self.nsegs:
            raise BenchError("could not collect enough consecutive segments")
        return segdir, run_[: self.nsegs]

    def walgen_setup(self, c):
        rows = min(500000, c.scale * 100000)
        c.psql("DROP TABLE IF EXISTS bench_walgen")
        c.psql("CREATE TABLE bench_walgen (LIKE pgbench_accounts INCLUDING ALL)")
        c.psql(f"INSERT INTO bench_walgen SELECT * FROM pgbench_accounts WHERE aid <= {rows}")
        c.psql("VACUUM (ANALYZE) bench_walgen")
        return rows

    def walgen(self, c, until, min_secs=0):
        """A write workload that makes WAL fast enough on a small machine: pgbench (2 clients,
        synchronous_commit=off) plus, in parallel, bulk UPDATEs of 100k-row ranges of bench_walgen
        (a copy of part of pgbench_accounts, with its primary key), VACUUMed after each pass.
        Runs for at least min_secs and until until() is true (checked after every bulk statement)."""
        rows = int(c.psql("SELECT count(*) FROM bench_walgen"))
        t0 = time.monotonic()
        pb = subprocess.Popen([f"{PGBIN}/pgbench", "-n", "-c", "2", "-j", "2", "-T", "3600", "postgres"],
                              env=c.env({"PGOPTIONS": "-c synchronous_commit=off"}), user=PG_USER,
                              group=PG_USER, extra_groups=[], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        lo, step = 1, 100000
        try:
            while time.monotonic() - t0 < min_secs or not until():
                if pb.poll() is not None:
                    raise BenchError("pgbench stopped early")
                c.psql(f"UPDATE bench_walgen SET abalance = abalance + 1 WHERE aid >= {lo} AND aid < {lo + step}")
                lo += step
                if lo > rows:
                    lo = 1
                    c.psql("VACUUM bench_walgen")
        finally:
            pb.send_signal(signal.SIGINT)
            pb.wait()

    @staticmethod
    def consecutive(names):
        best, cur = [], []
        for n in names:
            if cur and seg_next(cur[-1]) == n:
                cur.append(n)
            else:
                cur = [n]
            if len(cur) > len(best):
                best = list(cur)
        return best

    def fake_pgdata(self, path, segdir=None, names=(), ready=False):
        """A PGDATA-like dir: PG_VERSION, global/pg_control of the main cluster, pg_wal/ with the
        segments hard-linked in and archive_status/<seg>.ready for each."""
        c = self.main_cluster()
        rmtree(path)
        mkdir_pg(path)
        mkdir_pg(os.path.join(path, "global"))
        wal = mkdir_pg(os.path.join(path, "pg_wal"))
        st = mkdir_pg(os.path.join(wal, "archive_status"))
        shutil.copy2(os.path.join(c.datadir, "PG_VERSION"), path)
        shutil.copy2(os.path.join(c.datadir, "global", "pg_control"), os.path.join(path, "global"))
        for f in ("PG_VERSION", "global/pg_control"):
            shutil.chown(os.path.join(path, f), PG_USER, PG_USER)
        for n in names:
            os.link(os.path.join(segdir, n), os.path.join(wal, n))
            if ready:
                write_pg(os.path.join(st, n + ".ready"), "")
        return path

    # ---------------------------------------------------------------- pgBackRest

    def pgbr_conf(self, name, repo, pg1_path, asynchronous, cluster=None):
        base = mkdir_pg(self.p("pgbackrest", name), 0o755)
        spool = mkdir_pg(os.path.join(base, "spool"))
        mkdir_pg(os.path.join(base, "log"))
        mkdir_pg(os.path.join(base, "lock"))
        c = cluster or self.main_cluster()
        conf = os.path.join(base, "pgbackrest.conf")
        text = f"""[global]
repo1-path={repo}
repo1-retention-full=9999
compress-type=lz4
process-max=2
start-fast=y
log-path={base}/log
lock-path={base}/lock
spool-path={spool}
log-level-console=warn
log-level-file=info
archive-async={'y' if asynchronous else 'n'}

[bench]
pg1-path={pg1_path}
pg1-port={c.port}
pg1-socket-path={c.sockdir}
"""
        write_pg(conf, text, 0o644)
        return conf

    def pgbr(self, conf, *args):
        return f"pgbackrest --config={conf} --stanza=bench " + " ".join(args)

    def stanza_create(self, conf, repo):
        mkdir_pg(repo)
        c = self.main_cluster()
        run(self.pgbr(conf, f"--pg1-path={c.datadir}", "stanza-create"), env=c.env())

    # ---------------------------------------------------------------- archive_command

    def bench_archive(self):
        segdir, names = self.segments()
        c = self.main_cluster()
        nbytes = len(names) * SEG
        # the PGDATA-like dirs hard-link the cached segments, so they live on the same filesystem
        self.segrun = os.path.join(self.segbase, f"run-{os.getpid()}")
        base = mkdir_pg(os.path.join(self.segrun, "archive"), 0o755)
        repos = mkdir_pg(self.p("archive"), 0o755)
        tools = {}
        for t in ["walvault", "pgBackRest async", "pgBackRest sync", "cp", "cp+fsync"]:
            tdir = mkdir_pg(os.path.join(base, t.replace(" ", "_").replace("+", "_")), 0o755)
            pgdata = self.fake_pgdata(os.path.join(tdir, "pgdata"), segdir, names, ready=True)
            repo = mkdir_pg(os.path.join(repos, os.path.basename(tdir)))
            if t == "walvault":
                cmd = f"{self.wv} --repo file://{repo} wal-push %p"
            elif t.startswith("pgBackRest"):
                conf = self.pgbr_conf(t.replace(" ", "_"), repo, pgdata, t.endswith("async"))
                self.stanza_create(conf, repo)
                cmd = self.pgbr(conf, "archive-push %p")
            elif t == "cp":
                cmd = f"test ! -f {repo}/%f && cp %p {repo}/%f"
            else:
                cmd = (f"test ! -f {repo}/%f && cp %p {repo}/%f.tmp && sync {repo}/%f.tmp && "
                       f"mv {repo}/%f.tmp {repo}/%f && sync {repo}")
            tools[t] = (pgdata, repo, cmd)
        res = {}
        order = list(tools)
        for t in order:
            pgdata, repo, cmd = tools[t]
            log(f"archive_command: {t} x {len(names)}")
            errlog = os.path.join(self.logs, f"archive-{t.replace(' ', '_')}.log")
            lat, rss, cpu, cp_stored = [], 0, 0.0, 0
            os.sync()
            warm(segdir, names)
            # the detached pusher lives through the loop, so a slow poll sees its peak and costs
            # the measured calls little CPU
            poller = RssPoller("walvault", self.runduring, interval=0.2) if t == "walvault" else None
            start = time.monotonic()
            for n in names:
                call = cmd.replace("%p", f"pg_wal/{n}").replace("%f", n)
                r = timed(call, cwd=pgdata, capture=False, errfile=errlog)
                if r.rc != 0:
                    raise BenchError(f"archive_command {t} failed on {n} (exit {r.rc}); see {errlog}")
                st = os.path.join(pgdata, "pg_wal", "archive_status")
                os.rename(os.path.join(st, n + ".ready"), os.path.join(st, n + ".done"))
                lat.append(r.wall * 1000)
                rss = max(rss, r.maxrss_kib)
                cpu += r.cpu
                if t.startswith("cp"):
                    # the floors' copies are plain segments: count and drop them to save disk space
                    cp_stored += os.path.getsize(os.path.join(repo, n))
                    os.unlink(os.path.join(repo, n))
            total = time.monotonic() - start
            if t == "pgBackRest async":
                self.wait_pgbr_async_idle(os.path.dirname(repo))
            bg_rss = poller.stop() if poller else {}
            stored = cp_stored if t.startswith("cp") else du_bytes(repo)
            if t == "pgBackRest sync":
                rmtree(repo)  # restore uses the async repository (same content): save disk space
            res[t] = {"lat_ms": lat, "median": med(lat), "p95": p95(lat), "min": min(lat), "max": max(lat),
                      "total_s": total, "mib_s": nbytes / MiB / total, "stored_mib": stored / MiB,
                      "peak_rss_kib": rss, "bg_peak_rss_kib": bg_rss, "cpu_s": cpu, "command": cmd}
            log(f"  median {med(lat):.1f} ms, p95 {p95(lat):.1f} ms, {nbytes / MiB / total:.0f} MiB/s, "
                f"stored {stored / MiB:.0f} MiB, peak RSS {rss / 1024:.1f} MiB")
        self.results["sections"]["archive"] = {"segments": len(names), "first": names[0], "tools": res}
        self.archive_state = {"segdir": segdir, "names": names, "tools": tools}

    def wait_pgbr_async_idle(self, base):
        # no pgbackrest archive-push async process left for this spool
        wait_for(lambda: not helpers_running(("pgbackrest", "async")), 120,
                 "pgBackRest async archiver to finish", interval=0.1)

    def wait_helpers_idle(self):
        # neither tool's background process (walvault's prefetcher, pgBackRest's async archive-get)
        wait_for(lambda: not helpers_running(("pgbackrest", "async"), ("walvault", "wal-prefetch")), 120,
                 "background helpers to finish", interval=0.05)

    # ---------------------------------------------------------------- restore_command

    def bench_restore(self):
        if not hasattr(self, "archive_state"):
            log("restore needs the archive section's repositories: running it first")
            self.bench_archive()
        st = self.archive_state
        names = st["names"]
        base = mkdir_pg(self.p("restore"), 0o755)
        tools = {}
        for t in ["walvault", "pgBackRest async", "pgBackRest sync", "cp"]:
            repo = st["tools"]["pgBackRest async" if t.startswith("pgBackRest") else t][1]
            if t == "cp":
                # the floor's archive: exactly the archived segments, hard-linked from the cache
                repo = mkdir_pg(os.path.join(self.segrun, "cp-archive"))
                for n in names:
                    if not os.path.exists(os.path.join(repo, n)):
                        os.link(os.path.join(st["segdir"], n), os.path.join(repo, n))
            pgdata = self.fake_pgdata(os.path.join(base, t.replace(" ", "_"), "pgdata"))
            if t == "walvault":
                cmd = f"{self.wv} --repo file://{repo} wal-fetch %f %p"
            elif t.startswith("pgBackRest"):
                conf = self.pgbr_conf(t.replace(" ", "_") + "_restore", repo, pgdata, t.endswith("async"))
                cmd = self.pgbr(conf, "archive-get %f %p")
            else:
                cmd = f"cp {repo}/%f %p"
            tools[t] = (pgdata, cmd)
        miss_name = seg_next(names[-1])
        res = {}
        for t, (pgdata, cmd) in tools.items():
            log(f"restore_command: {t} x {len(names)} (page cache dropped first)")
            errlog = os.path.join(self.logs, f"restore-{t.replace(' ', '_')}.log")
            drop_caches()
            # every 100 ms: each prefetch pass lives longer than that, and a faster poll takes
            # CPU from the calls being timed
            poller = RssPoller("walvault", self.runduring, interval=0.1) if t == "walvault" else None
            lat, rss = [], 0
            dest = os.path.join(pgdata, "pg_wal", "RECOVERYXLOG")
            start = time.monotonic()
            for n in names:
                call = cmd.replace("%p", "pg_wal/RECOVERYXLOG").replace("%f", n)
                r = timed(call, cwd=pgdata, capture=False, errfile=errlog)
                if r.rc != 0:
                    raise BenchError(f"restore_command {t} failed on {n} (exit {r.rc}); see {errlog}")
                if os.path.getsize(dest) != SEG:
                    raise BenchError(f"restore_command {t}: {n} restored with a wrong size")
                os.unlink(dest)
                lat.append(r.wall * 1000)
                rss = max(rss, r.maxrss_kib)
            total = time.monotonic() - start
            # a miss is measured on its own, not against a prefetcher still draining the window
            self.wait_helpers_idle()
            bg_rss = poller.stop() if poller else {}
            misses, rcs = [], []
            for _ in range(5):
                call = cmd.replace("%p", "pg_wal/RECOVERYXLOG").replace("%f", miss_name)
                r = timed(call, cwd=pgdata, capture=False, errfile=errlog)
                misses.append(r.wall * 1000)
                rcs.append(r.rc)
                rss = max(rss, r.maxrss_kib)
                if os.path.exists(dest):
                    raise BenchError(f"restore_command {t}: a miss produced a file")
            res[t] = {"lat_ms": lat, "median": med(lat), "p95": p95(lat), "min": min(lat), "max": max(lat),
                      "total_s": total, "mib_s": len(names) * SEG / MiB / total,
                      "miss_ms": misses, "miss_median": med(misses), "miss_rc": sorted(set(rcs)),
                      "peak_rss_kib": rss, "bg_peak_rss_kib": bg_rss, "command": cmd}
            log(f"  median {med(lat):.1f} ms, p95 {p95(lat):.1f} ms, miss {med(misses):.1f} ms "
                f"(exit {sorted(set(rcs))}), peak RSS {rss / 1024:.1f} MiB, background {bg_rss}")
            if any(rc == 0 for rc in rcs):
                self.results["notes"].append(f"restore_command {t}: a missing segment returned exit 0")
        self.results["sections"]["restore"] = {"segments": len(names), "miss_name": miss_name, "tools": res}
        self.drop_archive_state()

    def drop_archive_state(self):
        if hasattr(self, "archive_state"):
            rmtree(self.p("archive"))
            rmtree(self.p("restore"))
            rmtree(self.segrun)
            del self.archive_state

    # ---------------------------------------------------------------- backup / delta

    def db_repos(self):
        """Fresh walvault + pgBackRest repositories for the main cluster, with an archive_command
        archiving into both (walvault first, then pgBackRest async)."""
        if self.db:
            return self.db
        c = self.main_cluster()
        base = mkdir_pg(self.p("db"), 0o755)
        wv_repo = os.path.join(base, "walvault-repo")
        pgbr_repo = os.path.join(base, "pgbackrest-repo")
        mkdir_pg(wv_repo)
        conf = self.pgbr_conf("db", pgbr_repo, c.datadir, True)
        self.stanza_create(conf, pgbr_repo)
        mkdir_pg(base, 0o755)
        c.psql("SELECT pg_switch_wal()")
        c.set("archive_command", f"{self.wv} -q --repo file://{wv_repo} wal-push %p && "
                                 f"pgbackrest --config={conf} --stanza=bench archive-push %p")
        c.psql("SELECT pg_switch_wal()")
        c.psql("CHECKPOINT")
        self.db = {"wv_repo": wv_repo, "pgbr_repo": pgbr_repo, "conf": conf, "base": base}
        return self.db

    def wv_backups(self):
        r = run([self.wv, "--repo", f"file://{self.db['wv_repo']}", "backup-list", "--json"],
                env=self.main_cluster().env())
        return json.loads(r.stdout)

    def pgbr_info(self):
        r = run(self.pgbr(self.db["conf"], "info --output=json"), env=self.main_cluster().env())
        return json.loads(r.stdout)[0]["backup"]

    def backup_walvault(self, kind):
        c = self.main_cluster()
        drop_caches()
        flag = "--full" if kind == "full" else "--delta"
        r = must(timed([self.wv, "-q", "--repo", f"file://{self.db['wv_repo']}", "backup-push", flag],
                       env=c.env(), cwd=c.base), f"walvault backup-push {flag}")
        b = self.wv_backups()[-1]
        if b["type"] != kind:
            raise BenchError(f"walvault made a {b['type']} backup, expected {kind}")
        return {"wall": r.wall, "cpu": r.cpu, "rss_kib": r.maxrss_kib, "stored": b["stored_size"],
                "original": b["original_size"], "name": b["name"]}

    def backup_pgbr(self, kind):
        c = self.main_cluster()
        drop_caches()
        r = must(timed(self.pgbr(self.db["conf"], "backup", f"--type={kind}"), env=c.env(), cwd=c.base),
                 f"pgbackrest backup --type={kind}")
        b = self.pgbr_info()[-1]
        if b["type"] != kind:
            raise BenchError(f"pgBackRest made a {b['type']} backup, expected {kind}")
        return {"wall": r.wall, "cpu": r.cpu, "rss_kib": r.maxrss_kib, "stored": b["info"]["repository"]["delta"],
                "original": b["info"]["delta"], "name": b["label"]}

    def backup_pgbb(self, i):
        c = self.main_cluster()
        d = os.path.join(self.db["base"], f"pg_basebackup-{i}")
        rmtree(d)
        drop_caches()
        r = must(timed([f"{PGBIN}/pg_basebackup", "-D", d, "-Ft", "--compress=client-lz4", "--checkpoint=fast"], env=c.env(), cwd=c.base),
                 "pg_basebackup")
        stored = du_bytes(d)
        rmtree(d)
        return {"wall": r.wall, "cpu": r.cpu, "rss_kib": r.maxrss_kib, "stored": stored}

    def touch_pages(self):
        """UPDATE about 3% of pgbench_accounts' heap pages (one row on each); returns what was touched."""
        c = self.main_cluster()
        relpages = int(c.psql("SELECT pg_relation_size('pgbench_accounts') / 8192"))
        rows = int(c.psql("SELECT count(*) FROM pgbench_accounts")) if c.scale <= 10 else c.scale * 100000
        per_page = rows / relpages
        n = max(2, int(round(per_page / 0.03)))
        c.meta["counter"] = c.meta.get("counter", 0) + 1
        json.dump(c.meta, open(c.meta_path, "w"))
        k = (c.meta["counter"] * 7919) % n
        hit = int(c.psql(f"SELECT count(DISTINCT (ctid::text::point)[0]) FROM pgbench_accounts WHERE aid % {n} = {k}"))
        c.psql(f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % {n} = {k}")
        after = int(c.psql("SELECT pg_relation_size('pgbench_accounts') / 8192"))
        c.psql("CHECKPOINT")
        return {"relpages": relpages, "pages_hit": hit, "pages_appended": after - relpages,
                "modulus": n, "pct": 100.0 * (hit + after - relpages) / relpages}

    def bench_backup(self):
        c = self.main_cluster()
        size = int(c.psql("SELECT pg_database_size('postgres')"))
        ensure_free(self.work, int(size * 0.6 * self.repeat) + 1024 * MiB, "the backup repositories")
        self.db_repos()
        c.psql("VACUUM (ANALYZE)")
        c.psql("CHECKPOINT")
        dbsize = int(c.psql("SELECT pg_database_size('postgres')"))
        runs = {"walvault": [], "pgBackRest": [], "pg_basebackup": []}
        deltas = {"walvault": [], "pgBackRest": []}
        touched = []
        for i in range(self.repeat):
            order = ["walvault", "pgBackRest", "pg_basebackup"]
            if i % 2:
                order.reverse()
            for t in order:
                log(f"full backup {i + 1}/{self.repeat}: {t}")
                r = {"walvault": lambda: self.backup_walvault("full"),
                     "pgBackRest": lambda: self.backup_pgbr("full"),
                     "pg_basebackup": lambda: self.backup_pgbb(i)}[t]()
                runs[t].append(r)
                log(f"  {r['wall']:.1f} s, CPU {r['cpu']:.1f} s, stored {r['stored'] / MiB:.0f} MiB, "
                    f"RSS {r['rss_kib'] / 1024:.0f} MiB")
            tp = self.touch_pages()
            touched.append(tp)
            log(f"touched {tp['pages_hit']} + {tp['pages_appended']} appended of {tp['relpages']} heap pages "
                f"({tp['pct']:.1f}%)")
            for t in (["walvault", "pgBackRest"] if i % 2 == 0 else ["pgBackRest", "walvault"]):
                log(f"delta backup {i + 1}/{self.repeat}: {t}")
                r = self.backup_walvault("delta") if t == "walvault" else self.backup_pgbr("incr")
                deltas[t].append(r)
                log(f"  {r['wall']:.1f} s, CPU {r['cpu']:.1f} s, stored {r['stored'] / MiB:.1f} MiB")
        self.results["sections"]["backup"] = {"db_size": dbsize, "scale": c.scale, "full": runs,
                                              "delta": deltas, "touched": touched}
        self.drop_db_repos()

    def drop_db_repos(self):
        """Deletes the backup/PITR repositories (disk space) and resets archive_command."""
        if not self.db:
            return
        c = self.main_cluster()
        c.set("archive_command", "/bin/true")
        self.wait_pgbr_async_idle(None)
        rmtree(self.db["base"])
        rmtree(os.path.dirname(self.db["conf"]))
        self.db = None

    # ---------------------------------------------------------------- PITR

    def bench_pitr(self):
        c = self.main_cluster()
        self.db_repos()
        c.psql("CREATE TABLE IF NOT EXISTS bench_marks (id bigserial PRIMARY KEY, t timestamptz NOT NULL)")
        c.psql("TRUNCATE bench_marks")
        self.walgen_setup(c)
        c.psql("VACUUM (ANALYZE)")
        log("PITR: fresh full backups (walvault, pgBackRest)")
        wvb = self.backup_walvault("full")
        pbb = self.backup_pgbr("full")
        start_lsn = c.psql("SELECT pg_current_wal_lsn()")
        # marks writer: one row every ~50 ms, each its own transaction
        marks = subprocess.Popen(
            [f"{PGBIN}/psql", "-X", "-q", "-c",
             "DO $$ BEGIN LOOP INSERT INTO bench_marks(t) VALUES (clock_timestamp()); COMMIT; "
             "PERFORM pg_sleep(0.05); END LOOP; END $$"],
            env=c.env({"PGAPPNAME": "bench_marks"}), user=PG_USER, group=PG_USER, extra_groups=[],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target_bytes = self.pitr_wal_mib * MiB
        log(f"PITR: workload until {self.pitr_wal_mib} MiB of WAL are written (archived into both repositories)")
        wl_start = time.monotonic()
        self.walgen(c, lambda: int(c.psql(f"SELECT pg_current_wal_lsn() - '{start_lsn}'::pg_lsn")) >= target_bytes,
                    min_secs=20)
        wl_secs = time.monotonic() - wl_start
        end_ts = c.psql("SELECT clock_timestamp()")
        nmarks = int(c.psql("SELECT count(*) FROM bench_marks"))
        wait_for(lambda: int(c.psql("SELECT count(*) FROM bench_marks")) >= nmarks + 20, 60, "more marks")
        c.psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'bench_marks'")
        marks.wait()
        # target: midway between the two marks commits around 5 s before the end of the workload
        row = c.psql(
            "SELECT ct + (nxt - ct) / 2 FROM (SELECT pg_xact_commit_timestamp(xmin) AS ct, "
            "lead(pg_xact_commit_timestamp(xmin)) OVER (ORDER BY pg_xact_commit_timestamp(xmin)) AS nxt "
            f"FROM bench_marks) x WHERE ct <= timestamptz '{end_ts}' - interval '5 s' ORDER BY ct DESC LIMIT 1")
        target = dt.datetime.fromisoformat(row.replace(" ", "T")).astimezone(dt.timezone.utc)
        target_s = target.strftime("%Y-%m-%d %H:%M:%S.%f") + "+00:00"
        truth = [int(x) for x in c.psql(
            f"SELECT id FROM bench_marks WHERE pg_xact_commit_timestamp(xmin) <= '{target_s}' ORDER BY id").split()]
        wal_mib = int(c.psql(f"SELECT pg_current_wal_lsn() - '{start_lsn}'::pg_lsn")) / MiB
        last = c.psql("SELECT pg_walfile_name(pg_switch_wal())")
        log(f"PITR: target {target_s}; waiting for {last} to be archived")
        wait_for(lambda: (c.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") or "") >= last,
                 600, f"{last} to be archived", interval=0.2)
        res = {"walvault": [], "pgBackRest": []}
        for i in range(self.repeat):
            for t in (["walvault", "pgBackRest"] if i % 2 == 0 else ["pgBackRest", "walvault"]):
                log(f"PITR {i + 1}/{self.repeat}: {t}")
                r = self.pitr_walvault(i, target_s) if t == "walvault" else self.pitr_pgbr(i, target_s)
                r["marks_exact"] = r.pop("marks") == truth
                res[t].append(r)
                log(f"  restore {r['restore']:.1f} s + replay {r['replay']:.1f} s = {r['total']:.1f} s; "
                    f"marks exact: {r['marks_exact']}; {r['check']}")
        c.psql("DROP TABLE IF EXISTS bench_walgen")
        self.drop_db_repos()
        checks = {json.dumps(r["check"]) for t in res for r in res[t]}
        self.results["sections"]["pitr"] = {
            "target": target_s, "wal_mib": wal_mib, "workload_s": wl_secs, "marks_truth": len(truth),
            "tools": res, "consistent": len(checks) == 1,
            "backups": {"walvault": wvb, "pgBackRest": pbb}}
        if len(checks) != 1:
            self.results["notes"].append(f"PITR: recovered clusters differ: {sorted(checks)}")

    def pitr_check(self, port, sock):
        k = Cluster("", port, sock, "")
        accounts = k.psql("SELECT count(*) || ' ' || sum(abalance) FROM pgbench_accounts")
        hist = k.psql("SELECT count(*) FROM pgbench_history")
        walgen = k.psql("SELECT count(*) || ' ' || sum(abalance) FROM bench_walgen")
        marks = [int(x) for x in k.psql("SELECT id FROM bench_marks ORDER BY id").split()]
        return {"accounts": accounts, "history": int(hist), "walgen": walgen, "marks_rows": len(marks)}, marks

    def pitr_walvault(self, i, target):
        self.ensure_restore_space()
        d = self.p("pitr", f"walvault-{i}")
        mkdir_pg(os.path.dirname(d), 0o755)
        rmtree(d)
        port = 55440
        drop_caches()
        r = must(timed([self.wv, "--repo", f"file://{self.db['wv_repo']}", "recover", "--pgdata", d,
                        "--target-time", target, "--start", "--port", str(port), "--socket-dir", self.sock,
                        "--pg-bin", PGBIN], env=pg_env(), cwd=self.p("pitr")), "walvault recover")
        k = Cluster(d, port, self.sock, "")
        STARTED.append(k)
        with open(os.path.join(self.logs, f"pitr-walvault-{i}.log"), "w") as f:
            f.write(r.out + r.err)
        try:
            m = re.search(r"([0-9.]+) s in total \(([0-9.]+) s of recovery\)", r.out + r.err)
            replay = float(m.group(2)) if m else None
            if k.psql("SELECT pg_is_in_recovery()") != "f":
                raise BenchError("walvault recover returned but the server is still in recovery")
            check, marks = self.pitr_check(port, self.sock)
        finally:
            k.stop("immediate")
            server_log = os.path.join(d, "walvault-recover.log")
            kept_log = os.path.join(self.logs, f"pitr-walvault-{i}.server.log")
            if os.path.exists(server_log):
                shutil.copy(server_log, kept_log)
        rmtree(d)
        total = r.wall
        return {"total": total, "replay": replay, "restore": total - replay if replay is not None else None,
                "cpu": r.cpu, "rss_kib": r.maxrss_kib, "check": check, "marks": marks,
                "redo": redo_usage(kept_log), "fetch_ms": wal_fetch_ms(kept_log)}

    def ensure_restore_space(self):
        size = int(self.main_cluster().psql("SELECT pg_database_size('postgres')"))
        ensure_free(self.work, int(size * 1.2) + 1024 * MiB, "a restored copy of the cluster")

    def pitr_pgbr(self, i, target):
        self.ensure_restore_space()
        d = self.p("pitr", f"pgbackrest-{i}")
        mkdir_pg(os.path.dirname(d), 0o755)
        rmtree(d)
        mkdir_pg(d)
        port = 55441
        drop_caches()
        r = must(timed(self.pgbr(self.db["conf"], f"--pg1-path={d}", "restore", "--type=time",
                                 f"'--target={target}'", "--target-action=promote"),
                       env=pg_env(), cwd=self.p("pitr")), "pgbackrest restore")
        k = Cluster(d, port, self.sock, os.path.join(self.logs, f"pitr-pgbackrest-{i}.log"))
        t0 = time.monotonic()
        run([f"{PGBIN}/pg_ctl", "-D", d, "-l", k.logfile, "-W",
             "-o", f"-p {port} -k {self.sock} -c listen_addresses='' -c archive_mode=off", "start"], env=k.env())
        STARTED.append(k)
        try:
            wait_for(k.running, 60, "the postmaster of pgBackRest's restored cluster")
            def promoted():
                p = run([f"{PGBIN}/psql", "-X", "-A", "-t", "-c", "SELECT pg_is_in_recovery()"],
                        env=k.env(), check=False)
                if p.returncode == 0 and p.stdout.strip() == "f":
                    return True
                if not k.running():
                    raise BenchError(f"recovered pgBackRest cluster stopped; see {k.logfile}")
                return False
            wait_for(promoted, 1800, "pgBackRest's restored cluster to finish recovery", interval=0.05)
            replay = time.monotonic() - t0
            check, marks = self.pitr_check(port, self.sock)
        finally:
            k.stop("immediate")
        rmtree(d)
        return {"total": r.wall + replay, "replay": replay, "restore": r.wall, "cpu": r.cpu,
                "rss_kib": r.maxrss_kib, "check": check, "marks": marks, "redo": redo_usage(k.logfile)}

    # ---------------------------------------------------------------- RSS vs size

    def bench_rss(self):
        out = {}
        for scale in (self.small_scale, self.scale):
            if scale == self.scale:
                c = self.main_cluster()
            else:
                c = self.cluster(scale, 55433)
            repo = self.p("rss", f"s{scale}-repo")
            mkdir_pg(os.path.dirname(repo), 0o755)
            rmtree(repo)
            mkdir_pg(repo)
            old = c.psql("SHOW archive_command")
            c.set("archive_command", f"{self.wv} -q --repo file://{repo} wal-push %p")
            c.psql("SELECT pg_switch_wal()")
            try:
                size = int(c.psql("SELECT pg_database_size('postgres')"))
                log(f"RSS: walvault backup-push --full, scale {scale} ({size / MiB:.0f} MiB)")
                drop_caches()
                bp = must(timed([self.wv, "-q", "--repo", f"file://{repo}", "backup-push", "--full"],
                                env=c.env(), cwd=c.base), "walvault backup-push")
                d = self.p("rss", f"s{scale}-restored")
                rmtree(d)
                log(f"RSS: walvault backup-fetch LATEST, scale {scale}")
                drop_caches()
                bf = must(timed([self.wv, "-q", "--repo", f"file://{repo}", "backup-fetch", "LATEST", d],
                                env=c.env(), cwd=self.p("rss")), "walvault backup-fetch")
                rmtree(d)
            finally:
                c.set("archive_command", old)
            out[scale] = {"db_size": size, "push_rss_kib": bp.maxrss_kib, "fetch_rss_kib": bf.maxrss_kib,
                          "push_wall": bp.wall, "fetch_wall": bf.wall}
            log(f"  push {bp.maxrss_kib / 1024:.1f} MiB / {bp.wall:.1f} s, fetch {bf.maxrss_kib / 1024:.1f} MiB / "
                f"{bf.wall:.1f} s")
            if scale != self.scale:
                c.stop()
        self.results["sections"]["rss"] = {str(k): v for k, v in out.items()}

    # ---------------------------------------------------------------- report

    def report(self):
        return Report(self).render()


def warm(directory, names):
    """Reads the files into the page cache, where PostgreSQL's just-written segments are when its
    archiver calls archive_command: every tool starts the archive loop from the same state,
    whatever an earlier section (or run) evicted."""
    buf = bytearray(MiB)
    for n in names:
        with open(os.path.join(directory, n), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def redo_usage(logfile):
    """(CPU s, elapsed s) of the startup process's redo, from the server log's "redo done" line."""
    try:
        text = open(logfile, errors="replace").read()
    except OSError:
        return None
    m = re.search(r"redo done at .*? CPU: user: ([0-9.]+) s, system: ([0-9.]+) s, elapsed: ([0-9.]+) s", text)
    return (float(m.group(1)) + float(m.group(2)), float(m.group(3))) if m else None


def wal_fetch_ms(logfile):
    """The time of every segment wal-fetch served during a recovery, as it logged it (in-process ms)."""
    try:
        text = open(logfile, errors="replace").read()
    except OSError:
        return []
    return [float(x) for x in re.findall(
        r"walvault wal-fetch: [0-9A-F]{24}: restored(?: from prefetch)? in ([0-9.]+) ms", text)]


def helpers_running(*patterns):
    """Whether a process runs whose command line holds every word of one of `patterns`."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if any(all(w in cmdline for w in words) for words in patterns):
                return True
    return False


class RssPoller:
    """Tracks the peak RSS (VmHWM) of every process named `comm`, including detached ones
    (walvault's background prefetcher), by subcommand."""

    def __init__(self, comm, match, interval=0.02):
        self.comm, self.match, self.interval, self.peak = comm, match.encode(), interval, {}
        self.stop_ev = threading.Event()
        self.th = threading.Thread(target=self.loop, daemon=True)
        self.th.start()

    def loop(self):
        while not self.stop_ev.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    if open(f"/proc/{pid}/comm").read().strip() != self.comm:
                        continue
                    raw = open(f"/proc/{pid}/cmdline", "rb").read()
                    if self.match not in raw:
                        continue
                    argv = raw.split(b"\0")
                    sub = next((a.decode() for a in argv[1:] if a and not a.startswith(b"-")
                                and not a.startswith(b"file:")), None)
                    if sub is None:
                        continue
                    for line in open(f"/proc/{pid}/status"):
                        if line.startswith("VmHWM:"):
                            kib = int(line.split()[1])
                            if kib == 0:
                                break
                            self.peak[sub] = max(self.peak.get(sub, 0), kib)
                except (OSError, ValueError):
                    pass
            self.stop_ev.wait(self.interval)

    def stop(self):
        self.stop_ev.set()
        self.th.join()
        return self.peak


# --------------------------------------------------------------------------------------------
# report


class Report:
    def __init__(self, bench):
        self.b = bench
        self.r = bench.results
        self.targets = []

    def target(self, what, value, ok):
        self.targets.append((what, value, "PASS" if ok else ("MISS" if ok is not None else "n/a")))

    def render(self):
        r, s = self.r, self.r["sections"]
        f = r["facts"]
        L = []
        L.append("# walvault benchmark results\n")
        L.append(f"Generated by `bench/run.py {' '.join(sys.argv[1:])}` on {f['date']}."
                 f"{' **Quick (smoke) run: small data, not for comparison.**' if self.b.quick else ''}\n")
        L.append("Each cell: median (min–max) over the runs or calls; ratio = walvault / peer (below 1 "
                 "means walvault is faster or smaller). Local-directory repositories for every tool.\n")
        if "archive" in s:
            L += self.archive(s["archive"])
        if "restore" in s:
            L += self.restore(s["restore"])
        if "backup" in s:
            L += self.backup(s["backup"])
        if "pitr" in s:
            L += self.pitr(s["pitr"])
        L += self.rss(s)
        L.append("## Targets (issue 6)\n")
        L.append("| target | measured | result |")
        L.append("|---|---|---|")
        for what, value, ok in self.targets:
            L.append(f"| {what} | {value} | {ok} |")
        L.append("")
        if r["notes"]:
            L.append("## Notes from this run\n")
            L += [f"- {n}".replace("\n", " ") for n in r["notes"]]
            L.append("")
        L.append("## Machine\n")
        L.append("| | |")
        L.append("|---|---|")
        for k in ["date", "nproc", "cpu", "memory", "filesystem", "kernel", "postgresql", "pgbackrest",
                  "walvault", "loadavg"]:
            v = f[k] if not isinstance(f[k], list) else " ".join(f[k])
            L.append(f"| {k} | {v} |")
        L.append("")
        return "\n".join(L)

    def archive(self, a):
        t = a["tools"]
        wv = t["walvault"]
        L = [f"## archive_command: {a['segments']} real 16 MiB segments, serial calls as PostgreSQL makes them\n",
             "| tool | per call ms: median (min–max) | p95 ms | total s | MiB/s | stored MiB | peak RSS MiB "
             "| walvault/tool median | walvault/tool MiB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
        for name, v in t.items():
            L.append(f"| {name} | {mmm(v['lat_ms'])} | {fmt(v['p95'])} | {fmt(v['total_s'])} | {fmt(v['mib_s'], 0)} "
                     f"| {fmt(v['stored_mib'], 0)} | {fmt(v['peak_rss_kib'] / 1024)} | "
                     f"{'' if name == 'walvault' else ratio(wv['median'], v['median'])} | "
                     f"{'' if name == 'walvault' else ratio(wv['mib_s'], v['mib_s'])} |")
        L.append("")
        L.append("Commands: " + "; ".join(f"{n}: `{v['command']}`" for n, v in t.items()) + "\n")
        pa = t.get("pgBackRest async")
        self.target("archive_command median ≤ 5 ms", f"{wv['median']:.1f} ms", wv["median"] <= 5)
        self.target("archive_command p95 ≤ 20 ms", f"{wv['p95']:.1f} ms", wv["p95"] <= 20)
        if pa:
            x = wv["mib_s"] / pa["mib_s"]
            self.target("archive throughput ≥ 1.5× pgBackRest async", f"{x:.2f}×", x >= 1.5)
        return L

    def restore(self, a):
        t = a["tools"]
        wv = t["walvault"]
        L = [f"## restore_command: the same {a['segments']} segments fetched serially as recovery does "
             f"(page cache dropped before each tool)\n",
             "| tool | per call ms: median (min–max) | p95 ms | total s | MiB/s | miss ms (exit code) | peak RSS MiB "
             "| walvault/tool median | walvault/tool miss |",
             "|---|---|---|---|---|---|---|---|---|"]
        for name, v in t.items():
            rss = fmt(v["peak_rss_kib"] / 1024)
            if v.get("bg_peak_rss_kib"):
                rss += " (background: " + ", ".join(f"{k} {fmt(x / 1024)}" for k, x in v["bg_peak_rss_kib"].items()) + ")"
            L.append(f"| {name} | {mmm(v['lat_ms'])} | {fmt(v['p95'])} | {fmt(v['total_s'])} | {fmt(v['mib_s'], 0)} "
                     f"| {mmm(v['miss_ms'])} ({','.join(map(str, v['miss_rc']))}) | {rss} | "
                     f"{'' if name == 'walvault' else ratio(wv['median'], v['median'])} | "
                     f"{'' if name == 'walvault' else ratio(wv['miss_median'], v['miss_median'])} |")
        L.append("")
        L.append(f"Miss: `{a['miss_name']}` (the segment after the last one archived), 5 calls.\n")
        self.target("restore_command median ≤ 5 ms (with prefetch)", f"{wv['median']:.1f} ms", wv["median"] <= 5)
        self.target("restore_command miss ≤ 5 ms (and non-zero exit)",
                    f"{wv['miss_median']:.1f} ms, exit {wv['miss_rc']}",
                    wv["miss_median"] <= 5 and 0 not in wv["miss_rc"])
        return L

    def backup(self, a):
        full, delta = a["full"], a["delta"]

        def col(rs, key, scale=1.0):
            return [x[key] * scale for x in rs]

        def m(rs, key, scale=1.0):
            return med(col(rs, key, scale)) if rs else None
        tp = a["touched"]
        L = [f"## Base backups: pgbench scale {a['scale']} ({a['db_size'] / MiB:.0f} MiB database), "
             f"{len(full['walvault'])} runs, page cache dropped before each\n",
             "| measurement | walvault | pgBackRest (process-max=2) | pg_basebackup -Ft client-lz4 "
             "| walvault/pgBackRest | walvault/pg_basebackup |",
             "|---|---|---|---|---|---|"]
        rows = [("full: wall s", "wall", 1.0), ("full: CPU s (user+sys, client side)", "cpu", 1.0),
                ("full: stored MiB", "stored", 1 / MiB), ("full: peak RSS MiB", "rss_kib", 1 / 1024)]
        for label, key, sc in rows:
            w, p, b = (col(full[x], key, sc) for x in ("walvault", "pgBackRest", "pg_basebackup"))
            L.append(f"| {label} | {mmm(w)} | {mmm(p)} | {mmm(b)} | {ratio(med(w), med(p))} | {ratio(med(w), med(b))} |")
        drows = [("delta/incr: wall s", "wall", 1.0), ("delta/incr: CPU s", "cpu", 1.0),
                 ("delta/incr: stored MiB", "stored", 1 / MiB), ("delta/incr: peak RSS MiB", "rss_kib", 1 / 1024)]
        for label, key, sc in drows:
            w, p = (col(delta[x], key, sc) for x in ("walvault", "pgBackRest"))
            L.append(f"| {label} | {mmm(w)} | {mmm(p)} | – | {ratio(med(w), med(p))} | |")
        L.append("")
        L.append("Delta/incr: walvault `backup-push --delta` (changed pages) vs pgBackRest `--type=incr` (changed "
                 "files), after `UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % N = k` hit "
                 + "; ".join(f"{t['pages_hit']} heap pages + {t['pages_appended']} appended of {t['relpages']} "
                             f"({t['pct']:.1f}%)" for t in tp)
                 + " (plus the matching primary-key index pages).\n")
        wf, pf, bf = m(full["walvault"], "wall"), m(full["pgBackRest"], "wall"), m(full["pg_basebackup"], "wall")
        self.target("full backup wall ≤ 0.75× pgBackRest process-max=2", f"{wf / pf:.2f}×", wf / pf <= 0.75)
        self.target("full backup wall ≤ 1.2× pg_basebackup client-lz4", f"{wf / bf:.2f}×", wf / bf <= 1.2)
        ds, fs = m(delta["walvault"], "stored"), m(full["walvault"], "stored")
        dw = m(delta["walvault"], "wall")
        self.target("delta stored ≤ 10% of the full's", f"{100 * ds / fs:.1f}%", ds / fs <= 0.10)
        self.target("delta wall ≤ 0.5× the full's", f"{dw / wf:.2f}×", dw / wf <= 0.5)
        self._backup_rss = (m(full["walvault"], "rss_kib"), a["scale"])
        return L

    def pitr(self, a):
        t = a["tools"]
        L = [f"## PITR: restore the newest full backup and replay {a['wal_mib']:.0f} MiB of WAL "
             f"(pgbench for {a['workload_s']:.0f} s) to a time ~5 s before the end; "
             f"{len(t['walvault'])} runs, page cache dropped before each\n",
             "| measurement | walvault (`recover --start`) | pgBackRest (`restore --type=time` + start) | walvault/pgBackRest |",
             "|---|---|---|---|"]
        for label, key in [("restore s", "restore"), ("replay s (start → promoted)", "replay"),
                           ("restore + replay s", "total")]:
            w, p = [x[key] for x in t["walvault"]], [x[key] for x in t["pgBackRest"]]
            L.append(f"| {label} | {mmm(w)} | {mmm(p)} | {ratio(med([x for x in w if x is not None]), med(p))} |")
        w = [x["rss_kib"] / 1024 for x in t["walvault"]]
        p = [x["rss_kib"] / 1024 for x in t["pgBackRest"]]
        L.append(f"| peak RSS MiB (`recover` / `pgbackrest restore`) | {mmm(w)} | {mmm(p)} | {ratio(med(w), med(p))} |")
        redo = {k: [x["redo"] for x in v if x.get("redo")] for k, v in t.items()}
        if redo["walvault"] and redo["pgBackRest"]:
            for label, j in [("startup process CPU s during redo (server log)", 0),
                             ("redo elapsed s (server log)", 1)]:
                w, p = [r[j] for r in redo["walvault"]], [r[j] for r in redo["pgBackRest"]]
                L.append(f"| {label} | {mmm(w)} | {mmm(p)} | {ratio(med(w), med(p))} |")
        fetch = [ms for x in t["walvault"] for ms in x.get("fetch_ms", [])]
        if fetch:
            L.append(f"| wal-fetch per segment during replay, in-process ms (its log; {len(fetch)} calls) | "
                     f"median {fmt(med(fetch))}, p95 {fmt(p95(fetch))} | | |")
        ex = {k: all(x["marks_exact"] for x in v) for k, v in t.items()}
        L.append(f"| marks rows exact (commit ts ≤ target: {a['marks_truth']} rows) | "
                 f"{'yes' if ex['walvault'] else '**NO**'} | {'yes' if ex['pgBackRest'] else '**NO**'} | |")
        L.append(f"| pgbench_accounts / history identical across tools and runs | "
                 f"{'yes' if a['consistent'] else '**NO**'} | | |")
        L.append("")
        L.append(f"Target time `{a['target']}`. Verified: `count(*), sum(abalance)` of pgbench_accounts and "
                 f"`count(*)` of pgbench_history equal in every recovered cluster; the side table (a row every "
                 f"~50 ms) holds exactly the rows whose commit timestamp (`track_commit_timestamp`) is ≤ the "
                 f"target. Check values: `{t['walvault'][0]['check']}`.\n")
        wt = med([x["total"] for x in t["walvault"]])
        pt = med([x["total"] for x in t["pgBackRest"]])
        self.target("PITR restore+replay ≤ 0.7× pgBackRest", f"{wt / pt:.2f}×", wt / pt <= 0.7)
        self.target("PITR result exact (both tools)", "yes" if all(ex.values()) and a["consistent"] else "no",
                    all(ex.values()) and a["consistent"])
        return L

    def rss(self, s):
        L = ["## Peak RSS of walvault commands\n", "| command | peak RSS MiB | |", "|---|---|---|"]
        limits = []
        if "archive" in s:
            v = s["archive"]["tools"]["walvault"]["peak_rss_kib"] / 1024
            L.append(f"| wal-push (max over {s['archive']['segments']} calls) | {fmt(v)} | |")
            limits.append(("wal-push", v, 64))
            for k, x in s["archive"]["tools"]["walvault"].get("bg_peak_rss_kib", {}).items():
                if k != "wal-push":
                    L.append(f"| {k} (detached pusher, polled from /proc) | {fmt(x / 1024)} | |")
                    limits.append((k, x / 1024, 64))
        if "restore" in s:
            r = s["restore"]["tools"]["walvault"]
            v = r["peak_rss_kib"] / 1024
            L.append(f"| wal-fetch (max over calls) | {fmt(v)} | |")
            limits.append(("wal-fetch", v, 64))
            for k, x in r.get("bg_peak_rss_kib", {}).items():
                if k != "wal-fetch":
                    L.append(f"| {k} (detached, polled from /proc) | {fmt(x / 1024)} | |")
                    limits.append((k, x / 1024, 64))
        if "rss" in s:
            scales = sorted(s["rss"], key=int)
            for cmd, key, wkey in [("backup-push --full", "push_rss_kib", "push_wall"),
                                   ("backup-fetch", "fetch_rss_kib", "fetch_wall")]:
                cells = "; ".join(f"scale {sc} ({s['rss'][sc]['db_size'] / MiB:.0f} MiB): "
                                  f"{fmt(s['rss'][sc][key] / 1024)} MiB in {fmt(s['rss'][sc][wkey])} s" for sc in scales)
                L.append(f"| {cmd} | {cells} | |")
                vals = [s["rss"][sc][key] / 1024 for sc in scales]
                limits.append((cmd.split()[0], max(vals), 256))
                if len(vals) == 2:
                    grow = vals[1] / vals[0]
                    self.target(f"{cmd.split()[0]} peak RSS flat from scale {scales[0]} to {scales[1]} (≤ 1.25×)",
                                f"{vals[0]:.0f} → {vals[1]:.0f} MiB ({grow:.2f}×)", grow <= 1.25)
        L.append("")
        for name, v, lim in limits:
            self.target(f"{name} peak RSS ≤ {lim} MiB", f"{v:.1f} MiB", v <= lim)
        return L


# --------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(
        description="Benchmark walvault against pgBackRest and PostgreSQL's own tools "
                    "(archive_command, restore_command, full/delta backup, PITR, peak RSS). Run as root.")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run (default: all): {','.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 40 segments, scale 10 (RSS: scale 1 vs 10), 96 MiB of PITR WAL")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each backup and PITR restore (default 3)")
    ap.add_argument("--walvault", help="walvault binary (default: cargo build --release in the repository root)")
    ap.add_argument("--work", default="/var/tmp/walvault-bench",
                    help="work directory; cache/ keeps the clusters and segments between runs "
                         "(default /var/tmp/walvault-bench)")
    ap.add_argument("--out", help="write the markdown results to this file (also printed to stdout)")
    ap.add_argument("--segments", type=int, help="number of WAL segments (default 200, quick 40)")
    ap.add_argument("--scale", type=int, help="pgbench scale of the main cluster (default 100, quick 10)")
    ap.add_argument("--pitr-wal-mib", type=int, help="WAL to replay in the PITR test (default 600, quick 96)")
    ap.add_argument("--segments-dir",
                    help="where to cache the WAL segments (default: WORK/cache, or /dev/shm when the disk is short)")
    ap.add_argument("--prepare", action="store_true",
                    help="only create the cached clusters and WAL segments (no measurements)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the run directory (repositories, restored copies) after the run")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install missing packages")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run.py must run as root (it runs PostgreSQL as postgres and drops the page cache)")
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    b = Bench(args)
    started = time.monotonic()
    try:
        b.setup()
        if args.prepare:
            b.segments()
            b.cluster(b.small_scale, 55433).stop()
            return
        for sec in SECTIONS:
            if sec in only:
                try:
                    getattr(b, f"bench_{sec}")()
                except BenchError as e:
                    # keep going: the other sections' numbers are still worth reporting
                    log(f"section {sec} FAILED: {e}")
                    b.results["notes"].append(f"section `{sec}` failed: {str(e)[:1500]}")
                if sec == "archive" and "restore" not in only:
                    b.drop_archive_state()
    finally:
        stop_all()
        if not args.keep:
            for d in os.listdir(b.runduring):
                if d not in ("logs",):
                    rmtree(os.path.join(b.runduring, d))
            if getattr(b, "segrun", None):
                rmtree(b.segrun)
        b.results["elapsed_s"] = time.monotonic() - started
        with open(os.path.join(b.work, "results.json"), "w") as f:
            json.dump(b.results, f, indent=1, default=str)
    md = b.report()
    md += f"\nThe whole run took {(time.monotonic() - started) / 60:.1f} min.\n"
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
        log(f"wrote {args.out}")


RUNTMP = "/tmp"

if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        sys.exit(1)
