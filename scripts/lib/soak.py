#!/usr/bin/env python3
"""The fault soak's driver (scripts/soak.sh starts PostgreSQL and builds).

Three daemons, each with its own workbench and config, share one PostgreSQL
reached through PgBouncer (transaction pooling) and a latency proxy, and one
S3 server (s3s-fs) reached through a fault proxy; five states on a cron of
a few seconds. A chaos loop, seeded (the seed and every fault are printed,
so a failure replays), injects faults at random; then every fault is
undone, the daemons settle, get SIGTERM, and the invariants are checked
from the audit table, each workbench's history, the bucket's files, the
leases and every output. Prints one line per invariant with its count, the
totals, and exits 1 on any violation.

    soak.py --work DIR --bin BIN --minutes M --seed S
    env: OW_PG_HOST OW_PG_PORT OW_PG_USER OW_PG_PASSWORD OW_PG_CLUSTER
         ("<version> <name>"), OW_S3_ACCESS_KEY OW_S3_SECRET_KEY S3S_BIN
"""
import argparse
import asyncio
import collections
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

STATES = ["KY", "OH", "PA", "VA", "WV"]
DAEMONS = 3
CRON = "*/4 * * * * *"  # every 4 s
LEASE_TTL = 6
WEBHOOK_TOKEN = "soak-webhook-token-5f0e1d"
KINDS = [
    "pg_restart", "pgbouncer_restart", "s3_down", "s3_503", "s3_500", "s3_reset",
    "kill9_daemon", "kill9_run", "sighup_good", "sighup_broken", "full_disk",
    "slow_db", "data_change",
]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- proxies

