#!/usr/bin/python3
"""Xen-in-QEMU harness: boot Xen + a busybox dom0 under TCG in a network namespace of
our own, next to the project's throwaway Ceph cluster, run a test program in dom0 and
collect its results.

Traffic stays inside the namespace (bridge 10.250.250.1/24, dom0 10.250.250.2) and on
127.0.0.0/8.  Everything started here is torn down on every exit path.

CLI:
  python3 tests/xen/harness.py run [--program DIR] [--no-cluster] [--timeout S] [--keep DIR]
  python3 tests/xen/harness.py cleanup      # remove brbd-* namespaces of dead harnesses

A test program is a directory: its files land in dom0 under /brbd/run/ and `main` is run
there (busybox sh available, /usr/lib/brbd/brbd-lib.sh has helpers); a `rootfs/` subdir is
overlaid onto dom0's / (e.g. rootfs/etc/xen/scripts/dummy).  The program prints
`BRBD-RESULT <name> PASS|FAIL|SKIP <seconds> <detail>` lines and leaves files in
/brbd/out/, which come back in <rundir>/out/.

A host.py with BOOT = "systemd" gets a real Debian dom0 booted from a disk instead
(tests/xen/sysdom0.py): the harness prepares each machine's disk and its drive(ctx)
boots, reboots and cuts the power itself (SystemdContext: ctx.boot, ctx.wait_down,
ctx.power_cut, ctx.poweroff, ctx.serial, ctx.disk, ctx.journal).
"""

import argparse
import atexit
import base64
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
import socket
import tarfile
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import build_dom0  # noqa: E402
from cpio import CpioWriter, write_tree  # noqa: E402

NS_PREFIX = "brbd-"
BRIDGE = "brbd0"
TAP = "brbdtap0"
HOST_ADDR = "10.250.250.1"
DOM0_ADDR = "10.250.250.2"
PREFIX = 24
DOM0_MAC = "52:54:00:fa:fa:02"
# dom0 asks the host for cluster faults here (one request line, one reply line)
CONTROL_PORT = 7450
CLONE_NEWNET = 0x40000000

# CPUs of the QEMU machine (= dom0's vcpus; guests share them): MTTCG runs one host thread
# per vcpu.  Two by default: measured on the 2-core CI machine (Debian 13 stack), with one
# vcpu 16 concurrent adds starved each other past the 30 s budget (7/16) and a 4-disk PV
# guest took 47 s; with two, 16/16 in 21 s and 26 s (dom0, its daemons and the guest run
# side by side).  A program's host.py may set QEMU_SMP (two machines at once keep one
# each); BLOCK_RBD_XEN_SMP overrides both.
SMP = 2
QEMU_NICE = 10
# boots again of a machine whose dom0 kernel died before the program started (early_crash)
EARLY_CRASH_REBOOTS = 1
# A program's host.py may ask for another CPU model (QEMU_CPU: the two-host gate needs
# SVM with nested paging for HVM/PVH guests); BLOCK_RBD_XEN_CPU overrides both.
CPU = "qemu64"
XEN_ARGS = ("console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=%d "
            "serial_tx_buffer=4M loglvl=all guest_loglvl=all")
DOM0_ARGS = "console=hvc0 earlyprintk=xen loglevel=4"



class Machine:
    """One Xen host under QEMU: machine 0 is the one-host gate's (tap brbdtap0, dom0
    10.250.250.2, serial.log, out/); machine i > 0 gets tap brbdtap<i>, 10.250.250.<2+i>,
    serial-<name>.log and out-<name>/.  Every machine has its own dom0 identity."""

    def __init__(self, index, name):
        self.index = index
        self.name = name
        self.tap = f"brbdtap{index}"
        self.addr = f"10.250.250.{2 + index}"
        self.mac = f"52:54:00:fa:fa:{2 + index:02x}"
        self.suffix = f"-{name}" if name else ""
        self.qemu = None
        self.stages = {}

    def serial(self, workdir):
        return os.path.join(workdir, f"serial{self.suffix}.log")

    def outdir(self, workdir):
        return os.path.join(workdir, f"out{self.suffix}")


def machines_of(names):
    """[Machine] for a program's MACHINES (default: the one-host gate's single machine)."""
    if not names:
        return [Machine(0, "")]
    return [Machine(i, name) for i, name in enumerate(names)]


RESULT_RE = re.compile(r"BRBD-RESULT (\S+) (PASS|FAIL|SKIP) (\S+) ?(.*)$")
STAGE_RE = re.compile(r"BRBD-STAGE (\S+) (\S+)")
BEGIN_RE = re.compile(r"BRBD-SCENARIO-BEGIN (\S+) (\S+)")


