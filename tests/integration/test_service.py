"""The per-host service (block_rbd/service.py) for real: the same hotplug runs through it,
its fallbacks, its crash, its peer check, its idle exit and systemd's socket activation.

The service is started directly, as systemd would start it (this machine runs no systemd).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import NOTHING, SCRIPT, leftovers, write_config

MiB = 1 << 20


class Service:
    def __init__(self, proc, sock):
        self.proc, self.sock = proc, sock
        self.env = {"BLOCK_RBD_SOCKET": sock}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for_socket(path, proc, seconds=30):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert proc.poll() is None, "the service exited: %s" % proc.stderr.read()
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the service never listened on %s" % path)


def start_service(idle=60, extra_env=None, **popen):
    directory = tempfile.mkdtemp(prefix="brbd-svc")  # short: Unix socket paths are limited
    sock = os.path.join(directory, "hotplug.sock")
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.Popen([sys.executable, SCRIPT, "service", "--socket", sock, "--idle", str(idle)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **popen)
    wait_for_socket(sock, proc)
    return Service(proc, sock)


@pytest.fixture
def service(config_path, xenstored):
    svc = start_service()
    yield svc
    svc.stop()


def run_pids(log_text, path):
    """The pids that logged `add:`/`remove:` outcomes for backend `path`."""
    return set(re.findall(r"block-rbd\[(\d+)\] INFO %s: (?:add|remove): " % re.escape(path), log_text))


def test_add_and_remove_through_the_service_do_what_in_process_runs_do(
        service, libxl, config_path, make_image, rbd_admin, ceph_cluster, tmp_path):
    via = make_image(size=16 * MiB)
    here = make_image(size=16 * MiB)
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, via), mode="w")
    other = libxl.backend("%s:%s" % (ceph_cluster.pool, here), mode="w", domid=6)
    assert libxl.run("add", path, env=service.env).returncode == 0
    assert libxl.run("add", other, env={"BLOCK_RBD_SOCKET": str(tmp_path / "nothing-here")}).returncode == 0
    served, local = libxl.keys(path), libxl.keys(other)
    assert served["hotplug-status"] == local["hotplug-status"] == "connected"
    assert set(served) == set(local)
    assert served["block-rbd-image"] == "%s/%s" % (ceph_cluster.pool, via)
    # the data path is the same: write through the served device, read it back through librbd
    with open(served["physical-device-path"], "r+b") as dev:
        dev.write(b"served" * 100)
        dev.flush()
        os.fsync(dev.fileno())
    import rbd
    with rbd.Image(rbd_admin[1], via, read_only=True) as image:
        assert image.read(0, 600) == b"served" * 100
    log_text = (tmp_path / "xen-hotplug.log").read_text()
    assert run_pids(log_text, path) == {str(service.proc.pid)}
    assert str(service.proc.pid) not in run_pids(log_text, other)
    assert libxl.run("remove", path, env=service.env).returncode == 0
    assert libxl.run("remove", other, env=service.env).returncode == 0
    assert leftovers(config_path) == NOTHING


def test_a_failure_through_the_service_is_one_line_in_xenstore_and_on_stderr(
        service, libxl, config_path, ceph_cluster, tmp_path):
    path = libxl.backend("%s:does-not-exist" % ceph_cluster.pool)
    result = libxl.run("add", path, env=service.env)
    assert result.returncode == 1
    error = libxl.keys(path)["hotplug-error"]
    assert error == "add failed: image %s/does-not-exist does not exist" % ceph_cluster.pool
    assert result.stderr.strip().splitlines() == ["block-rbd: %s: %s" % (path, error)]
    assert libxl.run("remove", path, env=service.env).returncode == 0
    assert leftovers(config_path) == NOTHING


def test_a_refusal_after_the_lock_is_reported_through_the_service_before_its_undo(
        service, libxl, config_path, make_image, ceph_cluster, tmp_path):
    """The refusal comes from inside attach (the cluster-wide registration): the service reports
    it, tells the script, then undoes the partial attach; the remove right after finds it done."""
    image = make_image(size=16 * MiB)
    first = libxl.backend("%s:%s" % (ceph_cluster.pool, image), mode="w")
    second = libxl.backend("%s:%s" % (ceph_cluster.pool, image), mode="w", domid=6)
    assert libxl.run("add", first, env=service.env).returncode == 0
    result = libxl.run("add", second, env=service.env)
    assert result.returncode == 1
    error = libxl.keys(second)["hotplug-error"]
    # the guest reads hotplug-error: the holder's host and domid; xl's stderr has the whole line
    assert error.startswith("add failed: %s/%s: w refused: attached w by a VM (host " % (ceph_cluster.pool, image))
    assert "client" not in error
    assert libxl.keys(second)["hotplug-status"] == "error"
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("block-rbd: %s: add failed: %s/%s: w refused: attached w by VM "
                           % (second, ceph_cluster.pool, image)) and ", client " in line
    assert libxl.run("remove", second, env=service.env).returncode == 0
    assert libxl.keys(first)["hotplug-status"] == "connected"
    log_text = (tmp_path / "xen-hotplug.log").read_text()
    assert log_text.count("%s: add failed:" % second) == 1
    assert libxl.run("remove", first, env=service.env).returncode == 0
    assert leftovers(config_path) == NOTHING


def test_disks_outlive_a_crash_of_the_service(service, libxl, config_path, make_image, ceph_cluster, tmp_path):
    image = make_image(size=16 * MiB)
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, image))
    assert libxl.run("add", path, env=service.env).returncode == 0
    device = libxl.keys(path)["physical-device-path"]
    service.proc.kill()
    service.proc.wait()
    # the guest's disk still works: the mapping lives in the kernel and in rbd-fuse, not in the service
    with open(device, "r+b") as dev:
        dev.write(b"x" * 512)
        os.fsync(dev.fileno())
        dev.seek(0)
        assert dev.read(512) == b"x" * 512
    # the next run finds no service and does the remove itself
    result = libxl.run("remove", path, env=service.env)
    assert result.returncode == 0, result.stderr
    assert leftovers(config_path) == NOTHING


def test_a_service_that_does_not_answer_is_bypassed_and_never_runs_the_request_again(
        service, libxl, config_path, make_image, ceph_cluster, tmp_path):
    image = make_image(size=16 * MiB)
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, image))
    os.kill(service.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = libxl.run("add", path, env=service.env)
        took = time.monotonic() - started
    finally:
        os.kill(service.proc.pid, signal.SIGCONT)
    assert result.returncode == 0, result.stderr
    assert took < 30  # the wait for the service came out of the run's budget, with time to spare
    time.sleep(1)  # the woken service sees the abandoned request: it must drop it
    log_text = (tmp_path / "xen-hotplug.log").read_text()
    assert len(re.findall(r"INFO %s: add: " % re.escape(path), log_text)) == 1
    assert str(service.proc.pid) not in run_pids(log_text, path)
    assert libxl.run("remove", path, env=service.env).returncode == 0
    assert leftovers(config_path) == NOTHING


def test_another_configuration_runs_in_process(service, libxl, ceph_cluster, make_image, tmp_path):
    image = make_image(size=16 * MiB)
    other_tmp = tmp_path / "other"
    other_tmp.mkdir()
    other = write_config(other_tmp / "block-rbd.yaml", ceph_cluster, str(other_tmp))
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, image))
    env = dict(service.env, BLOCK_RBD_CONFIG=other)
    assert libxl.run("add", path, env=env).returncode == 0
    log_text = (other_tmp / "xen-hotplug.log").read_text()
    assert run_pids(log_text, path) and str(service.proc.pid) not in run_pids(log_text, path)
    assert libxl.run("remove", path, env=env).returncode == 0
    assert leftovers(other) == NOTHING


def test_only_root_is_served(service):
    # open the way to the socket for the test, so that only the service's own check stands;
    # the service checks who is calling before it reads a word
    os.chmod(os.path.dirname(service.sock), 0o755)
    os.chmod(service.sock, 0o777)
    probe = "\n".join([
        "import socket, sys",
        "s = socket.socket(socket.AF_UNIX)",
        "s.connect(sys.argv[1])",
        "s.settimeout(10)",
        "try:",
        "    print(repr(s.recv(100)))",
        "except ConnectionResetError:",
        "    print(repr(b''))"])
    result = subprocess.run([sys.executable, "-c", probe, service.sock], capture_output=True, text=True,
                            timeout=30, user=65534, group=65534)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "b''"  # closed without a word: no "ready" for uid 65534
    assert service.proc.poll() is None


def test_sixteen_concurrent_adds_and_removes_share_the_service(
        service, libxl, config_path, make_image, ceph_cluster, tmp_path):
    images = [make_image(size=8 * MiB) for _ in range(16)]
    paths = [libxl.backend("%s:%s" % (ceph_cluster.pool, image), domid=10 + i) for i, image in enumerate(images)]

    def storm(command):
        results = {}
        threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, libxl.run(command, p, env=service.env)))
                   for p in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    added = storm("add")
    assert [p for p, r in added.items() if r.returncode != 0] == []
    assert all(libxl.keys(p)["hotplug-status"] == "connected" for p in paths)
    log_text = (tmp_path / "xen-hotplug.log").read_text()
    assert set().union(*(run_pids(log_text, p) for p in paths)) == {str(service.proc.pid)}
    removed = storm("remove")
    assert [p for p, r in removed.items() if r.returncode != 0] == []
    assert leftovers(config_path) == NOTHING


def test_it_exits_when_idle(config_path, xenstored):
    svc = start_service(idle=1)
    try:
        assert svc.proc.wait(30) == 0
    finally:
        svc.stop()


def test_socket_activation_as_systemd_does_it(config_path, xenstored, libxl, make_image, ceph_cluster, tmp_path):
    directory = tempfile.mkdtemp(prefix="brbd-sd")
    sock = os.path.join(directory, "hotplug.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock)
    listener.listen(16)

    def as_systemd():
        # what systemd does before exec: the socket as fd 3, LISTEN_PID/LISTEN_FDS for this pid
        os.dup2(listener.fileno(), 3)
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["LISTEN_FDS"] = "1"

    proc = subprocess.Popen([sys.executable, SCRIPT, "service", "--socket", os.path.join(directory, "unused"),
                             "--idle", "60"], preexec_fn=as_systemd, close_fds=False,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    listener.close()
    svc = Service(proc, sock)
    try:
        image = make_image(size=8 * MiB)
        path = libxl.backend("%s:%s" % (ceph_cluster.pool, image))
        assert libxl.run("add", path, env=svc.env).returncode == 0
        assert run_pids((tmp_path / "xen-hotplug.log").read_text(), path) == {str(proc.pid)}
        assert not os.path.exists(os.path.join(directory, "unused"))  # it used systemd's socket
        assert libxl.run("remove", path, env=svc.env).returncode == 0
    finally:
        svc.stop()
    assert leftovers(config_path) == NOTHING
