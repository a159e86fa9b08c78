"""Setup of the walvault benchmark (not a packaging script): PostgreSQL clusters and background
servers (started ones are stopped on exit), the work and cache directories, missing packages, the
walvault binary, machine facts, the cached pgbench clusters, the cached WAL segments and the write
workload that makes them, PGDATA-like directories, pgBackRest configurations, and the S3 server
(moto) and TLS terminator (socat) of the https section. `Setup` is the base of run.py's `Bench`;
the section mixins (archive.py, ..., https.py, spool.py) build on it.
"""

import atexit
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

import common
from common import (MiB, PG_USER, PGBIN, REPO_ROOT, SEG, BenchError, helpers_running, is_seg, listening,
                    log, mkdir_pg, pg_env, q, rmtree, run, seg_next, wait_for, write_pg)

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
    for p in list(SERVERS):
        stop_server(p)


# --------------------------------------------------------------------------------------------
# background servers (moto, socat)


SERVERS = []


def start_server(cmd, logfile, port, what, timeout=120):
    """Starts cmd (as root, output to logfile) and waits until it listens on 127.0.0.1:port."""
    with open(logfile, "a") as out:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    SERVERS.append(p)
    wait_for(lambda: p.poll() is not None or listening(port), timeout, f"{what} to listen on port {port}")
    if p.poll() is not None:
        SERVERS.remove(p)
        raise BenchError(f"{what} exited with {p.returncode} before listening; see {logfile}")
    return p


def stop_server(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in SERVERS:
        SERVERS.remove(p)


atexit.register(stop_all)


def on_signal(sig, _frame):
    stop_all()
    sys.exit(128 + sig)


# --------------------------------------------------------------------------------------------
# the bench's base: directories, binaries, clusters, segments, pgBackRest


class Setup:
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
        os.makedirs(self.work, exist_ok=True)
        os.chmod(self.work, 0o755)
        mkdir_pg(self.cache, 0o755)
        for d in os.listdir(self.work):  # run directories of runs that are gone
            if d.startswith("run-") and d[4:].isdigit() and not os.path.exists(f"/proc/{d[4:]}"):
                rmtree(os.path.join(self.work, d))
        rmtree(self.runduring_dir())
        mkdir_pg(self.runduring_dir(), 0o755)
        common.RUNTMP = mkdir_pg(self.p("tmp"))
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
        if missing:
            self.install(missing)

    def install(self, packages):
        cmd = ["apt-get", "install", "-y"] + packages
        if self.args.no_install:
            raise BenchError("missing packages; run: apt-get update && " + " ".join(cmd))
        log(f"installing {' '.join(packages)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(cmd, env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=True)
            subprocess.run(cmd, env=env, check=True)

    def socat_program(self):
        if not shutil.which("socat"):
            self.install(["socat"])
        return shutil.which("socat")

    def moto_program(self):
        """moto's S3 server: $WALVAULT_TEST_MOTO, the one integration/run.sh installs, one on
        PATH, else installed as run.sh does it (a venv and pip) into WORK/tools/venv."""
        venv = os.path.join(self.work, "tools", "venv")
        for cand in (os.environ.get("WALVAULT_TEST_MOTO"),
                     os.path.join(REPO_ROOT, ".test-tools", "venv", "bin", "moto_server"),
                     shutil.which("moto_server"), os.path.join(venv, "bin", "moto_server")):
            if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
        if self.args.no_install:
            raise BenchError(f"moto_server not found: set WALVAULT_TEST_MOTO, or let run.py install it into {venv}")
        if subprocess.run(["python3", "-c", "import venv, ensurepip"], capture_output=True).returncode != 0:
            self.install(["python3-venv"])
        log(f"installing moto (the S3 server) into {venv}")
        rmtree(venv)
        subprocess.run(["python3", "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "moto[server]>=5.1,<6"], check=True)
        return os.path.join(venv, "bin", "moto_server")

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

    def wait_pgbr_async_idle(self, base):
        # no pgbackrest archive-push async process left for this spool
        wait_for(lambda: not helpers_running(("pgbackrest", "async")), 120,
                 "pgBackRest async archiver to finish", interval=0.1)
