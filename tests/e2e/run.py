#!/usr/bin/env python3
"""Shoal container end-to-end test: a real swarm under compose, with faults.

Starts compose.yaml under its own project name (so its own network and volumes): --trackers
trackers (3) announcing every second, each file owned by two of them, two seeders with tens of
MiB of random files (one file on both), and --peers peers that want everything. While the
transfers run it

  1. kills seeder1 (`docker kill`) once every chunk of its files is held by someone else,
  2. kills tracker-2 (`docker kill`) for good, sampling every unfinished peer's progress every
     half second: none may stall (its downloaded bytes must keep rising),
  3. restarts tracker-1 (`docker restart`); peers must register again with it on their own,
  4. cuts a peer off the network until the trackers expire its lease, then reconnects it,

then waits until every peer holds every file, byte-identical to the originals, and checks that
the metrics agree with what happened, and that the consumer read its file in full through a
peer's HTTP API. It stops one peer to see it leave cleanly.

Then the ORIGIN phase: a test HTTP origin (the shoal-origin image) on a network of its own holds
a file no seeder has; --origin-peers daemons with SHOAL_ORIGIN, attached to both networks, want
it at once, and one more reader asks one of them through its API (`shoal-peer fetch`). Every copy
must be byte-identical and the origin must have sent about one copy (its /-/stats bytes_sent at
most 1.2 x the file). With the origin stopped, a late peer must still get the file, from the swarm.

Then the MIRROR phase (docker/compose.mirror.yaml: compose's `registry`, every peer mirroring it
with its API published on loopback): host skopeo pushes a small image into the registry, then
pulls it through two peers at once, each with a registries.conf whose mirror is that peer. Both
copies must have upstream's digests, each peer must have served every blob itself, and the
registry's access log must show each blob sent about once (at most 1.2 x its size in all); a
digest upstream lacks must get a 404 from a peer at once. Without skopeo (or the
shoal-registry-demo image) the run leaves out the overlay and this phase and says so; with
CI=true that is a failure.

The exit code is the verdict; everything the run created is removed, also on failure or Ctrl-C.

    python3 tests/e2e/run.py [--peers N] [--trackers N] [--origin-peers N] [--keep]
                             [--timeout SECONDS] [--build]

The project is named COMPOSE_PROJECT_NAME-e2e-PID (shoal-e2e-PID without it).

E2E_LOG, if set, is the containers' SHOAL_LOG (default info), e.g. "info,shoal::peer::server=debug".

Only the standard library; needs docker and docker-compose (or `docker compose`).
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1024 * 1024
# Seed files, by seeder. Sizes are deliberately not all chunk multiples; charlie.bin is on both
# seeders, so two holders offer the same file from the start.
SEEDS = {
    "seeder1": {"alpha.bin": 24 * MIB, "bravo.bin": 16 * MIB + 4097, "charlie.bin": 10 * MIB - 123},
    "seeder2": {"delta.bin": 20 * MIB + 1, "echo.bin": 8 * MIB, "charlie.bin": 10 * MIB - 123},
}
ANNOUNCE_INTERVAL = "1s"
# What the consumer service reads through a peer's API (compose.yaml's STACK_CONSUMER_FILE).
CONSUMER_FILE = "alpha.bin"
# The mirror phase: the image's layers (random bytes, so gzip keeps their size), the name it is
# pushed under, and how many copies of each blob the registry may send.
MIRROR_LAYERS = (3 * MIB + 777, 5 * MIB + 1)
MIRROR_IMAGE = "shoal/e2e:mirror"
MIRROR_MAX_COPIES = 1.2
MIRROR_OVERLAY = os.path.join(ROOT, "docker", "compose.mirror.yaml")
# The origin phase: a file only the origin has, and how many copies of it the origin may send.
ORIGIN_FILE = "origin.bin"
ORIGIN_SIZE = 40 * MIB + 12345
ORIGIN_MAX_COPIES = 1.2
LEASE_SECONDS = 3  # the tracker forgets a peer after three silent announce intervals
STALL_LIMIT = 5.0  # seconds an unfinished peer may go without a new byte after a tracker dies


class Failure(Exception):
    """The swarm did not do what it must; the message says what was expected."""


START = time.monotonic()
# Containers and networks the run makes without compose carry this label (value: the project).
EXTRA_LABEL = "org.shoal.e2e"


def log(msg):
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def run(args, timeout=60, check=True, env=None, quiet=False):
    """Runs a command and returns its stdout (text)."""
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise Failure(f"`{' '.join(args)}` did not finish within {timeout}s")
    if check and p.returncode != 0:
        if not quiet:
            sys.stderr.write(p.stdout + p.stderr)
        raise Failure(f"`{' '.join(args)}` exited with {p.returncode}: {p.stderr.strip()[-300:]}")
    return p.stdout


def wait_for(what, condition, timeout, interval=1.0):
    """Polls `condition` until it returns a truthy value; fails with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Failure as e:
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise Failure(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def parse_metrics(text):
    """Prometheus text -> {series: value}; series is `name` or `name{labels}`."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            out[series] = float(value)
        except ValueError:
            pass
    return out


class Container:
    def __init__(self, cid, service, number):
        self.id = cid
        self.service = service
        self.number = number
        self.name = f"{service}-{number}" if service in ("peer", "tracker") else service
        self.port = {"tracker": 9400, "origin": 8080, "registry": 5000}.get(service, 9401)
        self._addr = None

    @property
    def is_peer(self):
        return self.service == "peer"

    @property
    def is_daemon(self):
        """A Shoal daemon with a metrics port (the consumer is a one-shot command, the registry
        Debian's)."""
        return self.service not in ("consumer", "registry")

    def published(self, port):
        """host:port where the container's `port` is published on loopback, or None."""
        out = run(["docker", "port", self.id, f"{port}/tcp"], check=False)
        line = next((l for l in out.splitlines() if re.match(r"^(127\.0\.0\.1|0\.0\.0\.0):", l)), "")
        return line.replace("0.0.0.0:", "127.0.0.1:") or None

    def addr(self, refresh=False):
        """host:port of the published metrics port (it changes after a network reconnect)."""
        if refresh or not self._addr:
            self._addr = self.published(self.port)
        return self._addr

    def http(self, path):
        """(status, body) of GET path on the metrics port; raises Failure if unreachable."""
        for refresh in (False, True):
            addr = self.addr(refresh)
            if not addr:
                continue
            try:
                with urllib.request.urlopen(f"http://{addr}{path}", timeout=3) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, ""
            except (urllib.error.URLError, OSError):
                continue
        raise Failure(f"{self.name}: metrics port {self.port} is not reachable")

    def metrics(self):
        return parse_metrics(self.http("/metrics")[1])

    def ready(self):
        try:
            return self.http("/readyz")[0] == 200
        except Failure:
            return False

    def inspect(self, fmt):
        return run(["docker", "inspect", "--format", fmt, self.id]).strip()


class Swarm:
    """One compose project: up, the containers, and down."""

    def __init__(self, project, seed_dirs, args):
        self.project = project
        self.compose = args.compose.split() + ["--project-name", project,
                                               "--file", os.path.join(ROOT, "compose.yaml")]
        if args.mirror:
            self.compose += ["--file", MIRROR_OVERLAY]
        self.env = dict(os.environ)
        self.env.update({
            "STACK_IMAGE_TAG": args.tag,
            "STACK_SEEDER1_DIR": seed_dirs["seeder1"],
            "STACK_SEEDER2_DIR": seed_dirs["seeder2"],
            "SHOAL_ANNOUNCE_INTERVAL": ANNOUNCE_INTERVAL,
            "STACK_PEER_UPLOAD_LIMIT": str(args.peer_upload_limit),
            "STACK_SEEDER_UPLOAD_LIMIT": str(args.seeder_upload_limit),
            "STACK_CONSUMER_FILE": CONSUMER_FILE,
            "SHOAL_LOG": os.environ.get("E2E_LOG", "info"),
        })
        self.containers = {}
        self.network = None

    def up(self, peers, trackers):
        run(self.compose + ["up", "--detach", "--scale", f"tracker={trackers}", "--scale", f"peer={peers}"],
            timeout=240, env=self.env)
        out = run(["docker", "ps", "--all", "--filter", f"label=com.docker.compose.project={self.project}",
                   "--format", '{{.ID}} {{.Label "com.docker.compose.service"}} '
                               '{{.Label "com.docker.compose.container-number"}}'])
        for line in out.splitlines():
            cid, service, number = line.split()
            c = Container(cid, service, int(number))
            self.containers[c.name] = c
        self.network = self["tracker-1"].inspect("{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}")

    def __getitem__(self, name):
        return self.containers[name]

    def peers(self):
        return sorted((c for c in self.containers.values() if c.is_peer), key=lambda c: c.number)

    def trackers(self):
        return sorted((c for c in self.containers.values() if c.service == "tracker"),
                      key=lambda c: c.number)

    def logs(self, c, lines=25):
        p = subprocess.run(["docker", "logs", "--tail", str(lines), c.id], capture_output=True, text=True)
        return (p.stdout + p.stderr).rstrip()

    def down(self):
        """Removes the containers, the networks and the volumes, compose's and those the origin
        phase made itself (labelled with EXTRA_LABEL); says so if anything is left."""
        extra = f"label={EXTRA_LABEL}={self.project}"
        mine = run(["docker", "container", "ls", "--all", "--quiet", "--filter", extra], check=False).split()
        if mine:  # first: they hold on to compose's network
            run(["docker", "rm", "--force", "--volumes", *mine], check=False, timeout=120)
        p = subprocess.run(self.compose + ["down", "--volumes", "--remove-orphans", "--timeout", "5"],
                           capture_output=True, text=True, timeout=180, env=self.env)
        networks = run(["docker", "network", "ls", "--quiet", "--filter", extra], check=False).split()
        if networks:
            run(["docker", "network", "rm", *networks], check=False)
        left = [run(["docker", *kind, "--quiet", "--filter", label], check=False).split()
                for label in (f"label=com.docker.compose.project={self.project}", extra)
                for kind in (["container", "ls", "--all"], ["network", "ls"], ["volume", "ls"])]
        if p.returncode != 0 or any(left):
            print(f"cleanup incomplete ({p.stderr.strip()[-300:]}); left: {sum(left, [])}", file=sys.stderr)


class Run:
    """The test itself: seeds, swarm, faults, convergence, checks."""

    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.originals = {}  # file -> (size, sha256)
        self.faults = []  # (seconds since start, description, peers complete at that moment)
        self.checks = []  # (ok, description)
        self.notes = []  # lines for the summary
        self.project = f"{os.environ.get('COMPOSE_PROJECT_NAME') or 'shoal'}-e2e-{os.getpid()}"
        self.swarm = None
        self.partitioned = None
        self.killed_tracker = None
        self.seeder1_uploaded = 0
        self.origin_phase = None
        self.mirror_phase = None

    # ---- set-up ----------------------------------------------------------------------------

    def write_seeds(self):
        dirs = {}
        os.chmod(self.workdir, 0o755)  # the containers run as 65532
        for seeder, files in SEEDS.items():
            d = os.path.join(self.workdir, seeder)
            os.mkdir(d)
            os.chmod(d, 0o755)
            dirs[seeder] = d
            for name, size in files.items():
                path = os.path.join(d, name)
                if name in self.originals:  # the same file on both seeders
                    shutil.copyfile(os.path.join(dirs["seeder1"], name), path)
                else:
                    self.originals[name] = (size, write_random(path, size))
                os.chmod(path, 0o644)
        total = sum(size for size, _ in self.originals.values())
        log(f"seed files: {len(self.originals)} files, {total / MIB:.1f} MiB "
            f"({', '.join(f'{s}: {len(f)}' for s, f in SEEDS.items())}; charlie.bin on both)")
        return dirs

    def start(self, dirs):
        self.swarm = Swarm(self.project, dirs, self.args)
        log(f"starting project {self.project}: {self.args.trackers} trackers, seeder1, seeder2, "
            f"{self.args.peers} peers")
        self.swarm.up(self.args.peers, self.args.trackers)

        def all_healthy():
            states = [c.inspect("{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}")
                      for c in self.swarm.containers.values() if c.is_daemon]
            return all(s == "running/healthy" for s in states)

        wait_for("every container to be healthy (HEALTHCHECK)", all_healthy, 90)
        wait_for("every peer to be registered (/readyz)",
                 lambda: all(c.ready() for c in self.swarm.peers()), 60)
        log("all containers healthy and registered")

    # ---- observation -------------------------------------------------------------------------

    def total_bytes(self):
        return sum(size for size, _ in self.originals.values())

    def layout(self):
        """{file name: (chunk count, chunk size)}: each seeder picks its files' chunk size."""
        found = {}
        for name in self.originals:
            loc = self.located(name)
            found[name] = (loc["chunks"], loc["chunk_size"])
        return found

    def located(self, name):
        """The tracker's `locate --json` answer for `name`, asked from inside seeder2."""
        out = run(["docker", "exec", self.swarm["seeder2"].id, "/shoal-peer", "locate", name,
                   "--json"], quiet=True)
        return json.loads(out)

    def peer_done(self, c):
        try:
            m = c.metrics()
        except Failure:
            return False
        return (m.get("shoal_peer_files_shared") == len(self.originals)
                and m.get("shoal_peer_files_wanted") == 0)

    def complete_count(self):
        return sum(1 for c in self.swarm.peers() if self.peer_done(c))

    def fault(self, description):
        done = self.complete_count()
        self.faults.append((time.monotonic() - START, description, done))
        log(f"FAULT: {description} ({done}/{self.args.peers} peers complete)")

    def tracker_metric(self, name):
        """A metric of tracker-1, which lives through the run (it is restarted, not killed)."""
        return self.swarm["tracker-1"].metrics().get(name, 0)

    def locate(self, name):
        """(chunk count, {holder name: set of chunk indexes}) as the tracker reports them."""
        loc = self.located(name)
        holders = {}
        for h in loc["peers"]:
            held = set()
            for first, last in h["chunks"]:
                held.update(range(first, last + 1))
            holders[h["name"]] = held
        chunks = loc["chunks"]
        return chunks, holders

    def held_elsewhere(self, seeder):
        """Whether every chunk of every file of `seeder` is held by some other holder."""
        for name in SEEDS[seeder]:
            chunks, holders = self.locate(name)
            others = set().union(*(h for n, h in holders.items() if n != seeder))
            if len(others) < chunks:
                return False
        return True

    # ---- faults ------------------------------------------------------------------------------

    def kill_seeder(self, deadline):
        seeder = self.swarm["seeder1"]
        wait_for("seeder1's chunks to be held by other peers",
                 lambda: self.held_elsewhere("seeder1"), deadline - time.monotonic())
        self.seeder1_uploaded = seeder.metrics().get("shoal_peer_uploaded_bytes_total", 0)
        self.fault("docker kill seeder1 (every chunk of its files is held elsewhere)")
        run(["docker", "kill", seeder.id])
        wait_for("seeder1 to be dead", lambda: seeder.inspect("{{.State.Status}}") == "exited", 20)

    def kill_tracker(self):
        """Kills tracker-2 for good and watches every unfinished peer keep downloading."""
        victim = self.swarm["tracker-2"]
        self.killed_tracker = victim.name
        self.fault(f"docker kill {victim.name} (the files it owned have one owner left)")
        run(["docker", "kill", victim.id])
        last = {}  # peer name -> (bytes, when they last rose)
        worst = {}
        until = time.monotonic() + 20
        while time.monotonic() < until:
            now = time.monotonic()
            unfinished = [c for c in self.swarm.peers() if not self.peer_done(c)]
            if not unfinished:
                break
            for c in unfinished:
                got = c.metrics().get("shoal_peer_downloaded_bytes_total", 0)
                seen, since = last.get(c.name, (-1, now))
                if got > seen:
                    last[c.name] = (got, now)
                    since = now
                worst[c.name] = max(worst.get(c.name, 0), now - since)
            time.sleep(0.5)
        longest = max(worst.values(), default=0)
        staller = max(worst, key=worst.get, default="-")
        self.notes.append(f"after {victim.name} was killed, the longest pause of an unfinished peer "
                          f"was {longest:.1f}s ({staller})")
        self.check(longest < STALL_LIMIT,
                   f"no peer stalled after {victim.name} was killed: longest pause {longest:.1f}s "
                   f"(< {STALL_LIMIT:.0f}s, sampled every 0.5s)")

    def restart_tracker(self):
        tracker = self.swarm["tracker-1"]
        self.fault("docker restart tracker-1 (it forgets every peer and file)")
        run(["docker", "restart", "--time", "10", tracker.id], timeout=60)
        live = self.args.peers + 1  # the peers and seeder2
        wait_for(f"all {live} live peers to register again with the restarted tracker-1",
                 lambda: self.tracker_metric("shoal_tracker_peers") == live, 60)
        log(f"tracker restarted; {live} peers registered again on their own")

    def partition_peer(self):
        # The peer with the least downloaded, so the cut lands in the middle of its transfers.
        def progress(c):
            try:
                return c.metrics().get("shoal_peer_downloaded_bytes_total", 0)
            except Failure:
                return float("inf")

        victim = min(self.swarm.peers(), key=progress)
        self.partitioned = victim
        expired = self.tracker_metric("shoal_tracker_leases_expired_total")
        self.fault(f"docker network disconnect {victim.name} "
                   f"({progress(victim) / MIB:.1f} MiB downloaded)")
        run(["docker", "network", "disconnect", self.swarm.network, victim.id])
        wait_for(f"the tracker to expire {victim.name}'s lease",
                 lambda: self.tracker_metric("shoal_tracker_leases_expired_total") > expired,
                 LEASE_SECONDS * 10)
        log(f"tracker expired {victim.name}; reconnecting it")
        run(["docker", "network", "connect", "--alias", "peer", self.swarm.network, victim.id])
        live = self.args.peers + 1
        wait_for(f"{victim.name} to register again",
                 lambda: victim.ready() and self.tracker_metric("shoal_tracker_peers") == live, 60)
        log(f"{victim.name} is back and registered (new address)")

    # ---- convergence and verification -------------------------------------------------------

    def converge(self, deadline):
        last = [0]

        def everyone_done():
            done = self.complete_count()
            if done != last[0]:
                log(f"{done}/{self.args.peers} peers complete")
                if last[0] == 0:
                    self.notes.append(f"first peer complete at {time.monotonic() - START:.0f}s")
                last[0] = done
            return done == self.args.peers

        wait_for("every peer to hold every file", everyone_done, deadline - time.monotonic(), 2)
        self.notes.append(f"every peer complete at {time.monotonic() - START:.0f}s")

    def quiet_metrics(self):
        """Scrapes every live container until two scrapes 2s apart agree (transfers settled)."""
        live = [c for c in self.swarm.containers.values()
                if c.name not in ("seeder1", self.killed_tracker) and c.is_daemon]

        def scrape():
            return {c.name: c.metrics() for c in live}

        prev = [scrape()]

        def settled():
            now = scrape()
            keys = ("shoal_peer_uploaded_bytes_total", "shoal_peer_downloaded_bytes_total",
                    "shoal_peer_uploaded_chunks_total")
            same = all(prev[0][n].get(k) == now[n].get(k) for n in now for k in keys)
            prev[0] = now
            return now if same else None

        return wait_for("the counters to settle", settled, 30, 2)

    def check(self, ok, description):
        """Records a verdict."""
        self.checks.append((bool(ok), description))
        if not ok:
            log(f"CHECK FAILED: {description}")

    def verify_files(self):
        """sha256 of every file in every live peer's /data, read with `docker cp`."""
        expected = {name: sha for name, (_, sha) in self.originals.items()}
        for c in self.swarm.peers():
            found = read_data_dir(c)
            self.check(found == expected,
                       f"{c.name}: /data holds exactly the {len(expected)} files, byte-identical"
                       + ("" if found == expected else f" (got {describe_diff(found, expected)})"))
        seeder2 = read_data_dir(self.swarm["seeder2"])
        want2 = {n: expected[n] for n in SEEDS["seeder2"]}
        self.check(seeder2 == want2, "seeder2: its files are unchanged")

    def verify_metrics(self, scraped):
        n_files = len(self.originals)
        layout = self.layout()
        total, chunks = self.total_bytes(), sum(n for n, _ in layout.values())
        largest_chunk = max(size for _, size in layout.values())
        # The consumer's restarts are its retries (a peer it read from cut off by a fault, say):
        # verify_consumer reports them; here only the daemons count.
        restarted = {c.name for c in self.swarm.containers.values()
                     if c.service not in ("tracker", "consumer")
                     and c.inspect("{{.RestartCount}}") != "0"}
        self.check(not restarted, f"no container crashed and was restarted ({sorted(restarted) or 'none'})")
        down_sum = up_sum = peer_up = duplicates = 0
        for c in self.swarm.peers():
            m = scraped[c.name]

            def g(key, m=m):
                return m.get(key, 0)

            down_sum += g("shoal_peer_downloaded_bytes_total")
            up_sum += g("shoal_peer_uploaded_bytes_total")
            peer_up += g("shoal_peer_uploaded_bytes_total")
            duplicates += g("shoal_peer_duplicate_chunks_total")
            if c.name in restarted:
                continue  # its counters started over; the file check above still holds
            self.check(g("shoal_peer_files_shared") == n_files and g("shoal_peer_files_wanted") == 0,
                       f"{c.name}: files_shared == {n_files}, files_wanted == 0 "
                       f"(got {g('shoal_peer_files_shared'):.0f}, {g('shoal_peer_files_wanted'):.0f})")
            self.check(g("shoal_peer_downloaded_bytes_total") == total,
                       f"{c.name}: downloaded_bytes_total == {total} (sum of the file sizes), "
                       f"got {g('shoal_peer_downloaded_bytes_total'):.0f}")
            self.check(g("shoal_peer_downloaded_chunks_total") == chunks,
                       f"{c.name}: downloaded_chunks_total == {chunks}, "
                       f"got {g('shoal_peer_downloaded_chunks_total'):.0f}")
            self.check(g("shoal_peer_chunk_transfer_duration_seconds_count") == chunks,
                       f"{c.name}: one chunk transfer duration observed per chunk downloaded")
            self.check(g("shoal_peer_downloads_completed_total") == n_files
                       and g("shoal_peer_download_duration_seconds_count") == n_files,
                       f"{c.name}: downloads_completed_total == {n_files} with as many durations "
                       f"(got {g('shoal_peer_downloads_completed_total'):.0f})")
            self.check(g("shoal_peer_chunk_verify_failures_total") == 0,
                       f"{c.name}: no chunk failed verification")
            self.check(g("shoal_peer_active_transfers") == 0,
                       f"{c.name}: active_transfers back to 0 when idle "
                       f"(got {g('shoal_peer_active_transfers'):.0f})")
        s2 = scraped["seeder2"]
        up_sum += s2.get("shoal_peer_uploaded_bytes_total", 0)
        self.check(s2.get("shoal_peer_downloaded_bytes_total", 0) == 0
                   and s2.get("shoal_peer_files_shared") == len(SEEDS["seeder2"]),
                   f"seeder2: downloaded nothing and shares its {len(SEEDS['seeder2'])} files")
        self.check(s2.get("shoal_peer_chunk_verify_failures_total", 0) == 0, "seeder2: no verify failure")
        self.check(peer_up > 0, f"peers seed too: they uploaded {peer_up / MIB:.1f} MiB between them")
        self.notes.append(f"downloaded {down_sum / MIB:.1f} MiB in all; uploaded {peer_up / MIB:.1f} MiB "
                          f"by peers, {s2.get('shoal_peer_uploaded_bytes_total', 0) / MIB:.1f} MiB "
                          f"by seeder2, {self.seeder1_uploaded / MIB:.1f}+ MiB by seeder1 before it died; "
                          f"{duplicates:.0f} endgame duplicate chunks received")
        # Every chunk sent in full was received by a peer: counted as downloaded, or as a
        # duplicate (endgame) at most a chunk long. seeder1's uploads died with it. (A request
        # abandoned when its download completed may still be sent in full; seeder1's share,
        # at least one copy of each of its chunks, covers those.)
        received = down_sum + duplicates * largest_chunk
        self.check(up_sum <= received,
                   f"uploads of the surviving containers ({up_sum / MIB:.1f} MiB) <= downloads plus "
                   f"endgame duplicates ({received / MIB:.1f} MiB)")
        live = self.args.peers + 1
        trackers = [c.name for c in self.swarm.trackers() if c.name != self.killed_tracker]
        # Every peer registers with every tracker. Each file has two owners among the live
        # trackers, so with two left each indexes every file.
        owners = min(2, len(trackers))
        for name in trackers:
            t = scraped[name]
            if owners == len(trackers):
                self.check(t.get("shoal_tracker_files") == n_files,
                           f"{name}: files == {n_files} (got {t.get('shoal_tracker_files', 0):.0f})")
            self.check(t.get("shoal_tracker_peers") == live,
                       f"{name}: peers == {live} live holders (got {t.get('shoal_tracker_peers', 0):.0f})")
            self.check(t.get("shoal_tracker_registrations_total", 0) >= live,
                       f"{name}: at least {live} registrations since it started "
                       f"(got {t.get('shoal_tracker_registrations_total', 0):.0f})")
            self.check(t.get("shoal_tracker_leases_expired_total", 0) >= 1,
                       f"{name}: the partitioned peer's lease expired (leases_expired_total >= 1)")
        owned = sum(scraped[name].get("shoal_tracker_files_owned", 0) for name in trackers)
        self.check(owned >= owners * n_files,
                   f"trackers: each file indexed by {owners} live trackers (names owned in all: {owned:.0f})")
        self.verify_tracker_view()

    def verify_tracker_view(self):
        """The trackers must know every live holder as complete: `shoal-peer files` (merged)."""
        out = run(["docker", "exec", self.swarm["seeder2"].id, "/shoal-peer", "files", "--json"],
                  quiet=True)
        rows = {f["name"]: (f["peers"], f["seeders"]) for f in json.loads(out)}
        for name in self.originals:
            holders = self.args.peers + (1 if name in SEEDS["seeder2"] else 0)
            got = rows.get(name)
            self.check(got == (holders, holders),
                       f"tracker: {name} has {holders} holders, all complete (peers, seeders = {got})")

    def verify_consumer(self):
        """The consumer read CONSUMER_FILE through a peer's API, in full, and exited 0."""
        c = self.swarm["consumer"]
        wait_for("the consumer to finish reading through a peer's API",
                 lambda: c.inspect("{{.State.Status}}") == "exited"
                 and c.inspect("{{.State.Restarting}}") == "false", 60)
        code, restarts = c.inspect("{{.State.ExitCode}}"), c.inspect("{{.RestartCount}}")
        found = read_data_dir(c)
        want = {CONSUMER_FILE: self.originals[CONSUMER_FILE][1]}
        self.check(code == "0" and found == want,
                   f"consumer: `shoal-peer fetch {CONSUMER_FILE}` through a peer's API exited {code} "
                   f"after {restarts} retries, its /data byte-identical"
                   + ("" if found == want else f" (got {describe_diff(found, want)})"))

    def verify_leave(self):
        """A stopped peer exits 0 at once and tells the tracker it leaves (no lease expiry)."""
        c = self.swarm.peers()[0]
        live = self.tracker_metric("shoal_tracker_peers")
        expired = self.tracker_metric("shoal_tracker_leases_expired_total")
        started = time.monotonic()
        run(["docker", "stop", "--time", "10", c.id], timeout=30)
        took = time.monotonic() - started
        code = c.inspect("{{.State.ExitCode}}")
        self.check(code == "0" and took < 5, f"{c.name}: `docker stop` -> exit {code} after {took:.1f}s")
        try:
            wait_for("the tracker to drop the stopped peer",
                     lambda: self.tracker_metric("shoal_tracker_peers") == live - 1, 10, 0.2)
            left = self.tracker_metric("shoal_tracker_leases_expired_total") == expired
        except Failure:
            left = False
        self.check(left, f"{c.name}: the tracker dropped it through leave, not lease expiry")

    # ---- the whole run ------------------------------------------------------------------------

    def execute(self):
        dirs = self.write_seeds()
        self.start(dirs)
        deadline = time.monotonic() + self.args.timeout
        self.kill_seeder(deadline)
        self.kill_tracker()
        self.restart_tracker()
        self.partition_peer()
        self.converge(deadline)
        log("converged; verifying files and metrics")
        for _, description, done in self.faults:
            self.check(done < self.args.peers,
                       f"fault injected while transfers ran ({done}/{self.args.peers} complete): {description}")
        scraped = self.quiet_metrics()
        self.verify_files()
        self.verify_metrics(scraped)
        self.verify_consumer()
        self.verify_leave()
        self.origin_phase = OriginPhase(self)
        self.origin_phase.execute()
        if self.args.mirror:
            self.mirror_phase = MirrorPhase(self)
            self.mirror_phase.execute()
        return all(ok for ok, _ in self.checks)

    def summary(self, ok, error):
        print("\n==== Shoal e2e summary " + "=" * 56)
        print(f"project {self.project}: {self.args.peers} peers, {len(self.originals)} files, "
              f"{self.total_bytes() / MIB:.1f} MiB each, {time.monotonic() - START:.0f}s")
        for at, description, done in self.faults:
            print(f"  {at:5.0f}s fault: {description} [{done}/{self.args.peers} peers complete]")
        for note in self.notes:
            print(f"  {note}")
        passed = sum(1 for c, _ in self.checks if c)
        print(f"  checks: {passed}/{len(self.checks)} passed")
        for c, description in self.checks:
            if not c:
                print(f"    FAILED {description}")
        if error:
            print(f"  error: {error}")
        print("PASS" if ok else "FAIL")


class OriginPhase:
    """Pull-through: peers with SHOAL_ORIGIN fetch a file only an HTTP origin has, together."""

    def __init__(self, test):
        self.test = test
        self.swarm = test.swarm
        self.args = test.args
        self.network = f"{test.project}-origin"
        self.sha = None
        self.peers = []
        self.containers = []  # everything this phase created, for the logs of a failed run

    def docker_create(self, name, service, image, args, env=None, ports=(), origin_net=False,
                      extra=()):
        """Creates (not starts) a hardened container labelled for cleanup; returns a Container.
        origin_net: False = the swarm's network, True = both, "only" = the origin's."""
        cmd = ["docker", "create", "--name", f"{self.test.project}-{name}",
               "--label", f"{EXTRA_LABEL}={self.test.project}",
               "--network", self.network if origin_net == "only" else self.swarm.network,
               "--user", "65532:65532", "--read-only", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges:true", "--memory", "256m", "--pids-limit", "1024",
               *extra]
        for port in ports:
            cmd += ["--publish", f"127.0.0.1::{port}"]
        for key, value in (env or {}).items():
            cmd += ["--env", f"{key}={value}"]
        cid = run(cmd + [f"{image}:{self.args.tag}", *args]).strip()
        if origin_net is True:  # the swarm's network for the tracker and peers, this one for the origin
            run(["docker", "network", "connect", self.network, cid])
        c = Container(cid, service, 0)
        c.name = name
        self.containers.append(c)
        return c

    def peer(self, name):
        env = {"SHOAL_TRACKER": "tracker:7400", "SHOAL_NAME": name, "SHOAL_WANT": ORIGIN_FILE,
               "SHOAL_ORIGIN": "http://origin:8080", "SHOAL_API_ADDR": "0.0.0.0:7480",
               "SHOAL_LOG": os.environ.get("E2E_LOG", "info"), "SHOAL_LOG_FORMAT": "json"}
        return self.docker_create(name, "peer", "shoal-peer", ["run"], env, ports=[9401],
                                  origin_net=True, extra=["--volume", "/data"])

    def done(self, c):
        try:
            m = c.metrics()
        except Failure:
            return False
        return m.get("shoal_peer_files_shared") == 1 and m.get("shoal_peer_files_wanted") == 0

    def execute(self):
        d = os.path.join(self.test.workdir, "origin")
        os.mkdir(d)
        os.chmod(d, 0o755)
        path = os.path.join(d, ORIGIN_FILE)
        self.sha = write_random(path, ORIGIN_SIZE)
        os.chmod(path, 0o644)
        log(f"ORIGIN phase: {ORIGIN_FILE} ({ORIGIN_SIZE / MIB:.1f} MiB) only on the origin, on network "
            f"{self.network}; {self.args.origin_peers} pull-through peers and one API reader")
        run(["docker", "network", "create", "--label", f"{EXTRA_LABEL}={self.test.project}",
             self.network])
        origin = self.docker_create("origin", "origin", "shoal-origin", [], ports=[8080],
                                    origin_net="only",
                                    extra=["--network-alias", "origin", "--volume", f"{d}:/data:ro",
                                           "--no-healthcheck"])
        run(["docker", "start", origin.id])
        wait_for("the origin to answer /-/stats", lambda: self.stats(origin) is not None, 30, 0.5)

        self.peers = [self.peer(f"origin-peer-{i}") for i in range(1, self.args.origin_peers + 1)]
        reader = self.docker_create(
            "origin-reader", "consumer", "shoal-peer",
            ["fetch", ORIGIN_FILE, "--agent", f"http://{self.test.project}-origin-peer-1:7480",
             "--output", f"/data/{ORIGIN_FILE}"],
            extra=["--volume", "/data", "--restart", "on-failure:10", "--no-healthcheck"])
        started = time.monotonic()
        run(["docker", "start", *(c.id for c in self.peers), reader.id])  # all at once
        wait_for(f"all {len(self.peers)} pull-through peers to hold {ORIGIN_FILE}",
                 lambda: all(self.done(c) for c in self.peers), 300, 1)
        self.test.notes.append(f"origin phase: {len(self.peers)} peers complete after "
                               f"{time.monotonic() - started:.0f}s")
        wait_for("the API reader to finish", lambda: reader.inspect("{{.State.Status}}") == "exited"
                 and reader.inspect("{{.State.Restarting}}") == "false", 60)

        want = {ORIGIN_FILE: self.sha}
        for c in self.peers + [reader]:
            found = read_data_dir(c)
            self.test.check(found == want, f"{c.name}: holds {ORIGIN_FILE}, byte-identical to the "
                            "origin's" + ("" if found == want else f" (got {describe_diff(found, want)})"))
        self.test.check(reader.inspect("{{.State.ExitCode}}") == "0",
                        f"origin-reader: `shoal-peer fetch` through origin-peer-1's API exited 0")
        stats = self.stats(origin) or {}
        sent = stats.get("bytes_sent", -1)
        fetched = sum(c.metrics().get("shoal_peer_origin_bytes_total", 0) for c in self.peers)
        self.test.notes.append(f"origin sent {sent / MIB:.1f} MiB in {stats.get('requests')} requests "
                               f"for a {ORIGIN_SIZE / MIB:.1f} MiB file ({sent / ORIGIN_SIZE:.2f} copies); "
                               f"the peers count {fetched / MIB:.1f} MiB fetched from it")
        self.test.check(ORIGIN_SIZE <= sent <= ORIGIN_MAX_COPIES * ORIGIN_SIZE,
                        f"origin: bytes_sent {sent} is between 1 and {ORIGIN_MAX_COPIES} copies of "
                        f"{ORIGIN_SIZE}")
        self.test.check(ORIGIN_SIZE <= fetched <= ORIGIN_MAX_COPIES * ORIGIN_SIZE,
                        f"peers: shoal_peer_origin_bytes_total sums to {fetched:.0f}, between 1 and "
                        f"{ORIGIN_MAX_COPIES} copies")

        run(["docker", "stop", "--time", "5", origin.id], timeout=30)
        late = self.peer("origin-peer-late")
        run(["docker", "start", late.id])
        wait_for(f"a late peer to get {ORIGIN_FILE} with the origin stopped",
                 lambda: self.done(late), 120, 1)
        found = read_data_dir(late)
        self.test.check(found == want and late.metrics().get("shoal_peer_origin_bytes_total", 0) == 0,
                        f"origin-peer-late: got {ORIGIN_FILE} from the swarm with the origin stopped, "
                        "byte-identical, nothing from the origin")

    def stats(self, origin):
        """The origin's /-/stats JSON, or None while it does not answer."""
        try:
            status, body = origin.http("/-/stats")
        except Failure:
            return None
        return json.loads(body) if status == 200 else None


class MirrorPhase:
    """Registry mirror: skopeo pulls an image from compose's registry through two peers at once."""

    def __init__(self, test):
        self.test = test
        self.swarm = test.swarm
        self.dir = os.path.join(test.workdir, "mirror")
        self.blobs = {}  # digest (hex) -> size, every blob of the pushed image
        self.manifest = None  # the pushed manifest's digest (hex)

    def write_image(self):
        """An OCI image layout in self.dir/image: a gzip'd tar layer of random bytes per entry of
        MIRROR_LAYERS, a config, a manifest, tagged `e2e`."""
        blobs = os.path.join(self.dir, "image", "blobs", "sha256")
        os.makedirs(blobs)

        def blob(data, media_type):
            digest = hashlib.sha256(data).hexdigest()
            with open(os.path.join(blobs, digest), "wb") as f:
                f.write(data)
            self.blobs[digest] = len(data)
            return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

        layers, diff_ids = [], []
        for i, size in enumerate(MIRROR_LAYERS):
            tar_bytes = io.BytesIO()
            with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
                info = tarfile.TarInfo(f"layer{i}.bin")
                info.size = size
                tar.addfile(info, io.BytesIO(os.urandom(size)))
            diff_ids.append(f"sha256:{hashlib.sha256(tar_bytes.getvalue()).hexdigest()}")
            layers.append(blob(gzip.compress(tar_bytes.getvalue(), mtime=0),
                               "application/vnd.oci.image.layer.v1.tar+gzip"))
        config = blob(json.dumps({"architecture": "amd64", "os": "linux",
                                  "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode(),
                      "application/vnd.oci.image.config.v1+json")
        manifest = json.dumps({"schemaVersion": 2,
                               "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": config, "layers": layers}).encode()
        entry = blob(manifest, "application/vnd.oci.image.manifest.v1+json")
        del self.blobs[entry["digest"][len("sha256:"):]]  # a manifest, not a blob of the image
        self.manifest = entry["digest"][len("sha256:"):]
        entry["annotations"] = {"org.opencontainers.image.ref.name": "e2e"}
        with open(os.path.join(self.dir, "image", "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": [entry]}, f)
        with open(os.path.join(self.dir, "image", "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)

    def registries_conf(self, registry, agent):
        """A registries.conf sending pulls of `registry` images to the mirror `agent` first."""
        path = os.path.join(self.dir, f"registries-{agent.replace(':', '-')}.conf")
        with open(path, "w") as f:
            f.write(f'[[registry]]\nprefix = "{registry}"\nlocation = "{registry}"\ninsecure = true\n\n'
                    f'[[registry.mirror]]\nlocation = "{agent}"\ninsecure = true\n')
        return path

    def pulled(self, layout):
        """(manifest digest, {blob digest}) of the image skopeo wrote into the layout."""
        with open(os.path.join(layout, "index.json")) as f:
            manifest = json.load(f)["manifests"][0]["digest"].split(":", 1)[1]
        blobs = set(os.listdir(os.path.join(layout, "blobs", "sha256"))) - {manifest}
        return manifest, blobs

    def sent_by_registry(self, registry):
        """{blob digest: bytes} the registry sent in answers to GET, from its access log (stdout)."""
        p = subprocess.run(["docker", "logs", registry.id], capture_output=True, text=True, timeout=60)
        sent = dict.fromkeys(self.blobs, 0)
        for m in re.finditer(r'"GET \S*/blobs/sha256:([0-9a-f]{64})\S* HTTP/[\d.]+" \d{3} (\d+)', p.stdout):
            if m.group(1) in sent:
                sent[m.group(1)] += int(m.group(2))
        return sent

    def execute(self):
        test = self.test
        registry = self.swarm["registry"]
        wait_for("the registry to answer /v2/", lambda: registry.http("/v2/")[0] == 200, 30, 0.5)
        self.write_image()
        upstream = registry.addr()
        image = f"{upstream}/{MIRROR_IMAGE}"
        run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
             f"oci:{self.dir}/image:e2e", f"docker://{image}"], timeout=120)
        # Two peers that ran through every fault and are still up (peer-1 has left).
        agents = [c for c in self.swarm.peers()[1:] if c is not test.partitioned][:2]
        addrs = [c.published(7480) for c in agents]
        log(f"MIRROR phase: {image} ({len(self.blobs)} blobs, "
            f"{sum(self.blobs.values()) / MIB:.1f} MiB) pushed; skopeo pulls it through "
            f"{' and '.join(c.name for c in agents)} at once ({', '.join(addrs)})")
        started = time.monotonic()
        pulls = [subprocess.Popen(["skopeo", "--insecure-policy", "--registries-conf",
                                   self.registries_conf(upstream, addr), "copy", "--quiet",
                                   "--src-tls-verify=false", f"docker://{image}",
                                   f"oci:{self.dir}/{c.name}:e2e"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c, addr in zip(agents, addrs)]
        for c, p in zip(agents, pulls):
            try:
                out, _ = p.communicate(timeout=max(1, started + 180 - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            test.check(p.returncode == 0, f"{c.name}: skopeo pulled {image} through its mirror"
                       + ("" if p.returncode == 0 else f" (exit {p.returncode}: {out.strip()[-300:]})"))
        test.notes.append(f"mirror phase: two skopeo pulls through {', '.join(c.name for c in agents)} "
                          f"took {time.monotonic() - started:.0f}s")

        for c, p in zip(agents, pulls):
            if p.returncode != 0:
                continue
            manifest, blobs = self.pulled(os.path.join(self.dir, c.name))
            test.check(manifest == self.manifest and blobs == set(self.blobs),
                       f"{c.name}: the pulled image has upstream's manifest and blob digests")
            served = c.metrics().get('shoal_peer_mirror_requests_total{kind="blob",status="200"}', 0)
            test.check(served >= len(self.blobs), f"{c.name}: served the {len(self.blobs)} blobs "
                       f"itself (shoal_peer_mirror_requests_total blob/200 = {served:.0f})")
        sent = self.sent_by_registry(registry)
        for digest, size in sorted(self.blobs.items()):
            test.notes.append(f"mirror: registry sent blob sha256:{digest[:12]}... "
                              f"{sent[digest] / size:.2f} times ({sent[digest]} of {size} bytes)")
            test.check(size <= sent[digest] <= MIRROR_MAX_COPIES * size,
                       f"registry: sent blob sha256:{digest[:12]}... between 1 and "
                       f"{MIRROR_MAX_COPIES} times ({sent[digest]} bytes of {size})")

        # The runtime falls back to upstream on a 404: it must come at once, not after retries.
        missing = f"http://{addrs[0]}/v2/{MIRROR_IMAGE.split(':')[0]}/blobs/sha256:{'0' * 64}"
        asked = time.monotonic()
        try:
            with urllib.request.urlopen(missing, timeout=5) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError) as e:
            status = f"no answer within 5 s ({e})"
        test.notes.append(f"mirror: a digest upstream lacks -> {status} in "
                          f"{time.monotonic() - asked:.2f}s")
        test.check(status == 404, f"{agents[0].name}: a digest upstream lacks gets 404 within the "
                   f"5 s client timeout (got {status})")


def write_random(path, size):
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, MIB))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def read_data_dir(c):
    """{file name: sha256} of every entry in the container's /data (hidden files included)."""
    p = subprocess.Popen(["docker", "cp", f"{c.id}:/data/.", "-"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    found = {}
    try:
        with tarfile.open(fileobj=p.stdout, mode="r|") as tar:
            for member in tar:
                name = os.path.basename(member.name.rstrip("/"))
                if not member.isfile():
                    continue
                h = hashlib.sha256()
                f = tar.extractfile(member)
                for block in iter(lambda: f.read(MIB), b""):
                    h.update(block)
                found[name] = h.hexdigest()
    finally:
        p.stdout.close()
        if p.wait(timeout=60) != 0:
            raise Failure(f"docker cp from {c.name} failed: {p.stderr.read().decode().strip()}")
    return found


def describe_diff(found, expected):
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])
    return f"missing {missing}, unexpected {extra}, corrupt {wrong}"


def interrupt(signum, frame):
    raise KeyboardInterrupt()


def default_compose():
    if shutil.which("docker-compose"):
        return "docker-compose"
    return "docker compose"


def image_missing(args, image):
    return subprocess.run(["docker", "image", "inspect", f"{image}:{args.tag}"],
                          capture_output=True).returncode != 0


def ensure_images(args):
    images = ["shoal-tracker", "shoal-peer", "shoal-origin"]
    if shutil.which("skopeo"):
        images.append("shoal-registry-demo")
    if args.build or any(image_missing(args, i) for i in images):
        log("building the images (docker/build.sh)")
        subprocess.run(["bash", os.path.join(ROOT, "docker", "build.sh")], check=True)


def mirror_possible(args):
    """Whether the mirror phase can run: skopeo on this host and the shoal-registry-demo image.
    Where one lacks, the run says so and leaves the phase out; with CI=true that is a failure."""
    lacking = [what for what, missing in (("skopeo", not shutil.which("skopeo")),
                                          (f"the image shoal-registry-demo:{args.tag} "
                                           "(docker/build.sh needs docker-registry)",
                                           image_missing(args, "shoal-registry-demo")))
               if missing]
    if not lacking:
        return True
    if os.environ.get("CI") == "true":
        raise Failure(f"the mirror phase needs {' and '.join(lacking)}")
    log(f"SKIPPING the mirror phase: no {' and no '.join(lacking)} (apt-get install skopeo "
        "docker-registry)")
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=10, help="peers besides the two seeders (10)")
    parser.add_argument("--trackers", type=int, default=3, help="trackers (3; one is killed)")
    parser.add_argument("--origin-peers", type=int, default=8,
                        help="pull-through peers of the origin phase (8)")
    parser.add_argument("--keep", action="store_true", help="leave the swarm running for debugging")
    parser.add_argument("--timeout", type=float, default=480,
                        help="seconds from start-up until every peer must be complete (480)")
    parser.add_argument("--build", action="store_true", help="rebuild the images even if present")
    parser.add_argument("--tag", default="latest", help="image tag to test (latest)")
    # The caps stretch the transfers over about a minute so that the faults land mid-transfer;
    # fast seeders get seeder1's chunks out early, so it can be killed early.
    parser.add_argument("--peer-upload-limit", type=int, default=768 * 1024,
                        help="peers' SHOAL_UPLOAD_LIMIT, bytes/s (786432)")
    parser.add_argument("--seeder-upload-limit", type=int, default=8 * MIB,
                        help="seeders' SHOAL_UPLOAD_LIMIT, bytes/s (8388608)")
    parser.add_argument("--compose", default=default_compose(),
                        help="compose command (docker-compose, or 'docker compose')")
    parser.set_defaults(mirror=False)  # set once the images are there (mirror_possible)
    args = parser.parse_args()
    if args.peers < 2:
        parser.error("--peers must be at least 2")
    if args.trackers < 3:
        parser.error("--trackers must be at least 3: one is killed, one restarted")
    if args.origin_peers < 2:
        parser.error("--origin-peers must be at least 2")

    signal.signal(signal.SIGTERM, interrupt)  # clean up as on Ctrl-C
    os.makedirs(os.path.join(ROOT, "target"), exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="e2e-", dir=os.path.join(ROOT, "target"))
    test = Run(args, workdir)
    ok, error = False, None
    try:
        ensure_images(args)
        args.mirror = mirror_possible(args)
        ok = test.execute()
    except Failure as e:
        error = str(e)
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as e:  # a bug in this script: still clean up and say so
        error = f"{type(e).__name__}: {e}"
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if test.swarm and not ok and test.swarm.containers:
            for name in ("tracker-1", test.partitioned.name if test.partitioned else "peer-1",
                         "consumer", "registry"):
                if name in test.swarm.containers:
                    print(f"\n---- last log lines of {name} ----")
                    print(test.swarm.logs(test.swarm[name]))
            for c in test.origin_phase.containers[:3] if test.origin_phase else []:
                print(f"\n---- last log lines of {c.name} ----")
                print(test.swarm.logs(c))
        test.summary(ok, error)
        if args.keep:
            print(f"kept: project {test.project}, seed files in {workdir}\n"
                  f"remove with: docker rm -f -v $(docker ps -aq --filter label={EXTRA_LABEL}={test.project}); "
                  f"docker network rm {test.project}-origin; "
                  f"{args.compose} -p {test.project} -f compose.yaml "
                  f"{'-f docker/compose.mirror.yaml ' if args.mirror else ''}down -v; "
                  f"rm -rf {workdir}")
        else:
            if test.swarm:
                test.swarm.down()
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
