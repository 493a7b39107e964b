"""block-rbd backup / restore against the real cluster: RAW, QCOW2, increments, verification."""

import os
import shutil
import subprocess

import pytest

from conftest import need, remove_image
from images_helpers import (MiB, block_rbd_cli, cluster_for, digest, image_bytes, sample_layout,
                            snaps_of, write_pattern)

from block_rbd import backup
from block_rbd.target import ImageSpec


@pytest.fixture
def source(rbd_admin, make_image):
    """A 64 MiB image with scattered data and snapshot s1."""
    import rbd
    _handle, ioctx = rbd_admin
    name = make_image(size=64 * MiB)
    write_pattern(ioctx, name, sample_layout())
    with rbd.Image(ioctx, name) as image:
        image.create_snap("s1")
    return name


@pytest.fixture
def outdir(tmp_path):
    """A directory of its own for backup files (tmp_path also holds the config and log)."""
    path = tmp_path / "out"
    path.mkdir()
    return path


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def test_raw_backup_is_the_snapshot_byte_for_byte_and_sparse(config_path, rbd_admin, source, outdir):
    _handle, ioctx = rbd_admin
    dest = outdir / "full.raw"
    result = block_rbd_cli("backup", "rbd/%s@s1" % source, dest, "--verify")
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and "\r" not in result.output  # no progress bar off a terminal
    assert dest.read_bytes() == image_bytes(ioctx, source, "s1")
    assert allocated_bytes(dest) < 8 * MiB  # ~4 MiB of data in a 64 MiB image
    assert [p.name for p in outdir.iterdir()] == ["full.raw"]  # no partial file left
    again = block_rbd_cli("backup", "rbd/%s@s1" % source, dest)
    assert again.exit_code == 1 and "refusing to overwrite" in again.output


def test_qcow2_backup_passes_qemu_img_check_and_compare(config_path, rbd_admin, source, outdir):
    need("qemu-img", "qemu-utils")
    _handle, ioctx = rbd_admin
    dest = outdir / "full.qcow2"
    result = block_rbd_cli("backup", "rbd/%s@s1" % source, dest, "--format", "qcow2", "--verify")
    assert result.exit_code == 0, result.output
    subprocess.run(["qemu-img", "check", "-f", "qcow2", str(dest)], check=True, capture_output=True)
    reference = outdir / "reference.raw"
    reference.write_bytes(image_bytes(ioctx, source, "s1"))
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(reference), str(dest)],
                             capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert allocated_bytes(dest) < 8 * MiB


def test_live_image_backup_uses_and_removes_a_temporary_snapshot(config_path, rbd_admin, source, outdir):
    _handle, ioctx = rbd_admin
    dest = outdir / "live.raw"
    result = block_rbd_cli("backup", "rbd/" + source, dest, "--verify")
    assert result.exit_code == 0, result.output
    assert snaps_of(ioctx, source) == ["s1"]
    assert dest.read_bytes() == image_bytes(ioctx, source)


def test_backup_of_missing_snapshot_is_one_line(config_path, source, outdir):
    result = block_rbd_cli("backup", "rbd/%s@nope" % source, outdir / "x")
    assert result.exit_code == 1
    # (the log handler may repeat the line on stderr: each line is the whole message)
    assert set(result.output.strip().splitlines()) == {"block-rbd: image rbd/%s@nope does not exist" % source}
    assert list(outdir.iterdir()) == []


def test_verify_catches_a_corrupted_file(config_path, source, outdir):
    path = str(outdir / "f.raw")
    spec = ImageSpec("rbd", source, snap="s1")
    with cluster_for(config_path) as cluster:
        backup.write_raw(cluster, spec, path)
        backup.verify_raw(cluster, spec, path)
        with open(path, "r+b") as handle:  # one byte changed (the data there is random)
            handle.seek(5 * MiB + 10)
            old = handle.read(1)
            handle.seek(5 * MiB + 10)
            handle.write(bytes([old[0] ^ 0xFF]))
        with pytest.raises(backup.BackupError, match="differs from"):
            backup.verify_raw(cluster, spec, path)
        with open(path, "r+b") as handle:  # data where the snapshot has none
            handle.seek(5 * MiB + 10)
            handle.write(image_bytes_at(cluster, spec, 5 * MiB + 10, 1))
            handle.seek(60 * MiB)
            handle.write(b"stray")
        with pytest.raises(backup.BackupError, match="holds data at offset"):
            backup.verify_raw(cluster, spec, path)


