"""The Xen release gate: boot Xen + dom0 under QEMU/TCG once per pairing of a dom0 stack and
a cluster (the programs in tests/xen/guest/gate, .../twohost and .../sysgate), one pytest
test per scenario.

Pairings (dom0 stack, the cluster's Ceph):
  debian12-ceph16   Xen 4.17, Linux 6.1, Python 3.11, Ceph 16.2 client; this host's Ceph 16.2
  debian13-ceph18   Xen 4.20, Linux 6.12, Python 3.13, Ceph 18.2 client; Debian 13's Ceph 18.2
  debian12-ceph18   the Debian 12 dom0 against Ceph 18.2 (a cluster upgraded before its dom0s)
CI runs the one-host gate on debian12-ceph16 and debian13-ceph18, the systemd dom0 gate
(tests/xen/guest/sysgate) on both dom0 stacks against Ceph 18.2, and the two-host gate on
debian12-ceph18.  BLOCK_RBD_XEN_MATRIX=full adds the one-host gate on debian12-ceph18 (what
meets the cluster; the dom0 stack's own scenarios say they run in debian12-ceph16) and the
two-host gate on debian13-ceph18; =core (developer runs) leaves out the systemd gate on
debian12-ceph18.  Every boot is a harness process of its own, one after another
(BLOCK_RBD_XEN_SLOTS=N lets N QEMU machines run at once).
BLOCK_RBD_XEN_PAIRINGS (space-separated ids) picks some pairings, BLOCK_RBD_XEN_ONLY some
scenarios (developer runs; CI sets neither).

Needs root (network namespace, tap) and qemu-system-x86_64; `make deps` installs it.
Prints the wall times and the per-scenario attach/detach timings (relative figures:
TCG is slow).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

GATE = os.path.join(HERE, "guest", "gate")
TWOHOST = os.path.join(HERE, "guest", "twohost")
SYSGATE = os.path.join(HERE, "guest", "sysgate")
# pairing id -> (build_dom0 stack, the cluster's Debian suite: None is this host's Ceph)
PAIRINGS = {"debian12-ceph16": ("debian12", None), "debian13-ceph18": ("debian13", "trixie"),
            "debian12-ceph18": ("debian12", "trixie")}
SCENARIOS = [
    "krbd-attach", "nbd-attach", "ro-attach", "missing-image", "msgr2-only-krbd", "secure-krbd", "secure-nbd",
    "pv-guest-4disks",
    "pygrub-guest", "pygrub-restricted", "pvgrub-guest", "pytest-dom0-krbd", "pytest-dom0-nbd", "bench-attach", "mon-restart-add",
    "osd-stall-guest", "day2-guest", "qos-dom0", "nbd-heal-guest", "storm-krbd-service", "storm-nbd-service",
    "nothing-left-mapped",
]
# The two-host gate (guest/twohost/host.py drives them): two Xen machines, one cluster.
TWOHOST_SCENARIOS = ["cross-host-refusals", "fixed-uuid-twice", "migrate-krbd", "migrate-nbd", "migrate-fail",
                     "frozen-host-fenced"]
# The systemd dom0 gate (guest/sysgate/host.py drives it): the package from apt, guests
# from xendomains, reboots and a power cut, on a dom0 whose PID 1 is systemd.
SYSGATE_STEPS = ["install-boot", "xendomains-start", "nbd-scope", "nbd-heal", "units-killed", "adopt-daemons",
                 "upgrade", "reboot-restore", "power-cut", "package-remove", "poweroff", "nothing-left"]
# Under TCG one run takes 7-15 min of one core a machine, and a slow or busy machine nearly
# doubles that (measured: the debian12-ceph16 gate's dom0 program 1398 s on one such day).
# A hung run is stopped here (each scenario also has its own limit in dom0).
TIMEOUT = int(os.environ.get("BLOCK_RBD_XEN_TIMEOUT", "1800"))
# How many QEMU machines run at once.  One: measured on the 2-CPU CI machine, two gates side
# by side ran every scenario ~2.5x slower than one alone (TCG shares more than the CPUs),
# so nothing is gained and timing-sensitive scenarios lose their margins.
SLOTS = max(1, int(os.environ.get("BLOCK_RBD_XEN_SLOTS") or 1))
# On debian12-ceph18 the one-host gate runs what meets the cluster (mappers, messenger
# modes, mon and OSD faults, resize and discard, nbd heal); what only the dom0 stack does
# (bootloaders, libxl's parallel adds, storms, QoS in rbd-nbd, the benchmark, dom0's pytest)
# says it runs with the same dom0 in debian12-ceph16.
DOM0_SIDE_IN = {"debian12-ceph18": "debian12-ceph16"}

def _unavailable():
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 not installed (Debian package qemu-system-x86; make deps installs it)"
    if os.geteuid() != 0:
        return "the Xen harness needs root (network namespace and tap device)"
    if not shutil.which("ip"):
        return "ip not installed (Debian package iproute2)"
    return None


def _selected(names):
    only = os.environ.get("BLOCK_RBD_XEN_ONLY", "").split()
    return not only or any(n in only for n in names)


class Run:
    """One boot of a gate program on one pairing: a harness process of its own (its own
    network namespace, cluster and QEMU machines); its summary comes from its workdir."""

    def __init__(self, kind, program, pairing, scenarios, machines, settings=None):
        self.kind, self.program, self.pairing = kind, program, pairing
        self.scenarios, self.machines = scenarios, machines
        self.settings = dict(settings or {})
        self.label = "%s-%s" % (kind, pairing)
        self.proc = None
        self.workdir = None
        self.started = None
        self.summary = None
        self.done = threading.Event()

    def reason_not_run(self):
        reason = _unavailable()
        if reason:
            return reason
        if not _selected(self.scenarios):
            return "none of its scenarios selected (BLOCK_RBD_XEN_ONLY)"
        wanted = os.environ.get("BLOCK_RBD_XEN_PAIRINGS", "").split()
        if wanted and self.pairing not in wanted:
            return "pairing %s not selected (BLOCK_RBD_XEN_PAIRINGS)" % self.pairing
        return None

    def start(self, workdir):
        stack, cluster_suite = PAIRINGS[self.pairing]
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        argv = [sys.executable, os.path.join(HERE, "harness.py"), "run", "--program", self.program,
                "--stack", stack, "--keep", workdir, "--timeout", str(TIMEOUT)]
        argv += ["--cluster-suite", cluster_suite] if cluster_suite else []
        for key, value in sorted(self.settings.items()):
            argv += ["--set", "%s=%s" % (key, value)]
        self.log = os.path.join(workdir, "harness.log")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=HERE)
        self.started = time.time()

    def finish(self):
        rc = self.proc.returncode
        path = os.path.join(self.workdir, "summary.json")
        if os.path.exists(path):
            with open(path) as fh:
                self.summary = json.load(fh)
        else:
            self.summary = {"error": "the harness ended (rc %s) without a summary; its log ends:\n%s"
                                     % (rc, _tail(self.log))}
        self.summary["wall"] = round(time.time() - self.started, 1)
        self.summary["pairing"] = self.pairing
        self.done.set()


class Runs:
    """Every selected run, started as CPUs free up (first fit, in list order)."""

    def __init__(self, runs, workdir_of):
        self.runs = runs
        self.workdir_of = workdir_of
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._schedule, daemon=True)
        self.thread.start()

    def _schedule(self):
        pending = [r for r in self.runs if r.reason_not_run() is None]
        running = []
        while pending or running:
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                r.finish()
            for r in [r for r in running if time.time() - r.started > TIMEOUT + 900]:
                r.proc.terminate()  # its own limit failed: the harness tears down on SIGTERM
            free = SLOTS - sum(min(r.machines, SLOTS) for r in running)
            for r in list(pending):
                if self.stopping:
                    break
                if min(r.machines, SLOTS) <= free:
                    pending.remove(r)
                    r.start(self.workdir_of(r.label))
                    running.append(r)
                    free -= min(r.machines, SLOTS)
            if self.stopping:
                pending = []
            time.sleep(1)

    def stop(self):
        """pytest is ending early: the running harnesses tear down (SIGTERM), none starts."""
        self.stopping = True
        for r in self.runs:
            if r.proc and r.proc.poll() is None:
                r.proc.terminate()
        for r in self.runs:
            if r.proc:
                try:
                    r.proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    r.proc.kill()

    def get(self, kind, pairing):
        run = next(r for r in self.runs if r.kind == kind and r.pairing == pairing)
        reason = run.reason_not_run()
        if reason:
            pytest.skip(reason)
        run.done.wait()
        return run.summary


# The matrix CI runs: the one-host gate on each dom0 stack against the cluster its users
# meet first, the systemd dom0 gate on both stacks against Ceph 18.2 (a cluster upgraded
# before its dom0s) and the two-host gate on debian12-ceph18.  BLOCK_RBD_XEN_MATRIX=full
# adds the one-host gate on debian12-ceph18 (what meets the cluster) and the two-host gate
# on debian13-ceph18 (10 min together, and CI's 50 min hold no more); =core: the two
# one-host gates, the Debian 12 two-host gate and the Debian 13 systemd gate (a
# developer's quicker run).
MATRIX = os.environ.get("BLOCK_RBD_XEN_MATRIX", "")
CORE = MATRIX == "core"
TWOHOST_PAIRINGS = ["debian12-ceph18"] + (["debian13-ceph18"] if MATRIX == "full" else [])
GATE_PAIRINGS = ["debian12-ceph16", "debian13-ceph18"] + (["debian12-ceph18"] if MATRIX == "full" else [])
SYSGATE_PAIRINGS = ([] if CORE else ["debian12-ceph18"]) + ["debian13-ceph18"]
RUNS = [Run("twohost", TWOHOST, p, TWOHOST_SCENARIOS, 2)
        for p in TWOHOST_PAIRINGS]
RUNS += [Run("gate", GATE, p, SCENARIOS, 1, settings={"BRBD_DOM0_SIDE_IN": DOM0_SIDE_IN.get(p, "")})
         for p in GATE_PAIRINGS]
RUNS += [Run("systemd", SYSGATE, p, SYSGATE_STEPS, 1) for p in SYSGATE_PAIRINGS]


@pytest.fixture(scope="session")
def xen_runs(tmp_path_factory):
    keep = os.environ.get("BLOCK_RBD_XEN_KEEP")

    def workdir_of(label):
        return os.path.join(keep, label) if keep else str(tmp_path_factory.mktemp("xen-" + label))
    runs = Runs(RUNS, workdir_of)
    old = signal.signal(signal.SIGTERM, _stop_on_term)
    try:
        yield runs
    finally:  # an early end (SIGTERM, ^C, -x): the harnesses still running tear down
        runs.stop()
        signal.signal(signal.SIGTERM, old)


def _stop_on_term(signum, frame):
    pytest.exit("Xen gate terminated (signal %d)" % signum, returncode=2)


@pytest.fixture(scope="session", params=[r.pairing for r in RUNS if r.kind == "gate"])
def gate(request, xen_runs):
    return xen_runs.get("gate", request.param)


@pytest.fixture(scope="session", params=[r.pairing for r in RUNS if r.kind == "twohost"])
def twohost(request, xen_runs):
    return xen_runs.get("twohost", request.param)


@pytest.fixture(scope="session", params=[r.pairing for r in RUNS if r.kind == "systemd"])
def sysgate(request, xen_runs):
    return xen_runs.get("systemd", request.param)


def _check_ran(gate):
    if "error" in gate:
        pytest.fail("the Xen harness failed: %s" % gate["error"])


def _timings(summary):
    path = os.path.join(summary["workdir"], "out", "timings.txt")
    rows = []
    if os.path.exists(path):
        with open(path) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 2:
                    rows.append((parts[0], parts[1], " ".join(parts[2:])))
    return rows


def _bench(summary):
    path = os.path.join(summary["workdir"], "out", "bench.txt")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [line.rstrip() for line in handle if line.strip() and not line.startswith("BENCH")]


def _out_lines(summary, name, prefix):
    path = os.path.join(summary["workdir"], "out", name)
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as handle:
        return [line.rstrip() for line in handle if line.startswith(prefix)]


def test_vm_ran_to_the_end(gate):
    """dom0 finished its program and the result archive came back intact."""
    _check_ran(gate)
    assert gate["qemu_rc"] == 0, "QEMU: %s (serial log %s)" % (gate["qemu_rc"], gate["serial"])
    assert not gate["boot_fail"], gate["boot_fail"]
    assert gate["done"] and gate["archive_ok"], "no intact result archive (see %s)" % gate["serial"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(gate, name):
    _check_scenario(gate, name)


def test_two_hosts_ran_to_the_end(twohost):
    """Both dom0s finished and their result archives came back intact."""
    test_vm_ran_to_the_end(twohost)


@pytest.mark.parametrize("name", TWOHOST_SCENARIOS)
def test_two_host_scenario(twohost, name):
    _check_scenario(twohost, name, logs="twohost")


def test_systemd_dom0_ran_to_the_end(sysgate):
    """drive(ctx) returned, every boot ended by itself (or by the program's power cut)."""
    _check_ran(sysgate)
    assert not sysgate["boot_fail"], sysgate["boot_fail"]
    assert sysgate["done"] and sysgate["qemu_rc"] == 0, "QEMU: %s (drive log %s); it ends:\n%s" % (
        sysgate["qemu_rc"], _sysgate_log(sysgate), _tail(_sysgate_log(sysgate)))


@pytest.mark.parametrize("name", SYSGATE_STEPS)
def test_systemd_dom0_step(sysgate, name):
    _check_ran(sysgate)
    found = [r for r in sysgate["results"] if r["name"] == name]
    assert found, "step %s did not report (an earlier one failed?); %s ends:\n%s" % (
        name, _sysgate_log(sysgate), _tail(_sysgate_log(sysgate)))
    result = found[-1]
    if result["status"] == "SKIP":
        pytest.skip(result["detail"])
    assert result["status"] == "PASS", "%s (log %s); it ends:\n%s" % (
        result["detail"], _sysgate_log(sysgate), _tail(_sysgate_log(sysgate)))


def _sysgate_log(run):
    return os.path.join(run["workdir"], "sysgate.log")


def test_systemd_dom0_report(sysgate, capsys):
    """Not a check: prints the systemd dom0 gate's times and every step's result."""
    _check_ran(sysgate)
    lines = ["", "systemd dom0 gate %s: wall %.1f s (build %s s, cluster %s s, prepare %s s, disks %s s, drive %s s)"
             % (sysgate["pairing"], sysgate["wall"], *(sysgate["timings"].get(k) for k in (
                 "build", "cluster", "prepare", "disks", "drive")))]
    for name, facts in sorted(sysgate.get("machines", {}).items()):
        for b in facts.get("boots", []):
            lines.append("  %s boot %s: agent ready %s s, ended after %s s%s" % (
                name, b["n"], b.get("ready"), b.get("ended"), " (power cut)" if b.get("cut") else ""))
    for r in sysgate["results"]:
        lines.append("  %-17s %-5s %7s s  %s" % (r["name"], r["status"], r["seconds"], r["detail"]))
    with capsys.disabled():
        print("\n".join(lines))
    assert re.match(r"\d", str(sysgate["wall"]))


def _check_scenario(gate, name, logs=None):
    _check_ran(gate)
    found = [r for r in gate["results"] if r["name"] == name]
    assert found, "scenario %s did not report (serial log %s); the serial log ends:\n%s" % (
        name, gate["serial"], _tail(gate["serial"]))
    result = found[-1]
    if result["status"] == "SKIP":
        pytest.skip(result["detail"])
    log = os.path.join(gate["workdir"], *((logs,) if logs else ("out", "scenarios"))) + "/%s.log" % name
    assert result["status"] == "PASS", "%s (log %s); the log ends:\n%s" % (
        result["detail"], log, _tail(log) if os.path.exists(log) else _serial_tail(gate, name))


def _tail(path, n=25):
    """The last n lines of a file: CI shows a failure's message, not the files behind it."""
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError as exc:
        return "(%s)" % exc


def _serial_tail(gate, name):
    """A failed scenario's log tail as dom0 printed it on the serial console (when the
    result archive did not come back)."""
    try:
        with open(gate["serial"], errors="replace") as fh:
            text = fh.read()
    except (OSError, KeyError, TypeError) as exc:
        return "(%s)" % exc
    mark = "/scenarios/%s.log (tail) ----" % name
    if mark not in text:
        return "(not in the serial log)"
    return text.split(mark, 1)[1].split("\n----", 1)[0].lstrip("\n")


def _early_crashes(run):
    """Report lines for the dom0s the harness booted again (harness.early_crash)."""
    return ["  %s's dom0 kernel crashed before the program, booted again: %s (%s)"
            % (name, c["line"], c["serial"])
            for name, crashes in sorted(run.get("early_crashes", {}).items()) for c in crashes]


def test_report(gate, capsys):
    """Not a check: prints the wall times and per-scenario timings."""
    _check_ran(gate)
    lines = ["", "Xen gate %s: wall %.1f s (build %s s, cluster %s s, prepare %s s, QEMU %s s, verify %s s)"
             % (gate["pairing"], gate["wall"], *(gate["timings"].get(k) for k in (
                 "build", "cluster", "prepare", "qemu", "verify"))),
             "  dom0 stages (s since boot): " + ", ".join(
                 "%s %.1f" % (k, v) for k, v in gate["stages"].items() if v is not None),
             "  base layer %s" % ("cached" if gate["build"].get("base_cached") else "BUILT (cold)")]
    lines.append("  %-22s %-5s %8s %8s" % ("scenario", "", "seconds", "began at"))
    for r in gate["results"]:
        lines.append("  %-22s %-5s %8s %8s  %s" % (r["name"], r["status"], r["seconds"],
                                                  gate.get("begun", {}).get(r["name"], ""),
                                                  r["detail"][:110]))
    lines += _early_crashes(gate)
    for action in gate.get("host_actions", []):
        lines.append("  host action at %s s: %s -> %s (%s s)" % (
            action["at"], action["request"], action.get("reply"), action.get("seconds")))
    lines.append("  xl timings (s, under TCG):")
    for label, secs, rest in _timings(gate):
        lines.append("    %-28s %6s %s" % (label, secs, rest))
    storm = _out_lines(gate, "storm.txt", "STORM ")
    if storm:
        lines.append("  boot storm in dom0 (wall s; ratio = add storm / floor storm):")
        lines += ["    " + line[len("STORM "):] for line in storm]
    bench = _bench(gate)
    if bench:
        lines.append("  attach benchmark in dom0:")
        lines += ["    " + line for line in bench]
    with capsys.disabled():
        print("\n".join(lines))
    assert re.match(r"\d", str(gate["wall"]))


def test_two_host_report(twohost, capsys):
    """Not a check: prints the two-host gate's times and every scenario's whole result."""
    _check_ran(twohost)
    lines = ["", "Two-host Xen gate %s: wall %.1f s (build %s s, cluster %s s, prepare %s s, QEMU %s s)"
             % (twohost["pairing"], twohost["wall"], *(twohost["timings"].get(k) for k in (
                 "build", "cluster", "prepare", "qemu")))]
    for name, facts in sorted(twohost.get("machines", {}).items()):
        lines.append("  dom0 %s stages (s since boot): " % name + ", ".join(
            "%s %.1f" % (k, v) for k, v in facts["stages"].items() if v is not None))
    lines += _early_crashes(twohost)
    for r in twohost["results"]:
        lines.append("  %-20s %-5s %7s s  %s" % (r["name"], r["status"], r["seconds"], r["detail"]))
    with capsys.disabled():
        print("\n".join(lines))
    assert re.match(r"\d", str(twohost["wall"]))
