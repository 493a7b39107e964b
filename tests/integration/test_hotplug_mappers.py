"""block-rbd add/remove as libxl runs them, for whichever mapper BLOCK_RBD_TEST_MAPPER
names (default fuse): scripts/block-rbd as a subprocess, the real xenstore tools, the real
cluster.  On this machine that is the xenstored double and rbd-fuse; tests/xen runs the
same file inside a Xen dom0 against the REAL xenstored with krbd and with rbd-nbd."""

import concurrent.futures
import errno
import os

import pytest

from block_rbd import config as config_mod
from block_rbd import mappers
from conftest import TEST_MAPPER

MiB = 1 << 20
DEVICE_PREFIX = {"krbd": "rbd", "nbd": "nbd", "fuse": "loop"}


@pytest.fixture
def mapper(config_path):
    """The mapper under test (skipped, naming why, where it cannot run)."""
    instance = mappers.get(TEST_MAPPER, config_mod.load(config_path))
    reason = instance.unavailable()
    if reason:
        pytest.skip("mapper %s: %s" % (TEST_MAPPER, reason))
    return instance


def leftovers(mapper, config_path, images):
    """Mappings of `images` the mapper still sees, and holders block-rbd still records."""
    config = config_mod.load(config_path)
    from block_rbd import attachments
    mapped = sorted(m.device for m in mapper.mapped() if m.spec.image in images)
    holders = sorted("%s: %s" % (r.image, h) for r in attachments.local_state(config).records()
                     for h in r.holders if r.spec.image in images)
    return {"mapped": mapped, "holders": holders}


NOTHING = {"mapped": [], "holders": []}


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
    assert keys["block-rbd-image"] == "%s/%s" % (pool, image)
    assert keys["block-rbd-mode"] == mode
    assert keys["block-rbd-mapper"] == TEST_MAPPER
    return device


def sys_ro(device):
    with open("/sys/block/%s/ro" % os.path.basename(device)) as handle:
        return handle.read().strip() == "1"


def test_add_write_remove_data_in_ceph(libxl, config_path, mapper, make_image, rbd_admin, ceph_cluster):
    image = make_image(size=16 * MiB)
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, image), mode="w")
    result = libxl.run("add", path)
    assert result.returncode == 0, result.stderr
    device = connected_device(libxl, path, image, "w", ceph_cluster.pool)
    assert not sys_ro(device)
    data = os.urandom(8192)
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert rbd_io(rbd_admin, image, 3 * MiB, length=len(data)) == data
    result = libxl.run("remove", path)
    assert result.returncode == 0, result.stderr
    assert leftovers(mapper, config_path, [image]) == NOTHING
    assert libxl.run("remove", path).returncode == 0  # idempotent
    assert rbd_io(rbd_admin, image, 3 * MiB, length=len(data)) == data


def test_read_only_attach(libxl, config_path, mapper, make_image, rbd_admin, ceph_cluster):
    image = make_image(size=8 * MiB)
    rbd_io(rbd_admin, image, MiB, b"golden" * 100)
    path = libxl.backend("%s/%s,mode=r" % (ceph_cluster.pool, image), mode="w")  # target wins
    result = libxl.run("add", path)
    assert result.returncode == 0, result.stderr
    device = connected_device(libxl, path, image, "r", ceph_cluster.pool)
    assert sys_ro(device)
    with open(device, "rb") as handle:
        handle.seek(MiB)
        assert handle.read(600) == b"golden" * 100
    with pytest.raises(OSError) as info:
        fd = os.open(device, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 512, 0)
        finally:
            os.close(fd)
    assert info.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
    assert libxl.run("remove", path).returncode == 0
    assert leftovers(mapper, config_path, [image]) == NOTHING
    assert rbd_io(rbd_admin, image, 0, length=512) == b"\0" * 512


def test_second_add_is_a_no_op_and_two_backends_share(libxl, config_path, mapper, make_image, ceph_cluster):
    image = make_image(size=8 * MiB)
    first = libxl.backend("%s:%s" % (ceph_cluster.pool, image), mode="r", domid=7)
    second = libxl.backend("%s/%s" % (ceph_cluster.pool, image), mode="r", domid=7)
    assert libxl.run("add", first).returncode == 0
    before = libxl.keys(first)
    assert libxl.run("add", first).returncode == 0  # physical-device written: nothing to do
    assert libxl.keys(first) == before
    result = libxl.run("add", second)
    assert result.returncode == 0, result.stderr
    device = connected_device(libxl, first, image, "r", ceph_cluster.pool)
    assert connected_device(libxl, second, image, "r", ceph_cluster.pool) == device
    assert leftovers(mapper, config_path, [image])["mapped"] == [device]
    assert libxl.run("remove", first).returncode == 0
    state = leftovers(mapper, config_path, [image])
    assert state["mapped"] == [device] and len(state["holders"]) == 1
    assert libxl.run("remove", second).returncode == 0
    assert leftovers(mapper, config_path, [image]) == NOTHING


def test_missing_image_fails_cleanly(libxl, config_path, mapper, ceph_cluster):
    path = libxl.backend("%s:brbd-never-created" % ceph_cluster.pool)
    result = libxl.run("add", path)
    assert result.returncode != 0
    keys = libxl.keys(path)
    assert keys["hotplug-status"] == "error"
    assert keys["hotplug-error"] == "add failed: image %s/brbd-never-created does not exist" % ceph_cluster.pool
    assert "physical-device" not in keys
    assert leftovers(mapper, config_path, ["brbd-never-created"]) == NOTHING
    assert libxl.run("remove", path).returncode == 0


def test_four_parallel_adds_and_removes(libxl, config_path, mapper, make_image, ceph_cluster):
    """What libxl does for a domU with four disks."""
    images = [make_image(size=4 * MiB) for _ in range(4)]
    paths = [libxl.backend("%s:%s" % (ceph_cluster.pool, image), domid=11) for image in images]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: libxl.run("add", p, timeout=120), paths))
    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results if r.returncode]
    devices = [connected_device(libxl, p, i, "w", ceph_cluster.pool) for p, i in zip(paths, images)]
    assert len(set(devices)) == 4
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: libxl.run("remove", p, timeout=120), paths))
    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results if r.returncode]
    assert leftovers(mapper, config_path, images) == NOTHING
