#!/usr/bin/env python3
"""Boot storm: N concurrent hotplug `add`s of fresh clones of one golden snapshot, then N `remove`s.

    .venv/bin/python benchmarks/boot_storm.py [--n 16,64,128] [--mode in-process|service|both]

Each disk is its own domain's backend, written into the xenstored double the
way libxl writes it (tests/conftest.py's Libxl), with target
rbd/bs-MODE-N-I,clone=rbd/golden@base; `scripts/block-rbd add|remove` then
runs as libxl runs it (env XENBUS_*, stdin /dev/null, cwd /), fuse mapper,
the default timeouts.  Against the floor storm of the same run: N concurrent
bare maps (rbd-fuse + losetup + one xenstore-write), then N bare unmaps.

Modes: `in-process` (BLOCK_RBD_SOCKET names a socket nobody listens on) and
`service` (`block-rbd service` started for each storm, stopped after it).

CPU, two columns.  "+tools": os.wait4's rusage of every block-rbd process
(what it waited for included), plus the service's utime+stime+cutime+cstime
since its start (cutime/cstime: the commands it ran and reaped).  "own":
block-rbd's own processes only, the scripts and the service's utime+stime
(service mode; an in-process run's tools cannot be told apart from it, so
there the target is held against "+tools").
rbd-fuse daemons are excluded: they outlive every block-rbd process, so no
wait4 of ours can contain them (checked and printed for each storm).
Memory: PSS (/proc/PID/smaps_rollup) of every live block-rbd process and the
service (not of the short-lived tools they run), summed, sampled every 50 ms;
the peak is printed.

Starts its own cluster (tools/testcluster.py) and xenstored double, and
removes them, every mount and every file it made, also on Ctrl-C.  Prints
targets next to the figures; asserts nothing.
"""

import argparse
import glob
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools"), os.path.join(ROOT, "tests")]

import rados  # noqa: E402
import rbd  # noqa: E402
from conftest import Libxl, leftovers, reap_fuse_mounts, write_config  # noqa: E402
from floor import floor_map, floor_unmap  # noqa: E402
from testcluster import TestCluster  # noqa: E402
from xenstored import XenstoredDouble  # noqa: E402

from block_rbd import registry  # noqa: E402
from block_rbd.config import SCHEMA  # noqa: E402
from block_rbd.errors import BlockRbdError  # noqa: E402
from block_rbd.target import ImageSpec  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "block-rbd")
GOLDEN, SNAP = "golden", "base"
MiB = 1 << 20
# libxl kills a hotplug script after 40 s.
HOTPLUG_KILL = 40
COMMAND_KILL = 60
SAMPLE_EVERY = 0.05
TICK = os.sysconf("SC_CLK_TCK")
TARGET_WALL, TARGET_CPU, TARGET_PSS_MIB = 1.5, 0.05, 512

# Process groups of every command still running: killed on Ctrl-C or an error.
LIVE = set()
LIVE_LOCK = threading.Lock()


class Tracker:
    """The processes of one storm: which are alive, the CPU of those reaped."""

    def __init__(self):
        self.lock = threading.Lock()
        self.live = set()
        self.cpu = 0.0

    def started(self, pid):
        with self.lock:
            self.live.add(pid)

    def ended(self, pid, cpu):
        with self.lock:
            self.live.discard(pid)
            self.cpu += cpu

    def pids(self):
        with self.lock:
            return list(self.live)


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass  # already gone


def kill_all():
    with LIVE_LOCK:
        groups = list(LIVE)
    for pid in groups:
        _kill_group(pid)


