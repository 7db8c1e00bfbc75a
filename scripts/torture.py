#!/usr/bin/env python3
"""Torture bkp the way a bad night does: SIGKILLs during backups and prunes, 30 days of daily
backups with forget + prune and re-backups of old days, concurrent backups with prunes, and
(with --s3) all of it against a real S3 server behind a proxy that resets and delays some
connections. After every step every snapshot is restored and checked against the dump it was
made from. Prints trials, broken snapshots, hangs and lost data; exits non-zero if any.

Run by scripts/torture.sh (which builds bkp and installs faketime); not part of CI.
Time passes for prune through faketime: every command of a simulated day runs with the same
clock offset, so grace periods behave as they do in production.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG = 300  # seconds: a command running this long is a hang


class Tally:
    def __init__(self):
        self.counts = {}
        self.notes = []

    def add(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n

    def note(self, text):
        self.notes.append(text)
        print("  !", text, flush=True)


T = Tally()


class Bkp:
    def __init__(self, bkp, location, env_extra=None):
        self.bkp = bkp
        self.env = dict(os.environ)
        self.env.update({
            "BKP_REPOSITORY": location,
            "BKP_PASSWORD": "torture",
            "BKP_INSECURE_FAST_KDF": "1",
        })
        self.env.update(env_extra or {})
        self.expected = {}  # snapshot id -> sha256 of its dump
        self.forgotten = set()

    def argv(self, args, days=0):
        argv = [self.bkp] + args
        if days:
            argv = ["faketime", "-f", "+%dd" % days] + argv
        return argv

    def run(self, args, stdin=None, days=0, timeout=HANG):
        """Runs bkp; returns (code, stdout, stderr); a hang is counted and killed."""
        try:
            with open(stdin, "rb") if stdin else open(os.devnull, "rb") as inp:
                p = subprocess.run(self.argv(args, days), stdin=inp, capture_output=True,
                                   env=self.env, timeout=timeout)
            return p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired:
            T.add("hangs")
            T.note("hang: bkp %s" % " ".join(args))
            return None, b"", b""

    def spawn(self, args, stdin, days=0):
        return subprocess.Popen(self.argv(args, days), stdin=open(stdin, "rb"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)

    def snapshots(self, days=0):
        code, out, err = self.run(["snapshots", "--json"], days=days)
        if code != 0:
            T.add("failed listings")
            T.note("snapshots failed: %s" % err.decode(errors="replace").strip())
            return []
        return [s["id"] for s in json.loads(out)]

    def record(self, out, dump):
        try:
            sid = json.loads(out)["snapshot_id"]
        except (ValueError, KeyError):
            return None
        self.expected[sid] = sha256(dump)
        return sid

    def backup(self, dump, days=0, tag="t"):
        code, out, err = self.run(["backup", "--json", "--quiet", "--tag", tag], stdin=dump, days=days)
        if code == 0:
            return self.record(out, dump)
        T.add("failed backups")
        T.note("backup failed (%s): %s" % (code, err.decode(errors="replace").strip()[:300]))
        return None

    def verify(self, days=0, what=""):
        """Restores every listed snapshot; counts broken and lost ones."""
        listed = self.snapshots(days)
        for sid in listed:
            T.add("restores")
            try:
                p = subprocess.run(self.argv(["restore", "--quiet", sid], days), capture_output=True,
                                   env=self.env, timeout=HANG)
            except subprocess.TimeoutExpired:
                T.add("hangs")
                T.note("hang: restore %s %s" % (sid[:8], what))
                continue
            digest = hashlib.sha256(p.stdout).hexdigest()
            if p.returncode != 0 or (sid in self.expected and digest != self.expected[sid]):
                T.add("broken snapshots")
                T.note("broken snapshot %s %s: rc %s %s" % (
                    sid[:8], what, p.returncode, p.stderr.decode(errors="replace").strip()[:300]))
        for sid in self.expected:
            if sid not in listed and sid not in self.forgotten:
                T.add("lost snapshots")
                T.note("lost snapshot %s %s" % (sid[:8], what))
                self.forgotten.add(sid)  # count once

    def forget_keep_last(self, n, days=0, group_by=None):
        args = ["forget", "--json", "--keep-last", str(n)]
        if group_by:
            args += ["--group-by", group_by]
        code, out, err = self.run(args, days=days)
        if code != 0:
            T.note("forget failed: %s" % err.decode(errors="replace").strip())
            return
        for group in json.loads(out)["groups"]:
            self.forgotten |= {s["id"] for s in group["snapshots"] if not s["keep"]}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_dumps(gen, work, size, days):
    paths = []
    for day in range(1, days + 1):
        path = os.path.join(work, "day%02d.sql" % day)
        if not os.path.exists(path):
            with open(path, "wb") as out:
                subprocess.run([gen, str(size), str(day)], stdout=out, check=True)
        paths.append(path)
    return paths


def kill_trials(b, dumps, trials, rng, what):
    """SIGKILLs backups at random moments; after each, everything restores."""
    for i in range(trials):
        dump = dumps[rng.randrange(len(dumps))]
        p = b.spawn(["backup", "--json", "--quiet", "--tag", "kill"], dump)
        time.sleep(rng.uniform(0.0, 0.6))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate()
        T.add("backup kills")
        if p.returncode == 0:
            b.record(out, dump)
        if i % 10 == 9 or i == trials - 1:
            b.verify(what="after backup kill %d (%s)" % (i, what))
    if b.backup(dumps[0]) is None:
        T.note("backup after the kills failed (%s)" % what)
    b.verify(what="after the kills (%s)" % what)


def prune_kill_trials(b, dumps, trials, rng, what, use_time=True):
    """SIGKILLs prunes (marking and deleting, with repack) at random moments."""
    day = 0
    for i in range(trials):
        # Some new data, a forget, then a prune killed midway; days pass so both phases run.
        b.backup(dumps[rng.randrange(len(dumps))], days=day)
        b.forget_keep_last(2, days=day)
        if use_time:
            day += 2
        p = subprocess.Popen(b.argv(["prune", "--quiet"], day), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=b.env)
        time.sleep(rng.uniform(0.0, 0.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
        T.add("prune kills")
        b.verify(days=day, what="after prune kill %d (%s)" % (i, what))
    final = day + 2 if use_time else 0
    code, _, err = b.run(["prune", "--quiet"], days=final)
    if code != 0:
        T.note("prune after the kills failed: %s" % err.decode(errors="replace").strip())
    code, out, _ = b.run(["check", "--read-data"], days=final)
    if code != 0:
        T.add("check failures")
        T.note("check after prune kills (%s): %s" % (what, out.decode(errors="replace")[-500:]))
    b.verify(days=final, what="after the prune kills (%s)" % what)


def thirty_days(b, dumps, what, use_time=True):
    """Daily backups with forget --keep-last 7 and prune, then old days backed up again."""
    for day in range(1, 31):
        d = day if use_time else 0
        b.backup(dumps[(day - 1) % len(dumps)], days=d)
        b.forget_keep_last(7, days=d)
        code, _, err = b.run(["prune", "--quiet"], days=d)
        if code != 0:
            T.note("prune on day %d failed: %s" % (day, err.decode(errors="replace").strip()))
        T.add("daily cycles")
    b.verify(days=31 if use_time else 0, what="after 30 days (%s)" % what)
    for day in range(2, 9):  # a rollback of the database: old days again
        b.backup(dumps[day - 1], days=31 if use_time else 0)
    b.verify(days=31 if use_time else 0, what="after re-backups of old days (%s)" % what)
    code, out, _ = b.run(["check", "--read-data"], days=31 if use_time else 0)
    if code != 0:
        T.add("check failures")
        T.note("check after 30 days (%s): %s" % (what, out.decode(errors="replace")[-500:]))


def concurrent(b, dumps, rounds, what, use_time=True):
    """Three backup loops at once and a prune loop (default grace, clocks moving an hour a
    round): every backup either records a snapshot that restores or fails loudly."""
    stop = threading.Event()

    def backups(k):
        rng = random.Random(k)
        for _ in range(rounds):
            dump = dumps[rng.randrange(len(dumps))]
            code, out, err = b.run(["backup", "--json", "--quiet", "--tag", "c%d" % k], stdin=dump)
            T.add("concurrent backups")
            if code == 0:
                b.record(out, dump)
            else:
                T.add("concurrent backups failed loudly")

    def prunes():
        n = 0
        while not stop.is_set():
            b.forget_keep_last(2, group_by="tags")
            b.run(["prune", "--quiet"])
            n += 1
            T.add("concurrent prunes")

    workers = [threading.Thread(target=backups, args=(k,)) for k in range(3)]
    pruner = threading.Thread(target=prunes)
    for w in workers + [pruner]:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    pruner.join()
    b.verify(what="after concurrent backups (%s)" % what)
    if use_time:
        b.run(["prune", "--quiet"], days=2)
        b.run(["prune", "--quiet"], days=4)
        b.verify(days=4, what="after concurrent backups and later prunes (%s)" % what)


class FaultyProxy(threading.Thread):
    """Forwards to the S3 server; resets a few percent of connections mid-stream, delays some."""

    def __init__(self, upstream, rng, reset=0.03, delay=0.05):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.upstream, self.rng, self.reset, self.delay = upstream, rng, reset, delay
        self.faults = 0

    def run(self):
        while True:
            client, _ = self.sock.accept()
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            fault = self.rng.random()
            cut = None
            if fault < self.reset:
                cut = self.rng.randrange(1, 400_000)
                self.faults += 1
            elif fault < self.reset + self.delay:
                time.sleep(self.rng.uniform(0.1, 1.5))
                self.faults += 1
            threading.Thread(target=self.pipe, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self.pipe, args=(server, client, None), daemon=True).start()

    @staticmethod
    def pipe(a, b, cut):
        sent = 0
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if cut is not None and sent + len(data) > cut:
                    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    break
                b.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass


def start_s3(work):
    weed = os.path.join(ROOT, ".test-tools", "venv", "bin", "weed")
    if not os.path.exists(weed):
        subprocess.run([os.path.join(ROOT, "scripts", "install-test-deps.sh")], check=True)
    d = os.path.join(work, "s3")
    os.makedirs(os.path.join(d, "data"), exist_ok=True)
    with open(os.path.join(d, "s3.json"), "w") as f:
        f.write('{"identities":[{"name":"t","credentials":[{"accessKey":"K","secretKey":"S"}],'
                '"actions":["Admin","Read","List","Tagging","Write"]}]}')
    port = free_port()
    log = open(os.path.join(d, "weed.log"), "wb")
    p = subprocess.Popen([weed, "mini", "-dir=" + os.path.join(d, "data"), "-ip=127.0.0.1",
                          "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
                          "-admin.ui=false", "-s3.port=%d" % port,
                          "-s3.config=" + os.path.join(d, "s3.json"), "-bucket=torture"],
                         stdout=log, stderr=log)
    return p, port


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bkp", default=os.path.join(ROOT, "target", "release", "bkp"))
    ap.add_argument("--gen", default=os.path.join(ROOT, "target", "release", "examples", "gen_dump"))
    ap.add_argument("--size", type=int, default=20_000_000, help="bytes per generated dump")
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--prune-kills", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=8, help="backups per concurrent loop")
    ap.add_argument("--s3", action="store_true", help="also run against SeaweedFS behind a faulty proxy")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--s3-only", action="store_true", help="with --s3: skip the local runs")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="bkp-torture-")
    started = time.time()
    try:
        dumps = make_dumps(args.gen, work, args.size, 12)
        targets = [("local", lambda name: (os.path.join(work, name), {}), True)]
        s3 = None
        if args.s3:
            s3, port = start_s3(work)
            time.sleep(3)
            proxy = FaultyProxy(port, random.Random(args.seed + 1))
            proxy.start()
            env = {"AWS_ACCESS_KEY_ID": "K", "AWS_SECRET_ACCESS_KEY": "S", "AWS_REGION": "us-east-1",
                   "AWS_ENDPOINT_URL": "http://127.0.0.1:%d" % proxy.port, "AWS_ALLOW_HTTP": "true"}
            # S3 signatures carry the time: no faketime there, so prunes only mark.
            targets.append(("s3", lambda name: ("s3://torture/" + name, env), False))
        if args.s3 and args.s3_only:
            targets = targets[1:]
        for where, location, use_time in targets:
            def fresh(name):
                loc, env = location(name)
                b = Bkp(args.bkp, loc, env)
                code, _, err = b.run(["init"])
                assert code == 0, err
                return b
            print("== %s: %d SIGKILLs during backups" % (where, args.kills), flush=True)
            b = fresh("kills")
            b.backup(dumps[0])
            kill_trials(b, dumps, args.kills, rng, where)
            print("== %s: %d SIGKILLs during prunes" % (where, args.prune_kills), flush=True)
            prune_kill_trials(fresh("prune-kills"), dumps, args.prune_kills, rng, where, use_time)
            print("== %s: 30 days with forget + prune, then old days again" % where, flush=True)
            thirty_days(fresh("thirty"), dumps, where, use_time)
            print("== %s: three concurrent backups with prunes" % where, flush=True)
            concurrent(fresh("concurrent"), dumps, args.rounds, where, use_time)
        if s3:
            T.add("proxy faults injected", proxy.faults)
            s3.terminate()
            s3.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n== torture summary (%.0f s)" % (time.time() - started))
    for key in sorted(T.counts):
        print("%-36s %d" % (key, T.counts[key]))
    bad = sum(T.counts.get(k, 0) for k in ("broken snapshots", "lost snapshots", "hangs", "check failures"))
    print("%-36s %d" % ("BROKEN + LOST + HUNG + CHECK FAILURES", bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