def log(msg):
    print(f"[harness {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv, timeout=60, check=True, **kw):
    return subprocess.run(argv, check=check, timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


# ---------------------------------------------------------------- network namespace
class Namespace:
    def __init__(self, taps=(TAP,)):
        self.name = f"{NS_PREFIX}{os.getpid()}"
        self.taps = list(taps)
        self.up = False

    def create(self):
        cleanup_stale()
        run(["ip", "netns", "add", self.name])
        self.up = True
        n = ["ip", "-n", self.name]
        run(n + ["link", "set", "lo", "up"])
        run(n + ["link", "add", BRIDGE, "type", "bridge"])
        run(n + ["addr", "add", f"{HOST_ADDR}/{PREFIX}", "dev", BRIDGE])
        run(n + ["link", "set", BRIDGE, "up"])
        for tap in self.taps:
            run(n + ["tuntap", "add", "dev", tap, "mode", "tap"])
            run(n + ["link", "set", tap, "master", BRIDGE])
            run(n + ["link", "set", tap, "up"])
        log(f"namespace {self.name}: {BRIDGE} {HOST_ADDR}/{PREFIX}, taps {' '.join(self.taps)}")

    def exec_argv(self, argv):
        return ["ip", "netns", "exec", self.name] + list(argv)

    def destroy(self):
        if not self.up:
            return
        kill_ns_pids(self.name)
        run(["ip", "netns", "del", self.name], check=False)
        self.up = False
        log(f"namespace {self.name} removed")


def kill_ns_pids(name):
    """Kill what still runs in our namespace: only processes this harness started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        p = run(["ip", "netns", "pids", name], check=False)
        pids = [int(x) for x in p.stdout.split() if x.isdigit()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(1.0)


def cleanup_stale():
    """Remove brbd-<pid> namespaces whose harness process is gone."""
    p = run(["ip", "netns", "list"], check=False)
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)", name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            log(f"removing stale namespace {name}")
            kill_ns_pids(name)
            run(["ip", "netns", "del", name], check=False)


# ---------------------------------------------------------------- test cluster
class Cluster:
    """tools/testcluster.py, run inside the namespace bound to the bridge address."""

    def __init__(self, ns, workdir, suite=None):
        self.ns = ns
        self.suite = suite  # Ceph from a Debian root of this suite (tools/debianroot.py)
        self.dir = os.path.join(workdir, "cluster")
        self.script = os.path.join(REPO, "tools", "testcluster.py")
        self.info = None

    def available(self):
        return os.path.exists(self.script)

    def start(self, timeout=300):
        os.makedirs(self.dir, exist_ok=True)
        t0 = time.time()
        if self.suite:
            # built (or found cached) out here: the namespace has no route to the mirror
            build_dom0.debianroot.build(self.suite)
        p = subprocess.run(self.ns.exec_argv(["/usr/bin/python3", self.script, "start", self.dir,
                                              "--addr", HOST_ADDR]
                                             + (["--suite", self.suite] if self.suite else [])),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout, cwd=REPO)
        with open(os.path.join(self.dir, "start.log"), "w") as fh:
            fh.write(p.stdout + "\n--- stderr ---\n" + p.stderr)
        if p.returncode != 0:
            raise RuntimeError(f"testcluster start failed rc={p.returncode}: {p.stderr[-2000:]}")
        self.info = json.loads(p.stdout[p.stdout.index("{"):])
        log(f"cluster up in {time.time() - t0:.1f}s: {sorted(self.info)}")
        return self.info

    def stop(self):
        if self.info is None and not os.path.isdir(self.dir):
            return
        try:
            subprocess.run(self.ns.exec_argv(["/usr/bin/python3", self.script, "stop",
                                              "--keep", self.dir]),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120, cwd=REPO)
        except subprocess.TimeoutExpired:
            log("testcluster stop timed out (namespace teardown kills the rest)")
        self.info = None

    def ctl(self, command, *args, timeout=120):
        """`tools/testcluster.py COMMAND DIR ARGS` inside the namespace (daemons it starts
        bind to the bridge address); returns the CompletedProcess."""
        return run(self.ns.exec_argv(["/usr/bin/python3", self.script, command, self.dir]
                                     + [str(a) for a in args]),
                   timeout=timeout, check=False, cwd=REPO)

    def admin(self, argv, timeout=120):
        """Run a ceph/rbd admin command against the cluster, inside the namespace."""
        i = self.info
        return run(self.ns.exec_argv(list(argv) + ["-c", i["conf"], "--id", "admin",
                                                   "--keyring", i["admin_keyring"]]),
                   timeout=timeout, check=False)


def in_netns(ns_name, make):
    """make() run inside namespace ns_name; what it returns (a socket: it stays in that
    namespace whichever thread uses it afterwards).

    setns() moves only the calling thread, so a short-lived thread does it.
    """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    made = {}

    def run_there():
        fd = os.open(f"/run/netns/{ns_name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {ns_name}")
            made["value"] = make()
        except OSError as exc:
            made["error"] = exc
        finally:
            os.close(fd)

    t = threading.Thread(target=run_there)
    t.start()
    t.join()
    if "error" in made:
        raise made["error"]
    return made["value"]


def netns_listen(ns_name, addr, port):
    """A TCP socket listening on addr:port inside namespace ns_name."""
    def make():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(8)
        return sock
    return in_netns(ns_name, make)


def netns_connect(ns_name, addr, port, timeout=10):
    """A TCP connection to addr:port made inside namespace ns_name."""
    return in_netns(ns_name, lambda: socket.create_connection((addr, port), timeout=timeout))


class Control:
    """Host actions dom0 asks for while it runs (`brbd_host ACTION ARGS` in brbd-lib.sh):
    one line in, host.py's host_action(ctx, action, args) runs, one line back
    ("ok DETAIL" or "error DETAIL").  Every request is kept for verify and the summary."""

    def __init__(self, ns, hooks, ctx):
        self.sock = netns_listen(ns.name, HOST_ADDR, CONTROL_PORT)
        self.hooks = hooks
        self.ctx = ctx
        self.actions = []
        self.threads = []
        self.t0 = time.time()
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn):
        with conn:
            conn.settimeout(30)
            try:
                line = conn.makefile("r", encoding="utf-8", errors="replace").readline().split()
            except OSError:
                return
            rec = {"request": " ".join(line), "at": round(time.time() - self.t0, 2)}
            self.actions.append(rec)
            try:
                if not line:
                    raise ValueError("empty request")
                reply = "ok " + str(self.hooks.host_action(self.ctx, line[0], line[1:]))
            except Exception as exc:  # reported to dom0 and kept: the scenario decides
                reply = f"error {type(exc).__name__}: {exc}"
            rec.update(reply=reply, seconds=round(time.time() - self.t0 - rec["at"], 2))
            log(f"host action {rec['request']!r}: {reply}")
            try:
                conn.settimeout(10)
                conn.sendall(reply.replace("\n", " ").encode() + b"\n")
            except OSError:
                pass

    def close(self, wait=60):
        self.sock.close()
        for t in list(self.threads):
            t.join(timeout=wait)


# ---------------------------------------------------------------- per-run initrd layer
def build_run_cpio(path, program_dir, config, files):
    """config: dict -> /brbd/config (sh); files: {dom0 path: bytes or (bytes, mode)}."""
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.directory("brbd")
    lines = "".join(f"{k}={shell_quote(str(v))}\n" for k, v in sorted(config.items()))
    w.file("/brbd/config", lines.encode())
    if program_dir:
        rootfs = os.path.join(program_dir, "rootfs")
        w.directory("brbd/run")
        for name in sorted(os.listdir(program_dir)):
            full = os.path.join(program_dir, name)
            if name == "rootfs" or name == "__pycache__":
                continue
            if os.path.isdir(full):
                write_tree(w, full, f"brbd/run/{name}")
            else:
                with open(full, "rb") as fh:
                    w.file(f"/brbd/run/{name}", fh.read(), os.stat(full).st_mode & 0o777)
        if os.path.isdir(rootfs):
            write_tree(w, rootfs, "")
    for dest, data in sorted(files.items()):
        mode = 0o644
        if isinstance(data, tuple):
            data, mode = data
        w.ensure_parents(dest)
        w.file(dest, data, mode)
    w.close()
    with open(path, "wb") as fh:
        fh.write(gzip.compress(buf.getvalue(), compresslevel=1, mtime=0))


def shell_quote(s):
    return "'" + s.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------- serial output
def parse_serial(text, outdir):
    lines = [ln.rstrip("\r") for ln in text.replace("\r\n", "\n").split("\n")]
    results, stages, archive, begun = [], {}, None, {}
    in_arch, arch_lines, arch_hdr = False, [], None
    for ln in lines:
        if in_arch:
            if "BRBD-ARCHIVE-END" in ln:
                in_arch = False
                archive = (arch_hdr, arch_lines)
            elif re.fullmatch(r"[A-Za-z0-9+/=]+", ln):
                arch_lines.append(ln)
            continue
        m = re.search(r"BRBD-ARCHIVE-BEGIN (\d+) ([0-9a-f]{32})", ln)
        if m:
            in_arch, arch_lines, arch_hdr = True, [], (int(m.group(1)), m.group(2))
            continue
        m = RESULT_RE.search(ln)
        if m:
            results.append({"name": m.group(1), "status": m.group(2),
                            "seconds": _float(m.group(3)), "detail": m.group(4)})
            continue
        m = STAGE_RE.search(ln)
        if m:
            stages[m.group(1)] = _float(m.group(2))
            continue
        m = BEGIN_RE.search(ln)
        if m:
            begun[m.group(1)] = _float(m.group(2))
    archive_ok = None
    if archive:
        (size, md5), body = archive
        data = base64.b64decode("".join(body))
        archive_ok = len(data) == size and hashlib.md5(data).hexdigest() == md5
        if archive_ok:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(outdir, filter="data")
                else:  # Debian 12's python3.11.2 predates extraction filters
                    for m in tf.getmembers():
                        if m.name.startswith("/") or ".." in m.name.split("/") or not (
                                m.isfile() or m.isdir()):
                            raise RuntimeError(f"refusing archive member {m.name!r}")
                    tf.extractall(outdir)
        else:
            log(f"archive corrupt: {len(data)} bytes (want {size}), md5 mismatch")
    # a scenario that began and never reported hung or was killed with the run
    reported = {r["name"] for r in results}
    last = stages.get("main-end")
    for name, start in begun.items():
        if name not in reported:
            ran = "until the run ended at %.1f s" % last if last and start else "until the run was killed"
            results.append({"name": name, "status": "FAIL", "seconds": None,
                            "detail": "began at dom0 uptime %s s and never reported (%s)" % (start, ran)})
    return {"results": results, "stages": stages, "archive_ok": archive_ok, "begun": begun,
            "done": any("BRBD-DONE" in ln for ln in lines),
            "boot_fail": [ln for ln in lines if "BRBD-BOOT-FAIL" in ln]}


def _float(s):
    try:
        return float(s)
    except ValueError:
        return None


# ---------------------------------------------------------------- the run
class Harness:
    def __init__(self, program=None, use_cluster=True, timeout=900, keep=None,
                 checkout=None, nic="e1000", images=None, stack="debian12", cluster_suite=None,
                 settings=None):
        self.program = os.path.abspath(program) if program else None
        self.use_cluster = use_cluster
        self.timeout = timeout
        self.keep = keep
        self.checkout = checkout
        self.nic = nic
        self.stack = stack  # build_dom0.STACKS: the dom0's Debian release
        self.cluster_suite = cluster_suite  # None: this host's Ceph; "trixie": Debian 13's
        self.settings = dict(settings or {})  # more KEY=VALUE for dom0's /brbd/config
        self.images = list(images or [])  # [(pool/image, size_mb)] created before boot
        spec = os.path.join(self.program or "", "images")
        if self.program and os.path.exists(spec):
            with open(spec) as fh:
                for line in fh:
                    if line.split() and not line.startswith("#"):
                        name, size = line.split()[:2]
                        self.images.append((name, int(size)))
        self.hooks = load_host_hooks(self.program)
        self.machines = machines_of(getattr(self.hooks, "MACHINES", None))
        # "systemd": a Debian dom0 booted from a disk, each boot started by drive(ctx)
        self.boot_mode = getattr(self.hooks, "BOOT", None)
        self.smp = max(1, int(os.environ.get("BLOCK_RBD_XEN_SMP") or getattr(self.hooks, "QEMU_SMP", SMP)))
        self.ns = None
        self.cluster = None
        self.control = None
        self.workdir = None
        self._torn = False
        self.drive = None  # the host's drive(ctx) results, for a program that has one

    @property
    def host_stages(self):
        return self.machines[0].stages

    def machine(self, name):
        return next(m for m in self.machines if m.name == name)

    def teardown(self):
        if self._torn:
            return
        self._torn = True
        for m in self.machines:
            if m.qemu and m.qemu.poll() is None:
                log(f"killing QEMU {m.name}".rstrip())
                try:
                    os.killpg(m.qemu.pid, signal.SIGCONT)  # a frozen one too
                    os.killpg(m.qemu.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    m.qemu.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if self.control:
            self.control.close(wait=5)
        if self.cluster:
            self.cluster.stop()
        if self.ns:
            self.ns.destroy()

    def run(self):
        t_start = time.time()
        atexit.register(self.teardown)
        old_term = signal.signal(signal.SIGTERM, _raise_exit)
        timings = {}
        try:
            if self.boot_mode == "systemd":
                return self._run_systemd(t_start, timings)
            t0 = time.time()
            boot = build_dom0.build(self.checkout, stack=self.stack)
            timings["build"] = round(time.time() - t0, 2)
            if self.keep:
                self.workdir = os.path.abspath(self.keep)
                os.makedirs(self.workdir, exist_ok=True)
            else:
                self.workdir = tempfile.mkdtemp(prefix="brbd-xen-")
            for m in self.machines:
                shutil.rmtree(m.outdir(self.workdir), ignore_errors=True)
                os.makedirs(m.outdir(self.workdir))

            self.ns = Namespace([m.tap for m in self.machines])
            self.ns.create()
            config = {"BRBD_IP": DOM0_ADDR, "BRBD_PREFIX": PREFIX, "BRBD_HOST": HOST_ADDR,
                      "BRBD_TIMEOUT": max(60, self.timeout - 120), "BRBD_NIC": self.nic,
                      "BRBD_HAVE_CLUSTER": 0, "BRBD_ONLY": os.environ.get("BLOCK_RBD_XEN_ONLY", ""),
                      "BRBD_STACK": self.stack, **self.settings}
            files = {}
            for m in self.machines:
                m.config = {"BRBD_IP": m.addr, "BRBD_MACHINE": m.name,
                            "BRBD_PEERS": " ".join(o.addr for o in self.machines if o is not m)}
                m.files = {}
            if self.use_cluster:
                self.cluster = Cluster(self.ns, self.workdir, self.cluster_suite)
                if self.cluster.available():
                    t0 = time.time()
                    info = self.cluster.start()
                    config.update(self._cluster_files(info, files))
                    timings["cluster"] = round(time.time() - t0, 2)
                    if hasattr(self.hooks, "prepare"):
                        t0 = time.time()
                        self.hooks.prepare(HostContext(self, boot, config, files))
                        timings["prepare"] = round(time.time() - t0, 2)
                    if hasattr(self.hooks, "host_action"):
                        self.control = Control(self.ns, self.hooks,
                                               HostContext(self, boot, config, files))
                        config["BRBD_CONTROL"] = f"{HOST_ADDR} {CONTROL_PORT}"
                else:
                    log("tools/testcluster.py not present: running without a cluster")
                    self.cluster = None

            initrds = {}
            for m in self.machines:
                run_initrd = os.path.join(self.workdir, f"run{m.suffix}.cpio.gz")
                build_run_cpio(run_initrd, self.program, dict(config, **m.config), dict(files, **m.files))
                initrds[m.name] = os.path.join(self.workdir, f"initrd{m.suffix}.cpio.gz")
                with open(initrds[m.name], "wb") as out:
                    for p in (boot["initrd"], run_initrd):
                        with open(p, "rb") as fh:
                            shutil.copyfileobj(fh, out)

            t0 = time.time()
            rcs = self._boot(boot, initrds, HostContext(self, boot, config, files))
            timings["qemu"] = round(time.time() - t0, 2)
            timings["qemu_start_to_stage"] = self.host_stages
            if self.control:
                self.control.close()
            parsed = self._parse_all(rcs)
            if self.cluster is not None and hasattr(self.hooks, "verify"):
                t0 = time.time()
                try:
                    self.hooks.verify(HostContext(self, boot, config, files), parsed)
                except Exception as exc:  # a broken check is a failure, not a crash
                    parsed["results"].append({"name": "host-verify", "status": "FAIL",
                                              "seconds": 0.0, "detail": repr(exc)})
                timings["verify"] = round(time.time() - t0, 2)
            timings["total"] = round(time.time() - t_start, 2)
            summary = {"timings": timings, "workdir": self.workdir,
                       "serial": self.machines[0].serial(self.workdir), "build": boot, **parsed,
                       "host_actions": self.control.actions if self.control else []}
            with open(os.path.join(self.workdir, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=1)
            return summary
        finally:
            self.teardown()
            signal.signal(signal.SIGTERM, old_term)

    def _parse_all(self, rcs):
        """One machine: its parse_serial() as it always was.  Several: every machine's
        results together, the run done only if every machine's was, per-machine facts under
        "machines", the host's drive() results after them."""
        per = {}
        for m in self.machines:
            with open(m.serial(self.workdir), "rb") as fh:
                text = fh.read().decode("utf-8", "replace")
            per[m.name] = dict(parse_serial(text, m.outdir(self.workdir)), qemu_rc=rcs[m.name])
        if len(self.machines) == 1:
            parsed = per[self.machines[0].name]
        else:
            first = per[self.machines[0].name]
            parsed = {"results": [r for p in per.values() for r in p["results"]],
                      "stages": first["stages"], "begun": first["begun"],
                      "archive_ok": all(p["archive_ok"] for p in per.values()),
                      "done": all(p["done"] for p in per.values()),
                      "boot_fail": [f"{n}: {line}" for n, p in per.items() for line in p["boot_fail"]],
                      "qemu_rc": 0 if all(p["qemu_rc"] == 0 for p in per.values())
                      else {n: p["qemu_rc"] for n, p in per.items()},
                      "machines": {n: {k: v for k, v in p.items() if k != "results"} for n, p in per.items()}}
        if self.drive is not None:
            parsed["results"] += self.drive
        parsed["early_crashes"] = {m.name or "dom0": m.early_crashes
                                   for m in self.machines if getattr(m, "early_crashes", None)}
        return parsed

    def _cluster_files(self, info, files):
        """Give dom0 a minimal ceph.conf and the non-admin keyring; create wanted images.

        The cluster's own ceph.conf names host paths (run_dir, keyring dirs) that do not
        exist in dom0, so dom0 gets fsid + mon_host + auth settings only.
        """
        user = info.get("user", "blockrbd")
        cfg = {"BRBD_HAVE_CLUSTER": 1, "BRBD_ID": user, "BRBD_POOL": info.get("pool", "rbd"),
               "BRBD_KEYRING": f"/etc/ceph/ceph.client.{user}.keyring"}
        files["/etc/ceph/ceph.conf"] = (
            "[global]\n"
            f"fsid = {info['fsid']}\n"
            f"mon_host = {info['mon_host']}\n"
            "auth_cluster_required = cephx\nauth_service_required = cephx\n"
            "auth_client_required = cephx\n").encode()
        with open(info["keyring"], "rb") as fh:
            files[cfg["BRBD_KEYRING"]] = (fh.read(), 0o600)
        for proto, ip, port in info.get("mon_addrs", []):
            cfg[f"BRBD_MON_{proto.upper()}"] = f"{ip}:{port}"
        files["/brbd/cluster.json"] = json.dumps(
            {k: v for k, v in info.items() if "keyring" not in k}, indent=1).encode()
        for spec, size_mb in self.images:
            p = self.cluster.admin(["rbd", "create", "--size", f"{size_mb}M", spec])
            if p.returncode != 0:
                raise RuntimeError(f"rbd create {spec}: {p.stderr}")
        return cfg

    def _qemu_argv(self, m, boot, initrd, serial):
        for p in (boot["kernel"], initrd):
            if "," in p:
                raise RuntimeError(f"path with a comma cannot go to -initrd: {p}")
        # TCG keeps its host thread busy even while the guest idles: niced, the machines
        # still get every CPU nothing else wants, and the cluster's daemons beside them
        # answer without waiting for a time slice
        return self.ns.exec_argv([
            "nice", "-n", str(QEMU_NICE), "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-cpu",
            os.environ.get("BLOCK_RBD_XEN_CPU") or getattr(self.hooks, "QEMU_CPU", CPU), "-m", "2048",
            "-smp", str(self.smp), "-nographic", "-no-reboot", "-monitor", "none",
            "-serial", f"file:{serial}",
            "-kernel", boot["xen"], "-append", XEN_ARGS % self.smp,
            "-initrd", f"{boot['kernel']} {DOM0_ARGS},{initrd}",
            "-netdev", f"tap,id=n0,ifname={m.tap},script=no,downscript=no",
            "-device", f"e1000,netdev=n0,mac={m.mac}" if self.nic == "e1000"
            else f"virtio-net-pci,netdev=n0,mac={m.mac}",
        ])

    def _boot(self, boot, initrds, ctx):
        """Run every machine's QEMU to its end (and the program's drive(ctx) beside them,
        if it has one); {machine name: QEMU's exit code or "timeout"}."""
        qlogs = []
        t0 = time.time()

        def launch(m):
            serial = m.serial(self.workdir)
            argv = self._qemu_argv(m, boot, initrds[m.name], serial)
            with open(os.path.join(self.workdir, f"qemu{m.suffix}.cmd"), "w") as fh:
                fh.write(json.dumps(argv) + "\n")
            qlog = open(os.path.join(self.workdir, f"qemu{m.suffix}.log"), "ab")
            qlogs.append(qlog)
            log(f"booting Xen in QEMU {m.name} (timeout {self.timeout}s), serial -> {serial}")
            m.qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog,
                                      stderr=subprocess.STDOUT, start_new_session=True)
            m.stages, m.seen = {}, b""

        for m in self.machines:
            m.early_crashes = []
            launch(m)
        driver = None
        if hasattr(self.hooks, "drive"):
            def drive():
                try:
                    self.drive = self.hooks.drive(ctx)
                except Exception as exc:  # the scenarios it did not report fail below
                    log(f"drive failed: {type(exc).__name__}: {exc}")
                    self.drive = [{"name": "host-drive", "status": "FAIL", "seconds": 0.0,
                                   "detail": f"{type(exc).__name__}: {exc}"}]
            driver = threading.Thread(target=drive, daemon=True)
            driver.start()
        rcs = {}
        try:
            # poll: note the host time each BRBD-STAGE line first shows up on a serial
            while len(rcs) < len(self.machines):
                time.sleep(0.2)
                for m in self.machines:
                    if m.name in rcs:
                        continue
                    rc = m.qemu.poll()
                    m.seen = self._stages(m, m.seen, t0)
                    if rc is not None:
                        crash = None if m.stages else early_crash(m.seen)
                        if crash and len(m.early_crashes) < EARLY_CRASH_REBOOTS:
                            kept = m.serial(self.workdir) + f".crash{len(m.early_crashes) + 1}"
                            os.replace(m.serial(self.workdir), kept)
                            m.early_crashes.append({"at": round(time.time() - t0, 2),
                                                    "line": crash, "serial": kept})
                            log(f"dom0 {m.name} crashed in its kernel's boot, before the program "
                                f"started ({crash}); booting it again, serial kept as {kept}")
                            launch(m)
                            continue
                        rcs[m.name] = rc
                if time.time() - t0 > self.timeout:
                    log("QEMU hard timeout: killing it")
                    for m in self.machines:
                        if m.name not in rcs:
                            os.killpg(m.qemu.pid, signal.SIGCONT)
                            os.killpg(m.qemu.pid, signal.SIGKILL)
                            m.qemu.wait(timeout=30)
                            rcs[m.name] = "timeout"
            if driver:
                driver.join(timeout=60)
            return rcs
        finally:
            for qlog in qlogs:
                qlog.close()

    def _stages(self, m, seen, t0):
        try:
            with open(m.serial(self.workdir), "rb") as fh:
                fh.seek(len(seen))
                seen += fh.read()
        except FileNotFoundError:
            return seen
        for match in re.finditer(rb"BRBD-STAGE (\S+) ", seen):
            name = match.group(1).decode()
            if name not in m.stages:
                m.stages[name] = round(time.time() - t0, 2)
        return seen


def early_crash(serial):
    """The first line of a dom0 kernel crash on a serial log (bytes) that ended with Xen
    restarting the machine for it, or None.  Debian 13's 6.12 dom0 under TCG with two
    vCPUs has been seen (1 run in CI) to die at 5 s of uptime on an int3 in
    sched_clock_cpu while a static key was being patched: before init, so before anything
    of block-rbd or the program ran."""
    if b"Hardware Dom0 crashed" not in serial:
        return None
    for line in serial.decode("utf-8", "replace").splitlines():
        line = re.sub(r"^\[\s*[0-9.]+\]\s*", "", line.strip())
        if line.startswith(("Oops:", "Kernel panic", "BUG:", "general protection")):
            return line
    return "Hardware Dom0 crashed"


SYSTEMD_DOM0_ARGS = "root=/dev/vda ro console=hvc0 net.ifnames=0 loglevel=4"
POWEROFF_GRACE = 90  # seconds a dom0 gets for `systemctl poweroff` at the run's end


def program_files(program_dir):
    """{dom0 path: (bytes, mode)} of a program directory: its files under /brbd/run/, its
    rootfs/ overlaid onto / (what build_run_cpio puts into an initrd)."""
    files = {}
    if not program_dir:
        return files
    for top, dest in ((program_dir, "/brbd/run"), (os.path.join(program_dir, "rootfs"), "")):
        for dirpath, dirnames, filenames in os.walk(top):
            rel = os.path.relpath(dirpath, top)
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__"
                                 and not (top == program_dir and rel == "." and d == "rootfs"))
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if os.path.islink(full) or not os.path.isfile(full):
                    continue
                with open(full, "rb") as fh:
                    files[os.path.normpath(os.path.join(dest + "/", rel, name))] = (
                        fh.read(), os.stat(full).st_mode & 0o777)
    return files


