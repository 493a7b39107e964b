"""Faults against the real cluster: monitors gone during remove, a monitor restarted during
add, leftovers of killed runs, a xenstored that answers slowly.  (Monitors gone during
add: test_failures.py::test_cluster_down.)"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import NOTHING, SCRIPT, leftovers, write_config

MiB = 1 << 20


def cli(config_path, *args):
    return subprocess.run([sys.executable, SCRIPT, "--config", config_path, *args],
                          capture_output=True, text=True, timeout=120)


def registrations(ceph_cluster, image):
    """The block-rbd registration keys on the image's header object, read with librados."""
    import rados
    import rbd
    with rados.Rados(conffile=ceph_cluster.conf, rados_id=ceph_cluster.user,
                     conf={"keyring": ceph_cluster.user_keyring}) as handle:
        with handle.open_ioctx(ceph_cluster.pool) as ioctx:
            with rbd.Image(ioctx, image, read_only=True) as opened:
                header = "rbd_header." + opened.id()
            with rados.ReadOpCtx() as op:
                items, _ret = ioctx.get_omap_vals(op, "", "block-rbd.access.", 1000)
                ioctx.operate_read_op(op, header)
                return sorted(key for key, _value in items)


def test_remove_with_the_monitors_gone_unmaps_exits_0_and_the_release_is_finished_later(
        libxl, config_path, make_image, ceph_cluster, tmp_path):
    image = make_image(size=16 * MiB)
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, image), mode="w")
    assert libxl.run("add", path).returncode == 0
    assert registrations(ceph_cluster, image) == ["block-rbd.access.testhost:" + path]
    ceph_cluster.kill_mon()
    try:
        started = time.monotonic()
        result = libxl.run("remove", path)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 30
        left = leftovers(config_path)  # unmapped: no loop, no mount, no holder; the release pending
        assert left == dict(NOTHING, pending=["%s/%s: %s" % (ceph_cluster.pool, image, path)])
        log_text = (tmp_path / "xen-hotplug.log").read_text()
        assert "the cluster-wide release of %s is pending" % path in log_text
        assert "hotplug-error" not in libxl.keys(path)
        rows = json.loads(cli(config_path, "showmapped", "--format", "json").stdout)
        assert [(r["image"], r["backends"], r["pending_release"]) for r in rows] == [
            ("%s/%s" % (ceph_cluster.pool, image), [path], True)]
        assert "pending cluster-wide release" in cli(config_path, "showmapped").stdout
        assert "release of %s is pending" % path in cli(config_path, "doctor").stdout
    finally:
        ceph_cluster.start_mon()
    # the registration is still in Ceph until someone on this host finishes the release
    assert registrations(ceph_cluster, image) == ["block-rbd.access.testhost:" + path]
    done = cli(config_path, "release-pending")
    assert done.returncode == 0, done.stderr
    assert "released %s/%s by %s" % (ceph_cluster.pool, image, path) in done.stdout
    assert registrations(ceph_cluster, image) == []
    assert json.loads(cli(config_path, "showmapped", "--format", "json").stdout) == []


def test_the_next_run_that_reaches_the_cluster_finishes_pending_releases(
        libxl, config_path, make_image, ceph_cluster, tmp_path):
    first, second = make_image(size=8 * MiB), make_image(size=8 * MiB)
    one = libxl.backend("%s:%s" % (ceph_cluster.pool, first))
    two = libxl.backend("%s:%s" % (ceph_cluster.pool, second), domid=7)
    assert libxl.run("add", one).returncode == 0
    ceph_cluster.kill_mon()
    try:
        assert libxl.run("remove", one).returncode == 0
    finally:
        ceph_cluster.start_mon()
    assert registrations(ceph_cluster, first) != []
    # another host wants `first` in w: the pending release must not block it for long;
    # here the next run on this host (an add of another image) finishes it first
    assert libxl.run("add", two).returncode == 0
    assert registrations(ceph_cluster, first) == []
    other_tmp = tmp_path / "hostb"
    other_tmp.mkdir()
    other = write_config(other_tmp / "block-rbd.yaml", ceph_cluster, str(other_tmp), host="hostb")
    path_b = libxl.backend("%s:%s" % (ceph_cluster.pool, first), domid=9)
    assert libxl.run("add", path_b, env={"BLOCK_RBD_CONFIG": other}).returncode == 0
    assert libxl.run("remove", path_b, env={"BLOCK_RBD_CONFIG": other}).returncode == 0
    assert libxl.run("remove", two).returncode == 0
    assert leftovers(config_path) == NOTHING and leftovers(other) == NOTHING


