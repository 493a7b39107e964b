"""How `block-rbd add` fails, for real: each failure ends with ONE line in
hotplug-error, hotplug-status=error, a non-zero exit, the line in the log file
and on stderr, and nothing left behind (no loop, no fuse mount, no holder).
And no cephx secret ever shows in a command line, the log or xenstore."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from block_rbd import config as config_mod
from conftest import NOTHING, SCRIPT, leftovers

MiB = 1 << 20


pytestmark = pytest.mark.usefixtures("fuse_cleanup")


def assert_failed_cleanly(libxl, result, path, config_path, fault):
    assert result.returncode != 0
    keys = libxl.keys(path)
    error = keys.get("hotplug-error", "")
    assert error.startswith("add failed: ") and fault in error, error
    assert "\n" not in error and error == error.strip()
    assert keys["hotplug-status"] == "error"
    assert "physical-device" not in keys and "physical-device-path" not in keys
    with open(config_mod.load(config_path)["log.file"]) as handle:
        log_lines = [line for line in handle.read().splitlines() if error in line]
    assert len(log_lines) >= 1 and path in log_lines[0] and " ERROR " in log_lines[0]
    assert [line for line in result.stderr.splitlines() if error in line]
    assert leftovers(config_path) == NOTHING
    # and remove after the failure is fine
    assert libxl.run("remove", path).returncode == 0
    assert leftovers(config_path) == NOTHING
    return error


@pytest.mark.parametrize("params, fault", [
    ("rbd:vm 1", "image name 'vm 1' contains ' '"),
    ("rbd/a/b/c", "too many '/'"),
    ("rbd:vm1,mode=rw", "mode=rw: expected one of r, w, r!, w!"),
    ("", "empty target"),
])
def test_malformed_target(libxl, config_path, params, fault):
    path = libxl.backend(params)
    assert_failed_cleanly(libxl, libxl.run("add", path), path, config_path, fault)


def test_missing_pool(libxl, config_path):
    path = libxl.backend("nosuchpool:vm1")
    assert_failed_cleanly(libxl, libxl.run("add", path), path, config_path, "nosuchpool")


def test_missing_image(libxl, config_path):
    path = libxl.backend("rbd:no-such-image")
    error = assert_failed_cleanly(libxl, libxl.run("add", path), path, config_path, "does not exist")
    assert "rbd/no-such-image" in error


@pytest.mark.parametrize("params, fault", [
    ("rbd:%s,mapper=floppy", "mapper=floppy: expected one of krbd, nbd, fuse"),
])
def test_unknown_mapper(libxl, config_path, make_image, params, fault):
    path = libxl.backend(params % make_image(size=4 * MiB))
    assert_failed_cleanly(libxl, libxl.run("add", path), path, config_path, fault)


def test_unknown_mapper_in_config(libxl, config_path, ceph_cluster, make_image, tmp_path, monkeypatch):
    from conftest import write_config
    config = write_config(tmp_path / "bad.yaml", ceph_cluster, str(tmp_path), mapper="floppy")
    monkeypatch.setenv("BLOCK_RBD_CONFIG", config)
    path = libxl.backend("rbd:%s" % make_image(size=4 * MiB))
    result = libxl.run("add", path)
    assert result.returncode != 0
    error = libxl.keys(path)["hotplug-error"]
    assert error == "add failed: %s: mapper = 'floppy': expected auto, krbd, nbd or fuse" % config
    assert libxl.keys(path)["hotplug-status"] == "error"
    assert error in result.stderr
    assert leftovers(config_path) == NOTHING


@pytest.mark.parametrize("mapper", ["krbd", "nbd"])
def test_mapper_unusable_on_this_kernel(libxl, config_path, make_image, mapper):
    if mapper == "krbd" and os.path.isdir("/sys/bus/rbd"):
        pytest.skip("this kernel has rbd: krbd would map for real")
    if mapper == "nbd" and os.path.isdir("/sys/module/nbd"):
        pytest.skip("this kernel has nbd: rbd-nbd would map for real")
    path = libxl.backend("rbd:%s,mapper=%s" % (make_image(size=4 * MiB), mapper))
    assert_failed_cleanly(libxl, libxl.run("add", path), path, config_path, "mapper %s is not usable here" % mapper)


def test_cluster_down(libxl, config_path, make_image, ceph_cluster, tmp_path):
    image = make_image(size=4 * MiB)
    path = libxl.backend("rbd:%s" % image)
    ceph_cluster.kill_mon()
    try:
        started = time.monotonic()
        result = libxl.run("add", path)
        elapsed = time.monotonic() - started
        keys = libxl.keys(path)
        assert elapsed < 15, "add took %.1f s with the cluster down" % elapsed
        assert result.returncode != 0
        error = keys["hotplug-error"]
        assert "\n" not in error and error.startswith("add failed: ")
        assert "did not answer in time" in error or "connecting to the Ceph cluster" in error, error
        assert keys["hotplug-status"] == "error"
        assert error in result.stderr
        assert error in open(os.path.join(str(tmp_path), "xen-hotplug.log")).read()
        assert leftovers(config_path) == NOTHING
    finally:
        ceph_cluster.start_mon()
    assert libxl.run("remove", path).returncode == 0
    assert leftovers(config_path) == NOTHING


def slow_rbd_fuse(tmp_path, seconds):
    """A PATH wrapper: rbd-fuse that sleeps before doing its job, and says when it started."""
    directory = tmp_path / "slowbin"
    directory.mkdir()
    marker = tmp_path / "rbd-fuse-started"
    wrapper = directory / "rbd-fuse"
    wrapper.write_text("#!/bin/sh\necho $$ > %s\nsleep %s\nexec /usr/bin/rbd-fuse \"$@\"\n" % (marker, seconds))
    wrapper.chmod(0o755)
    return str(directory), marker


def test_sigkill_in_the_middle_of_add_then_remove_cleans_up(libxl, config_path, make_image, tmp_path):
    image = make_image(size=4 * MiB)
    path = libxl.backend("rbd:%s" % image)
    bindir, marker = slow_rbd_fuse(tmp_path, 1.5)
    env = dict(os.environ, XENBUS_PATH=path, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend",
               PATH=bindir + ":" + os.environ["PATH"])
    proc = subprocess.Popen([sys.executable, SCRIPT, "add"], env=env, cwd="/", stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the add never reached rbd-fuse"
    proc.send_signal(signal.SIGKILL)  # what libxl does at its timeout
    proc.wait()
    assert "hotplug-status" not in libxl.keys(path)
    # the orphaned rbd-fuse goes on and mounts: the worst moment, a mount but no loop yet
    wrapper_pid = int(marker.read_text())
    while os.path.exists("/proc/%d" % wrapper_pid) and time.monotonic() < deadline:
        try:
            with open("/proc/%d/cmdline" % wrapper_pid, "rb") as handle:
                if handle.read().startswith(b"/usr/bin/rbd-fuse"):
                    break
        except OSError:
            break
        time.sleep(0.05)
    while not leftovers(config_path)["mounts"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(config_path)["mounts"], "rbd-fuse never mounted"

    result = libxl.run("remove", path)
    assert result.returncode == 0, result.stderr
    assert leftovers(config_path) == NOTHING
    assert libxl.run("remove", path).returncode == 0


# ---- no secret anywhere -------------------------------------------------------------------------

def keyring_secret(path):
    with open(path) as handle:
        for line in handle:
            if line.strip().startswith("key"):
                return line.split("=", 1)[1].strip()
    raise AssertionError("no key in %s" % path)


class CmdlineSampler(threading.Thread):
    """Reads every process's command line, over and over, while add/remove run."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.seen = set()
        self.rounds = 0

    def run(self):
        while not self.stop.is_set():
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        with open("/proc/%s/cmdline" % entry, "rb") as handle:
                            self.seen.add(handle.read())
                    except OSError:
                        pass
            self.rounds += 1


