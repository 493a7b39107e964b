"""block-rbd add/remove as libxl runs them, for whichever mapper BLOCK_RBD_TEST_MAPPER
names (default fuse): scripts/block-rbd as a subprocess, the real xenstore tools, the real
cluster as the least-privilege user.  On this machine that is the xenstored double and
rbd-fuse + loop; tests/xen runs the same file inside a Xen dom0 against the REAL xenstored
with krbd and with rbd-nbd.  Checks of rbd-fuse and loop devices run with fuse only."""

import concurrent.futures
import os

import pytest

from block_rbd import config as config_mod
from block_rbd import mappers
from conftest import NOTHING, TEST_MAPPER, assert_refuses_writes, leftovers

MiB = 1 << 20
DEVICE_PREFIX = {"krbd": "rbd", "nbd": "nbd", "fuse": "loop"}
FUSE = TEST_MAPPER == "fuse"
fuse_only = pytest.mark.skipif(not FUSE, reason="needs the fuse mapper (this run: %s)" % TEST_MAPPER)

pytestmark = pytest.mark.usefixtures("fuse_cleanup")


@pytest.fixture
def mapper(config_path):
    """The mapper under test (skipped, naming why, where it cannot run)."""
    instance = mappers.get(TEST_MAPPER, config_mod.load(config_path))
    reason = instance.unavailable()
    if reason:
        pytest.skip("mapper %s: %s" % (TEST_MAPPER, reason))
    return instance


def rbd_io(rbd_admin, name, offset, data=None, length=0):
    import rbd
    _handle, ioctx = rbd_admin
    with rbd.Image(ioctx, name, read_only=data is None) as image:
        if data is None:
            return image.read(offset, length)
        image.write(data, offset)


def connected_device(libxl, path, image, mode, pool):
    keys = libxl.keys(path)
    assert keys.get("hotplug-status") == "connected", keys
    assert "hotplug-error" not in keys
    device = keys["physical-device-path"]
    st = os.stat(device)
    assert keys["physical-device"] == "%x:%x" % (os.major(st.st_rdev), os.minor(st.st_rdev))
    assert os.path.basename(device).startswith(DEVICE_PREFIX[TEST_MAPPER]), device
    if FUSE:
        assert os.major(st.st_rdev) == 7  # a loop device
    assert keys["block-rbd-image"] == "%s/%s" % (pool, image)
    assert keys["block-rbd-mode"] == mode
    assert keys["block-rbd-mapper"] == TEST_MAPPER
    for key, value in keys.items():
        assert "AQ" not in value or "key" not in key  # no secret among the keys the guest can read
    return device


def assert_mapped(state, count):
    """`count` devices mapped; with fuse, as many rbd-fuse mounts and loop devices."""
    assert len(state["mapped"]) == count
    if FUSE:
        assert len(state["mounts"]) == count and len(state["loops"]) == count


def sys_ro(device):
    with open("/sys/block/%s/ro" % os.path.basename(device)) as handle:
        return handle.read().strip() == "1"


def hotplug_log(tmp_path):
    with open(os.path.join(str(tmp_path), "xen-hotplug.log")) as handle:
        return handle.read()


def test_add_write_remove_data_in_ceph(libxl, config_path, mapper, make_image, rbd_admin, ceph_cluster,
                                       tmp_path):
    image = make_image(size=16 * MiB)
    pool = ceph_cluster.pool
    path = libxl.backend("%s:%s" % (pool, image), mode="w")
    result = libxl.run("add", path)
    assert result.returncode == 0, result.stderr
    device = connected_device(libxl, path, image, "w", pool)
    assert not sys_ro(device)
    data = os.urandom(4096) + b"block-rbd was here" + os.urandom(4096 - 18)
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert rbd_io(rbd_admin, image, 3 * MiB, length=len(data)) == data
    assert "%s: add: %s/%s mode w -> %s via %s" % (path, pool, image, device, TEST_MAPPER) in hotplug_log(tmp_path)

    result = libxl.run("remove", path)
    assert result.returncode == 0, result.stderr
    assert leftovers(config_path, [image]) == NOTHING
    if FUSE:
        # the loop device no longer holds our file (its name may already serve someone
        # else: another suite runs beside this one in CI)
        backing = "/sys/block/%s/loop/backing_file" % os.path.basename(device)
        held = open(backing).read() if os.path.exists(backing) else ""
        assert "/%s\n" % image not in held and not held.rstrip("\n").endswith("/" + image)
    assert "%s: remove: %s/%s mode w: unmapped %s" % (path, pool, image, device) in hotplug_log(tmp_path)
    assert libxl.run("remove", path).returncode == 0  # idempotent
    assert leftovers(config_path, [image]) == NOTHING
    assert rbd_io(rbd_admin, image, 3 * MiB, length=len(data)) == data  # in Ceph after the detach


@pytest.mark.parametrize("params_mode, libxl_mode", [("", "r"), (",mode=r", "w")],
                         ids=["libxl_mode_r", "target_mode_r_wins_over_libxl_w"])
