"""The backup files' formats: Ceph's "rbd diff v1" stream, and telling the kinds apart.

An incremental backup is the stream `rbd export-diff` writes, so
`rbd import-diff` reads our files too:

    b"rbd diff v1\\n"
    b"f" le32 len, name      from-snapshot (absent: from the image's creation)
    b"t" le32 len, name      to-snapshot
    b"s" le64 size           image size at the to-snapshot
    b"w" le64 off, le64 len, data      changed data
    b"z" le64 off, le64 len            zeroed (or discarded) range
    b"e"                     end
"""

import struct

from ..errors import BackupError
from .extents import CHUNK

DIFF_MAGIC = b"rbd diff v1\n"
QCOW2_MAGIC = b"QFI\xfb"


class DiffWriter:
    """Writes an rbd diff v1 stream to a binary file object."""

    def __init__(self, handle):
        self.handle = handle
        handle.write(DIFF_MAGIC)

    def _name(self, tag, name):
        raw = name.encode()
        self.handle.write(tag + struct.pack("<I", len(raw)) + raw)

    def header(self, from_snap, to_snap, size):
        if from_snap:
            self._name(b"f", from_snap)
        if to_snap:
            self._name(b"t", to_snap)
        self.handle.write(b"s" + struct.pack("<Q", size))

    def data(self, offset, data):
        self.handle.write(b"w" + struct.pack("<QQ", offset, len(data)))
        self.handle.write(data)

    def zero(self, offset, length):
        self.handle.write(b"z" + struct.pack("<QQ", offset, length))

    def end(self):
        self.handle.write(b"e")


def _exact(handle, count, path):
    data = handle.read(count)
    if len(data) != count:
        raise BackupError("%s: truncated rbd diff stream" % path)
    return data


def read_diff(handle, path="diff", piece=CHUNK):
    """Records of an rbd diff v1 stream: ("from"|"to", name), ("size", n),
    ("w", offset, data) in pieces of at most `piece` bytes, ("z", offset, length)."""
    if handle.read(len(DIFF_MAGIC)) != DIFF_MAGIC:
        raise BackupError("%s is not an rbd diff v1 file" % path)
    while True:
        tag = handle.read(1)
        if tag == b"e":
            return
        if tag in (b"f", b"t"):
            (length,) = struct.unpack("<I", _exact(handle, 4, path))
            yield ("from" if tag == b"f" else "to", _exact(handle, length, path).decode())
        elif tag == b"s":
            yield ("size", struct.unpack("<Q", _exact(handle, 8, path))[0])
        elif tag == b"w":
            offset, length = struct.unpack("<QQ", _exact(handle, 16, path))
            while length:
                step = min(piece, length)
                yield ("w", offset, _exact(handle, step, path))
                offset, length = offset + step, length - step
        elif tag == b"z":
            yield ("z",) + struct.unpack("<QQ", _exact(handle, 16, path))
        elif not tag:
            raise BackupError("%s: rbd diff stream ends without its end record" % path)
        else:
            raise BackupError("%s: unknown record %r in rbd diff stream" % (path, tag))


def diff_header(path):
    """{"from": name|None, "to": name|None, "size": n} of a diff file (reads only the header)."""
    info = {"from": None, "to": None, "size": None}
    try:
        with open(path, "rb") as handle:
            for record in read_diff(handle, path):
                if record[0] in info:
                    info[record[0]] = record[1]
                if record[0] == "size":
                    break
    except OSError as exc:
        raise BackupError("cannot read %s: %s" % (path, exc.strerror)) from None
    if info["size"] is None:
        raise BackupError("%s: rbd diff stream has no size record" % path)
    return info


def check_chain(headers, paths):
    """Each increment must start at the snapshot the previous one ended at."""
    for i in range(1, len(headers)):
        if headers[i]["from"] != headers[i - 1]["to"]:
            raise BackupError("%s starts at snapshot %s but %s ends at %s" % (
                paths[i], headers[i]["from"], paths[i - 1], headers[i - 1]["to"]))


def file_format(path):
    """The kind of backup file at path, by its first bytes: "qcow2", "diff" or "raw"."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(DIFF_MAGIC))
    except OSError as exc:
        raise BackupError("cannot read %s: %s" % (path, exc.strerror)) from None
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    if head == DIFF_MAGIC:
        return "diff"
    return "raw"