def spawn(argv, tracker, env, timeout):
    """Run argv in its own process group, killed after `timeout`; reap it with
    os.wait4 so its rusage (and its waited-for children's) is accounted.
    Returns (exit code, stdout, stderr, seconds)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        with LIVE_LOCK:
            LIVE.add(proc.pid)
        tracker.started(proc.pid)
        timer = threading.Timer(timeout, _kill_group, (proc.pid,))
        timer.daemon = True
        timer.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            with LIVE_LOCK:
                LIVE.discard(proc.pid)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        tracker.ended(proc.pid, usage.ru_utime + usage.ru_stime)
        elapsed = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"), elapsed


def pss_kib(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass  # exited (or a zombie) between listing and reading: no memory left
    return 0


class Sampler(threading.Thread):
    """Peak of the summed PSS of pids() (every SAMPLE_EVERY s) and the sampler's own CPU."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids = pids
        self.done = threading.Event()
        self.peak_kib = 0
        self.cpu = 0.0

    def run(self):
        while True:
            self.peak_kib = max(self.peak_kib, sum(pss_kib(pid) for pid in self.pids()))
            if self.done.wait(SAMPLE_EVERY):
                break
        self.cpu = time.thread_time()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(timeout=10)


def proc_cpu(pid):
    """(utime+stime, utime+stime+cutime+cstime) of a live process, in seconds (None if gone)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(v) for v in fields[11:13]) / TICK, sum(int(v) for v in fields[11:15]) / TICK


def fuse_daemons(under):
    """{pid: (ppid, cpu seconds)} of the rbd-fuse processes serving mounts below `under`."""
    found = {}
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            with open(proc + "/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            if not argv[0].endswith(b"rbd-fuse") or not any(a.startswith(under.encode() + b"/") for a in argv):
                continue
            with open(proc + "/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(proc[6:])] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return found


def storm(fn, items, bound):
    """Run fn(item) for all items at once; (results, wall seconds).  A result is
    None when fn did not finish within `bound` (its processes are then killed)."""
    pool = ThreadPoolExecutor(max_workers=len(items))
    started = time.monotonic()
    futures = [pool.submit(fn, item) for item in items]
    done, late = wait(futures, timeout=bound)
    wall = time.monotonic() - started
    if late:
        kill_all()
    pool.shutdown(wait=True)
    return [f.result() if f in done else None for f in futures], wall


class Storms:
    def __init__(self, cluster, xsd, ioctx, work):
        self.cluster = cluster
        self.xsd = xsd
        self.ioctx = ioctx
        self.work = work
        self.libxl = Libxl(xsd)
        self.next_domid = 100
        self.env = dict(os.environ, **xsd.env())

    def domid(self):
        self.next_domid += 1
        return self.next_domid

    # ---- the floor ------------------------------------------------------------------

    def floor(self, images):
        tracker = Tracker()
        floor_dir = os.path.join(self.work, "floor")
        backends = ["/local/domain/0/backend/vbd/%d/51712" % self.domid() for _ in images]

        def run(argv, env=None):
            code, out, err, _s = spawn(argv, tracker, env or self.env, COMMAND_KILL)
            if code != 0:
                raise RuntimeError("%s: %s" % (argv[0], err.strip() or "exit %d" % code))
            return out

        def one_map(i):
            try:
                return floor_map("fuse", self.cluster, images[i], os.path.join(floor_dir, str(i)), backends[i],
                                 self.env, run)
            except RuntimeError as exc:
                return exc

        def one_unmap(i):
            try:
                floor_unmap("fuse", devices[i], os.path.join(floor_dir, str(i)), run)
                return True
            except RuntimeError as exc:
                return exc

        indexes = list(range(len(images)))
        with Sampler(tracker.pids) as map_mem:
            devices, map_wall = storm(one_map, indexes, 4 * COMMAND_KILL)
        map_cpu = tracker.cpu
        mapped = [i for i in indexes if isinstance(devices[i], str)]
        with Sampler(tracker.pids) as unmap_mem:
            unmapped, unmap_wall = storm(one_unmap, mapped, 4 * COMMAND_KILL)
        for path in backends:
            self.xsd.rm(path)
        reap_fuse_mounts(floor_dir)
        return {"map": Phase(len(mapped), map_wall, map_cpu, map_mem, _errors(devices)),
                "unmap": Phase(sum(r is True for r in unmapped), unmap_wall, tracker.cpu - map_cpu, unmap_mem,
                               _errors(unmapped))}

    # ---- block-rbd --------------------------------------------------------------

    def hotplug_storms(self, mode, n, service_ok):
        """The add storm and the remove storm of one mode; None if the mode cannot run here."""
        work = os.path.join(self.work, "%s-%d" % (mode, n))
        os.makedirs(work)
        overrides = {key: default for key, (default, _check, _doc) in SCHEMA.items() if key.startswith("timeouts.")}
        config = write_config(os.path.join(work, "block-rbd.yaml"), self.cluster, work, mapper="fuse", **overrides)
        sock = os.path.join(work, "service.sock")
        env = dict(self.env, BLOCK_RBD_CONFIG=config, BLOCK_RBD_SOCKET=sock)
        service = None
        if mode == "service":
            if not service_ok:
                return None
            service = Service(sock, env, work)
        images = ["bs-%s-%d-%d" % (mode, n, i) for i in range(n)]
        paths = []
        for image in images:
            paths.append(self.libxl.backend("%s/%s,clone=%s/%s@%s" % (self.cluster.pool, image, self.cluster.pool,
                                                                      GOLDEN, SNAP),
                                            domid=self.domid(), devid=51712, vm="bench-" + image))
        tracker = Tracker()

        def hotplug(command):
            def one(path):
                run_env = dict(env, XENBUS_PATH=path, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend")
                # the script itself, as libxl execs it (its #! line and all)
                code, _out, err, secs = spawn([SCRIPT, command], tracker, run_env, HOTPLUG_KILL)
                if code == 0 and command == "add" and \
                        self.xsd.read("/local/domain/0/%s/hotplug-status" % path) != "connected":
                    return RuntimeError("exit 0 without hotplug-status=connected")
                if code == 0:
                    return secs
                return RuntimeError(err.strip().splitlines()[-1] if err.strip() else "exit %d" % code)
            return one

        try:
            pids = (lambda: tracker.pids() + [service.pid]) if service else tracker.pids
            with Sampler(pids) as add_mem:
                added, add_wall = storm(hotplug("add"), paths, HOTPLUG_KILL + 30)
            # The service's CPU counts from its start, as if the storm had started it.
            middle_own, middle = service.cpu() if service else (0.0, 0.0)
            add_cpu = tracker.cpu
            daemons = fuse_daemons(os.path.join(work, "fuse"))
            with Sampler(pids) as remove_mem:
                removed, remove_wall = storm(hotplug("remove"), paths, HOTPLUG_KILL + 30)
            after_own, after = service.cpu() if service else (0.0, 0.0)
            service_note = service.state() if service else None
        finally:
            if service:
                service.stop()
        for path in paths:
            self.xsd.rm("/local/domain/0/" + path)
            self.xsd.rm("/local/domain/%s" % path.split("/")[2])
        add = Phase(sum(isinstance(r, float) for r in added), add_wall, add_cpu + middle, add_mem,
                    _errors(added), [r for r in added if isinstance(r, float)],
                    own=add_cpu + middle_own if service else None)
        remove = Phase(sum(isinstance(r, float) for r in removed), remove_wall, tracker.cpu - add_cpu + after - middle,
                       remove_mem, _errors(removed), [r for r in removed if isinstance(r, float)],
                       own=tracker.cpu - add_cpu + after_own - middle_own if service else None)
        notes = []
        if service:
            notes.append("service: %.2f CPU-s from its start to the end of the add storm, %.2f in the remove storm"
                         " (in the figures above); of these its own %.2f and %.2f, the rest the tools it ran "
                         "(xenstore-*, losetup, fusermount, rbd-fuse before it daemonizes)"
                         % (middle, after - middle, middle_own, after_own - middle_own))
        if service_note:
            notes.append(service_note)
        if mode == "in-process" and os.path.exists(sock):
            notes.append("something created %s during the in-process storms" % sock)
        notes.append(_daemon_note(daemons, n, service))
        notes.append(self.check_and_clean(work, images))
        return add, remove, notes

    def check_and_clean(self, work, images):
        """What the storm left (loops, mounts, daemons, state records, registrations), removed."""
        left = leftovers(os.path.join(work, "block-rbd.yaml"))
        state = os.path.join(work, "state")
        records = [p for p in glob.glob(os.path.join(state, "**", "*"), recursive=True)
                   if os.path.isfile(p) and not p.startswith(os.path.join(state, "locks") + os.sep)]
        daemons = fuse_daemons(os.path.join(work, "fuse"))
        regs = {}
        for image in images:
            try:
                header = registry.header_object(self.ioctx, ImageSpec(self.cluster.pool, image))
            except BlockRbdError:
                continue  # never created: nothing can be registered on it
            with rados.ReadOpCtx() as op:
                items, _ret = self.ioctx.get_omap_vals(op, "", registry.PREFIX, 1000)
                self.ioctx.operate_read_op(op, header)
                keys = [key for key, _value in items]
            if keys:
                regs[header] = keys
        reap_fuse_mounts(os.path.join(work, "fuse"))
        for pid in fuse_daemons(os.path.join(work, "fuse")):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # exited meanwhile
        for path in glob.glob("/sys/block/loop*/loop/backing_file"):
            try:
                with open(path) as handle:
                    if handle.read().startswith(os.path.join(work, "fuse") + "/"):
                        subprocess.run(["losetup", "--detach", "/dev/" + path.split("/")[3]],
                                       capture_output=True, timeout=COMMAND_KILL)
            except OSError:
                pass  # detached meanwhile
        for path in records:
            os.unlink(path)
        for header, keys in regs.items():
            with rados.WriteOpCtx() as op:
                self.ioctx.remove_omap_keys(op, tuple(keys))
                self.ioctx.operate_write_op(op, header)
        found = ["%d loop device(s)" % len(left["loops"])] if left["loops"] else []
        found += ["%d fuse mount(s)" % len(left["mounts"])] if left["mounts"] else []
        found += ["%d rbd-fuse daemon(s)" % len(daemons)] if daemons else []
        found += ["%d state record(s)" % len(records)] if records else []
        found += ["%d registration(s)" % sum(map(len, regs.values()))] if regs else []
        return "left behind: " + (", ".join(found) + " (cleaned up)" if found else "nothing")


class Phase:
    def __init__(self, ok, wall, cpu, sampler, errors, latencies=(), own=None):
        self.ok, self.wall, self.cpu, self.errors = ok, wall, cpu, errors
        # block-rbd's own processes only (the scripts and the service itself), where it can be told
        self.own = own
        self.peak_mib = sampler.peak_kib / 1024.0
        self.sampler_cpu = sampler.cpu
        self.latencies = list(latencies)


def _errors(results):
    """{first line of each distinct failure: count}."""
    found = {}
    for result in results:
        if result is None or isinstance(result, Exception):
            text = "no result within the storm's bound" if result is None else str(result)
            found[text] = found.get(text, 0) + 1
    return found


def _daemon_note(daemons, n, service):
    ppids = sorted(set(ppid for ppid, _cpu in daemons.values()))
    note = ("rbd-fuse daemons after the add storm: %d of %d, alive after every block-rbd process was reaped, "
            "parents %s, %.2f CPU-s so far: excluded" % (len(daemons), n, ppids, sum(c for _p, c in daemons.values())))
    if service and service.pid in ppids:
        note += "; WARNING: some are children of the service, whose cutime will include them once reaped"
    return note


class Service:
    """`block-rbd service` started directly, as a socket unit would."""

    def __init__(self, sock, env, work):
        self.sock = sock
        self.log = open(os.path.join(work, "service.log"), "w")
        self.proc = subprocess.Popen([SCRIPT, "service", "--socket", sock, "--idle", "600"],
                                     env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        self.last_cpu = (0.0, 0.0)
        with LIVE_LOCK:
            LIVE.add(self.pid)
        deadline = time.monotonic() + 20
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the service did not come up at %s (see its output above)" % sock)
            time.sleep(0.05)

    def _answers(self):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            try:
                probe.connect(self.sock)
                return True
            except OSError:
                return False

    def cpu(self):
        """Its CPU so far (the last reading if it is gone: its state() then says so)."""
        self.last_cpu = proc_cpu(self.pid) or self.last_cpu  # (own, with the tools it ran)
        return self.last_cpu

    def state(self):
        code = self.proc.poll()
        return None if code is None else "WARNING: the service exited (%d) during the storms" % code

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _kill_group(self.pid)
                self.proc.wait(timeout=15)
        with LIVE_LOCK:
            LIVE.discard(self.pid)
        self.log.close()
        if self.proc.returncode not in (0, -signal.SIGTERM):
            with open(self.log.name) as handle:
                tail = handle.read().strip().splitlines()[-5:]
            print("  service exited %d; last output: %s" % (self.proc.returncode, " | ".join(tail) or "(none)"))


def service_available(env):
    try:
        result = subprocess.run([sys.executable, SCRIPT, "service", "--help"], env=env, cwd="/",
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def make_images(ioctx, floor_names):
    """The golden image and its snapshot; the floor's clones of it."""
    rbd.RBD().create(ioctx, GOLDEN, 1 << 30, old_format=False)
    with rbd.Image(ioctx, GOLDEN) as image:
        image.write(os.urandom(4 * MiB), 0)
        image.create_snap(SNAP)
    for name in floor_names:
        try:
            rbd.RBD().clone(ioctx, GOLDEN, SNAP, ioctx, name)
        except rbd.InvalidArgument:  # clone v1 only on this cluster: it needs a protected snapshot
            with rbd.Image(ioctx, GOLDEN) as image:
                image.protect_snap(SNAP)
            rbd.RBD().clone(ioctx, GOLDEN, SNAP, ioctx, name)


