"""block-rbd add/remove as libxl runs them, through the fuse mapper for real:
scripts/block-rbd as a subprocess, the real xenstore tools against the xenstored
double, rbd-fuse + losetup against the real test cluster as the least-privilege user."""

import concurrent.futures
import errno
import os

import pytest

from conftest import NOTHING, leftovers

MiB = 1 << 20


pytestmark = pytest.mark.usefixtures("fuse_cleanup")




def read_image(rbd_admin, name, offset, length):
    import rbd
    _handle, ioctx = rbd_admin
    with rbd.Image(ioctx, name, read_only=True) as image:
        return image.read(offset, length)


def write_image(rbd_admin, name, offset, data):
    import rbd
    _handle, ioctx = rbd_admin
    with rbd.Image(ioctx, name) as image:
        image.write(data, offset)


def check_connected(libxl, path, image, mode, pool="rbd"):
    keys = libxl.keys(path)
    assert keys["hotplug-status"] == "connected"
    assert "hotplug-error" not in keys
    device = keys["physical-device-path"]
    st = os.stat(device)
    assert keys["physical-device"] == "%x:%x" % (os.major(st.st_rdev), os.minor(st.st_rdev))
    assert os.major(st.st_rdev) == 7  # a loop device
    assert keys["block-rbd-image"] == "%s/%s" % (pool, image)
    assert keys["block-rbd-mode"] == mode
    assert keys["block-rbd-mapper"] == "fuse"
    for key, value in keys.items():
        assert "AQ" not in value or "key" not in key  # no secret among the keys the guest can read
    return device


def test_add_write_read_back_through_librbd_remove(libxl, config_path, make_image, rbd_admin, ceph_cluster, tmp_path):
    image = make_image(size=16 * MiB)
    path = libxl.backend("%s:%s" % (ceph_cluster.pool, image), mode="w")
    result = libxl.run("add", path)
    assert result.returncode == 0, result.stderr
    device = check_connected(libxl, path, image, "w")
    name = os.path.basename(device)
    with open("/sys/block/%s/ro" % name) as handle:
        assert handle.read().strip() == "0"

    data = os.urandom(4096) + b"block-rbd was here" + os.urandom(4096 - 18)
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert read_image(rbd_admin, image, 3 * MiB, len(data)) == data

    log = open(os.path.join(str(tmp_path), "xen-hotplug.log")).read()
    assert "%s: add: rbd/%s mode w -> %s via fuse" % (path, image, device) in log

    result = libxl.run("remove", path)
    assert result.returncode == 0, result.stderr
    assert leftovers(tmp_path) == NOTHING
    assert not os.path.exists("/sys/block/%s/loop/backing_file" % name)
    assert "%s: remove: rbd/%s mode w: unmapped %s" % (path, image, device) in open(
        os.path.join(str(tmp_path), "xen-hotplug.log")).read()
    # idempotent
    assert libxl.run("remove", path).returncode == 0
    assert leftovers(tmp_path) == NOTHING
    # the data is in Ceph after the detach
    assert read_image(rbd_admin, image, 3 * MiB, len(data)) == data


def test_read_only_mode_refuses_writes(libxl, config_path, make_image, rbd_admin, tmp_path):
    image = make_image(size=8 * MiB)
    write_image(rbd_admin, image, MiB, b"golden" * 100)
    path = libxl.backend("rbd/%s" % image, mode="r")
    result = libxl.run("add", path)
    assert result.returncode == 0, result.stderr
    device = check_connected(libxl, path, image, "r")
    with open("/sys/block/%s/ro" % os.path.basename(device)) as handle:
        assert handle.read().strip() == "1"
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
    assert read_image(rbd_admin, image, 0, 512) == b"\0" * 512
    assert libxl.run("remove", path).returncode == 0
    assert leftovers(tmp_path) == NOTHING


