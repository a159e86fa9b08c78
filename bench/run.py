#!/usr/bin/env python3
"""walvault benchmark suite: walvault side by side with pgBackRest and PostgreSQL's own tools.

One command (as root, on a Debian 12 host with PostgreSQL 15):

    bench/run.py --out bench/RESULTS.md

See bench/README.md for what is measured and how. Python 3 standard library only. This file
parses the options and runs the sections; the rest lives beside it: common.py (processes,
measurement, stats), setup.py (packages, clusters, caches, segments, S3 server), one module per
section (archive.py, restore.py, backup.py, pitr.py, rss.py, https.py, spool.py, status.py,
retention.py) and report.py
(tables, ratios, targets).
"""

import argparse
import json
import os
import signal
import sys
import time

from archive import ArchiveSection
from backup import BackupSection
from encryption import EncryptionSection
from common import SECTIONS, BenchError, log, rmtree
from https import HttpsSection
from pitr import PitrSection
from report import Report
from restore import RestoreSection
from retention import RetentionSection
from rss import RssSection
from setup import Setup, on_signal, stop_all
from spool import SpoolSection
from status import StatusSection


class Bench(Setup, ArchiveSection, RestoreSection, BackupSection, PitrSection, RssSection, HttpsSection,
            SpoolSection, StatusSection, RetentionSection, EncryptionSection):
    """One run: Setup's directories, clusters and segments, one bench_<section>() per section."""

    # ---------------------------------------------------------------- report

    def report(self):
        return Report(self).render()


# --------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(
        description="Benchmark walvault against pgBackRest and PostgreSQL's own tools "
                    "(archive_command, restore_command, full/delta backup, PITR, peak RSS), and walvault's "
                    "wal-push CPU over https and its prefetch spool check. Run as root.")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run (default: all): {','.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 40 segments, scale 10 (RSS: scale 1 vs 10), 96 MiB of PITR WAL")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each backup and PITR restore (default 3)")
    ap.add_argument("--walvault", help="walvault binary (default: cargo build --release in the repository root)")
    ap.add_argument("--work", default="/var/tmp/walvault-bench",
                    help="work directory; cache/ keeps the clusters and segments between runs "
                         "(default /var/tmp/walvault-bench)")
    ap.add_argument("--out", help="write the markdown results to this file (also printed to stdout)")
    ap.add_argument("--segments", type=int, help="number of WAL segments (default 200, quick 40)")
    ap.add_argument("--scale", type=int, help="pgbench scale of the main cluster (default 100, quick 10)")
    ap.add_argument("--pitr-wal-mib", type=int, help="WAL to replay in the PITR test (default 600, quick 96)")
    ap.add_argument("--segments-dir",
                    help="where to cache the WAL segments (default: WORK/cache, or /dev/shm when the disk is short)")
    ap.add_argument("--prepare", action="store_true",
                    help="only create the cached clusters and WAL segments (no measurements)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the run directory (repositories, restored copies) after the run")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install missing packages")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run.py must run as root (it runs PostgreSQL as postgres and drops the page cache)")
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    b = Bench(args)
    started = time.monotonic()
    try:
        b.setup()
        if args.prepare:
            b.segments()
            b.cluster(b.small_scale, 55433).stop()
            return
        for sec in SECTIONS:
            if sec in only:
                try:
                    getattr(b, f"bench_{sec}")()
                except BenchError as e:
                    # keep going: the other sections' numbers are still worth reporting
                    log(f"section {sec} FAILED: {e}")
                    b.results["notes"].append(f"section `{sec}` failed: {str(e)[:1500]}")
                if sec == "archive" and "restore" not in only:
                    b.drop_archive_state()
    finally:
        stop_all()
        if not args.keep:
            for d in os.listdir(b.runduring):
                if d not in ("logs",):
                    rmtree(os.path.join(b.runduring, d))
            if getattr(b, "segrun", None):
                rmtree(b.segrun)
        b.results["elapsed_s"] = time.monotonic() - started
        with open(os.path.join(b.work, "results.json"), "w") as f:
            json.dump(b.results, f, indent=1, default=str)
    md = b.report()
    md += f"\nThe whole run took {(time.monotonic() - started) / 60:.1f} min.\n"
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        sys.exit(1)