def config_text(config):
    """/brbd/config: one sh assignment a line."""
    return "".join(f"{k}={shell_quote(str(v))}\n" for k, v in sorted(config.items()))


def machine_identity(m):
    """Files that make the shared image machine m's: its address (ifupdown, the agent)
    and its own machine id."""
    import sysdom0
    files = {"/etc/network/interfaces": (sysdom0.interfaces(m.addr, PREFIX).encode(), 0o644),
             "/etc/machine-id": (sysdom0.machine_id(m.name).encode(), 0o444)}
    if m.addr != sysdom0.ADDR:
        files["/etc/systemd/system/brbd-agent.service.d/address.conf"] = (
            sysdom0.agent_dropin(m.addr).encode(), 0o644)
    return files


def systemd_summary(machines, drive, drive_error):
    """The run's parsed facts in the shape the other modes give (test_xen reads them the
    same way): no archive in this mode (the journal stays on each disk), `done` when
    drive(ctx) returned, qemu_rc 0 when every boot's QEMU ended by itself with 0."""
    rcs = {m.name: [b.get("rc") for b in m.boots] for m in machines}
    # a power cut's SIGKILL is the program's own doing, not QEMU's failure
    clean = all(b.get("rc") == 0 or b.get("cut") for m in machines for b in m.boots) and not drive_error
    return {"results": list(drive or []), "stages": {}, "begun": {}, "archive_ok": True,
            "done": drive is not None and not drive_error,
            "boot_fail": [f"{m.name}: boot {b['n']}: {b['fail']}" for m in machines
                          for b in m.boots if b.get("fail")],
            "qemu_rc": 0 if clean else rcs,
            "machines": {m.name: {"stages": {}, "disk": m.disk, "boots": m.boots} for m in machines}}