def test_no_secret_in_any_command_line_log_or_xenstore(libxl, config_path, make_image, ceph_cluster, tmp_path,
                                                     xenstored):
    secret = keyring_secret(ceph_cluster.user_keyring)
    needles = [secret.encode(), secret.rstrip("=").encode()]
    images = [make_image(size=4 * MiB) for _ in range(2)]
    paths = [libxl.backend("rbd:%s" % images[0], mode="w"), libxl.backend("rbd:%s" % images[1], mode="r")]
    sampler = CmdlineSampler()
    sampler.start()
    try:
        for path in paths:
            result = libxl.run("add", path)
            assert result.returncode == 0, result.stderr
        # a failing add and remove too
        bad = libxl.backend("rbd:no-such-image")
        assert libxl.run("add", bad).returncode != 0
        for path in paths + [bad]:
            assert libxl.run("remove", path).returncode == 0
    finally:
        sampler.stop.set()
        sampler.join()
    assert sampler.rounds > 10
    assert any(b"rbd-fuse" in cmdline for cmdline in sampler.seen), "the sampler never saw rbd-fuse"
    assert any(b"losetup" in cmdline for cmdline in sampler.seen) or sampler.rounds > 0
    leaked = [c for c in sampler.seen if any(n in c for n in needles)]
    assert leaked == []
    with open(os.path.join(str(tmp_path), "xen-hotplug.log"), "rb") as handle:
        log = handle.read()
    assert not any(n in log for n in needles)
    tree = json.dumps(xenstored.tree("/")).encode()
    assert not any(n in tree for n in needles)
    assert leftovers(config_path) == NOTHING