def test_remove_with_nothing_mapped_here_never_contacts_the_cluster(libxl, config_path, make_image,
                                                                     ceph_cluster, tmp_path):
    image = make_image(size=4 * MiB)
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, image))
    ceph_cluster.kill_mon()
    try:
        started = time.monotonic()
        result = libxl.run("remove", path)
        took = time.monotonic() - started
    finally:
        ceph_cluster.start_mon()
    assert result.returncode == 0, result.stderr
    assert took < 4  # no connect attempt (that alone waits timeouts.connect = 5 s)
    assert "nothing to do" in (tmp_path / "xen-hotplug.log").read_text()


def test_remove_with_a_truncated_record_unmaps_and_sets_it_aside(libxl, config_path, make_image, ceph_cluster,
                                                                  tmp_path):
    """The record of a mapping cut short (a full disk, a crash): named by showmapped and doctor;
    remove still unmaps (the mapper finds the device) and releases, then sets the record aside."""
    from block_rbd import config as config_mod
    from block_rbd.state import local_state

    image = make_image(size=8 * MiB)
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, image))
    assert libxl.run("add", path).returncode == 0
    device = libxl.keys(path)["physical-device-path"]
    state = local_state(config_mod.load(config_path))
    (record,) = [os.path.join(state.maps_dir, n) for n in os.listdir(state.maps_dir)]
    with open(record, "r+") as handle:
        handle.truncate(40)
    rows = json.loads(cli(config_path, "showmapped", "--format", "json").stdout)
    assert [(r["device"], r["managed"], r["corrupt"].split(": unreadable (")[0]) for r in rows] == [
        (device, True, record)]
    assert "unreadable record: %s: unreadable (not JSON" % record in cli(config_path, "showmapped").stdout
    assert "%s: unreadable (not JSON" % record in cli(config_path, "doctor").stdout
    result = libxl.run("remove", path)
    assert result.returncode == 0, result.stderr
    assert leftovers(config_path) == NOTHING  # unmapped, nothing pending
    assert registrations(ceph_cluster, image) == []
    assert os.listdir(state.maps_dir) == [os.path.basename(record) + ".corrupt"]
    log_text = (tmp_path / "xen-hotplug.log").read_text()
    assert "set the unreadable record %s aside as %s.corrupt" % (record, record) in log_text
    assert "internal error" not in log_text and "hotplug-error" not in libxl.keys(path)


def test_a_leftover_registration_of_this_host_is_dropped_not_fenced(libxl, config_path, make_image,
                                                                     ceph_cluster, tmp_path):
    """A run killed after registering, whose local record is gone: this host's to clean up."""
    from block_rbd import config as config_mod
    from block_rbd.cluster import Cluster
    from block_rbd.policy import Request
    from block_rbd.registry import Registry
    from block_rbd.target import parse_spec

    image = make_image(size=8 * MiB)
    config = config_mod.load(config_path)
    with Cluster(config) as cluster:
        Registry(config).acquire(cluster, parse_spec("%s/%s" % (ceph_cluster.pool, image)),
                                 Request("backend/vbd/3/51712", "w", vm="dead-vm", domid="3", devid="51712"))
    assert registrations(ceph_cluster, image) == ["block-rbd.access.testhost:backend/vbd/3/51712"]
    # another host sees an attachment it must respect (pending, then stale: fence or wait)
    other_tmp = tmp_path / "hostb"
    other_tmp.mkdir()
    other = write_config(other_tmp / "block-rbd.yaml", ceph_cluster, str(other_tmp), host="hostb")
    path_b = libxl.backend("%s:%s" % (ceph_cluster.pool, image), domid=9)
    refused = libxl.run("add", path_b, env={"BLOCK_RBD_CONFIG": other})
    assert refused.returncode == 1 and "refused" in libxl.keys(path_b)["hotplug-error"]
    assert libxl.run("remove", path_b, env={"BLOCK_RBD_CONFIG": other}).returncode == 0
    # this host knows nothing of that holder: its next add drops the leftover without fencing
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, image), domid=4)
    result = libxl.run("add", path)
    assert result.returncode == 0, result.stderr
    log_text = (tmp_path / "xen-hotplug.log").read_text()
    assert "dropped testhost's own leftover access registration testhost:backend/vbd/3/51712" in log_text
    assert "blocklisted" not in log_text and "fenced" not in log_text
    assert registrations(ceph_cluster, image) == ["block-rbd.access.testhost:" + path]
    assert libxl.run("remove", path).returncode == 0
    assert registrations(ceph_cluster, image) == []
    assert leftovers(config_path) == NOTHING


