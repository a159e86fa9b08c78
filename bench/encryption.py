"""Encryption section: walvault plain and walvault with age encryption side by side, same data, one
run: archive_command throughput (serial wal-push of the cached segments), restore_command latency
(serial wal-fetch of them), a full backup of the main cluster and its backup-fetch (wall time and
peak RSS), and a PITR (`recover --start` to a time, exact) from each repository, the main cluster
archiving into both. Issue 16's targets: encrypted >= 0.85x plain speed, peak RSS within 10%.
"""

import os
import shutil
import time

from common import MiB, SEG, BenchError, drop_caches, log, med, mkdir_pg, must, rmtree, run, timed, write_pg
from archive import warm

# Archive rounds per variant, in alternating order.
ARCHIVE_ROUNDS = 2


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
            conf = os.path.join(base, f"{v}.toml")
            repo = os.path.join(base, f"repo-{v}")
            text = f'repo = "file://{repo}"\n'
            if v == "age":
                text += f'[encryption]\nrecipients = ["{recipient}"]\nidentity_file = ["{key}"]\n'
            write_pg(conf, text, 0o644)
            variants[v] = {"repo": repo, "conf": conf, "pgdata": os.path.join(base, f"pgdata-{v}")}
        res = {v: {} for v in variants}
        nbytes = len(names) * SEG
        # Archive rounds in alternating order (plain first, then age first), each into an empty
        # repository from a fresh PGDATA, so whatever the first variant leaves behind (writeback,
        # a warmer cache) weighs on both alike.
        archive = {v: {"lat": [], "secs": 0.0, "rss": 0} for v in variants}
        for rnd in range(ARCHIVE_ROUNDS):
            for v in (["plain", "age"] if rnd % 2 == 0 else ["age", "plain"]):
                d, a = variants[v], archive[v]
                log(f"encryption: archive round {rnd + 1}/{ARCHIVE_ROUNDS} ({v}) x {len(names)}")
                rmtree(d["repo"])
                mkdir_pg(d["repo"])
                self.fake_pgdata(d["pgdata"], segdir, names, ready=True)
                warm(segdir, names)
                start = time.monotonic()
                for n in names:
                    r = timed([self.wv, "--config", d["conf"], "wal-push", f"pg_wal/{n}"], cwd=d["pgdata"],
                              capture=False)
                    if r.rc != 0:
                        raise BenchError(f"wal-push ({v}) failed on {n} (exit {r.rc})")
                    a["lat"].append(r.wall * 1000)
                    a["rss"] = max(a["rss"], r.maxrss_kib)
                a["secs"] += time.monotonic() - start
        for v, a in archive.items():
            res[v]["archive"] = {"median_ms": med(a["lat"]), "rss_kib": a["rss"],
                                 "mib_s": ARCHIVE_ROUNDS * nbytes / MiB / a["secs"]}
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
        # From here on the main cluster archives into both repositories, so that the backups and
        # the PITR workload after them are recoverable from each.
        self.pitr_prepare(c)
        c.set("archive_command", " && ".join(
            f"{self.wv} -q --config {d['conf']} wal-push %p" for d in variants.values()))
        c.psql("SELECT pg_switch_wal()")
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
        w = self.pitr_workload(c, "archived into both repositories")
        for v in variants:
            res[v]["pitr"] = []
        for i in range(self.repeat):
            for v in (["plain", "age"] if i % 2 == 0 else ["age", "plain"]):
                log(f"encryption: PITR {i + 1}/{self.repeat} ({v})")
                r = self.pitr_walvault(i, w["target"], ["--config", variants[v]["conf"]], tag=f"encryption-{v}")
                r["marks_exact"] = r.pop("marks") == w["truth"]
                res[v]["pitr"].append(r)
                log(f"  restore {r['restore']:.1f} s + replay {r['replay']:.1f} s = {r['total']:.1f} s; "
                    f"marks exact: {r['marks_exact']}")
        c.set("archive_command", "/bin/true")
        c.psql("DROP TABLE IF EXISTS bench_walgen")
        self.results["sections"]["encryption"] = {"segments": len(names), "variants": res,
                                                  "pitr_wal_mib": w["wal_mib"]}
        rmtree(base)
