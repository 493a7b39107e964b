"""Shared by the golden-image, snapshot and backup integration tests."""

import hashlib
import os

from click.testing import CliRunner

MiB = 1 << 20


def block_rbd_cli(*args):
    """Run `block-rbd ARGS` in-process, as cli.main() would."""
    from block_rbd.cli import cli
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def cluster_for(config_path):
    from block_rbd import config
    from block_rbd.cluster import Cluster
    return Cluster(config.load(config_path))


def write_pattern(ioctx, name, layout):
    """layout: [(offset, bytes)] written to the image."""
    import rbd
    with rbd.Image(ioctx, name) as image:
        for offset, data in layout:
            image.write(data, offset)


def image_bytes(ioctx, name, snap=None):
    import rbd
    with rbd.Image(ioctx, name, snapshot=snap, read_only=True) as image:
        size = image.size()
        return b"".join(image.read(off, min(4 * MiB, size - off)) for off in range(0, size, 4 * MiB))


def digest(data):
    return hashlib.sha256(data).hexdigest()


def sample_layout(seed=0):
    """Random data, a long zero run inside written data, and a tiny write far out."""
    rnd = os.urandom
    return [(0, rnd(MiB)), (5 * MiB, rnd(2 * MiB) + bytes(MiB) + rnd(4096)), (40 * MiB + 512, b"tail" * 100)]


def snaps_of(ioctx, name):
    import rbd
    with rbd.Image(ioctx, name, read_only=True) as image:
        return [s["name"] for s in image.list_snaps()]
