"""Invariant 5: a dead host's registration is stale; refuse names the fence, fence takes over.

The dead host is simulated by its mapping client: rbd-fuse killed with -9, or
frozen with SIGSTOP (a hung host that could wake up and write: what fencing
exists for).  Its watch lingers until the OSD's watch timeout (~30 s).
"""

import os
import signal
import time
import uuid

import pytest

from access_hosts import Host, fuse_pid, wait_watcher_gone


@pytest.fixture
def three_hosts(ceph_cluster, tmp_path, libxl, make_image):
    hosts = [Host("host%d" % i, ceph_cluster, tmp_path, "brbd-h%d" % i,
                  ceph_cluster.make_user("brbd-h%d" % i), libxl) for i in (1, 2, 3)]
    hosts[2].config_path = hosts[2].write(**{"access.stale": "fence"})
    yield hosts


def _holder(host, ceph_cluster, image, rbd_admin, domid):
    path = host.backend(image, domid=domid, vm=str(uuid.uuid4()))
    result = host.add(path)
    assert result.returncode == 0, result.stderr
    (reg,) = _locks(host, image)
    mountpoint = os.path.join(host.tmp, "fuse", "%s%%2F%s" % (ceph_cluster.pool, image))
    pid = fuse_pid(mountpoint)
    assert pid, "no rbd-fuse for %s" % mountpoint
    return path, reg["client"], pid


