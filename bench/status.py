"""Status section: what `walvault status` and `walvault metrics` cost on a repository with many
WAL objects. A few real segments are archived with wal-push (identity, summaries, status/wal), then
the stored object of one of them is hard-linked under 100k further segment names (quick: 10k), so
listing sees a long archive without the disk it would take. Both commands run a few times each,
measured with wait4(): wall time, CPU and peak RSS. Neither may read a WAL object.
"""

import os

from common import BenchError, log, med, mkdir_pg, rmtree, timed

OBJECTS = 100_000
OBJECTS_QUICK = 10_000


def segment_name(tli, segno, per_xlogid=256):
    return f"{tli:08X}{segno // per_xlogid:08X}{segno % per_xlogid:08X}"


class StatusSection:
    # ---------------------------------------------------------------- status / metrics cost

    def bench_status(self):
        segdir, names = self.segments()
        real = names[:3]
        repo = mkdir_pg(self.p("status", "repo"))
        pg = self.fake_pgdata(self.p("status", "pgdata"), segdir, real, ready=False)
        argv = [self.wv, "--repo", f"file://{repo}"]
        errlog = os.path.join(self.logs, "status.log")
        for n in real:
            t = timed(argv + ["wal-push", f"pg_wal/{n}"], cwd=pg, capture=False, errfile=errlog)
            if t.rc != 0:
                raise BenchError(f"wal-push failed on {n} (exit {t.rc}); see {errlog}")
        n = OBJECTS_QUICK if self.quick else OBJECTS
        # Linked from each stored segment in turn: one inode takes at most 65000 links (ext4).
        stored = [os.path.join(repo, "wal", r) for r in real]
        tli = int(real[0][:8], 16)
        first = int(real[-1][8:16], 16) * 256 + int(real[-1][16:], 16) + 1
        log(f"status: hard-linking {n} fake WAL objects")
        for i in range(n):
            os.link(stored[i % len(stored)], os.path.join(repo, "wal", segment_name(tli, first + i)))
        out = {"objects": n + len(real), "commands": {}}
        for cmd in (["status", "--json"], ["metrics"]):
            runs = []
            for _ in range(self.repeat):
                t = timed(argv + cmd, cwd=repo)
                if t.rc != 0:
                    raise BenchError(f"walvault {' '.join(cmd)} failed (exit {t.rc}): {t.err[-2000:]}")
                runs.append(t)
            name = " ".join(cmd)
            out["commands"][name] = {
                "wall_s": [r.wall for r in runs], "cpu_s": [r.cpu for r in runs],
                "maxrss_kib": [r.maxrss_kib for r in runs],
                "wall_median": med([r.wall for r in runs]), "maxrss_median_mib": med([r.maxrss_kib for r in runs]) / 1024,
            }
            log(f"  walvault {name}: median {med([r.wall for r in runs]):.2f} s, "
                f"peak RSS {med([r.maxrss_kib for r in runs]) / 1024:.0f} MiB")
        self.results["sections"]["status"] = out
        rmtree(self.p("status"))