def test_read_only_attach(libxl, config_path, mapper, make_image, rbd_admin, ceph_cluster,
                          params_mode, libxl_mode):
    image = make_image(size=8 * MiB)
    rbd_io(rbd_admin, image, MiB, b"golden" * 100)
    path = libxl.backend("%s/%s%s" % (ceph_cluster.pool, image, params_mode), mode=libxl_mode)
    result = libxl.run("add", path)
    assert result.returncode == 0, result.stderr
    device = connected_device(libxl, path, image, "r", ceph_cluster.pool)
    assert sys_ro(device)
    with open(device, "rb") as handle:
        handle.seek(MiB)
        assert handle.read(600) == b"golden" * 100
    assert_refuses_writes(device)
    assert libxl.run("remove", path).returncode == 0
    assert leftovers(config_path, [image]) == NOTHING
    assert rbd_io(rbd_admin, image, 0, length=512) == b"\0" * 512


def test_remove_when_nothing_was_ever_mapped(libxl, config_path, mapper, make_image, ceph_cluster):
    image = make_image(size=8 * MiB)
    for params in ("%s:%s" % (ceph_cluster.pool, image), "%s:brbd-never-created" % ceph_cluster.pool,
                   "not a target"):
        path = libxl.backend(params)
        result = libxl.run("remove", path)
        assert result.returncode == 0, result.stderr
        assert "hotplug-error" not in libxl.keys(path)
        assert libxl.run("remove", path).returncode == 0
    assert leftovers(config_path, [image, "brbd-never-created"]) == NOTHING


def test_second_add_is_a_no_op_and_two_backends_share(libxl, config_path, mapper, make_image, ceph_cluster,
                                                      tmp_path):
    image = make_image(size=8 * MiB)
    pool = ceph_cluster.pool
    first = libxl.backend("%s:%s" % (pool, image), mode="r", domid=7)
    second = libxl.backend("%s/%s" % (pool, image), mode="r", domid=7)
    assert libxl.run("add", first).returncode == 0
    before = libxl.keys(first)
    state = leftovers(config_path, [image])
    result = libxl.run("add", first)  # physical-device written: nothing to do
    assert result.returncode == 0, result.stderr
    assert libxl.keys(first) == before
    assert leftovers(config_path, [image]) == state
    assert_mapped(state, 1)

    result = libxl.run("add", second)
    assert result.returncode == 0, result.stderr
    device = connected_device(libxl, first, image, "r", pool)
    assert connected_device(libxl, second, image, "r", pool) == device
    assert libxl.keys(first)["physical-device"] == libxl.keys(second)["physical-device"]
    state = leftovers(config_path, [image])
    assert state["mapped"] == [device]
    assert_mapped(state, 1)
    assert state["holders"] == sorted("%s/%s: %s" % (pool, image, p) for p in (first, second))

    assert libxl.run("remove", first).returncode == 0
    state = leftovers(config_path, [image])
    assert state["mapped"] == [device] and state["holders"] == ["%s/%s: %s" % (pool, image, second)]
    assert_mapped(state, 1)
    with open(device, "rb") as handle:  # still a working disk for the other backend
        assert len(handle.read(4096)) == 4096
    assert "still used by %s" % second in hotplug_log(tmp_path)

    assert libxl.run("remove", second).returncode == 0
    assert leftovers(config_path, [image]) == NOTHING


def test_missing_image_fails_cleanly(libxl, config_path, mapper, ceph_cluster):
    path = libxl.backend("%s:brbd-never-created" % ceph_cluster.pool)
    result = libxl.run("add", path)
    assert result.returncode != 0
    keys = libxl.keys(path)
    assert keys["hotplug-status"] == "error"
    assert keys["hotplug-error"] == "add failed: image %s/brbd-never-created does not exist" % ceph_cluster.pool
    assert "physical-device" not in keys
    assert leftovers(config_path, ["brbd-never-created"]) == NOTHING
    assert libxl.run("remove", path).returncode == 0


# One domU with four disks, and sixteen domUs with one each.  In dom0, pv-guest-4disks runs
# the four through libxl itself (the gate deselects four_parallel), and nbd is loaded with
# 8 devices there: the sixteen are this host's load test.
@pytest.mark.parametrize("disks, domus, timeout", [(4, 1, 120), pytest.param(16, 16, 60, marks=fuse_only)],
                         ids=["four_parallel", "sixteen_parallel"])
def test_parallel_adds_and_removes(libxl, config_path, mapper, make_image, ceph_cluster, disks, domus, timeout):
    images = [make_image(size=4 * MiB) for _ in range(disks)]
    paths = [libxl.backend("%s:%s" % (ceph_cluster.pool, image), mode="w", domid=11 + i % domus)
             for i, image in enumerate(images)]
    with concurrent.futures.ThreadPoolExecutor(disks) as pool:
        results = list(pool.map(lambda p: libxl.run("add", p, timeout=timeout), paths))
    assert [r.returncode for r in results] == [0] * disks, [r.stderr for r in results if r.returncode]
    devices = [connected_device(libxl, p, i, "w", ceph_cluster.pool) for p, i in zip(paths, images)]
    assert len(set(devices)) == disks
    state = leftovers(config_path, images)
    assert_mapped(state, disks)
    assert len(state["holders"]) == disks
    with concurrent.futures.ThreadPoolExecutor(disks) as pool:
        results = list(pool.map(lambda p: libxl.run("remove", p, timeout=timeout), paths))
    assert [r.returncode for r in results] == [0] * disks, [r.stderr for r in results if r.returncode]
    assert leftovers(config_path, images) == NOTHING
