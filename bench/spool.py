"""Prefetch spool section: what wal-fetch's crc32 check of a spooled segment costs. walvault's own
prefetcher fills the spool, then the same spooled files are served twice over, alternating: named
as written (this boot: checked by their first page only, then renamed) and renamed to another
boot id (the content's crc32 is checked before the rename, as for a file a crash may have torn).
Then one file with a wrong checksum in its name shows which of the two paths reads the content.
"""

import os
import re

from common import SEG, BenchError, helpers_running, log, med, mkdir_pg, p95, rmtree, timed, wait_for

SERVED = re.compile(r"([0-9A-F]{24}): restored from prefetch in ([0-9.]+) ms")
VARIANTS = ("this boot: served by rename", "earlier boot: crc32 checked, then renamed")


class SpoolSection:
    # ---------------------------------------------------------------- prefetch spool check

    def bench_spool(self):
        segdir, names = self.segments()
        n = min(len(names) - 1, 20 if self.quick else 40)  # the prefetcher takes at most 64
        names = names[: n + 1]
        self.segrun = os.path.join(self.segbase, f"run-{os.getpid()}")
        pushdir = os.path.join(self.segrun, "spool-push")  # hard links: beside the cache
        repo = mkdir_pg(self.p("spool", "repo"))
        pgdata = self.fake_pgdata(self.p("spool", "pgdata"))
        saved = mkdir_pg(self.p("spool", "saved"))
        try:
            self.archive_for_spool(pushdir, segdir, names, repo)
            spooldir, files = self.fill_spool(pgdata, repo, names)
        finally:
            rmtree(pushdir)
        for f in files.values():
            os.link(os.path.join(spooldir, f), os.path.join(saved, f))
            os.unlink(os.path.join(spooldir, f))
        boot = boot_id()
        written_boot = {f.split(".")[2] for f in files.values() if f.count(".") == 2}
        if not boot or written_boot != {boot}:
            raise BenchError(f"the prefetcher named its files {sorted(files.values())[:2]}..., not with this "
                             f"boot's id {boot}: nothing to compare")
        other = "0" * 32 if boot != "0" * 32 else "1" * 32
        argv = [self.wv, "--repo", f"file://{repo}", "wal-fetch"]
        res = {v: {"wall_ms": [], "cpu_ms": [], "inproc_ms": []} for v in VARIANTS}
        log(f"spool: wal-fetch x {n} from the prefetch spool, {self.repeat} rounds of each variant in turn")
        for r in range(self.repeat):
            for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                place(saved, spooldir, files, boot if v == VARIANTS[0] else other)
                errlog = os.path.join(self.logs, f"spool-{r}-{VARIANTS.index(v)}.log")
                for seg in sorted(files):
                    t = self.fetch_one(argv, pgdata, seg, errlog)
                    res[v]["wall_ms"].append(t.wall * 1000)
                    res[v]["cpu_ms"].append(t.cpu * 1000)
                served = [float(m.group(2)) for m in map(SERVED.search, open(errlog)) if m]
                if len(served) != len(files):
                    raise BenchError(f"spool ({v}): {len(served)} of {len(files)} calls served from the spool; "
                                     f"see {errlog}")
                res[v]["inproc_ms"] += served
        checks = self.wrong_crc(argv, pgdata, saved, spooldir, files, boot, other)
        out = {"segments": n, "variants": {}, "checks": checks, "command": " ".join(argv + ["<segment>",
               "pg_wal/RECOVERYXLOG", "--prefetch", "0"])}
        for v, x in res.items():
            out["variants"][v] = dict(x, **{f"{k}_{s}": f(x[f"{k}_ms"]) for k in ("wall", "cpu", "inproc")
                                            for s, f in (("median", med), ("p95", p95))})
            log(f"  {v}: in-process median {med(x['inproc_ms']):.2f} ms, wall {med(x['wall_ms']):.1f} ms, "
                f"CPU {med(x['cpu_ms']):.1f} ms")
        log(f"  wrong checksum in the name: {checks}")
        self.results["sections"]["spool"] = out
        rmtree(self.p("spool"))

    def archive_for_spool(self, pushdir, segdir, names, repo):
        pg = self.fake_pgdata(os.path.join(pushdir, "pgdata"), segdir, names, ready=True)
        st = os.path.join(pg, "pg_wal", "archive_status")
        errlog = os.path.join(self.logs, "spool-push.log")
        for n in names:
            t = timed([self.wv, "--repo", f"file://{repo}", "wal-push", f"pg_wal/{n}"], cwd=pg, capture=False,
                      errfile=errlog)
            if t.rc != 0:
                raise BenchError(f"wal-push failed on {n} (exit {t.rc}); see {errlog}")
            os.rename(os.path.join(st, n + ".ready"), os.path.join(st, n + ".done"))
        wait_for(lambda: not helpers_running(("wal-push-ahead", repo)), 120, "the pusher to finish", interval=0.05)

    def fill_spool(self, pgdata, repo, names):
        """Fetches names[0] with a prefetch window of the rest and waits for walvault's prefetcher.
        Returns the spool directory and its files by segment."""
        n = len(names) - 1
        errlog = os.path.join(self.logs, "spool-fill.log")
        self.fetch_one([self.wv, "--repo", f"file://{repo}", "wal-fetch"], pgdata, names[0], errlog,
                       prefetch=n)
        wait_for(lambda: not helpers_running(("wal-prefetch", repo)), 300, "the prefetcher to finish", interval=0.05)
        top = os.path.join(pgdata, "walvault_spool", "prefetch")
        tags = os.listdir(top) if os.path.isdir(top) else []
        if len(tags) != 1:
            raise BenchError(f"expected one repository's directory in {top}, found {tags}; see {errlog}")
        spooldir = os.path.join(top, tags[0])
        files = {f.split(".")[0]: f for f in os.listdir(spooldir) if f.split(".")[0] in names}
        if sorted(files) != names[1:]:
            raise BenchError(f"the prefetcher spooled {len(files)} of {n} segments in {spooldir}; see {errlog}")
        return spooldir, files

    def fetch_one(self, argv, pgdata, seg, errlog, prefetch=0):
        t = timed(argv + [seg, "pg_wal/RECOVERYXLOG", "--prefetch", str(prefetch)], cwd=pgdata, capture=False,
                  errfile=errlog)
        dest = os.path.join(pgdata, "pg_wal", "RECOVERYXLOG")
        if t.rc != 0 or os.path.getsize(dest) != SEG:
            raise BenchError(f"wal-fetch {seg} failed (exit {t.rc}) or restored a wrong size; see {errlog}")
        os.unlink(dest)
        return t

    def wrong_crc(self, argv, pgdata, saved, spooldir, files, boot, other):
        """Serves the first segment under a name with a wrong checksum, as this boot's and as an
        earlier boot's file: whether each path was served from the spool shows which reads it."""
        seg = sorted(files)[0]
        _, crc, _ = files[seg].split(".")
        bad = f"{int(crc, 16) ^ 1:08x}"
        out = {}
        for key, b in (("this_boot_served", boot), ("earlier_boot_served", other)):
            os.link(os.path.join(saved, files[seg]), os.path.join(spooldir, f"{seg}.{bad}.{b}"))
            errlog = os.path.join(self.logs, f"spool-wrong-crc-{key}.log")
            self.fetch_one(argv, pgdata, seg, errlog)
            out[key] = any(SERVED.search(line) for line in open(errlog))
            for f in os.listdir(spooldir):
                if f.startswith(seg):
                    os.unlink(os.path.join(spooldir, f))
        return out


def place(saved, spooldir, files, boot):
    """Hard-links the saved spool files into the spool, named for `boot`."""
    for f in os.listdir(spooldir):
        if f != "lock":
            os.unlink(os.path.join(spooldir, f))
    for seg, f in files.items():
        _, crc, _ = f.split(".")
        os.link(os.path.join(saved, f), os.path.join(spooldir, f"{seg}.{crc}.{boot}"))


def boot_id():
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip().replace("-", "")
    except OSError:
        return None
