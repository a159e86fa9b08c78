"""Full and delta backup section: walvault backup-push, pgBackRest backup and pg_basebackup of the
main cluster with the page cache dropped before each, then delta/incr backups after touching ~3%
of the heap pages. Also the backup repositories (with an archive_command into both tools) that
the PITR section reuses.
"""

import json
import os

from common import (MiB, PGBIN, BenchError, drop_caches, du_bytes, ensure_free, log, mkdir_pg, must, rmtree, run,
                    timed)


class BackupSection:
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