class Proxy:
    """A TCP proxy with faults the chaos loop sets: `down` (refuse), a
    queue of per-connection HTTP faults (503 SlowDown, 500, a reset after
    the first bytes of the answer) and a delay on every chunk."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.port = free_port()
        self.down = False
        self.delay = 0.0
        self.faults = collections.deque()
        self.connections = 0

    async def handle(self, cr, cw):
        self.connections += 1
        if self.down:
            cw.close()
            return
        fault = self.faults.popleft() if self.faults else None
        if fault in ("503", "500"):
            try:
                await asyncio.wait_for(cr.readuntil(b"\r\n\r\n"), 10)
            except Exception:
                cw.close()
                return
            code, reason, err = (("503", "Slow Down", "SlowDown") if fault == "503"
                                 else ("500", "Internal Server Error", "InternalError"))
            body = f"<Error><Code>{err}</Code><Message>soak</Message></Error>".encode()
            cw.write(f"HTTP/1.1 {code} {reason}\r\nRetry-After: 1\r\nContent-Type: application/xml\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await cw.drain()
            cw.close()
            return
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cw.close()
            return
        # A reset cuts the request after 256 KiB (a part's body mid-way)
        # or the answer after 300 bytes, whichever comes first.
        up_cut, down_cut = (256 * 1024, 300) if fault == "reset" else (None, None)

        async def pump(r, w, limit=None):
            sent = 0
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    if limit is not None and sent + len(data) > limit:
                        w.write(data[: max(0, limit - sent)])
                        await w.drain()
                        w.transport.abort()
                        cw.transport.abort()
                        sw.transport.abort()
                        return
                    sent += len(data)
                    w.write(data)
                    await w.drain()
            except Exception:
                pass
            finally:
                try:
                    w.close()
                except Exception:
                    pass

        await asyncio.gather(pump(cr, sw, up_cut), pump(sr, cw, down_cut))


def start_proxies(proxies):
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def main():
        for p in proxies:
            await asyncio.start_server(p.handle, "127.0.0.1", p.port)
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True).start()
    ready.wait(10)


def start_webhook(port, received):
    """A receiver for the daemons' notifications (its token is a secret)."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            n = int(self.headers.get("Content-Length", 0))
            received.append((self.path, self.rfile.read(n)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()


# ---------------------------------------------------------------- the world

class World:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.bin = args.bin
        self.env = dict(os.environ)
        self.pg = dict(host=os.environ["OW_PG_HOST"], port=os.environ["OW_PG_PORT"],
                       user=os.environ["OW_PG_USER"], password=os.environ["OW_PG_PASSWORD"])
        self.cluster = os.environ["OW_PG_CLUSTER"].split()
        self.secrets = [self.pg["password"], os.environ["OW_S3_SECRET_KEY"], WEBHOOK_TOKEN]
        self.s3_port = free_port()
        self.s3_root = self.work / "s3"
        self.pgb_port = free_port()
        self.pgb_dir = self.work / "pgbouncer"
        self.s3 = None
        self.pgb = None
        self.daemons = [None] * DAEMONS
        self.stopped = [False] * DAEMONS  # killed on purpose, restart due
        self.exits = []                   # unexpected exits: (daemon, rc)
        self.outputs = []                 # files whose text must hold no secret
        self.timers = []                  # (due, name, action)
        self.faults = collections.Counter()
        self.skipped_kinds = set()
        self.webhooks = []
        self.tmpfs = None

    # ---- services
    def psql(self, sql, db="soak"):
        env = dict(self.env, PGPASSWORD=self.pg["password"])
        return subprocess.run(
            ["psql", "-X", "-q", "-At", "-h", self.pg["host"], "-p", self.pg["port"], "-U",
             self.pg["user"], "-d", db, "-v", "ON_ERROR_STOP=1", "-c", sql],
            env=env, capture_output=True, text=True, timeout=60)

    def start_s3(self):
        if self.s3 is not None and self.s3.poll() is None:
            return
        self.s3_root.mkdir(parents=True, exist_ok=True)
        out = open(self.work / "s3s.log", "a")
        self.s3 = subprocess.Popen(
            [os.environ["S3S_BIN"], "--host", "127.0.0.1", "--port", str(self.s3_port),
             "--access-key", os.environ["OW_S3_ACCESS_KEY"], "--secret-key",
             os.environ["OW_S3_SECRET_KEY"], str(self.s3_root)], stdout=out, stderr=out)
        wait_port(self.s3_port)

    def start_pgbouncer(self):
        self.pgb_dir.mkdir(parents=True, exist_ok=True)
        (self.pgb_dir / "userlist.txt").write_text(f'"{self.pg["user"]}" "{self.pg["password"]}"\n')
        (self.pgb_dir / "pgbouncer.ini").write_text(f"""[databases]
* = host=127.0.0.1 port={self.pg['port']}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.pgb_port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.pgb_dir}/userlist.txt
pool_mode = transaction
default_pool_size = 3
max_client_conn = 500
logfile = {self.pgb_dir}/pgbouncer.log
pidfile = {self.pgb_dir}/pgbouncer.pid
""")
        subprocess.run(["chown", "-R", "postgres", str(self.pgb_dir)], check=True)
        self.pgb = subprocess.Popen(["runuser", "-u", "postgres", "--", "/usr/sbin/pgbouncer",
                                     str(self.pgb_dir / "pgbouncer.ini")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.pgb_port)

    def stop_pgbouncer(self):
        pid_file = self.pgb_dir / "pgbouncer.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if self.pgb:
            self.pgb.wait(10)
        for _ in range(100):
            if not pid_file.exists() or not port_open(self.pgb_port):
                break
            time.sleep(0.05)

    # ---- daemons
    def config(self, i, broken=False):
        d = self.work / f"d{i}"
        text = f"""
[workbench]
dir = "{d}/wb"
lock_timeout_secs = 20
[source]
host = "127.0.0.1"
port = {self.pg_proxy.port}
database = "soak"
user = "{self.pg['user']}"
sslmode = "disable"
connect_timeout_secs = 5
[storage]
endpoint = "http://127.0.0.1:{self.s3_proxy.port}"
region = "us-east-1"
bucket = "soak"
prefix = "outreach"
path_style = true
request_timeout_secs = 20
part_size_mib = 5
[lease]
ttl_secs = {LEASE_TTL}
[retry]
attempts = 4
initial_backoff_secs = 0.5
max_backoff_secs = 4.0
[daemon]
max_concurrent_runs = 2
shutdown_grace_secs = 15
run_timeout_secs = 120
log_dir = "{d}/logs"
[metrics]
textfile = "{d}/metrics.prom"
[[notify]]
url_env = "SOAK_WEBHOOK"
on = ["failed", "gated", "abandoned", "cancelled", "recovered"]
format = "json"
[[schedule]]
states = {json.dumps(STATES)}
cron = "{CRON}"
timezone = "UTC"
"""
        if broken:
            text += "\n[[schedule]]\nstates = [\"XX\"]\ncron = \"not a cron\"\n"
        path = d / "config.toml"
        path.write_text(text)
        return path

    def daemon_env(self):
        return dict(self.env, NEON_PASSWORD=self.pg["password"],
                    B2_KEY_ID=os.environ["OW_S3_ACCESS_KEY"],
                    B2_APPLICATION_KEY=os.environ["OW_S3_SECRET_KEY"],
                    SOAK_WEBHOOK=f"http://127.0.0.1:{self.webhook_port}/hook/{WEBHOOK_TOKEN}")

    def start_daemon(self, i):
        d = self.work / f"d{i}"
        out_path = d / "daemon.out"
        self.outputs.append(out_path)
        out = open(out_path, "a")
        self.daemons[i] = subprocess.Popen([self.bin, "daemon", "--config", str(d / "config.toml")],
                                           stdout=out, stderr=out, env=self.daemon_env())
        self.stopped[i] = False

    def setup(self):
        # PgBouncer runs as postgres, from a folder in here.
        os.chmod(self.work, 0o755)
        (self.work / "s3" / "soak").mkdir(parents=True, exist_ok=True)
        self.start_s3()
        self.start_pgbouncer()
        self.pg_proxy = Proxy(self.pgb_port)
        self.s3_proxy = Proxy(self.s3_port)
        start_proxies([self.pg_proxy, self.s3_proxy])
        self.webhook_port = free_port()
        start_webhook(self.webhook_port, self.webhooks)
        for i in range(DAEMONS):
            (self.work / f"d{i}" / "wb").mkdir(parents=True, exist_ok=True)
            self.config(i)
        # The last daemon's workbench on a small tmpfs, for the full disk.
        wb = self.work / f"d{DAEMONS - 1}" / "wb"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(wb)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            self.tmpfs = wb
        else:
            self.skipped_kinds.add("full_disk")
            log(f"full_disk skipped: cannot mount a tmpfs ({r.stderr.strip()})")
        for i in range(DAEMONS):
            self.start_daemon(i)

    # ---- faults
    def after(self, secs, name, action):
        self.timers.append((time.monotonic() + secs, name, action))

    def run_timers(self, all_now=False):
        now = time.monotonic()
        due = [t for t in self.timers if all_now or t[0] <= now]
        self.timers = [t for t in self.timers if t not in due]
        for _, name, action in sorted(due, key=lambda t: t[0]):
            action()

    def supervise(self):
        """Restarts a daemon that exited on its own, as systemd would."""
        for i, p in enumerate(self.daemons):
            if p is not None and not self.stopped[i] and p.poll() is not None:
                self.exits.append((i, p.returncode))
                log(f"daemon {i} exited with {p.returncode}; restarted in 2 s")
                self.stopped[i] = True
                self.after(2, f"restart d{i}", lambda i=i: self.start_daemon(i))

    def inject(self, kind, rng):
        if kind in self.skipped_kinds:
            return
        detail = ""
        if kind == "pg_restart":
            subprocess.run(["pg_ctlcluster", self.cluster[0], self.cluster[1], "restart", "-m", "fast"],
                           capture_output=True, timeout=60)
        elif kind == "pgbouncer_restart":
            if self.pgb.poll() is not None:
                return  # down already
            self.stop_pgbouncer()
            secs = rng.uniform(0.5, 3)
            detail = f"back in {secs:.1f} s"
            self.after(secs, "pgbouncer up", self.start_pgbouncer)
        elif kind == "s3_down":
            if self.s3.poll() is not None:
                return  # down already
            self.s3.kill()
            self.s3.wait()
            secs = rng.uniform(1, 6)
            detail = f"back in {secs:.1f} s"
            self.after(secs, "s3 up", self.start_s3)
        elif kind in ("s3_503", "s3_500", "s3_reset"):
            n = rng.randint(1, 4)
            detail = f"next {n} connections"
            self.s3_proxy.faults.extend([kind[3:]] * n)
        elif kind == "kill9_daemon":
            i = rng.randrange(DAEMONS)
            p = self.daemons[i]
            if p is None or p.poll() is not None:
                return
            p.kill()
            p.wait()
            self.stopped[i] = True
            secs = rng.uniform(1, 5)
            detail = f"daemon {i}, restarted in {secs:.1f} s"
            self.after(secs, f"restart d{i}", lambda i=i: self.start_daemon(i))
        elif kind == "kill9_run":
            i = rng.randrange(DAEMONS)
            state = rng.choice(STATES)
            out_path = self.work / f"run-{len(self.outputs)}.out"
            self.outputs.append(out_path)
            out = open(out_path, "w")
            p = subprocess.Popen([self.bin, "run", "--state", state, "--config",
                                  str(self.work / f"d{i}" / "config.toml")],
                                 stdout=out, stderr=out, env=self.daemon_env())
            secs = rng.uniform(0.2, 2.5)
            detail = f"run --state {state} on d{i}'s workbench, killed after {secs:.1f} s"
            self.after(secs, "kill run", lambda p=p: (p.kill(), p.wait()))
        elif kind in ("sighup_good", "sighup_broken"):
            i = rng.randrange(DAEMONS)
            p = self.daemons[i]
            if p is None or p.poll() is not None:
                return
            self.config(i, broken=kind == "sighup_broken")
            p.send_signal(signal.SIGHUP)
            detail = f"daemon {i}"
            if kind == "sighup_broken":
                self.after(1.5, f"config d{i} good", lambda i=i: self.config(i))
        elif kind == "full_disk":
            filler = self.tmpfs / "filler"
            st = os.statvfs(self.tmpfs)
            free = st.f_bavail * st.f_frsize
            subprocess.run(["fallocate", "-l", str(max(free - 32 * 1024, 0)), str(filler)],
                           capture_output=True)
            secs = rng.uniform(2, 6)
            detail = f"daemon {DAEMONS - 1}'s workbench, for {secs:.1f} s"
            self.after(secs, "disk freed", lambda: filler.unlink(missing_ok=True))
        elif kind == "slow_db":
            self.pg_proxy.delay = rng.choice([0.05, 0.2, 0.5])
            secs = rng.uniform(2, 8)
            detail = f"{self.pg_proxy.delay * 1000:.0f} ms a chunk for {secs:.1f} s"
            self.after(secs, "db fast", lambda: setattr(self.pg_proxy, "delay", 0.0))
        elif kind == "data_change":
            state = rng.choice(STATES)
            r = self.psql(f"UPDATE marketing.company_master SET website_url = 'v{rng.randrange(10**6)}.example' "
                          f"WHERE company_unique_id IN (SELECT company_unique_id FROM marketing.company_master "
                          f"WHERE address_state = '{state}' ORDER BY random() LIMIT 3)")
            detail = f"{state} {'ok' if r.returncode == 0 else r.stderr.strip()}"
        self.faults[kind] += 1
        log(f"fault {kind} {detail}")

    def stop_all(self):
        """SIGTERM to every daemon; each must exit 0."""
        rcs = {}
        for i, p in enumerate(self.daemons):
            if p is None or p.poll() is not None:
                rcs[i] = None if p is None else p.returncode
                continue
            p.send_signal(signal.SIGTERM)
        for i, p in enumerate(self.daemons):
            if i in rcs:
                continue
            try:
                rcs[i] = p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                rcs[i] = "still running 60 s after SIGTERM"
        return rcs

    def cleanup(self):
        for p in self.daemons:
            if p and p.poll() is None:
                p.kill()
        if self.s3 and self.s3.poll() is None:
            self.s3.kill()
        self.stop_pgbouncer()
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.tmpfs)], capture_output=True)


