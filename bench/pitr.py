"""PITR section: fresh full backups by both tools, a write workload archived into both with a
side table of timed marks, then restores to a target time by `walvault recover --start` and by
pgBackRest restore + start, timed, with the recovered data checked for exactness. The redo
and wal-fetch times are read from the server logs.
"""

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import time

from common import (MiB, PG_USER, PGBIN, BenchError, drop_caches, ensure_free, log, mkdir_pg, must, pg_env,
                    rmtree, run, timed, wait_for)
from setup import STARTED, Cluster


class PitrSection:
    # ---------------------------------------------------------------- PITR

    def bench_pitr(self):
        c = self.main_cluster()
        self.db_repos()
        self.pitr_prepare(c)
        log("PITR: fresh full backups (walvault, pgBackRest)")
        wvb = self.backup_walvault("full")
        pbb = self.backup_pgbr("full")
        w = self.pitr_workload(c, "archived into both repositories")
        target_s, truth, wal_mib, wl_secs = w["target"], w["truth"], w["wal_mib"], w["workload_s"]
        res = {"walvault": [], "pgBackRest": []}
        for i in range(self.repeat):
            for t in (["walvault", "pgBackRest"] if i % 2 == 0 else ["pgBackRest", "walvault"]):
                log(f"PITR {i + 1}/{self.repeat}: {t}")
                r = (self.pitr_walvault(i, target_s, ["--repo", f"file://{self.db['wv_repo']}"])
                     if t == "walvault" else self.pitr_pgbr(i, target_s))
                r["marks_exact"] = r.pop("marks") == truth
                res[t].append(r)
                log(f"  restore {r['restore']:.1f} s + replay {r['replay']:.1f} s = {r['total']:.1f} s; "
                    f"marks exact: {r['marks_exact']}; {r['check']}")
        c.psql("DROP TABLE IF EXISTS bench_walgen")
        self.drop_db_repos()
        checks = {json.dumps(r["check"]) for t in res for r in res[t]}
        self.results["sections"]["pitr"] = {
            "target": target_s, "wal_mib": wal_mib, "workload_s": wl_secs, "marks_truth": len(truth),
            "tools": res, "consistent": len(checks) == 1,
            "backups": {"walvault": wvb, "pgBackRest": pbb}}
        if len(checks) != 1:
            self.results["notes"].append(f"PITR: recovered clusters differ: {sorted(checks)}")

    def pitr_prepare(self, c):
        """The side table of timed marks and the write workload's table, before the backups."""
        c.psql("CREATE TABLE IF NOT EXISTS bench_marks (id bigserial PRIMARY KEY, t timestamptz NOT NULL)")
        c.psql("TRUNCATE bench_marks")
        self.walgen_setup(c)
        c.psql("VACUUM (ANALYZE)")

    def pitr_workload(self, c, archived_into):
        """The write workload with a mark every ~50 ms until pitr_wal_mib of WAL are written, then a
        target time midway between two marks ~5 s before its end, the marks a recovery to it must
        hold (by commit timestamp), and the wait until the last segment is archived."""
        start_lsn = c.psql("SELECT pg_current_wal_lsn()")
        # marks writer: one row every ~50 ms, each its own transaction
        marks = subprocess.Popen(
            [f"{PGBIN}/psql", "-X", "-q", "-c",
             "DO $$ BEGIN LOOP INSERT INTO bench_marks(t) VALUES (clock_timestamp()); COMMIT; "
             "PERFORM pg_sleep(0.05); END LOOP; END $$"],
            env=c.env({"PGAPPNAME": "bench_marks"}), user=PG_USER, group=PG_USER, extra_groups=[],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target_bytes = self.pitr_wal_mib * MiB
        log(f"PITR: workload until {self.pitr_wal_mib} MiB of WAL are written ({archived_into})")
        wl_start = time.monotonic()
        self.walgen(c, lambda: int(c.psql(f"SELECT pg_current_wal_lsn() - '{start_lsn}'::pg_lsn")) >= target_bytes,
                    min_secs=20)
        wl_secs = time.monotonic() - wl_start
        end_ts = c.psql("SELECT clock_timestamp()")
        nmarks = int(c.psql("SELECT count(*) FROM bench_marks"))
        wait_for(lambda: int(c.psql("SELECT count(*) FROM bench_marks")) >= nmarks + 20, 60, "more marks")
        c.psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'bench_marks'")
        marks.wait()
        # target: midway between the two marks commits around 5 s before the end of the workload
        row = c.psql(
            "SELECT ct + (nxt - ct) / 2 FROM (SELECT pg_xact_commit_timestamp(xmin) AS ct, "
            "lead(pg_xact_commit_timestamp(xmin)) OVER (ORDER BY pg_xact_commit_timestamp(xmin)) AS nxt "
            f"FROM bench_marks) x WHERE ct <= timestamptz '{end_ts}' - interval '5 s' ORDER BY ct DESC LIMIT 1")
        target = dt.datetime.fromisoformat(row.replace(" ", "T")).astimezone(dt.timezone.utc)
        target_s = target.strftime("%Y-%m-%d %H:%M:%S.%f") + "+00:00"
        truth = [int(x) for x in c.psql(
            f"SELECT id FROM bench_marks WHERE pg_xact_commit_timestamp(xmin) <= '{target_s}' ORDER BY id").split()]
        wal_mib = int(c.psql(f"SELECT pg_current_wal_lsn() - '{start_lsn}'::pg_lsn")) / MiB
        last = c.psql("SELECT pg_walfile_name(pg_switch_wal())")
        log(f"PITR: target {target_s}; waiting for {last} to be archived")
        wait_for(lambda: (c.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") or "") >= last,
                 600, f"{last} to be archived", interval=0.2)
        return {"target": target_s, "truth": truth, "wal_mib": wal_mib, "workload_s": wl_secs}

    def pitr_check(self, port, sock):
        k = Cluster("", port, sock, "")
        accounts = k.psql("SELECT count(*) || ' ' || sum(abalance) FROM pgbench_accounts")
        hist = k.psql("SELECT count(*) FROM pgbench_history")
        walgen = k.psql("SELECT count(*) || ' ' || sum(abalance) FROM bench_walgen")
        marks = [int(x) for x in k.psql("SELECT id FROM bench_marks ORDER BY id").split()]
        return {"accounts": accounts, "history": int(hist), "walgen": walgen, "marks_rows": len(marks)}, marks

    def pitr_walvault(self, i, target, repo_args, tag="walvault"):
        """`walvault recover --start` of the repository `repo_args` names to `target`, timed and
        checked; `tag` names its directory and logs."""
        self.ensure_restore_space()
        d = self.p("pitr", f"{tag}-{i}")
        mkdir_pg(os.path.dirname(d), 0o755)
        rmtree(d)
        port = 55440
        drop_caches()
        r = must(timed([self.wv, *repo_args, "recover", "--pgdata", d,
                        "--target-time", target, "--start", "--port", str(port), "--socket-dir", self.sock,
                        "--pg-bin", PGBIN], env=pg_env(), cwd=self.p("pitr")), "walvault recover")
        k = Cluster(d, port, self.sock, "")
        STARTED.append(k)
        with open(os.path.join(self.logs, f"pitr-{tag}-{i}.log"), "w") as f:
            f.write(r.out + r.err)
        try:
            m = re.search(r"([0-9.]+) s in total \(([0-9.]+) s of recovery\)", r.out + r.err)
            replay = float(m.group(2)) if m else None
            if k.psql("SELECT pg_is_in_recovery()") != "f":
                raise BenchError("walvault recover returned but the server is still in recovery")
            check, marks = self.pitr_check(port, self.sock)
        finally:
            k.stop("immediate")
            server_log = os.path.join(d, "walvault-recover.log")
            kept_log = os.path.join(self.logs, f"pitr-{tag}-{i}.server.log")
            if os.path.exists(server_log):
                shutil.copy(server_log, kept_log)
        rmtree(d)
        total = r.wall
        return {"total": total, "replay": replay, "restore": total - replay if replay is not None else None,
                "cpu": r.cpu, "rss_kib": r.maxrss_kib, "check": check, "marks": marks,
                "redo": redo_usage(kept_log), "fetch_ms": wal_fetch_ms(kept_log)}

    def ensure_restore_space(self):
        size = int(self.main_cluster().psql("SELECT pg_database_size('postgres')"))
        ensure_free(self.work, int(size * 1.2) + 1024 * MiB, "a restored copy of the cluster")

    def pitr_pgbr(self, i, target):
        self.ensure_restore_space()
        d = self.p("pitr", f"pgbackrest-{i}")
        mkdir_pg(os.path.dirname(d), 0o755)
        rmtree(d)
        mkdir_pg(d)
        port = 55441
        drop_caches()
        r = must(timed(self.pgbr(self.db["conf"], f"--pg1-path={d}", "restore", "--type=time",
                                 f"'--target={target}'", "--target-action=promote"),
                       env=pg_env(), cwd=self.p("pitr")), "pgbackrest restore")
        k = Cluster(d, port, self.sock, os.path.join(self.logs, f"pitr-pgbackrest-{i}.log"))
        t0 = time.monotonic()
        run([f"{PGBIN}/pg_ctl", "-D", d, "-l", k.logfile, "-W",
             "-o", f"-p {port} -k {self.sock} -c listen_addresses='' -c archive_mode=off", "start"], env=k.env())
        STARTED.append(k)
        try:
            wait_for(k.running, 60, "the postmaster of pgBackRest's restored cluster")
            def promoted():
                p = run([f"{PGBIN}/psql", "-X", "-A", "-t", "-c", "SELECT pg_is_in_recovery()"],
                        env=k.env(), check=False)
                if p.returncode == 0 and p.stdout.strip() == "f":
                    return True
                if not k.running():
                    raise BenchError(f"recovered pgBackRest cluster stopped; see {k.logfile}")
                return False
            wait_for(promoted, 1800, "pgBackRest's restored cluster to finish recovery", interval=0.05)
            replay = time.monotonic() - t0
            check, marks = self.pitr_check(port, self.sock)
        finally:
            k.stop("immediate")
        rmtree(d)
        return {"total": r.wall + replay, "replay": replay, "restore": r.wall, "cpu": r.cpu,
                "rss_kib": r.maxrss_kib, "check": check, "marks": marks, "redo": redo_usage(k.logfile)}


def redo_usage(logfile):
    """(CPU s, elapsed s) of the startup process's redo, from the server log's "redo done" line."""
    try:
        text = open(logfile, errors="replace").read()
    except OSError:
        return None
    m = re.search(r"redo done at .*? CPU: user: ([0-9.]+) s, system: ([0-9.]+) s, elapsed: ([0-9.]+) s", text)
    return (float(m.group(1)) + float(m.group(2)), float(m.group(3))) if m else None


def wal_fetch_ms(logfile):
    """The time of every segment wal-fetch served during a recovery, as it logged it (in-process ms)."""
    try:
        text = open(logfile, errors="replace").read()
    except OSError:
        return []
    return [float(x) for x in re.findall(
        r"walvault wal-fetch: [0-9A-F]{24}: restored(?: from prefetch)? in ([0-9.]+) ms", text)]
