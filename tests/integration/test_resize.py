"""block-rbd resize against the real cluster: an attached image grows under its device
(every mapper: krbd and rbd-nbd by themselves, a loop device on rbd-fuse through
follow_size), and shrinking is refused while attached and without --allow-shrink."""

import os

from images_helpers import MiB, block_rbd_cli, image_bytes, write_pattern

from block_rbd import attachments
from block_rbd import config as config_mod
from block_rbd.mappers.base import device_size
from block_rbd.target import parse_spec


def image_size(ioctx, name):
    import rbd
    with rbd.Image(ioctx, name, read_only=True) as image:
        return image.size()


def test_an_attached_image_grows_under_its_device(libxl, config_path, rbd_admin, make_image):
    _handle, ioctx = rbd_admin
    name = make_image(size=16 * MiB)
    write_pattern(ioctx, name, [(0, b"kept" * 1024)])
    path = libxl.backend("rbd/" + name, mode="w")
    assert libxl.run("add", path).returncode == 0
    device = libxl.keys(path)["physical-device-path"]
    mapper = libxl.keys(path)["block-rbd-mapper"]
    try:
        assert device_size(device) == 16 * MiB
        grown = block_rbd_cli("resize", "rbd/" + name, "32M")
        assert grown.exit_code == 0, grown.output
        assert grown.output.splitlines() == [
            "resized rbd/%s from %d to %d bytes" % (name, 16 * MiB, 32 * MiB),
            "%s (%s): %d bytes" % (device, mapper, 32 * MiB)]
        assert device_size(device) == 32 * MiB  # no detach
        fd = os.open(device, os.O_RDWR)
        try:
            os.pwrite(fd, b"new end!" * 512, 30 * MiB)  # past the old end
            os.fsync(fd)
            assert os.pread(fd, 4096, 0) == b"kept" * 1024
        finally:
            os.close(fd)
        again = block_rbd_cli("resize", "rbd/" + name, "32M")
        assert again.exit_code == 0 and again.output.startswith(
            "resized rbd/%s from %d to %d bytes" % (name, 32 * MiB, 32 * MiB))
        for flags in ((), ("--allow-shrink",)):
            refused = block_rbd_cli("resize", "rbd/" + name, "8M", *flags)
            assert refused.exit_code == 1
            assert "rbd/%s is attached (testhost:%s" % (name, path) in refused.output
            assert "detach it before shrinking it" in refused.output
            assert len(refused.output.strip().splitlines()) == 1
        assert image_size(ioctx, name) == 32 * MiB
    finally:
        assert libxl.run("remove", path).returncode == 0
    data = image_bytes(ioctx, name)
    assert data[:4096] == b"kept" * 1024 and data[30 * MiB:30 * MiB + 4096] == b"new end!" * 512


def test_shrinking_needs_allow_shrink_and_snapshots_are_refused(config_path, rbd_admin, make_image):
    _handle, ioctx = rbd_admin
    name = make_image(size=16 * MiB)
    refused = block_rbd_cli("resize", "rbd/" + name, "8M")
    assert refused.exit_code == 1
    assert ("shrinking rbd/%s from %d to %d bytes drops the data past the new end: refused without "
            "--allow-shrink" % (name, 16 * MiB, 8 * MiB)) in refused.output
    assert image_size(ioctx, name) == 16 * MiB
    done = block_rbd_cli("resize", "rbd/" + name, "8M", "--allow-shrink")
    assert done.exit_code == 0, done.output
    assert image_size(ioctx, name) == 8 * MiB
    snap = block_rbd_cli("resize", "rbd/%s@s1" % name, "32M")
    assert snap.exit_code != 0 and "name an image, not a snapshot" in snap.output
    bad = block_rbd_cli("resize", "rbd/" + name, "lots")
    assert bad.exit_code == 1 and "expected a positive number" in bad.output


def test_a_resize_made_elsewhere_is_followed(libxl, config_path, rbd_admin, make_image):
    """Another host (here: librbd directly) grows the image: krbd and rbd-nbd follow by
    themselves; a loop device on rbd-fuse once upkeep's follow_size runs."""
    import rbd
    _handle, ioctx = rbd_admin
    name = make_image(size=16 * MiB)
    path = libxl.backend("rbd/" + name, mode="w")
    assert libxl.run("add", path).returncode == 0
    device = libxl.keys(path)["physical-device-path"]
    try:
        with rbd.Image(ioctx, name) as image:
            image.resize(24 * MiB)
        config = config_mod.load(config_path)
        followed = attachments.follow_size(config, parse_spec("rbd/" + name), 24 * MiB)
        assert [(m.device, size) for m, size in followed] == [(device, 24 * MiB)]
        assert device_size(device) == 24 * MiB
    finally:
        assert libxl.run("remove", path).returncode == 0


def test_image_size_reads_the_header_as_librbd_does(config_path, rbd_admin, make_image):
    import rbd
    from block_rbd.cluster import Cluster
    from block_rbd.registry import image_size
    _handle, ioctx = rbd_admin
    name = make_image(size=16 * MiB)
    config = config_mod.load(config_path)
    with Cluster(config) as cluster, cluster.ioctx("rbd") as own:
        assert image_size(own, parse_spec("rbd/" + name)) == 16 * MiB
        with rbd.Image(ioctx, name) as image:
            image.resize(20 * MiB)
        assert image_size(own, parse_spec("rbd/" + name)) == 20 * MiB