def verdict(ok):
    return "PASS" if ok else "MISS"


def report(n, mode, floor, result):
    print("\nN = %d, %s" % (n, mode))
    if result is None:
        print("  service: not available in this checkout")
        return
    if isinstance(result, str):
        print("  " + result)
        return
    add, remove, notes = result
    print("  %-11s %7s %8s %7s %11s %11s %13s" % ("", "ok", "wall s", "ratio", "own CPU-s", "+tools CPU-s",
                                                 "peak PSS MiB"))
    print("  %-11s %7s %8s %7s %11s %11s" % ("", "", "", "", "per disk", "per disk"))
    for label, base in (("floor map", floor["map"]), ("floor unmap", floor["unmap"])):
        print("  %-11s %7s %8.2f %7s %11s %11.4f %13.1f" % (label, "%d/%d" % (base.ok, n), base.wall, "", "",
                                                           base.cpu / n, base.peak_mib))
    for label, phase, base in (("add", add, floor["map"]), ("remove", remove, floor["unmap"])):
        ratio = phase.wall / base.wall if base.wall else float("nan")
        own = "%.4f" % (phase.own / n) if phase.own is not None else "-"
        print("  %-11s %7s %8.2f %6.2fx %11s %11.4f %13.1f" % (label, "%d/%d" % (phase.ok, n), phase.wall, ratio,
                                                              own, phase.cpu / n, phase.peak_mib))
        if phase.latencies:
            print("  %-11s per run: median %.2f s, max %.2f s" % ("", statistics.median(phase.latencies),
                                                                   max(phase.latencies)))
        for text, count in sorted(phase.errors.items()):
            print("  %-11s %d failed: %s" % ("", count, text))
    peak = max(add.peak_mib, remove.peak_mib)
    print("  targets: %d of %d succeed: %s | wall <= %.1fx floor: add %s, remove %s | <= %.2f CPU-s/disk: add %s, "
          "remove %s | peak PSS <= %d MiB%s: %s"
          % (n, n, verdict(add.ok == n and remove.ok == n), TARGET_WALL,
             verdict(add.wall <= TARGET_WALL * floor["map"].wall),
             verdict(remove.wall <= TARGET_WALL * floor["unmap"].wall), TARGET_CPU,
             verdict(_own(add) / n <= TARGET_CPU), verdict(_own(remove) / n <= TARGET_CPU), TARGET_PSS_MIB,
             "" if n == 128 else " (set for N = 128)", verdict(peak <= TARGET_PSS_MIB)))
    print("  sampler's own CPU: %.2f s (add), %.2f s (remove)" % (add.sampler_cpu, remove.sampler_cpu))
    for note in notes:
        print("  " + note)


