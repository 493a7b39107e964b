"""Manual use without Xen, for real through the fuse mapper:
`block-rbd map TARGET [--mode r|w]`, `block-rbd unmap TARGET|DEVICE`,
`block-rbd showmapped [--format json]`."""

import json
import os
import subprocess
import sys

import pytest

from conftest import SCRIPT, assert_refuses_writes, leftovers

MiB = 1 << 20


pytestmark = pytest.mark.usefixtures("fuse_cleanup")


def cli(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True, cwd="/",
                          stdin=subprocess.DEVNULL, timeout=60, env=env)


def loops(config_path):
    return leftovers(config_path)["loops"]


def mounts(config_path):
    return leftovers(config_path)["mounts"]


def showmapped(fmt="json"):
    result = cli("showmapped", "--format", fmt)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if fmt == "json" else result.stdout


def test_map_showmapped_unmap_by_target(config_path, make_image, rbd_admin):
    image = make_image(size=8 * MiB)
    result = cli("map", "rbd/%s" % image)
    assert result.returncode == 0, result.stderr
    device = result.stdout.strip()
    assert device.startswith("/dev/loop") and loops(config_path) == [device]
    with open("/sys/block/%s/ro" % os.path.basename(device)) as handle:
        assert handle.read().strip() == "0"
    with open(device, "r+b") as handle:  # a writable disk: the data reaches Ceph
        handle.seek(MiB)
        handle.write(b"manual map" * 10)
        handle.flush()
        os.fsync(handle.fileno())
    import rbd
    with rbd.Image(rbd_admin[1], image, read_only=True) as img:
        assert img.read(MiB, 100) == b"manual map" * 10

    assert showmapped() == [{"image": "rbd/%s" % image, "snap": None, "mode": "rw", "mapper": "fuse",
                             "device": device, "backends": [], "manual": True, "managed": True,
                             "pending_release": False, "corrupt": None}]
    plain = showmapped("plain").splitlines()
    assert plain[0].split() == ["IMAGE", "SNAP", "MODE", "MAPPER", "DEVICE", "USED", "BY"]
    assert plain[1].split() == ["rbd/%s" % image, "-", "rw", "fuse", device, "manual"]

    again = cli("map", "rbd:%s" % image)  # idempotent: the same device, still one mapping
    assert again.returncode == 0 and again.stdout.strip() == device
    assert loops(config_path) == [device]

    result = cli("unmap", "rbd:%s" % image)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "rbd/%s (rw): unmapped %s" % (image, device)
    assert loops(config_path) == [] and mounts(config_path) == []
    assert showmapped() == []
    assert "nothing" not in showmapped("plain") and len(showmapped("plain").splitlines()) == 1


def test_map_read_only_and_unmap_by_device(config_path, make_image):
    image = make_image(size=8 * MiB)
    result = cli("map", image, "--mode", "r")  # bare image: the configured pool
    assert result.returncode == 0, result.stderr
    ro = result.stdout.strip()
    assert loops(config_path) == [ro]
    with open("/sys/block/%s/ro" % os.path.basename(ro)) as handle:
        assert handle.read().strip() == "1"
    assert_refuses_writes(ro)
    assert [(r["image"], r["mode"], r["device"], r["manual"]) for r in showmapped()] == [
        ("rbd/%s" % image, "ro", ro, True)]
    assert cli("map", "rbd/%s" % image, "--mode", "r").stdout.strip() == ro  # idempotent

    result = cli("unmap", ro)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "rbd/%s (ro): unmapped %s" % (image, ro)
    assert loops(config_path) == [] and mounts(config_path) == []
    result = cli("unmap", ro)
    assert result.returncode == 1


def test_target_mode_option_wins(config_path, make_image):
    image = make_image(size=8 * MiB)
    device = cli("map", "rbd/%s,mode=r" % image, "--mode", "w").stdout.strip()
    with open("/sys/block/%s/ro" % os.path.basename(device)) as handle:
        assert handle.read().strip() == "1"
    assert showmapped()[0]["mode"] == "ro"
    assert cli("unmap", "rbd/%s" % image).returncode == 0
    assert loops(config_path) == []


def test_showmapped_names_the_xen_backend(libxl, config_path, make_image):
    image = make_image(size=8 * MiB)
    path = libxl.backend("rbd:%s" % image, mode="w")
    assert libxl.run("add", path).returncode == 0
    device = libxl.keys(path)["physical-device-path"]
    (row,) = showmapped()
    assert row["backends"] == [path] and row["device"] == device and row["manual"] is False
    assert path in showmapped("plain")
    # unmap refuses what a guest uses
    for what in ("rbd:%s" % image, device):
        result = cli("unmap", what)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            "block-rbd: %s is attached to %s; detach it with xl block-detach" % (what, path)]
    assert loops(config_path) == [device]
    assert libxl.run("remove", path).returncode == 0
    assert showmapped() == []


@pytest.mark.parametrize("args, fault", [
    (("map", "rbd:vm 1"), "block-rbd: image name 'vm 1' contains ' ', which is not allowed"),
    (("map", "rbd:no-such-image"), "block-rbd: image rbd/no-such-image does not exist"),
    (("unmap", "rbd:never-mapped"), "block-rbd: rbd:never-mapped is not mapped by block-rbd map on this host"),
    (("unmap", "/dev/loop200"), "block-rbd: /dev/loop200 is not a device block-rbd mapped on this host"),
])
def test_errors_are_one_line(config_path, args, fault):
    result = cli(*args)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [fault]  # one error, one line
    assert loops(config_path) == [] and mounts(config_path) == []
    assert showmapped() == []


def test_status_names_the_image_its_attachments_and_the_mapping_here(config_path, make_image):
    image = make_image(size=8 * MiB)
    idle = cli("status", "rbd/" + image)
    assert idle.returncode == 0, idle.stderr
    assert idle.stdout.splitlines()[0].startswith("rbd/%s: 8 MiB, features " % image)
    assert "rbd/%s: no block-rbd attachments" % image in idle.stdout

    device = cli("map", "rbd/" + image, "--mode", "r").stdout.strip()
    try:
        status = json.loads(cli("status", image, "--format", "json").stdout)
        assert status["image"]["size"] == 8 * MiB and "layering" in status["image"]["features"]
        assert status["image"]["parent"] is None and status["image"]["snapshots"] == []
        [reg] = status["registrations"]
        assert (reg["key"], reg["mode"], reg["state"]) == ("testhost:manual", "r", "alive")
        assert reg["client"] in status["watchers"]
        assert [(m["device"], m["mode"], m["manual"]) for m in status["mapped_here"]] == [(device, "ro", True)]
        plain = cli("status", "rbd:" + image).stdout
        assert "testhost:manual" in plain and "mapped on this host: %s ro via fuse, used by manual" % device in plain
    finally:
        assert cli("unmap", device).returncode == 0
    missing = cli("status", "rbd/no-such-image")
    assert missing.returncode == 1 and missing.stderr.strip().endswith("does not exist")
