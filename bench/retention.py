#!/usr/bin/env python3
"""Retention section: what planning a `delete` costs over a million WAL objects.

A local repository is faked: N empty WAL objects on timeline 1 (listing reads names and sizes
only), and two full backups whose manifests say one starts at segment 16 and the other near the
end, so `delete --retain-full 1` must hold nearly every WAL object as one to delete. Measured:
wall time and peak RSS of `delete --retain-full 1 --dry-run --json` (the plan, with its proof
walk over every kept segment), and of `backup-list --json` over the same repository.

Standalone: `bench/retention.py --walvault target/release/walvault --objects 1000000`; inside the
suite: `bench/run.py --only retention`.
"""

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib

SEG_PER_LOG = 256  # 16 MiB segments


def codec(content):
    """An object in walvault's format, stored uncompressed (repo/codec.rs)."""
    head = b"WVLT" + bytes([1, 0, 0, 0]) + struct.pack("<Q", len(content))
    head += struct.pack("<I", zlib.crc32(head))
    body = b""
    if content:
        body = struct.pack("<II", len(content), len(content) | (1 << 31)) + content
    return head + body + struct.pack("<II", 0, zlib.crc32(content))


def seg_name(tli, segno):
    return f"{tli:08X}{segno // SEG_PER_LOG:08X}{segno % SEG_PER_LOG:08X}"


def manifest(name, segno, stop_time):
    lsn = segno * (16 << 20) + 0x28
    stop = lsn + 0x1000
    summary = {
        "format": 1, "name": name, "type": "full", "parent": None, "delta_depth": 0,
        "start_time": stop_time, "stop_time": stop_time,
        "start_lsn": f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}", "stop_lsn": f"{stop >> 32:X}/{stop & 0xFFFFFFFF:X}",
        "timeline": 1, "pg_version_num": 150000, "system_identifier": 1, "wal_segment_size": 16 << 20,
        "data_checksums": False, "original_size": 0, "stored_size": 0, "packs": 0,
        "page_checksum_failures": [], "backup_label": "", "tablespace_map": None, "tablespaces": [],
        "dirs": [], "files": [],
    }
    return codec(json.dumps(summary).encode())


def fake_repo(root, objects):
    """`objects` WAL objects and two full backups; returns the repository URL."""
    wal = os.path.join(root, "wal")
    os.makedirs(wal, exist_ok=True)
    for segno in range(1, objects + 1):
        open(os.path.join(wal, seg_name(1, segno)), "wb").close()
    for name, segno, when in (("base_20261101T000000Z_00000001_old", 16, "2026-11-01T00:00:00Z"),
                              ("base_20261130T000000Z_00000001_new", objects - 16, "2026-11-30T00:00:00Z")):
        d = os.path.join(root, "backups", name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "manifest"), "wb") as f:
            f.write(manifest(name, segno, when))
    return f"file://{root}"


def measure(walvault, url, args):
    """Wall seconds and peak RSS (KiB) of one walvault run."""
    start = time.monotonic()
    p = subprocess.Popen([walvault, "--repo", url, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate()
    wall = time.monotonic() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if p.returncode != 0:
        raise RuntimeError(f"walvault {' '.join(args)} failed: {err.decode()[-2000:]}")
    return {"wall_s": wall, "peak_rss_kib": rss, "stdout": out.decode()}


def run(walvault, objects, work):
    """Fakes the repository under `work` and measures; returns the results."""
    root = tempfile.mkdtemp(prefix="retention-", dir=work)
    started = time.monotonic()
    url = fake_repo(root, objects)
    fake_s = time.monotonic() - started
    # A fresh process per measurement: RUSAGE_CHILDREN's peak is the largest child so far, so the
    # smaller run goes first.
    listed = measure(walvault, url, ["backup-list", "--json"])
    planned = measure(walvault, url, ["delete", "--retain-full", "1", "--dry-run", "--json"])
    plan = json.loads(planned.pop("stdout"))
    listed.pop("stdout")
    subprocess.run(["rm", "-rf", root], check=True)
    return {"objects": objects, "fake_s": fake_s, "backup_list": listed, "delete_plan": planned,
            "wal_objects_to_delete": plan["delete"]["wal_objects"]}


def report(a):
    mib = lambda kib: kib / 1024  # noqa: E731
    return [f"## Retention plan over {a['objects']} WAL objects (local repository, faked)\n",
            "| command | wall s | peak RSS MiB |", "|---|---|---|",
            f"| `backup-list --json` | {a['backup_list']['wall_s']:.1f} | {mib(a['backup_list']['peak_rss_kib']):.0f} |",
            f"| `delete --retain-full 1 --dry-run --json` ({a['wal_objects_to_delete']} WAL objects to delete) "
            f"| {a['delete_plan']['wall_s']:.1f} | {mib(a['delete_plan']['peak_rss_kib']):.0f} |", ""]


class RetentionSection:
    """The suite's hook (bench/run.py): `bench_retention` stores its results for the report."""

    def bench_retention(self):
        objects = 100_000 if self.quick else 1_000_000
        self.results["sections"]["retention"] = run(self.wv, objects, self.p())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--walvault", required=True, help="walvault binary")
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--work", default="/var/tmp", help="where to fake the repository")
    args = ap.parse_args()
    print("\n".join(report(run(os.path.abspath(args.walvault), args.objects, args.work))))


if __name__ == "__main__":
    sys.exit(main())
