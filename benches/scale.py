#!/usr/bin/env python3
"""Scale benchmark (issue 14): what a backup and a restore cost as the repository and the dump grow.

For each repository size (chunks:snapshots, e.g. 1M:1k) it creates a repository, backs up day 1
of a generated dump (tag `bench`), fills the repository with synthetic index files and snapshots
(`examples/scale_fill.rs`, written through the real format code: the packs those index files
name do not exist and the synthetic snapshots are of empty streams, in 20 series of their own),
then measures:

  backup     day 2 of the dump (streamed from the generator through a 4 KiB pipe, so that the
             first read by bkp is seen): peak RSS, time, time until bkp first read stdin and
             until it had read 64 MiB (past every buffer: a dump program is not stalled), store
             requests and bytes read before the first new pack was written (base frames for
             delta compression included), requests in all, and requests and bytes read of
             objects other than packs (metadata)
  restore    `restore latest --tag bench` into a reader: time to the first byte, time, requests,
             peak RSS
  snapshots  `snapshots --tag bench`: time, requests
  check      `check` (no data read): peak RSS, time
  prune      `prune`: peak RSS, time (it marks the synthetic packs; run last)

Requests are counted by bkp itself (BKP_TRACE_REQUESTS; a listing counts one request per 1,000
objects, as on S3). Keys use the insecure fast KDF, so that peak RSS shows what scales and not
the default KDF's fixed 64 MiB (docs/PERFORMANCE.md).

    benches/scale.py [--sizes 1M:1k,10M:100k] [--dump 1G] [--s3] [--work DIR]

Builds the release binary and examples first. Needs ~5 GB of disk per 100 M chunks.
"""

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
BKP = os.path.join(RELEASE, "bkp")
GEN = os.path.join(RELEASE, "examples", "gen_dump")
FILL = os.path.join(RELEASE, "examples", "scale_fill")
F_SETPIPE_SZ = 1031
TIME = "/usr/bin/time"


def count(text):
    """1M, 10k, 100 -> int."""
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("kmg")) * scale)


def size(text):
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


class Run:
    def __init__(self, rss_kib, elapsed, trace, first=None):
        self.rss_mib = rss_kib / 1024
        self.elapsed = elapsed
        self.first = first
        self.requests = []
        for line in open(trace) if os.path.exists(trace) else []:
            micros, kind, name, nbytes, n = line.split(" ")
            self.requests.append((int(micros), kind, name, int(nbytes), int(n)))

    def total_requests(self):
        return sum(r[4] for r in self.requests)

    def metadata(self):
        """(requests, bytes read) for objects other than packs."""
        n = read = 0
        for _, kind, name, nbytes, k in self.requests:
            if not name.startswith("packs/"):
                n += k
                if kind in ("get", "get-range"):
                    read += nbytes
        return n, read

    def before_first_pack(self):
        """(requests, bytes read) before the first put of a pack."""
        n = read = 0
        for _, kind, name, nbytes, k in self.requests:
            if kind == "put" and name.startswith("packs/"):
                break
            n += k
            if kind in ("get", "get-range"):
                read += nbytes
        return n, read


