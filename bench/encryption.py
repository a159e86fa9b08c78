"""Encryption section: walvault plain and walvault with age encryption side by side, same data, one
run: archive_command throughput (serial wal-push of the cached segments), restore_command latency
(serial wal-fetch of them), a full backup of the main cluster and its backup-fetch (wall time and
peak RSS). Issue 16's targets: encrypted >= 0.85x plain throughput, peak RSS within 10%.
"""

import os
import shutil
import time

from common import MiB, SEG, BenchError, drop_caches, log, med, mkdir_pg, must, rmtree, run, timed, write_pg
from archive import warm


class EncryptionSection:
    def bench_encryption(self):
        if shutil.which("age-keygen") is None:
            self.install(["age"])
        segdir, names = self.segments()
        c = self.main_cluster()
        base = mkdir_pg(self.p("encryption"), 0o755)
        key = os.path.join(base, "identity.key")
        recipient = run(["age-keygen", "-o", key], user=None).stderr.split("Public key:")[-1].strip()
        shutil.chown(key, "postgres", "postgres")
        os.chmod(key, 0o600)
        variants = {}
        for v in ["plain", "age"]:
            repo = mkdir_pg(os.path.join(base, f"repo-{v}"))
            conf = os.path.join(base, f"{v}.toml")
            text = f'repo = "file://{repo}"\n'
            if v == "age":
                text += f'[encryption]\nrecipients = ["{recipient}"]\nidentity_file = ["{key}"]\n'
            write_pg(conf, text, 0o644)
            pgdata = self.fake_pgdata(os.path.join(base, f"pgdata-{v}"), segdir, names, ready=True)
            variants[v] = {"repo": repo, "conf": conf, "pgdata": pgdata}
        res = {v: {} for v in variants}
        nbytes = len(names) * SEG
        # Interleaved per step, so load beside the run hits both variants alike.
        for v, d in variants.items():
            log(f"encryption: archive ({v}) x {len(names)}")
            warm(segdir, names)
            lat, rss = [], 0
            start = time.monotonic()
            for n in names:
                r = timed([self.wv, "--config", d["conf"], "wal-push", f"pg_wal/{n}"], cwd=d["pgdata"],
                          capture=False)
                if r.rc != 0:
                    raise BenchError(f"wal-push ({v}) failed on {n} (exit {r.rc})")
                lat.append(r.wall * 1000)
                rss = max(rss, r.maxrss_kib)
            total = time.monotonic() - start
            res[v]["archive"] = {"median_ms": med(lat), "mib_s": nbytes / MiB / total, "rss_kib": rss}
        for v, d in variants.items():
            log(f"encryption: restore ({v}) x {len(names)}")
            dest = mkdir_pg(os.path.join(base, f"restore-{v}"))
            lat, rss = [], 0
            start = time.monotonic()
            for n in names:
                r = timed([self.wv, "--config", d["conf"], "wal-fetch", "--prefetch", "0", n,
                           os.path.join(dest, n)], cwd=d["pgdata"], capture=False)
                if r.rc != 0:
                    raise BenchError(f"wal-fetch ({v}) failed on {n} (exit {r.rc})")
                os.unlink(os.path.join(dest, n))
                lat.append(r.wall * 1000)
                rss = max(rss, r.maxrss_kib)
            total = time.monotonic() - start
            res[v]["restore"] = {"median_ms": med(lat), "mib_s": nbytes / MiB / total, "rss_kib": rss}
        for v, d in variants.items():
            log(f"encryption: backup-push --full and backup-fetch ({v})")
            walls, fetch_walls, rss, fetch_rss = [], [], 0, 0
            for i in range(self.repeat):
                drop_caches()
                r = must(timed([self.wv, "-q", "--config", d["conf"], "backup-push", "--full"], env=c.env(),
                               cwd=c.base), f"walvault backup-push ({v})")
                walls.append(r.wall)
                rss = max(rss, r.maxrss_kib)
                target = os.path.join(base, f"fetched-{v}")
                rmtree(target)
                drop_caches()
                r = must(timed([self.wv, "-q", "--config", d["conf"], "backup-fetch", "LATEST", target],
                               cwd=base), f"walvault backup-fetch ({v})")
                fetch_walls.append(r.wall)
                fetch_rss = max(fetch_rss, r.maxrss_kib)
                rmtree(target)
            res[v]["backup"] = {"wall_s": walls, "rss_kib": rss}
            res[v]["fetch"] = {"wall_s": fetch_walls, "rss_kib": fetch_rss}
        self.results["sections"]["encryption"] = {"segments": len(names), "variants": res}
        rmtree(base)
