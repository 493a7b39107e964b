"""block_rbd.backup.export: the helpers that need no cluster, and backup()'s own refusals."""

import pytest

from block_rbd.backup import export
from block_rbd.errors import BlockRbdError


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
