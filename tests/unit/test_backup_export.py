"""block_rbd.backup.export: the helpers that need no cluster, and backup()'s own refusals."""

import errno
import json
import os
import re
import shutil
import stat

import pytest

from block_rbd import process
from block_rbd.backup import export
from block_rbd.errors import BackupError, BlockRbdError
from block_rbd.target import ImageSpec


class FakeRbd:
    RBD_FEATURE_FAST_DIFF = 16
    RBD_FLAG_FAST_DIFF_INVALID = 2
    RBD_FLAG_OBJECT_MAP_INVALID = 1


def test_fast_diff_usable():
    assert export.fast_diff_usable(61, 0, FakeRbd)
    assert not export.fast_diff_usable(61, 2, FakeRbd)
    assert not export.fast_diff_usable(61, 1, FakeRbd)
    assert not export.fast_diff_usable(1, 0, FakeRbd)


def test_data_segments_of_sparse_file(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as handle:
        handle.truncate(16 << 20)
        handle.seek(8 << 20)
        handle.write(b"x" * 4096)
    with open(path, "rb") as handle:
        segments = export.data_segments(handle.fileno(), 16 << 20)
    assert segments and all(off <= 8 << 20 < off + n for off, n in segments)
    assert sum(n for _o, n in segments) < 16 << 20


def test_backup_refuses_existing_dest(tmp_path):
    dest = tmp_path / "x"
    dest.write_bytes(b"")
    with pytest.raises(export.BackupError, match="refusing to overwrite"):
        export.backup(None, None, str(dest))


def test_backup_since_needs_raw(tmp_path):
    with pytest.raises(BlockRbdError, match="rbd diff stream"):
        export.backup(None, None, str(tmp_path / "x"), "qcow2", since="s")


def test_qemu_img_timeout_grows_with_size():
    assert export.qemu_img_timeout(0) == export.QEMU_IMG_BASE
    assert export.qemu_img_timeout(4 << 30) > export.qemu_img_timeout(1 << 30)


# ---- attack: who may read a backup, and what it may overwrite ----------------------------------

SNAP = ImageSpec("rbd", "vm1", "", "s1")


def fake_raw(cluster, spec, path, progress=None, durable=True):
    """write_raw without a cluster: 1 MiB with data at its start, written into `path` as it is."""
    with open(path, "r+b") as handle:
        handle.truncate(1 << 20)
        handle.write(b"secret data")
    return {"size": 1 << 20, "extents": [(0, 4096)], "written": 11}


def fake_diff(cluster, spec, since, path, progress=None):
    with open(path, "wb") as handle:
        handle.write(b"rbd diff v1\n")
    return {"size": 1 << 20, "extents": [], "written": 0}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def no_cluster(monkeypatch):
    monkeypatch.setattr(export, "write_raw", fake_raw)
    monkeypatch.setattr(export, "write_diff", fake_diff)
    monkeypatch.setattr(export, "verify_raw", lambda *args: None)
    monkeypatch.setattr(export, "verify_diff", lambda *args: None)


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode) if os.path.lexists(path) else None


needs_qemu_img = pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img not installed (Debian qemu-utils)")


@needs_qemu_img
def test_attack_a_qcow2_backup_is_never_readable_by_others(tmp_path, umask_022, no_cluster, monkeypatch):
    """qemu-img convert under umask 022 made the QCOW2 backup 0644: anyone read the disk."""
    seen = []
    real_run = process.run

    def run(argv, **kwargs):
        if argv[:2] == ["qemu-img", "convert"]:
            out = argv[-1]  # qemu-img writes into the file as it is: it must be 0600 before any data
            seen.append(mode(out))
            result = real_run(argv, **kwargs)
            seen.append(mode(out))
            return result
        return real_run(argv, **kwargs)
    monkeypatch.setattr(process, "run", run)
    dest = tmp_path / "full.qcow2"
    export.backup(None, SNAP, str(dest), "qcow2", verify=True)
    assert seen == [0o600, 0o600]
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["full.qcow2"]
    assert json.loads(process.run(["qemu-img", "info", "--output=json", str(dest)]).stdout)["format"] == "qcow2"


@pytest.mark.parametrize("fmt, since", [("raw", None), ("raw", "s0")])
def test_raw_and_diff_backups_are_0600(tmp_path, umask_022, no_cluster, fmt, since):
    dest = tmp_path / "b"
    export.backup(None, SNAP, str(dest), fmt, since=since)
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600 and os.listdir(tmp_path) == ["b"]


FORMATS = [pytest.param("raw", None, id="raw"), pytest.param("raw", "s0", id="diff"),
           pytest.param("qcow2", None, id="qcow2", marks=needs_qemu_img)]


@pytest.mark.parametrize("fmt, since", FORMATS)
def test_attack_a_dest_created_while_the_backup_is_written_is_not_overwritten(tmp_path, no_cluster, monkeypatch,
                                                                             fmt, since):
    """The check before the final rename was not atomic: a file created at dest after it was replaced."""
    dest = tmp_path / "b"
    where = "write_diff" if since else "write_raw"
    writer = getattr(export, where)

    def racing(*args, **kwargs):
        result = writer(*args, **kwargs)
        dest.write_bytes(b"someone else's")  # between the check and the publish
        return result
    monkeypatch.setattr(export, where, racing)
    with pytest.raises(BackupError) as info:
        export.backup(None, SNAP, str(dest), fmt, since=since)
    assert str(info.value) == "%s was created while the backup was written: refusing to overwrite it" % dest
    assert dest.read_bytes() == b"someone else's"
    assert os.listdir(tmp_path) == ["b"]  # no temporary file left


def test_attack_a_dangling_symlink_at_dest_is_not_replaced(tmp_path, no_cluster):
    dest = tmp_path / "b"
    os.symlink(str(tmp_path / "elsewhere"), str(dest))
    with pytest.raises(BackupError, match="exists: refusing to overwrite a backup$"):
        export.backup(None, SNAP, str(dest))
    assert os.path.islink(dest) and os.listdir(tmp_path) == ["b"]


@pytest.mark.parametrize("no_links", [False, True], ids=["link", "renameat2"])
def test_publish_names_the_file_and_never_replaces_one(tmp_path, monkeypatch, no_links):
    """On a file system without hard links (vfat: EPERM), renameat2 RENAME_NOREPLACE."""
    if no_links:
        def link(*args, **kwargs):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(export.os, "link", link)
    temp, dest = tmp_path / ".b.x.partial", tmp_path / "b"
    temp.write_bytes(b"mine")
    export.publish(str(temp), str(dest))
    assert dest.read_bytes() == b"mine" and not temp.exists()
    temp.write_bytes(b"again")
    with pytest.raises(BackupError, match=r"^%s was created while the backup was written: refusing to overwrite "
                                          r"it$" % re.escape(str(dest))):
        export.publish(str(temp), str(dest))
    assert dest.read_bytes() == b"mine" and not temp.exists()


def test_a_backup_into_a_missing_directory_is_one_line(tmp_path, no_cluster):
    with pytest.raises(BackupError, match=r"^cannot write a backup in %s: No such file or directory$"
                                          % re.escape(str(tmp_path / "nope"))):
        export.backup(None, SNAP, str(tmp_path / "nope" / "b"))