def image_bytes_at(cluster, spec, offset, length):
    with cluster.image(spec) as image:
        return image.read(offset, length)


def change(ioctx, name, snap, layout, zero=()):
    import rbd
    with rbd.Image(ioctx, name) as image:
        for offset, data in layout:
            image.write(data, offset)
        for offset, length in zero:
            image.write_zeroes(offset, length)
        image.create_snap(snap)


@pytest.mark.parametrize("full_format", ["raw", "qcow2"])
def test_restore_from_full_plus_increments_is_byte_identical(config_path, rbd_admin, source, outdir,
                                                              full_format):
    if full_format == "qcow2":
        need("qemu-img", "qemu-utils")
    _handle, ioctx = rbd_admin
    full = outdir / ("full." + full_format)
    assert block_rbd_cli("backup", "rbd/%s@s1" % source, full, "--format", full_format).exit_code == 0
    # s2: new data, overwritten data, a zeroed range; s3: the image grows and more data lands.
    change(ioctx, source, "s2", [(2 * MiB, os.urandom(MiB)), (5 * MiB, b"X" * 4096)], zero=[(6 * MiB, MiB)])
    import rbd
    with rbd.Image(ioctx, source) as image:
        image.resize(96 * MiB)
    change(ioctx, source, "s3", [(80 * MiB, os.urandom(MiB + 7)), (0, b"head")])
    inc1, inc2 = outdir / "s1-s2.diff", outdir / "s2-s3.diff"
    for since, snap, path in (("s1", "s2", inc1), ("s2", "s3", inc2)):
        result = block_rbd_cli("backup", "rbd/%s@%s" % (source, snap), path, "--since", since, "--verify")
        assert result.exit_code == 0, result.output
    restored = source + "-restored"
    try:
        result = block_rbd_cli("restore", full, "rbd/" + restored, "--increment", inc1, "--increment", inc2)
        assert result.exit_code == 0, result.output
        assert digest(image_bytes(ioctx, restored)) == digest(image_bytes(ioctx, source, "s3"))
        assert snaps_of(ioctx, restored) == ["s1", "s2", "s3"]
        exists = block_rbd_cli("restore", full, "rbd/" + restored)
        assert exists.exit_code == 1 and "exists" in exists.output
    finally:
        remove_image(ioctx, restored)
    # Increments out of order are refused before anything is created.
    wrong = block_rbd_cli("restore", full, "rbd/" + restored, "--increment", inc2, "--increment", inc1)
    assert wrong.exit_code == 1 and "starts at snapshot s1 but" in wrong.output
    assert restored not in rbd.RBD().list(ioctx)


def test_rbd_import_diff_reads_our_increments(config_path, rbd_admin, ceph_cluster, source, outdir):
    """The increment format is Ceph's own: the rbd CLI (test only) applies it too."""
    need("rbd", "ceph-common")
    _handle, ioctx = rbd_admin
    full = outdir / "full.raw"
    assert block_rbd_cli("backup", "rbd/%s@s1" % source, full).exit_code == 0
    change(ioctx, source, "s2", [(3 * MiB, os.urandom(2 * MiB))], zero=[(0, 4096)])
    inc = outdir / "inc.diff"
    assert block_rbd_cli("backup", "rbd/%s@s2" % source, inc, "--since", "s1").exit_code == 0
    restored = source + "-cli"
    try:
        assert block_rbd_cli("restore", full, "rbd/" + restored).exit_code == 0
        import rbd
        with rbd.Image(ioctx, restored) as image:
            image.create_snap("s1")
        subprocess.run(["rbd", "-c", ceph_cluster.conf, "--id", ceph_cluster.user,
                        "--keyring", ceph_cluster.user_keyring, "--no-progress",
                        "import-diff", str(inc), "rbd/" + restored],
                       check=True, capture_output=True, timeout=60)
        assert digest(image_bytes(ioctx, restored)) == digest(image_bytes(ioctx, source, "s2"))
    finally:
        remove_image(ioctx, restored)
    shutil.rmtree(outdir, ignore_errors=True)