def _own(phase):
    """Our own processes' CPU where it can be told apart, else everything (in-process runs)."""
    return phase.own if phase.own is not None else phase.cpu


def counts(text):
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, e.g. 16,64")
    return values


def _terminate(_signum, _frame):
    raise KeyboardInterrupt


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=counts, action="append", help="storm sizes, e.g. --n 16 --n 64 or --n 16,64 "
                        "(default 16,64,128)")
    parser.add_argument("--mode", choices=("in-process", "service", "both"), default="both")
    parser.add_argument("--logs", metavar="DIR", help="keep each storm's xen-hotplug.log here")
    args = parser.parse_args()
    sizes = sorted(set(v for group in (args.n or [[16, 64, 128]]) for v in group))
    modes = ["in-process", "service"] if args.mode == "both" else [args.mode]
    signal.signal(signal.SIGTERM, _terminate)
    # Every concurrent run holds a few descriptors here (output files, the double's sockets).
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = tempfile.mkdtemp(prefix="brbd-storm-")
    try:
        with TestCluster(os.path.join(work, "ceph")) as cluster, \
                XenstoredDouble(os.path.join(work, "xs.sock")) as xsd:
            handle = rados.Rados(conffile=cluster.conf, rados_id=cluster.user,
                                 conf={"keyring": cluster.user_keyring})
            handle.connect()
            ioctx = handle.open_ioctx(cluster.pool)
            try:
                storms = Storms(cluster, xsd, ioctx, work)
                service_ok = "service" in modes and service_available(storms.env)
                floor_names = ["floor-%d" % i for i in range(max(sizes))]
                make_images(ioctx, floor_names)
                print("boot storm: fuse mapper, clones of %s/%s@%s, %d CPUs, load average %s at start"
                      % (cluster.pool, GOLDEN, SNAP, os.cpu_count(), " ".join("%.2f" % v for v in os.getloadavg())))
                for n in sizes:
                    floor = storms.floor(floor_names[:n])
                    for mode in modes:
                        try:
                            result = storms.hotplug_storms(mode, n, service_ok)
                        except RuntimeError as exc:  # the service did not start
                            result = str(exc)
                        report(n, mode, floor, result)
                        sys.stdout.flush()
            finally:
                kill_all()
                for mount_dir in [os.path.join(work, "floor")] + glob.glob(os.path.join(work, "*", "fuse")):
                    reap_fuse_mounts(mount_dir)
                ioctx.close()
                handle.shutdown()
    except KeyboardInterrupt:
        print("\ninterrupted: cleaned up", file=sys.stderr)
        return 130
    finally:
        kill_all()
        if args.logs:
            for log in glob.glob(os.path.join(work, "*", "xen-hotplug.log")):
                os.makedirs(args.logs, exist_ok=True)
                shutil.copy(log, os.path.join(args.logs, os.path.basename(os.path.dirname(log)) + ".log"))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
