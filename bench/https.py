"""S3 over https section: CPU per wal-push call against a local S3 server (moto) behind a TLS
terminator (socat, with a CA and server certificate made here by the openssl CLI), against the
same server over plain http (through a plain socat forwarder, so both paths have the same hop),
the variants called in turn segment by segment so they share the machine's load. Each call
stores only its own segment (`--concurrency 1`, no other `.ready` file): no push-ahead.
"""

import os
import subprocess
import urllib.request

from common import (BenchError, free_port, log, med, mkdir_pg, p95, pg_env, rmtree, timed,
                    write_pg)
from setup import start_server, stop_server

BUCKET = "walvault-bench"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class HttpsSection:
    # ---------------------------------------------------------------- wal-push over https

    def bench_https(self):
        segdir, names = self.segments()
        names = names[: 20 if self.quick else 50]
        moto, socat = self.moto_program(), self.socat_program()
        self.segrun = os.path.join(self.segbase, f"run-{os.getpid()}")
        base = mkdir_pg(os.path.join(self.segrun, "https"), 0o755)  # hard links: beside the cache
        certs = mkdir_pg(self.p("https-certs"), 0o755)
        ca, server_pem, server_key = make_certs(certs)
        # The system bundle with the bench's CA appended: what a host trusting its usual roots
        # loads (SSL_CERT_FILE names one file, so the CA cannot be added beside it).
        bundle = os.path.join(certs, "system-bundle-and-ca.pem")
        with open(bundle, "w") as out:
            for f in (SYSTEM_BUNDLE, ca):
                if os.path.exists(f):
                    out.write(open(f).read())
        os.chmod(bundle, 0o644)
        ncerts = open(bundle).read().count("BEGIN CERTIFICATE")
        servers = []
        try:
            moto_port, tls_port, plain_port = free_port(), free_port(), free_port()
            servers.append(start_server([moto, "-H", "127.0.0.1", "-p", str(moto_port)],
                                        os.path.join(self.logs, "moto.log"), moto_port, "moto"))
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{moto_port}/{BUCKET}", method="PUT"),
                                   timeout=30).close()
            servers.append(start_server(
                [socat, f"OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,cert={server_pem},"
                        f"key={server_key},verify=0", f"TCP:127.0.0.1:{moto_port}"],
                os.path.join(self.logs, "socat-tls.log"), tls_port, "socat (TLS)"))
            servers.append(start_server(
                [socat, f"TCP-LISTEN:{plain_port},bind=127.0.0.1,reuseaddr,fork", f"TCP:127.0.0.1:{moto_port}"],
                os.path.join(self.logs, "socat-plain.log"), plain_port, "socat (plain)"))
            variants = {
                "http": (f"http://127.0.0.1:{plain_port}", None),
                "https, SSL_CERT_FILE = the CA alone": (f"https://127.0.0.1:{tls_port}", ca),
                f"https, SSL_CERT_FILE = system bundle + CA ({ncerts} certificates)": (
                    f"https://127.0.0.1:{tls_port}", bundle),
            }
            res = self.push_in_turn(base, segdir, names, variants)
        finally:
            for s in servers:
                stop_server(s)
            rmtree(base)
        self.results["sections"]["https"] = {"segments": len(names), "variants": res}

    def push_in_turn(self, base, segdir, names, variants):
        runs = {}
        for i, (v, (endpoint, cafile)) in enumerate(variants.items()):
            pgdata = self.fake_pgdata(os.path.join(base, f"v{i}", "pgdata"), segdir, names)
            env = pg_env({"WALVAULT_S3_ENDPOINT": endpoint, "WALVAULT_S3_FORCE_PATH_STYLE": "true",
                          "WALVAULT_S3_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "bench",
                          "AWS_SECRET_ACCESS_KEY": "bench", "AWS_EC2_METADATA_DISABLED": "true"})
            if cafile:
                env["SSL_CERT_FILE"] = cafile
            repo = f"s3://{BUCKET}/v{i}-{os.getpid()}"
            errlog = os.path.join(self.logs, f"https-v{i}.log")
            runs[v] = {"pgdata": pgdata, "env": env, "errlog": errlog, "cpu_ms": [], "wall_ms": [], "rss": 0,
                       "command": f"{self.wv} --repo {repo} wal-push --concurrency 1 pg_wal/<segment>",
                       "argv": [self.wv, "--repo", repo, "wal-push", "--concurrency", "1"],
                       "endpoint": endpoint, "cafile": cafile}
        log(f"https: wal-push x {len(names)} per variant, in turn: {', '.join(variants)}")
        order = list(variants)
        for k, n in enumerate(names):
            # each variant goes first as often as the others
            for v in order[k % len(order):] + order[: k % len(order)]:
                r = runs[v]
                st = os.path.join(r["pgdata"], "pg_wal", "archive_status")
                write_pg(os.path.join(st, n + ".ready"), "")
                t = timed(r["argv"] + [f"pg_wal/{n}"], cwd=r["pgdata"], env=r["env"], capture=False,
                          errfile=r["errlog"])
                if t.rc != 0:
                    raise BenchError(f"wal-push ({v}) failed on {n} (exit {t.rc}); see {r['errlog']}")
                os.rename(os.path.join(st, n + ".ready"), os.path.join(st, n + ".done"))
                r["cpu_ms"].append(t.cpu * 1000)
                r["wall_ms"].append(t.wall * 1000)
                r["rss"] = max(r["rss"], t.maxrss_kib)
        res = {}
        for v, r in runs.items():
            stored = sum(": stored " in line for line in open(r["errlog"]))
            if stored != len(names):
                # a call served by push-ahead or "already archived" would not measure a store
                raise BenchError(f"wal-push ({v}): {stored} of {len(names)} calls logged a store; see {r['errlog']}")
            res[v] = {"cpu_ms": r["cpu_ms"], "wall_ms": r["wall_ms"], "cpu_median": med(r["cpu_ms"]),
                      "cpu_p95": p95(r["cpu_ms"]), "wall_median": med(r["wall_ms"]), "wall_p95": p95(r["wall_ms"]),
                      "peak_rss_kib": r["rss"], "command": r["command"], "endpoint": r["endpoint"],
                      "ssl_cert_file": r["cafile"]}
            log(f"  {v}: CPU median {med(r['cpu_ms']):.1f} ms, p95 {p95(r['cpu_ms']):.1f} ms; "
                f"wall median {med(r['wall_ms']):.1f} ms")
        return res


def make_certs(d):
    """A CA and a server certificate for IP 127.0.0.1 signed by it (rustls refuses a CA
    certificate as the server's own). Returns the CA, server certificate and key paths."""
    ca, ca_key = os.path.join(d, "ca.pem"), os.path.join(d, "ca.key")
    pem, key, csr = os.path.join(d, "server.pem"), os.path.join(d, "server.key"), os.path.join(d, "server.csr")
    ext = os.path.join(d, "server.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    for cmd in (
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=walvault bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", pem,
         "-days", "2", "-extfile", ext],
    ):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} failed: {p.stderr[-2000:]}")
    os.chmod(ca, 0o644)  # walvault runs as postgres
    os.chmod(ca_key, 0o600)
    os.chmod(key, 0o600)
    return ca, pem, key
