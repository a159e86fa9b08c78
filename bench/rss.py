"""Peak RSS section: walvault backup-push --full and backup-fetch at two database sizes, to see
whether memory grows with the database.
"""

import os

from common import MiB, drop_caches, log, mkdir_pg, must, rmtree, timed


class RssSection:
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
