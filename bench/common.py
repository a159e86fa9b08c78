"""Shared pieces of the walvault benchmark (bench/run.py): paths and sizes, logging, running and
measuring processes (wait4() for wall time, CPU and peak RSS of a process tree), files owned by
postgres, WAL segment names, medians, and the /proc pollers for walvault's detached helpers.
Every other bench module imports from here; this module imports none of them.
"""

import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

PGBIN = "/usr/lib/postgresql/15/bin"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG = 16 * 1024 * 1024
MiB = 1024 * 1024
SECTIONS = ["archive", "restore", "backup", "pitr", "rss", "https", "spool", "status", "retention",
            "encryption"]
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
    process and every descendant it waited for), peak RSS in KiB (max over the same tree), and
    bytes the same tree read from storage (ru_inblock: page-cache hits are not counted)."""

    def __init__(self, rc, wall, cpu, maxrss_kib, out, err, read_bytes=0):
        self.rc, self.wall, self.cpu, self.maxrss_kib, self.out, self.err = rc, wall, cpu, maxrss_kib, out, err
        self.read_bytes = read_bytes


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
    return Timed(p.returncode, wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss, out, err, ru.ru_inblock * 512)


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


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


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


# scratch directory of timed()'s captured output; Setup.setup() points it into the run directory
RUNTMP = "/tmp"


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


# --------------------------------------------------------------------------------------------
# /proc: detached helpers


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