def _systemd_run(self, t_start, timings):
    """BOOT = "systemd": the program's drive(ctx) boots, reboots and cuts the power of
    each machine; the harness builds the image and the disks and cleans up."""
    import sysdom0
    self.t_start = t_start
    t0 = time.time()
    image = sysdom0.build(self.stack)
    timings["build"] = round(time.time() - t0, 2)
    self.workdir = os.path.abspath(self.keep) if self.keep else tempfile.mkdtemp(prefix="brbd-xen-")
    os.makedirs(self.workdir, exist_ok=True)
    self.ns = Namespace([m.tap for m in self.machines])
    self.ns.create()
    config = {"BRBD_IP": DOM0_ADDR, "BRBD_PREFIX": PREFIX, "BRBD_HOST": HOST_ADDR,
              "BRBD_TIMEOUT": max(60, self.timeout - 120), "BRBD_NIC": self.nic,
              "BRBD_HAVE_CLUSTER": 0, "BRBD_ONLY": os.environ.get("BLOCK_RBD_XEN_ONLY", ""),
              "BRBD_STACK": self.stack, "BRBD_BOOT": "systemd", **self.settings}
    files = {}
    for m in self.machines:
        m.config = {"BRBD_IP": m.addr, "BRBD_MACHINE": m.name,
                    "BRBD_PEERS": " ".join(o.addr for o in self.machines if o is not m)}
        m.files = {}
        m.boots = []
        m.disk = os.path.join(self.workdir, f"disk-{m.name or 'dom0'}.raw")
    ctx = SystemdContext(self, image, config, files)
    if self.use_cluster:
        self.cluster = Cluster(self.ns, self.workdir, self.cluster_suite)
        if not self.cluster.available():
            raise RuntimeError("tools/testcluster.py not present")
        t0 = time.time()
        config.update(self._cluster_files(self.cluster.start(), files))
        timings["cluster"] = round(time.time() - t0, 2)
        if hasattr(self.hooks, "host_action"):
            self.control = Control(self.ns, self.hooks, ctx)
            config["BRBD_CONTROL"] = f"{HOST_ADDR} {CONTROL_PORT}"
    if hasattr(self.hooks, "prepare"):
        t0 = time.time()
        self.hooks.prepare(ctx)
        timings["prepare"] = round(time.time() - t0, 2)
    t0 = time.time()
    for m in self.machines:
        mine = dict(program_files(self.program), **files)
        mine.update(machine_identity(m))
        mine["/brbd/config"] = (config_text(dict(config, **m.config)).encode(), 0o644)
        mine.update(m.files)
        secs = sysdom0.prepare_disk(image, m.disk, mine, debs=ctx.debs)
        log(f"disk {m.disk} ready in {secs:.1f}s" + (f" (+{len(ctx.debs)} .deb)" if ctx.debs else ""))
    timings["disks"] = round(time.time() - t0, 2)

    # drive(ctx) in a thread of its own: the run's timeout still holds if it hangs
    t0 = time.time()
    done, error = {}, None

    def drive():
        try:
            done["results"] = self.hooks.drive(ctx)
        except Exception as exc:  # the scenarios it did not report fail
            done["error"] = f"{type(exc).__name__}: {exc}"
    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    driver.join(timeout=self.timeout)
    if driver.is_alive():
        log(f"drive(ctx) still running after {self.timeout}s: cutting every machine's power")
        for m in self.machines:
            ctx.power_cut(m.name)
        driver.join(timeout=60)
        error = f"timeout: drive(ctx) ran past {self.timeout}s"
    error = error or done.get("error")
    results = done.get("results")
    if error:
        log(f"drive failed: {error}")
        results = list(results or []) + [{"name": "host-drive", "status": "FAIL", "seconds": 0.0,
                                           "detail": error}]
    timings["drive"] = round(time.time() - t0, 2)
    for m in self.machines:
        ctx.shutdown(m.name)
    if self.control:
        self.control.close()
    parsed = systemd_summary(self.machines, results, error)
    if self.cluster is not None and hasattr(self.hooks, "verify"):
        t0 = time.time()
        try:
            self.hooks.verify(ctx, parsed)
        except Exception as exc:  # a broken check is a failure, not a crash
            parsed["results"].append({"name": "host-verify", "status": "FAIL",
                                      "seconds": 0.0, "detail": repr(exc)})
        timings["verify"] = round(time.time() - t0, 2)
    timings["total"] = round(time.time() - t_start, 2)
    last = self.machines[0].boots[-1]["serial"] if self.machines[0].boots else None
    summary = {"timings": timings, "workdir": self.workdir, "serial": last,
               "build": image, **parsed,
               "host_actions": self.control.actions if self.control else []}
    with open(os.path.join(self.workdir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


Harness._run_systemd = _systemd_run


class BootFailed(RuntimeError):
    pass


class Agent:
    """A machine's dom0 agent (tests/xen/dom0/brbd-agent), reached from the host."""

    PORT = 7460

    def __init__(self, ns_name, machine):
        self.ns_name = ns_name
        self.machine = machine

    def _call(self, request, timeout):
        sock = netns_connect(self.ns_name, self.machine.addr, self.PORT, timeout=10)
        with sock:
            sock.settimeout(timeout + 30)
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = sock.makefile("r", encoding="utf-8", errors="replace").readline()
        if not reply:
            raise RuntimeError(f"dom0 {self.machine.name}: the agent closed without a reply")
        return json.loads(reply)

    def wait_ready(self, timeout):
        """Until the agent answers (dom0 booted and started it); False after `timeout`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.machine.qemu is not None and self.machine.qemu.poll() is not None:
                return False
            try:
                return self._call({"sh": "true", "timeout": 10}, 10)["rc"] == 0
            except OSError:
                time.sleep(1)
        return False

    def sh(self, script, timeout=120):
        """{"rc", "out", "secs"} of `sh -c script` in dom0 (under /brbd/run)."""
        return self._call({"sh": script, "timeout": timeout}, timeout)

    def finish(self):
        try:
            self._call({"finish": True}, 10)
        except (OSError, RuntimeError, ValueError) as exc:
            log(f"dom0 {self.machine.name}: finish: {exc}")


def load_host_hooks(program):
    """The program's optional host.py: prepare(ctx) before boot, verify(ctx, parsed) after.

    Both run on the host with the cluster up.  prepare may create/fill images (as the
    admin, through ctx.admin / ctx.admin_python) and add dom0 files (ctx.files) and
    /brbd/config entries (ctx.config); verify may check what dom0 left in Ceph and
    mark results (ctx.mark(parsed, name, ok, detail)).
    """
    path = os.path.join(program or "", "host.py")
    if not program or not os.path.exists(path):
        return None
    import importlib.util
    spec = importlib.util.spec_from_file_location("brbd_host_hooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class HostContext:
    def __init__(self, harness, boot, config, files):
        self.harness = harness
        self.boot = boot
        self.config = config
        self.files = files
        self.workdir = harness.workdir
        self.info = harness.cluster.info
        self.pool = harness.cluster.info.get("pool", "rbd")

    def admin(self, argv, timeout=120):
        return self.harness.cluster.admin(argv, timeout=timeout)

    def cluster_ctl(self, command, *args, timeout=120):
        """tools/testcluster.py COMMAND on the run's cluster (status, restart-mon...)."""
        return self.harness.cluster.ctl(command, *args, timeout=timeout)

    @property
    def machines(self):
        return self.harness.machines

    def agent(self, name):
        return Agent(self.harness.ns.name, self.harness.machine(name))

    def signal_machine(self, name, sig):
        """Send `sig` to a machine's QEMU (SIGSTOP freezes the whole host: Xen, dom0, guests)."""
        os.kill(self.harness.machine(name).qemu.pid, sig)

    @property
    def actions(self):
        """The host actions dom0 asked for: [{request, at, reply, seconds}]."""
        return self.harness.control.actions if self.harness.control else []

    def admin_python(self, code, args=(), timeout=120):
        """Run python3 `code` inside the namespace; argv[1:] = conf, admin keyring, pool, *args."""
        i = self.info
        return run(self.harness.ns.exec_argv(["/usr/bin/python3", "-c", code, i["conf"],
                                              i["admin_keyring"], self.pool] + list(args)),
                   timeout=timeout, check=False)

    @staticmethod
    def mark(parsed, name, ok, detail):
        """Fold a host-side check into scenario `name` (added if dom0 did not report it).

        A scenario dom0 skipped stays skipped: there is nothing of it to check."""
        for res in parsed["results"]:
            if res["name"] == name:
                if res["status"] == "SKIP":
                    return
                if not ok and res["status"] != "FAIL":
                    res["status"] = "FAIL"
                res["detail"] = (res["detail"] + "; host: " + detail).strip("; ")
                return
        parsed["results"].append({"name": name, "status": "PASS" if ok else "FAIL",
                                  "seconds": 0.0, "detail": "host: " + detail})


class SystemdContext(HostContext):
    """ctx of a BOOT = "systemd" program: the harness's HostContext, and the machines'
    power under the program's control.  ctx.image is sysdom0.build()'s info (xen, kernel,
    initrd, image, root, versions); ctx.debs (set in prepare) go into every disk by apt."""

    def __init__(self, harness, image, config, files):
        # not HostContext.__init__: its `boot` attribute (the initrd build) is a method here
        self.harness = harness
        self.image = image
        self.config = config
        self.files = files
        self.debs = []
        self.workdir = harness.workdir

    @property
    def info(self):  # the cluster starts after this context is made
        c = self.harness.cluster
        return (c.info if c else None) or {}

    @property
    def pool(self):
        return self.info.get("pool", "rbd")

    def _qemu_argv(self, m, serial):
        h, img = self.harness, self.image
        for p in (img["kernel"], img["initrd"], m.disk):
            if "," in p:
                raise RuntimeError(f"path with a comma cannot go to QEMU: {p}")
        # as the initrd modes' QEMU (niced TCG, the same NIC on the machine's tap), with
        # the machine's disk as /dev/vda; -no-reboot: a dom0 reboot ends QEMU too
        return h.ns.exec_argv([
            "nice", "-n", str(QEMU_NICE), "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-cpu",
            os.environ.get("BLOCK_RBD_XEN_CPU") or getattr(h.hooks, "QEMU_CPU", CPU), "-m", "2048",
            "-smp", str(h.smp), "-nographic", "-no-reboot", "-monitor", "none",
            "-serial", f"file:{serial}",
            "-kernel", img["xen"], "-append", XEN_ARGS % h.smp,
            "-initrd", f"{img['kernel']} {SYSTEMD_DOM0_ARGS},{img['initrd']}",
            # cache=unsafe: dom0's flushes cost no host fsync (a killed QEMU loses nothing
            # it wrote; only a host crash would, and the disk is the run's own)
            "-drive", f"file={m.disk},if=virtio,format=raw,cache=unsafe",
            "-netdev", f"tap,id=n0,ifname={m.tap},script=no,downscript=no",
            "-device", f"e1000,netdev=n0,mac={m.mac}" if h.nic == "e1000"
            else f"virtio-net-pci,netdev=n0,mac={m.mac}",
        ])

    def _ended(self, m):
        """Note a boot's end once its QEMU is gone."""
        b = m.boots[-1] if m.boots else None
        if b is not None and "rc" not in b and m.qemu is not None and m.qemu.poll() is not None:
            b["rc"] = m.qemu.returncode
            b["ended"] = round(time.time() - b["t0"], 2)
            b["qlog"].close()
            del b["qlog"]

    def running(self, name):
        m = self.harness.machine(name)
        return m.qemu is not None and m.qemu.poll() is None

    def boot(self, name, timeout=420):
        """Start machine `name`'s QEMU on its disk; seconds from QEMU's start until its
        agent answers.  BootFailed if QEMU ends first or `timeout` passes."""
        m = self.harness.machine(name)
        if self.running(name):
            raise BootFailed(f"machine {name}: already running")
        n = len(m.boots) + 1
        serial = os.path.join(self.workdir, f"serial-{name or 'dom0'}-{n}.log")
        argv = self._qemu_argv(m, serial)
        with open(os.path.join(self.workdir, f"qemu-{name or 'dom0'}-{n}.cmd"), "w") as fh:
            fh.write(json.dumps(argv) + "\n")
        qlog = open(os.path.join(self.workdir, f"qemu-{name or 'dom0'}-{n}.log"), "wb")
        log(f"booting {name or 'dom0'} ({n}) from {m.disk}, serial -> {serial}")
        t0 = time.time()
        b = {"n": n, "serial": serial, "started": round(t0 - self.harness.t_start, 2), "t0": t0,
             "qlog": qlog}
        m.boots.append(b)
        m.qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        agent = self.agent(name)
        ok = agent.wait_ready(timeout)
        self._ended(m)
        if not ok:
            why = (f"QEMU ended (rc {b['rc']})" if "rc" in b else f"no agent within {timeout}s")
            b["fail"] = why
            self.power_cut(name)
            tail = " | ".join(self.serial(name).strip().splitlines()[-3:])
            raise BootFailed(f"machine {name}: {why} (serial {serial} ends: {tail[-300:]})")
        b["ready"] = round(time.time() - t0, 2)
        log(f"{name or 'dom0'} ({n}): agent answering after {b['ready']:.1f}s")
        return b["ready"]

    def wait_down(self, name, timeout, since=None):
        """Seconds until machine `name`'s QEMU ended by itself (poweroff or reboot in
        dom0), counted from `since` (a time.time()) or from now; None after `timeout`."""
        m = self.harness.machine(name)
        t0 = since or time.time()
        if m.qemu is None:
            return 0.0
        try:
            m.qemu.wait(timeout=max(0.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            return None
        self._ended(m)
        m.boots[-1]["down"] = round(time.time() - t0, 2)
        return m.boots[-1]["down"]

    def power_cut(self, name):
        """Kill machine `name`'s QEMU at once (a power loss: what dom0 had not yet written
        to its disk is lost; what QEMU had written is in the host's page cache and stays)."""
        m = self.harness.machine(name)
        if m.qemu is None or m.qemu.poll() is not None:
            self._ended(m)
            return
        try:
            os.killpg(m.qemu.pid, signal.SIGCONT)  # a frozen one too
            os.killpg(m.qemu.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        m.qemu.wait(timeout=30)
        m.boots[-1]["cut"] = True
        self._ended(m)

    def poweroff(self, name, timeout=POWEROFF_GRACE, verb="poweroff"):
        """`systemctl VERB` in dom0 (poweroff or reboot: either ends QEMU); seconds until
        QEMU exited, None if it did not within `timeout`."""
        t0 = time.time()
        try:
            self.agent(name).sh(f"systemctl --no-block {verb}", timeout=20)
        except (OSError, RuntimeError, ValueError) as exc:
            log(f"{name}: systemctl {verb}: {exc}")
        return self.wait_down(name, timeout, since=t0)

    def reboot(self, name, timeout=POWEROFF_GRACE):
        return self.poweroff(name, timeout, verb="reboot")

    def shutdown(self, name):
        """The run's end: a machine still up is powered off, killed if it will not go."""
        if not self.running(name):
            self._ended(self.harness.machine(name))
            return
        log(f"{name or 'dom0'} still running at the end: systemctl poweroff")
        if self.poweroff(name) is None:
            log(f"{name or 'dom0'}: no poweroff within {POWEROFF_GRACE}s: killing QEMU")
            self.power_cut(name)

    def serial(self, name):
        """The current (or last) boot's serial console text."""
        m = self.harness.machine(name)
        if not m.boots:
            return ""
        try:
            with open(m.boots[-1]["serial"], "rb") as fh:
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def disk(self, name):
        return self.harness.machine(name).disk

    def journal(self, name, identifier=None, args=()):
        """The journal on machine `name`'s disk (its QEMU must have ended)."""
        import sysdom0
        if self.running(name):
            raise RuntimeError(f"machine {name} is running: its disk is in use")
        return sysdom0.read_journal(self.disk(name), identifier, root=self.image["root"], args=args)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def run_program(program=None, **kw):
    """Importable entry point: returns the summary dict (results, stages, timings...)."""
    return Harness(program, **kw).run()


def main(argv=None):
    ap = argparse.ArgumentParser(description="Xen-in-QEMU harness for block-rbd")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--program", default=os.path.join(HERE, "guest", "phase1"))
    r.add_argument("--no-cluster", action="store_true")
    r.add_argument("--timeout", type=int, default=900)
    r.add_argument("--keep", help="run directory to keep (default: a temp dir, kept)")
    r.add_argument("--checkout")
    r.add_argument("--nic", choices=["e1000", "virtio"], default="e1000")
    r.add_argument("--stack", choices=build_dom0.STACKS, default="debian12", help="the dom0's Debian")
    r.add_argument("--cluster-suite", help="run the cluster's Ceph from this Debian suite (trixie)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more setting for dom0's /brbd/config (repeatable)")
    r.add_argument("--image", action="append", default=[],
                   help="pool/image:SIZE_MB to create before boot (repeatable)")
    sub.add_parser("cleanup")
    a = ap.parse_args(argv)
    if a.cmd == "cleanup":
        cleanup_stale()
        return 0
    images = []
    for spec in a.image:
        name, _, size = spec.partition(":")
        images.append((name, int(size or 64)))
    s = run_program(a.program, use_cluster=not a.no_cluster, timeout=a.timeout, keep=a.keep,
                    checkout=a.checkout, nic=a.nic, images=images, stack=a.stack,
                    cluster_suite=a.cluster_suite,
                    settings=dict(kv.partition("=")[::2] for kv in a.set))
    for res in s["results"]:
        print(f"{res['status']:4} {res['name']:40} {res['seconds']}s "
              f"(began {s['begun'].get(res['name'], '-')}) {res['detail']}")
    for act in s["host_actions"]:
        print(f"host action at {act['at']}s: {act['request']} -> {act.get('reply')}")
    print(json.dumps({k: s[k] for k in ("qemu_rc", "timings", "stages", "archive_ok", "done",
                                          "boot_fail", "workdir")}, indent=1))
    npass = sum(r["status"] == "PASS" for r in s["results"])
    nfail = sum(r["status"] == "FAIL" for r in s["results"])
    print(f"{npass} passed, {nfail} failed")
    ok = s["done"] and s["archive_ok"] and nfail == 0 and npass > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
