"""Pure helpers of block_rbd.backup: zero detection, extents, the rbd diff v1 format."""

import io
import os
import random
import struct

import pytest

from block_rbd import backup
from block_rbd.errors import BlockRbdError

B = backup.BLOCK


def test_nonzero_runs():
    assert backup.nonzero_runs(bytes(4 * B)) == []
    data = bytearray(8 * B)
    data[0] = 1
    data[3 * B + 5] = 1
    data[4 * B] = 1
    data[8 * B - 1] = 1
    assert backup.nonzero_runs(bytes(data)) == [(0, B), (3 * B, 5 * B), (7 * B, 8 * B)]


def test_nonzero_runs_partial_last_block():
    data = bytes(B) + b"\x01" * 10
    assert backup.nonzero_runs(data) == [(B, B + 10)]


def reference_runs(data):
    """nonzero_runs the plain way: block by block."""
    runs = []
    for pos in range(0, len(data), B):
        if any(data[pos:pos + B]):
            if runs and runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], min(pos + B, len(data)))
            else:
                runs.append((pos, min(pos + B, len(data))))
    return runs


@pytest.mark.parametrize("seed", range(40))
def test_nonzero_runs_matches_block_by_block(seed):
    rnd = random.Random(seed)
    size = rnd.choice([0, 1, B - 1, B, 3 * B + 10, 70 * B, 300 * B + rnd.randrange(B)])
    data = bytearray(size)
    for _ in range(rnd.randrange(8)):  # data and zeros, at any offset and length
        start, length = rnd.randrange(size + 1), rnd.choice([1, B // 2, B, B + 1, 2 * B - 1, 5 * B, 80 * B])
        length = min(length, size - start)
        data[start:start + length] = rnd.choice([rnd.randbytes(length), b"\x01" * length, bytes(length)])
    assert len(data) == size
    data = bytes(data)
    assert backup.nonzero_runs(data) == reference_runs(data)


def test_zero_gaps_complement():
    assert backup.zero_gaps([], 10) == [(0, 10)]
    assert backup.zero_gaps([(0, 10)], 10) == []
    assert backup.zero_gaps([(2, 4), (6, 8)], 10) == [(0, 2), (4, 6), (8, 10)]


def test_chunks_split():
    assert list(backup.chunks([(0, 10), (20, 3)], size=4)) == [(0, 4), (4, 4), (8, 2), (20, 3)]


def test_merge():
    assert backup.merge([(10, 5), (0, 5), (5, 5), (30, 1), (31, 0)]) == [(0, 15), (30, 1)]
    assert backup.merge([(0, 10), (2, 3)]) == [(0, 10)]


def test_outside():
    assert backup._outside(0, 100, [(10, 10), (50, 10)]) == [(0, 10), (20, 30), (60, 40)]
    assert backup._outside(10, 10, [(0, 100)]) == []


class FakeRbd:
    RBD_FEATURE_FAST_DIFF = 16
    RBD_FLAG_FAST_DIFF_INVALID = 2
    RBD_FLAG_OBJECT_MAP_INVALID = 1


def test_fast_diff_usable():
    assert backup.fast_diff_usable(61, 0, FakeRbd)
    assert not backup.fast_diff_usable(61, 2, FakeRbd)
    assert not backup.fast_diff_usable(61, 1, FakeRbd)
    assert not backup.fast_diff_usable(1, 0, FakeRbd)


def test_diff_writer_matches_export_diff_layout():
    out = io.BytesIO()
    diff = backup.DiffWriter(out)
    diff.header("a", "b", 1 << 20)
    diff.data(4096, b"xyz")
    diff.zero(8192, 4096)
    diff.end()
    expected = (b"rbd diff v1\n" + b"f" + struct.pack("<I", 1) + b"a" + b"t" + struct.pack("<I", 1) + b"b"
                + b"s" + struct.pack("<Q", 1 << 20) + b"w" + struct.pack("<QQ", 4096, 3) + b"xyz"
                + b"z" + struct.pack("<QQ", 8192, 4096) + b"e")
    assert out.getvalue() == expected


def test_read_diff_round_trip_and_pieces():
    out = io.BytesIO()
    diff = backup.DiffWriter(out)
    diff.header(None, "b", 100)
    diff.data(0, b"0123456789")
    diff.zero(10, 5)
    diff.end()
    records = list(backup.read_diff(io.BytesIO(out.getvalue()), piece=4))
    assert records == [("to", "b"), ("size", 100), ("w", 0, b"0123"), ("w", 4, b"4567"),
                       ("w", 8, b"89"), ("z", 10, 5)]


@pytest.mark.parametrize("raw,message", [
    (b"not a diff", "not an rbd diff v1"),
    (b"rbd diff v1\ns" + struct.pack("<Q", 1), "ends without its end record"),
    (b"rbd diff v1\nw" + struct.pack("<QQ", 0, 10) + b"abc", "truncated"),
    (b"rbd diff v1\nX", "unknown record"),
])
def test_read_diff_rejects_malformed(raw, message):
    with pytest.raises(backup.BackupError, match=message):
        list(backup.read_diff(io.BytesIO(raw)))


def test_diff_header_and_chain(tmp_path):
    paths = []
    for i, (frm, to) in enumerate([("s1", "s2"), ("s2", "s3")]):
        path = tmp_path / ("d%d" % i)
        with open(path, "wb") as handle:
            diff = backup.DiffWriter(handle)
            diff.header(frm, to, 4096)
            diff.end()
        paths.append(str(path))
    headers = [backup.diff_header(p) for p in paths]
    assert headers[0] == {"from": "s1", "to": "s2", "size": 4096}
    backup.check_chain(headers, paths)
    with pytest.raises(backup.BackupError, match="starts at snapshot s2 but .* ends at s3"):
        backup.check_chain([headers[0], headers[1], headers[1]], paths + paths[1:])


def test_data_segments_of_sparse_file(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as handle:
        handle.truncate(16 << 20)
        handle.seek(8 << 20)
        handle.write(b"x" * 4096)
    with open(path, "rb") as handle:
        segments = backup.data_segments(handle.fileno(), 16 << 20)
    assert segments and all(off <= 8 << 20 < off + n for off, n in segments)
    assert sum(n for _o, n in segments) < 16 << 20


def test_file_format(tmp_path):
    for name, head, kind in (("a", b"QFI\xfb\x00\x00\x00\x03", "qcow2"), ("b", b"rbd diff v1\n", "diff"),
                             ("c", bytes(16), "raw")):
        (tmp_path / name).write_bytes(head)
        assert backup.file_format(str(tmp_path / name)) == kind


def test_backup_refuses_existing_dest(tmp_path):
    dest = tmp_path / "x"
    dest.write_bytes(b"")
    with pytest.raises(backup.BackupError, match="refusing to overwrite"):
        backup.backup(None, None, str(dest))


def test_backup_since_needs_raw(tmp_path):
    with pytest.raises(BlockRbdError, match="rbd diff stream"):
        backup.backup(None, None, str(tmp_path / "x"), "qcow2", since="s")


def test_qemu_img_timeout_grows_with_size():
    assert backup.qemu_img_timeout(0) == backup.QEMU_IMG_BASE
    assert backup.qemu_img_timeout(4 << 30) > backup.qemu_img_timeout(1 << 30)


def test_is_zero_long():
    assert backup.is_zero(bytes(backup.CHUNK + 1))
    assert not backup.is_zero(bytes(backup.CHUNK) + b"\x01")
    assert os.urandom(0) == b"" and backup.is_zero(b"")