class Bench:
    def __init__(self, work, env):
        self.work = work
        self.env = env
        self.traces = 0

    def trace_file(self):
        self.traces += 1
        path = os.path.join(self.work, f"trace-{self.traces}")
        if os.path.exists(path):
            os.remove(path)
        return path

    def bkp(self, location, *args, stdin=None, stdout=subprocess.DEVNULL, check=True):
        trace = self.trace_file()
        env = dict(self.env, BKP_REPOSITORY=location, BKP_TRACE_REQUESTS=trace)
        started = time.monotonic()
        # Peak RSS through /usr/bin/time, not this process's wait4: Linux carries a process's
        # peak across fork and exec, so a child forked from this script (which grows as it
        # reads request traces) would report at least this script's size (134 MiB for every
        # command after the 100 M-chunk fill: the "104 MiB first run" of 2026-12-02 too).
        proc = subprocess.Popen([TIME, "-f", "%M", "-o", trace + ".rss", BKP, *args], env=env,
                                stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
        return proc, started, trace

    def wait(self, proc, started, trace, check=True, first=None):
        err = proc.stderr.read()
        proc.wait()
        elapsed = time.monotonic() - started
        if check and proc.returncode != 0:
            sys.exit(f"bkp {proc.args[5:]} failed ({proc.returncode}): {err.decode()[-2000:]}")
        with open(trace + ".rss") as f:
            rss_kib = int(f.read().split()[-1])
        return Run(rss_kib, elapsed, trace, first)

    def run(self, location, *args, check=True):
        proc, started, trace = self.bkp(location, *args)
        return self.wait(proc, started, trace, check)

    def backup(self, location, dump_size, day):
        """Day `day` of a generated dump streamed into `bkp backup --tag bench`: from a file
        generated beforehand up to 2 GiB (the generator is slower than bkp), beyond that from
        the generator itself."""
        if dump_size <= 2 << 30:
            path = os.path.join(self.work, f"dump-{dump_size}-{day}.sql")
            if not os.path.exists(path):
                with open(path + ".tmp", "wb") as f:
                    subprocess.run([GEN, str(dump_size), str(day)], stdout=f, check=True)
                os.rename(path + ".tmp", path)
            gen = subprocess.Popen(["cat", path], stdout=subprocess.PIPE)
        else:
            gen = subprocess.Popen([GEN, str(dump_size), str(day)], stdout=subprocess.PIPE)
        r, w = os.pipe()
        fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
        proc, started, trace = self.bkp(location, "backup", "--tag", "bench", stdin=r)
        os.close(r)
        src = gen.stdout.fileno()
        first = None
        self.first_64m = None
        sent = 0
        try:
            # The pipe holds 4096 bytes: the write after it returns once bkp has read.
            while first is None:
                block = os.read(src, 4096)
                if not block:
                    break
                os.write(w, block)
                sent += len(block)
                if sent > 4096:
                    first = time.monotonic() - started
            fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
            while os.splice(src, w, 1 << 20):
                sent += 1 << 20
                if self.first_64m is None and sent >= 64 << 20:
                    self.first_64m = time.monotonic() - started
        except BrokenPipeError:
            pass
        os.close(w)
        gen.wait()
        return self.wait(proc, started, trace, first=first)

    def restore(self, location):
        proc, started, trace = self.bkp(location, "restore", "latest", "--tag", "bench",
                                        stdout=subprocess.PIPE)
        out = proc.stdout.fileno()
        first = None
        total = 0
        while True:
            block = os.read(out, 1 << 20)
            if not block:
                break
            if first is None:
                first = time.monotonic() - started
            total += len(block)
        return self.wait(proc, started, trace, first=first), total


def seaweedfs(work):
    """Starts SeaweedFS (installed by scripts/install-test-deps.sh); returns (process, env)."""
    subprocess.run([os.path.join(ROOT, "scripts", "install-test-deps.sh")], check=True)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = os.path.join(work, "s3.json")
    with open(config, "w") as f:
        f.write('{"identities":[{"name":"bench","credentials":[{"accessKey":"bench",'
                '"secretKey":"bench-secret"}],"actions":["Admin","Read","List","Tagging","Write"]}]}')
    data = os.path.join(work, "s3data")
    os.makedirs(data)
    weed = subprocess.Popen(
        [os.path.join(ROOT, ".test-tools", "venv", "bin", "weed"), "mini", f"-dir={data}",
         "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
         "-admin.ui=false", f"-s3.port={port}", f"-s3.config={config}", "-bucket=bench"],
        stdout=open(os.path.join(work, "weed.log"), "w"), stderr=subprocess.STDOUT)
    env = dict(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
               AWS_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
               AWS_ALLOW_HTTP="true")
    # Ready when bkp can create a repository there (a signed create-only write).
    probe_env = dict(os.environ, BKP_PASSWORD="probe", BKP_INSECURE_FAST_KDF="1", **env)
    for attempt in range(300):
        probe = subprocess.run([BKP, "--repo", f"s3://bench/probe-{attempt}", "init"],
                               env=probe_env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        if probe.returncode == 0:
            return weed, env
        time.sleep(0.5)
    weed.kill()
    sys.exit("SeaweedFS did not start")


def measure(bench, location, chunks, snapshots, dump_size):
    init = bench.run(location, "init")
    del init
    bench.backup(location, dump_size, 1)
    started = time.monotonic()
    env = dict(bench.env)
    subprocess.run([FILL, location, str(chunks), str(snapshots)], env=env, check=True)
    fill_s = time.monotonic() - started
    backup = bench.backup(location, dump_size, 2)
    restore, restored = bench.restore(location)
    listing = bench.run(location, "snapshots", "--tag", "bench")
    check = bench.run(location, "check", check=False)
    prune = bench.run(location, "prune")
    before_n, before_bytes = backup.before_first_pack()
    meta_n, meta_bytes = backup.metadata()
    return {
        "fill_s": fill_s,
        "backup_rss": backup.rss_mib,
        "backup_s": backup.elapsed,
        "backup_first_read_ms": (backup.first or 0) * 1000,
        "backup_64m_ms": (bench.first_64m or 0) * 1000,
        "backup_before_pack": before_n,
        "backup_before_pack_mib": before_bytes / (1 << 20),
        "backup_requests": backup.total_requests(),
        "backup_meta": meta_n,
        "backup_meta_mib": meta_bytes / (1 << 20),
        "restore_first_byte_ms": (restore.first or 0) * 1000,
        "restore_s": restore.elapsed,
        "restore_requests": restore.total_requests(),
        "restore_rss": restore.rss_mib,
        "restored": restored,
        "snapshots_s": listing.elapsed,
        "snapshots_requests": listing.total_requests(),
        "check_rss": check.rss_mib,
        "check_s": check.elapsed,
        "prune_rss": prune.rss_mib,
        "prune_s": prune.elapsed,
    }


COLUMNS = [
    ("store", "{store}"), ("chunks", "{chunks}"), ("snaps", "{snapshots}"), ("dump", "{dump}"),
    ("backup RSS MiB", "{backup_rss:.0f}"), ("backup s", "{backup_s:.2f}"),
    ("1st stdin read ms", "{backup_first_read_ms:.0f}"),
    ("64 MiB of stdin read ms", "{backup_64m_ms:.0f}"),
    ("req before 1st pack", "{backup_before_pack}"),
    ("MiB read before 1st pack", "{backup_before_pack_mib:.1f}"),
    ("backup req", "{backup_requests}"),
    ("backup metadata req", "{backup_meta}"), ("metadata MiB read", "{backup_meta_mib:.1f}"),
    ("restore 1st byte ms", "{restore_first_byte_ms:.0f}"), ("restore s", "{restore_s:.2f}"),
    ("restore req", "{restore_requests}"), ("restore RSS MiB", "{restore_rss:.0f}"),
    ("snapshots s", "{snapshots_s:.2f}"), ("snapshots req", "{snapshots_requests}"),
    ("check RSS MiB", "{check_rss:.0f}"), ("check s", "{check_s:.1f}"),
    ("prune RSS MiB", "{prune_rss:.0f}"), ("prune s", "{prune_s:.1f}"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1M:1k,10M:1k,10M:100k",
                        help="repository sizes, CHUNKS:SNAPSHOTS, comma-separated")
    parser.add_argument("--dump", default="1G", help="dump sizes, comma-separated (1G,10G)")
    parser.add_argument("--s3", action="store_true", help="on a SeaweedFS server, not locally")
    parser.add_argument("--work", help="directory for repositories (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the repositories")
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--bin", help="a directory holding bkp and examples/ (default: the "
                        "release build; implies --no-build), to measure another version")
    args = parser.parse_args()
    if args.bin:
        global BKP, GEN, FILL
        BKP = os.path.join(args.bin, "bkp")
        GEN = os.path.join(args.bin, "examples", "gen_dump")
        FILL = os.path.join(args.bin, "examples", "scale_fill")
    elif not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bin", "bkp", "--example", "gen_dump",
                        "--example", "scale_fill"], cwd=ROOT, check=True)
    work = args.work or tempfile.mkdtemp(prefix="bkp-scale-")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, BKP_PASSWORD="bench", BKP_INSECURE_FAST_KDF="1")
    weed = None
    if args.s3:
        weed, s3_env = seaweedfs(work)
        env.update(s3_env)
    bench = Bench(work, env)
    rows = []
    try:
        for dump in args.dump.split(","):
            for spec in args.sizes.split(","):
                chunks, snapshots = (count(x) for x in spec.split(":"))
                name = f"scale-{spec.replace(':', '-')}-{dump}-{os.getpid()}"
                location = f"s3://bench/{name}" if args.s3 else os.path.join(work, name)
                print(f"# {spec} chunks:snapshots, {dump} dump, {location}", file=sys.stderr,
                      flush=True)
                row = measure(bench, location, chunks, snapshots, size(dump))
                row.update(store="s3" if args.s3 else "local", chunks=spec.split(":")[0],
                           snapshots=spec.split(":")[1], dump=dump)
                rows.append(row)
                print("  " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()), file=sys.stderr, flush=True)
                if not args.s3 and not args.keep:
                    shutil.rmtree(location, ignore_errors=True)
    finally:
        if weed:
            weed.kill()
            weed.wait()
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("| " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(f.format(**row) for _, f in COLUMNS) + " |")


if __name__ == "__main__":
    main()
