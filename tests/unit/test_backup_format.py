"""block_rbd.backup.format: the rbd diff v1 stream and telling backup files apart."""

import io
import struct

import pytest

from block_rbd.backup import format as backup_format


def test_diff_writer_matches_export_diff_layout():
    out = io.BytesIO()
    diff = backup_format.DiffWriter(out)
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
    diff = backup_format.DiffWriter(out)
    diff.header(None, "b", 100)
    diff.data(0, b"0123456789")
    diff.zero(10, 5)
    diff.end()
    records = list(backup_format.read_diff(io.BytesIO(out.getvalue()), piece=4))
    assert records == [("to", "b"), ("size", 100), ("w", 0, b"0123"), ("w", 4, b"4567"),
                       ("w", 8, b"89"), ("z", 10, 5)]


@pytest.mark.parametrize("raw,message", [
    (b"not a diff", "not an rbd diff v1"),
    (b"rbd diff v1\ns" + struct.pack("<Q", 1), "ends without its end record"),
    (b"rbd diff v1\nw" + struct.pack("<QQ", 0, 10) + b"abc", "truncated"),
    (b"rbd diff v1\nX", "unknown record"),
])
def test_read_diff_rejects_malformed(raw, message):
    with pytest.raises(backup_format.BackupError, match=message):
        list(backup_format.read_diff(io.BytesIO(raw)))


def test_diff_header_and_chain(tmp_path):
    paths = []
    for i, (frm, to) in enumerate([("s1", "s2"), ("s2", "s3")]):
        path = tmp_path / ("d%d" % i)
        with open(path, "wb") as handle:
            diff = backup_format.DiffWriter(handle)
            diff.header(frm, to, 4096)
            diff.end()
        paths.append(str(path))
    headers = [backup_format.diff_header(p) for p in paths]
    assert headers[0] == {"from": "s1", "to": "s2", "size": 4096}
    backup_format.check_chain(headers, paths)
    with pytest.raises(backup_format.BackupError, match="starts at snapshot s2 but .* ends at s3"):
        backup_format.check_chain([headers[0], headers[1], headers[1]], paths + paths[1:])


def test_file_format(tmp_path):
    for name, head, kind in (("a", b"QFI\xfb\x00\x00\x00\x03", "qcow2"), ("b", b"rbd diff v1\n", "diff"),
                             ("c", bytes(16), "raw")):
        (tmp_path / name).write_bytes(head)
        assert backup_format.file_format(str(tmp_path / name)) == kind