def test_a_monitor_restarted_during_add(libxl, config_path, make_image, ceph_cluster, tmp_path):
    image = make_image(size=8 * MiB)
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, image))
    results = {}
    runner = threading.Thread(target=lambda: results.setdefault("add", libxl.run("add", path)))
    runner.start()
    time.sleep(0.3)  # the run has started (Python is up, the connection is being made)
    ceph_cluster.kill_mon()
    time.sleep(1)
    ceph_cluster.start_mon()
    runner.join(60)
    add = results["add"]
    keys = libxl.keys(path)
    if add.returncode == 0:
        assert keys["hotplug-status"] == "connected"
    else:  # a clean failure: one line, nothing left
        assert "\n" not in keys["hotplug-error"] and keys["hotplug-status"] == "error"
        assert leftovers(config_path) == NOTHING
    assert libxl.run("remove", path).returncode == 0
    assert leftovers(config_path) == NOTHING
    assert registrations(ceph_cluster, image) == []


@pytest.mark.parametrize("delay", [0.3])
def test_a_slow_xenstored_still_adds_within_the_budget(libxl, xenstored, config_path, make_image,
                                                       ceph_cluster, tmp_path, delay):
    """Every xenstore answer 0.3 s late: reading the backend alone then takes over the 5 s
    that used to be a fixed step timeout; the run's budget (30 s) still has room."""
    image = make_image(size=8 * MiB)
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, image))
    xenstored.delay = delay
    try:
        started = time.monotonic()
        add = libxl.run("add", path)
        took = time.monotonic() - started
        assert add.returncode == 0, add.stderr
        remove = libxl.run("remove", path)
        assert remove.returncode == 0, remove.stderr
    finally:
        xenstored.delay = 0
    log_text = (tmp_path / "xen-hotplug.log").read_text()
    assert "timed out" not in log_text
    assert took > 5  # the delay was real: it would have hit the old cap
    assert leftovers(config_path) == NOTHING


def test_the_budget_counts_from_the_process_start(libxl, ceph_cluster, make_image, tmp_path, monkeypatch):
    """libxl's 40 s count from its fork, and so does the run's budget: an interpreter that is
    slow to start (a busy dom0) has spent part of it.  Here 2.5 s pass between the fork and
    the exec of the script, with a budget of 2 s: the run must give up at once, cleanly."""
    config = write_config(tmp_path / "block-rbd.yaml", ceph_cluster, str(tmp_path), **{"timeouts.hotplug": 2})
    monkeypatch.setenv("BLOCK_RBD_CONFIG", config)
    image = make_image(size=4 * MiB)
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, image))
    env = dict(os.environ, XENBUS_PATH=path, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend",
               BLOCK_RBD_SOCKET=str(tmp_path / "no-service"))
    result = subprocess.run(["sh", "-c", 'sleep 2.5; exec "$0" add', SCRIPT], env=env, cwd="/",
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    error = libxl.keys(path)["hotplug-error"]
    assert error.startswith("add failed: the run's time budget (2 s) was used up before "), error
    assert result.stderr.strip().splitlines() == ["block-rbd: %s: %s" % (path, error)]  # one line, no traceback
    assert leftovers(config) == NOTHING