def test_target_mode_r_wins_over_libxl_w(libxl, config_path, make_image, tmp_path):
    image = make_image(size=8 * MiB)
    path = libxl.backend("rbd/%s,mode=r" % image, mode="w")
    assert libxl.run("add", path).returncode == 0
    device = check_connected(libxl, path, image, "r")
    with open("/sys/block/%s/ro" % os.path.basename(device)) as handle:
        assert handle.read().strip() == "1"
    assert libxl.run("remove", path).returncode == 0
    assert leftovers(tmp_path) == NOTHING


def test_remove_when_nothing_was_ever_mapped(libxl, config_path, make_image, tmp_path):
    image = make_image(size=8 * MiB)
    for params in ("rbd:%s" % image, "rbd:never-created", "not a target"):
        path = libxl.backend(params)
        result = libxl.run("remove", path)
        assert result.returncode == 0, result.stderr
        assert "hotplug-error" not in libxl.keys(path)
        assert libxl.run("remove", path).returncode == 0
    assert leftovers(tmp_path) == NOTHING


def test_add_when_physical_device_is_written_is_a_no_op(libxl, config_path, make_image, tmp_path):
    image = make_image(size=8 * MiB)
    path = libxl.backend("rbd:%s" % image)
    assert libxl.run("add", path).returncode == 0
    before = libxl.keys(path)
    state = leftovers(tmp_path)
    result = libxl.run("add", path)
    assert result.returncode == 0, result.stderr
    assert libxl.keys(path) == before
    assert leftovers(tmp_path) == state and len(state["loops"]) == 1
    assert libxl.run("remove", path).returncode == 0
    assert leftovers(tmp_path) == NOTHING


def test_two_backends_of_one_vm_share_one_mapping(libxl, config_path, make_image, tmp_path):
    image = make_image(size=8 * MiB)
    first = libxl.backend("rbd:%s" % image, mode="r", domid=7)
    second = libxl.backend("rbd/%s" % image, mode="r", domid=7)
    assert libxl.run("add", first).returncode == 0
    result = libxl.run("add", second)
    assert result.returncode == 0, result.stderr
    device = check_connected(libxl, first, image, "r")
    assert check_connected(libxl, second, image, "r") == device
    assert libxl.keys(first)["physical-device"] == libxl.keys(second)["physical-device"]
    state = leftovers(tmp_path)
    assert len(state["loops"]) == 1 and len(state["mounts"]) == 1
    assert sorted(state["holders"]) == sorted("rbd/%s: %s" % (image, p) for p in (first, second))

    assert libxl.run("remove", first).returncode == 0
    state = leftovers(tmp_path)
    assert state["holders"] == ["rbd/%s: %s" % (image, second)]
    assert len(state["loops"]) == 1
    with open(device, "rb") as handle:  # still a working disk for the other backend
        assert len(handle.read(4096)) == 4096
    assert "still used by %s" % second in open(os.path.join(str(tmp_path), "xen-hotplug.log")).read()

    assert libxl.run("remove", second).returncode == 0
    assert leftovers(tmp_path) == NOTHING


def test_sixteen_concurrent_adds_then_removes(libxl, config_path, make_image, tmp_path):
    images = [make_image(size=4 * MiB) for _ in range(16)]
    paths = [libxl.backend("rbd:%s" % image, mode="w", domid=10 + i) for i, image in enumerate(images)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: libxl.run("add", p), paths))
    assert [r.returncode for r in results] == [0] * 16, [r.stderr for r in results if r.returncode]
    devices = [check_connected(libxl, path, image, "w") for path, image in zip(paths, images)]
    assert len(set(devices)) == 16
    state = leftovers(tmp_path)
    assert len(state["loops"]) == 16 and len(state["mounts"]) == 16 and len(state["holders"]) == 16
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: libxl.run("remove", p), paths))
    assert [r.returncode for r in results] == [0] * 16, [r.stderr for r in results if r.returncode]
    assert leftovers(tmp_path) == NOTHING
