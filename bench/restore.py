"""restore_command section: the archive section's segments fetched back serially from every
tool's repository as recovery fetches them (page cache dropped first), then misses for the
segment after the last archived one once no background helper is left.
"""

import os
import time

from common import (MiB, SEG, BenchError, RssPoller, drop_caches, helpers_running, log, med, mkdir_pg,
                    p95, seg_next, timed, wait_for)


class RestoreSection:
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

    def wait_helpers_idle(self):
        # neither tool's background process (walvault's prefetcher, pgBackRest's async archive-get)
        wait_for(lambda: not helpers_running(("pgbackrest", "async"), ("walvault", "wal-prefetch")), 120,
                 "background helpers to finish", interval=0.05)
