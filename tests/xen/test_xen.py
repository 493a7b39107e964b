"""The Xen release gate: boot Xen + dom0 under QEMU/TCG once per pairing of a dom0 stack and
a cluster (the program in tests/xen/guest/gate), report one pytest test per scenario.

Pairings (dom0 stack, the cluster's Ceph):
  debian12-ceph16   Xen 4.17, Linux 6.1, Python 3.11, Ceph 16.2 client; this host's Ceph 16.2
  debian13-ceph18   Xen 4.20, Linux 6.12, Python 3.13, Ceph 18.2 client; Debian 13's Ceph 18.2
  debian12-ceph18   the Debian 12 dom0 against Ceph 18.2 (a cluster upgraded before its
                    dom0s): the two-host gate runs there
BLOCK_RBD_XEN_PAIRINGS (space-separated ids) picks some of them.

Needs root (network namespace, tap) and qemu-system-x86_64; `make deps` installs it.
Prints the wall times and the per-scenario attach/detach timings (relative figures:
TCG is slow).
"""

import os
import re
import shutil
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

GATE = os.path.join(HERE, "guest", "gate")
TWOHOST = os.path.join(HERE, "guest", "twohost")
# pairing id -> (build_dom0 stack, the cluster's Debian suite: None is this host's Ceph)
PAIRINGS = {"debian12-ceph16": ("debian12", None), "debian13-ceph18": ("debian13", "trixie"),
            "debian12-ceph18": ("debian12", "trixie")}
GATE_PAIRINGS = ["debian12-ceph16", "debian13-ceph18"]
TWOHOST_PAIRINGS = ["debian12-ceph18"]
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
# Under TCG one run takes ~7 min of one core; a busy machine stretches that.  A hung run
# is stopped here, well inside CI's 45 min (each scenario also has its own limit in dom0).
TIMEOUT = int(os.environ.get("BLOCK_RBD_XEN_TIMEOUT", "1500"))


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


def _run_gate(tmp_path_factory, program, label, scenarios, pairing):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    if not _selected(scenarios):
        pytest.skip("none of its scenarios selected (BLOCK_RBD_XEN_ONLY)")
    wanted = os.environ.get("BLOCK_RBD_XEN_PAIRINGS", "").split()
    if wanted and pairing not in wanted:
        pytest.skip("pairing %s not selected (BLOCK_RBD_XEN_PAIRINGS)" % pairing)
    stack, cluster_suite = PAIRINGS[pairing]
    label = "%s-%s" % (label, pairing)
    import harness
    keep = os.environ.get("BLOCK_RBD_XEN_KEEP")
    workdir = os.path.join(keep, label) if keep else str(tmp_path_factory.mktemp("xen-" + label))
    started = time.time()
    try:
        summary = harness.run_program(program, use_cluster=True, timeout=TIMEOUT, keep=workdir,
                                      stack=stack, cluster_suite=cluster_suite)
    except SystemExit as exc:  # SIGTERM: the harness tore everything down; stop, don't reboot
        pytest.exit("Xen gate terminated (%s)" % exc, returncode=2)
    except Exception as exc:
        # pytest would run a failed session fixture again for the next test: one boot only
        summary = {"error": "%s: %s" % (type(exc).__name__, exc)}
    summary["wall"] = round(time.time() - started, 1)
    summary["pairing"] = pairing
    return summary


@pytest.fixture(scope="session", params=GATE_PAIRINGS)
def gate(request, tmp_path_factory):
    return _run_gate(tmp_path_factory, GATE, "gate", SCENARIOS, request.param)


@pytest.fixture(scope="session", params=TWOHOST_PAIRINGS)
def twohost(request, tmp_path_factory):
    return _run_gate(tmp_path_factory, TWOHOST, "twohost", TWOHOST_SCENARIOS, request.param)


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
    for r in twohost["results"]:
        lines.append("  %-20s %-5s %7s s  %s" % (r["name"], r["status"], r["seconds"], r["detail"]))
    with capsys.disabled():
        print("\n".join(lines))
    assert re.match(r"\d", str(twohost["wall"]))