def port_open(port):
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def wait_port(port):
    for _ in range(200):
        if port_open(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


# ---------------------------------------------------------------- invariants

def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")) if s else None


def check(w, rcs, stop_offsets):
    """Each invariant's violations, as lists of lines."""
    v = collections.OrderedDict((k, []) for k in range(1, 8))
    r = w.psql("SELECT coalesce(json_agg(json_build_object('id', id, 'type', event_type, 'd', details) "
               "ORDER BY id), '[]') FROM shq.audit_log")
    if r.returncode != 0:
        v[2].append(f"the audit table cannot be read: {r.stderr.strip()}")
        return v, {}
    rows = json.loads(r.stdout)
    (w.work / "audit.json").write_text(r.stdout)
    w.outputs.append(w.work / "audit.json")
    runs = [x["d"] for x in rows if x["type"] == "outreach_validation_run"]
    # 1. each (state, fire time) ran at most once across all hosts: ran,
    # that is got past its claims (a run that failed before them, say with
    # PostgreSQL down, ran nothing, and each host audits its own try)
    fires = collections.Counter((d["state"], d.get("fire_time")) for d in runs if d.get("fire_time"))
    ran = collections.defaultdict(list)
    for d in runs:
        if d.get("fire_time") and d.get("lease_acquired_at"):
            ran[(d["state"], d["fire_time"])].append(f"{d['run_id'][:8]} {d['status']}")
    v[1] += [f"{s} fire {f} ran {len(r)} times: {', '.join(r)}" for (s, f), r in ran.items() if len(r) > 1]
    # 2. every run started is audited exactly once
    audited = collections.Counter(d["run_id"] for d in runs)
    v[2] += [f"run {i} audited {n} times" for i, n in audited.items() if n > 1]
    started = {}
    for i in range(DAEMONS):
        out = subprocess.run([w.bin, "history", "--json", "--limit", "1000000", "--config",
                              str(w.work / f"d{i}" / "config.toml")], capture_output=True, text=True,
                             env=w.daemon_env())
        if out.returncode != 0:
            v[2].append(f"daemon {i}'s history cannot be read: {out.stderr.strip()}")
            continue
        (w.work / f"history-{i}.json").write_text(out.stdout)
        w.outputs.append(w.work / f"history-{i}.json")
        for e in json.loads(out.stdout):
            if not e["dry_run"]:
                started[e["run_id"]] = (i, e["state"], e["status"])
    for run_id, (i, state, status) in sorted(started.items()):
        if status == "running":
            v[2].append(f"run {run_id} of {state} (workbench {i}) still 'running' after the settle")
        elif run_id not in audited:
            v[2].append(f"run {run_id} of {state} (workbench {i}, {status}) is not in the audit")
    # 3. no two runs of one state overlap in time (lease to audit). A run
    # whose lease lapsed (its heartbeat could not reach PostgreSQL for the
    # TTL) and was taken over works on only until its next fence, which
    # stops it before it publishes: its span ends at the lapse, unknown
    # here, so it is left out and counted.
    def fenced(d):
        return "no longer holds the lease" in (d.get("error") or "")
    for state in STATES:
        spans = sorted((ts(d["lease_acquired_at"]), ts(d.get("finished_at")), d["run_id"])
                       for d in runs if d["state"] == state and d.get("lease_acquired_at")
                       and d.get("finished_at") and not fenced(d))
        for (a0, a1, ai), (b0, b1, bi) in zip(spans, spans[1:]):
            if b0 < a1:
                v[3].append(f"{state}: run {bi} took the lease at {b0} before run {ai} ended at {a1}")
    # 4. each state's objects equal its manifest; the manifest names the
    # state's last audited run that wrote one
    for state in STATES:
        folder = w.s3_root / "soak" / "outreach" / state.lower()
        manifest_path = folder / "_manifest.json"
        if not manifest_path.exists():
            continue
        m = json.loads(manifest_path.read_bytes())
        named = {}
        listed = m["files"] + m.get("changes", []) + m.get("retained_changes", [])
        for f in listed:
            path = w.s3_root / "soak" / f["key"]
            named[str(path)] = f
            if not path.exists():
                v[4].append(f"{state}: {f['key']} named by the manifest is missing")
                continue
            body = path.read_bytes()
            if hashlib.sha256(body).hexdigest() != f["sha256"] or len(body) != f["bytes"]:
                v[4].append(f"{state}: {f['key']} holds other bytes than the manifest says")
        by_id = {d["run_id"]: d for d in runs}
        writer = by_id.get(m["run_id"])
        for path in folder.rglob("*.parquet"):
            if str(path) in named:
                continue
            # A change set whose run died between its upload and its
            # manifest is deleted by the state's next publish: only the
            # last attempt, after the manifest's writer, may leave one.
            run_of = path.stem.split("_", 1)[-1]
            late = by_id.get(run_of)
            if ("changes" in path.parts and writer is not None and late is not None
                    and late.get("status") != "success"
                    and ts(late["started_at"]) > ts(writer["started_at"])):
                continue
            v[4].append(f"{state}: {path.relative_to(w.s3_root)} is not in the manifest")
        if writer is None:
            v[4].append(f"{state}: the manifest names run {m['run_id']}, which is not in the audit")
            continue
        since = ts(writer.get("finished_at") or writer.get("started_at"))
        later = [d["run_id"] for d in runs if d["state"] == state and d["status"] == "success"
                 and (d.get("manifest") or "").startswith("written") and ts(d["finished_at"]) > since]
        v[4] += [f"{state}: run {i} wrote a manifest after the one in the bucket ({m['run_id']})" for i in later]
    # 6. every daemon exits 0 on SIGTERM; no lease left to a dead process
    v[6] += [f"daemon {i} ended with {rc} on SIGTERM" for i, rc in rcs.items() if rc != 0]
    r = w.psql("SELECT state || ' ' || host || ' pid ' || pid FROM shq.outreach_leases WHERE expires_at > now()")
    v[6] += [f"lease of {line} still held after every process stopped" for line in r.stdout.splitlines()]
    # 7. no secret anywhere; no ERROR line for the planned stop
    files = list(w.outputs)
    for i in range(DAEMONS):
        d = w.work / f"d{i}"
        files += list((d / "logs").glob("*")) + [d / "metrics.prom"]
    for f in files:
        if not f.exists():
            continue
        text = f.read_text(errors="replace")
        for s in w.secrets:
            if s in text:
                v[7].append(f"a secret in {f}")
    for i, (path, offset) in stop_offsets.items():
        tail = path.read_text(errors="replace")[offset:]
        v[7] += [f"daemon {i} at its stop: {line.strip()}" for line in tail.splitlines() if " ERROR " in line]
    # 5. no unfinished multipart upload (s3s-fs keeps one as
    # .upload-<id>.json in its root until it is completed or aborted)
    v[5] += [f"unfinished multipart upload {p.name}" for p in w.s3_root.glob(".upload-*.json")]
    statuses = collections.Counter(d["status"] for d in runs)
    return v, dict(fires=len(fires), runs=sum(statuses.values()), statuses=statuses,
                   fenced=sum(1 for d in runs if fenced(d)))


NAMES = {
    1: "each (state, fire time) ran at most once across all hosts",
    2: "every run started is in the audit exactly once",
    3: "no two runs of one state overlap in time",
    4: "each state's objects equal its manifest, which names its last audited writer",
    5: "no unfinished multipart upload once S3 is back",
    6: "every daemon exits 0 on SIGTERM; no lease left to a dead process",
    7: "no secret in any output, log, metric or audit row; no ERROR line for a planned stop",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--minutes", type=float, default=2)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--settle", type=float, default=20)
    ap.add_argument("--weight", action="append", default=[], metavar="KIND=N",
                    help="draw KIND N times as often as the others (full_disk=3)")
    args = ap.parse_args()
    pool = list(KINDS)
    for w in args.weight:
        kind, _, n = w.partition("=")
        if kind not in KINDS or not n.isdigit():
            ap.error(f"--weight {w}: expected one of {', '.join(KINDS)} = a whole number")
        pool += [kind] * (int(n) - 1)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**9)
    log(f"soak: seed {seed}, {args.minutes} minutes, {DAEMONS} daemons, states {' '.join(STATES)}, cron '{CRON}'")
    weights = "".join(f" --weight {w}" for w in args.weight)
    log(f"replay: scripts/soak.sh --minutes {args.minutes:g} --seed {seed}{weights}")
    rng = random.Random(seed)
    w = World(args)
    try:
        w.setup()
        deadline = time.monotonic() + args.minutes * 60
        next_fault = time.monotonic() + 3
        while time.monotonic() < deadline:
            w.run_timers()
            w.supervise()
            if time.monotonic() >= next_fault:
                w.inject(rng.choice(pool), rng)
                next_fault = time.monotonic() + rng.uniform(1, 4)
            time.sleep(0.1)
        log("chaos over: every fault undone; settling")
        w.run_timers(all_now=True)
        w.s3_proxy.faults.clear()
        w.pg_proxy.delay = 0
        for i in range(DAEMONS):
            w.config(i)
            if w.stopped[i]:
                w.start_daemon(i)
        settle_end = time.monotonic() + args.settle
        while time.monotonic() < settle_end:
            w.supervise()
            w.run_timers()
            time.sleep(0.2)
        stop_offsets = {i: (w.work / f"d{i}" / "daemon.out",
                            (w.work / f"d{i}" / "daemon.out").stat().st_size) for i in range(DAEMONS)}
        rcs = w.stop_all()
        v, totals = check(w, rcs, stop_offsets)
    finally:
        w.cleanup()
    bad = 0
    print()
    for k, lines in v.items():
        bad += len(lines)
        print(f"invariant {k} ({NAMES[k]}): {len(lines)} violation(s)")
        for line in lines[:20]:
            print(f"    {line}")
    print(f"fires {totals.get('fires', 0)}, audited runs {totals.get('runs', 0)}: "
          + ", ".join(f"{s} {n}" for s, n in sorted(totals.get("statuses", {}).items()))
          + f"; stopped by their lease's fence {totals.get('fenced', 0)}")
    print("faults: " + ", ".join(f"{k} {w.faults[k]}" for k in KINDS)
          + (f" (skipped: {', '.join(sorted(w.skipped_kinds))})" if w.skipped_kinds else ""))
    print(f"daemon exits outside the final stop (restarted): {w.exits or 'none'}; "
          f"notifications received: {len(w.webhooks)}")
    print(f"seed {seed}: {'OK' if bad == 0 else f'{bad} VIOLATION(S)'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
