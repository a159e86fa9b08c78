"""archive_command section: every tool's archive command called serially on the cached segments,
as PostgreSQL's archiver calls it (cwd a PGDATA-like directory, .ready renamed to .done), with
per-call latency, throughput, stored size and peak RSS (the detached pusher's from /proc).
Its repositories stay in `archive_state` for the restore section.
"""

import os
import time

from common import MiB, SEG, BenchError, RssPoller, du_bytes, log, med, mkdir_pg, p95, rmtree, timed


class ArchiveSection:
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

    def drop_archive_state(self):
        if hasattr(self, "archive_state"):
            rmtree(self.p("archive"))
            rmtree(self.p("restore"))
            rmtree(self.segrun)
            del self.archive_state


def warm(directory, names):
    """Reads the files into the page cache, where PostgreSQL's just-written segments are when its
    archiver calls archive_command: every tool starts the archive loop from the same state,
    whatever an earlier section (or run) evicted."""
    buf = bytearray(MiB)
    for n in names:
        with open(os.path.join(directory, n), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
