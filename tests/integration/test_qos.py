"""Per-disk I/O limits (qos=) through the hotplug path against the real cluster: a disk
with limits is mapped by rbd-nbd with librbd's limits on its command line, and a mapper
without limits is refused in one line with nothing left behind.  The rbd-nbd case runs
where the nbd driver is (the Xen gate's pytest-dom0-nbd); the gate's qos-dom0 scenario
measures that the limits hold."""

import pytest

from block_rbd import config as config_mod
from block_rbd import mappers
from block_rbd.mappers.nbd import discover
from conftest import NOTHING, leftovers

MiB = 1 << 20


def test_qos_with_a_mapper_without_limits_fails_cleanly(libxl, config_path, make_image):
    name = make_image(size=16 * MiB)
    path = libxl.backend("rbd/%s,mapper=krbd,qos=iops:100" % name, mode="w")
    run = libxl.run("add", path)
    assert run.returncode == 1
    error = libxl.keys(path)["hotplug-error"]
    assert error == ("add failed: qos=iops:100 needs mapper=nbd (librbd's limits); krbd has no I/O limits: "
                     "use mapper=nbd or qos=none")
    assert libxl.keys(path)["hotplug-status"] == "error"
    assert error in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert leftovers(config_path) == NOTHING
    assert libxl.run("remove", path).returncode == 0


def test_a_disk_with_limits_is_mapped_by_rbd_nbd_with_them(libxl, config_path, make_image):
    config = config_mod.load(config_path)
    reason = mappers.get("nbd", config).unavailable()
    if reason:
        pytest.skip("rbd-nbd mapper: %s (the Xen gate's pytest-dom0-nbd runs this)" % reason)
    name = make_image(size=16 * MiB)
    path = libxl.backend("rbd/%s,qos=iops:500+write_bps:8M" % name, mode="w")
    assert libxl.run("add", path).returncode == 0
    try:
        keys = libxl.keys(path)
        assert keys["block-rbd-mapper"] == "nbd"  # whatever the configured mapper
        mapping = [m for m in discover() if m.device == keys["physical-device-path"]][0]
        with open("/proc/%d/cmdline" % mapping.details["pid"], "rb") as handle:
            argv = handle.read().decode().split("\0")
        assert "--rbd_qos_iops_limit=500" in argv and "--rbd_qos_write_bps_limit=8388608" in argv
    finally:
        assert libxl.run("remove", path).returncode == 0
    assert leftovers(config_path, [name]) == NOTHING