def _locks(host, image):
    import json
    result = host.cli("locks", image, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["registrations"]


def _blocklisted(ceph_cluster, addr):
    return any(entry.get("addr", "").startswith(addr) for entry in ceph_cluster.ceph("osd", "blocklist", "ls"))


def test_kill9_refuse_then_break_lock(three_hosts, libxl, ceph_cluster, make_image, rbd_admin):
    h1, h2, _h3 = three_hosts
    image = make_image()
    path1, addr, pid = _holder(h1, ceph_cluster, image, rbd_admin, 5)
    os.kill(pid, signal.SIGKILL)
    # Before the watch times out the holder looks alive: refused as in use.
    wait_watcher_gone(rbd_admin[1], image, addr)
    assert [r["state"] for r in _locks(h2, image)] == ["stale"]
    path2 = h2.backend(image, domid=6)
    started = time.monotonic()
    result = h2.add(path2)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    error = libxl.keys(path2)["hotplug-error"]
    assert "w refused: stale attachment w by a VM" in error and addr not in error  # the guest reads it
    fence = "block-rbd break-lock %s/%s host1:%s" % (ceph_cluster.pool, image, path1)
    assert fence in error
    assert elapsed < 5 + 2  # the check itself is bounded; the rest is process start-up
    # The operator runs exactly the command the error names.
    broke = h2.cli(*fence.split()[1:])
    assert broke.returncode == 0, broke.stderr
    assert "blocklisted client %s" % addr in broke.stdout
    assert _blocklisted(ceph_cluster, addr)
    result = h2.add(path2)
    assert result.returncode == 0, result.stderr
    # The dead host's remove (after its reboot) is idempotent and leaves host2 alone.
    h1.remove(path1)
    assert [r["key"] for r in _locks(h2, image)] == ["host2:" + path2]
    assert h2.remove(path2).returncode == 0
    ceph_cluster.ceph("osd", "blocklist", "rm", addr)


def test_frozen_holder_is_fenced_and_cannot_write(three_hosts, libxl, ceph_cluster, make_image, rbd_admin):
    h1, h2, h3 = three_hosts  # h3 runs with access.stale: fence
    image = make_image()
    path1, addr, pid = _holder(h1, ceph_cluster, image, rbd_admin, 7)
    device1 = libxl.keys(path1)["physical-device-path"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_watcher_gone(rbd_admin[1], image, addr)
        path2 = h2.backend(image, domid=8)
        assert h2.add(path2).returncode == 1  # refuse (the default) still refuses
        path3 = h3.backend(image, domid=9)
        started = time.monotonic()
        result = h3.add(path3)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 5 + 10  # check ≤ 5 s, plus mapping
        assert _blocklisted(ceph_cluster, addr)
        assert [r["key"] for r in _locks(h3, image)] == ["host3:" + path3]
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        # The old client wakes up and writes: nothing it writes may reach the image.
        pattern = bytes([0xAB]) * 4096
        offset = 1 << 20
        tried = _write(device1, pattern, offset)
        time.sleep(3)  # time for rbd-fuse to flush whatever it accepted
        tried_again = _write(device1, pattern, offset)
        import rbd
        with rbd.Image(rbd_admin[1], image, read_only=True) as img:
            assert img.read(offset, 4096) != pattern, \
                "a fenced client could still write (dd said: %s / %s)" % (tried, tried_again)
        # The new holder writes fine.
        device3 = libxl.keys(path3)["physical-device-path"]
        assert _write(device3, pattern, 0) == "ok"
        with rbd.Image(rbd_admin[1], image, read_only=True) as img:
            assert img.read(0, 4096) == pattern
    finally:
        h1.remove(path1)
        assert [r["key"] for r in _locks(h3, image)] == ["host3:" + path3]
        assert h3.remove(path3).returncode == 0
        ceph_cluster.ceph("osd", "blocklist", "rm", addr)


def _write(device, data, offset):
    """Write through the block device, bypassing dom0's page cache; "ok" or the error."""
    import mmap
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    try:
        fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    except OSError as exc:
        return exc.strerror
    try:
        os.pwrite(fd, buf, offset)
        os.fsync(fd)
        return "ok"
    except OSError as exc:
        return exc.strerror
    finally:
        os.close(fd)


def test_a_host_back_from_a_power_loss_releases_its_earlier_boots_registrations(
        three_hosts, libxl, ceph_cluster, make_image, rbd_admin):
    """Power lost with a guest attached: the mapping client dies, the tmpfs records go, the
    registration stays in Ceph.  The ledger on disk noted it with its boot, so once the
    host is back its boot unit's `release-pending` drops it: no fencing, no break-lock,
    and another host then attaches `w` at once."""
    import json
    from conftest import reap_fuse_mounts

    h1, h2, _h3 = three_hosts
    image = make_image()
    _path1, addr, _pid = _holder(h1, ceph_cluster, image, rbd_admin, 5)
    config = h1.config()
    (note,) = [os.path.join(config["ledger_dir"], "registered", n)
               for n in os.listdir(os.path.join(config["ledger_dir"], "registered"))]
    with open(note) as handle:
        noted = json.load(handle)
    with open("/proc/sys/kernel/random/boot_id") as handle:
        assert noted["boot"] == handle.read().strip() and noted["image"] == "%s/%s" % (ceph_cluster.pool, image)
    # The power goes: the client dies, and so does everything under state_dir (tmpfs) ...
    reap_fuse_mounts(config["fuse.mount_dir"], kill_all=True)
    import shutil
    shutil.rmtree(config["state_dir"])
    # ... and the host boots again: the note is of an earlier boot now.
    noted["boot"] = "0" * 32
    with open(note, "w") as handle:
        json.dump(noted, handle)
    released = h1.cli("release-pending")
    assert released.returncode == 0, released.stderr
    assert released.stdout == "released %s/%s by %s\n" % (ceph_cluster.pool, image, _path1)
    assert _locks(h2, image) == [] and not _blocklisted(ceph_cluster, addr)
    assert os.listdir(os.path.join(config["ledger_dir"], "registered")) == []
    # A dom0 takes longer to boot than the OSDs keep a dead client's watch (~30 s).
    wait_watcher_gone(rbd_admin[1], image, addr)
    path2 = h2.backend(image, domid=6)
    result = h2.add(path2)
    assert result.returncode == 0, result.stderr
    assert h2.remove(path2).returncode == 0
