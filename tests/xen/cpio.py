"""Minimal writer for the "newc" cpio format the Linux initramfs unpacker reads.

Written here rather than calling cpio(1) so the archive is reproducible (uid/gid 0,
mtime 0, sorted order) and the build needs no tool beyond Python.
"""

import os
import stat

_TRAILER = "TRAILER!!!"


class CpioWriter:
    def __init__(self, fileobj):
        self._f = fileobj
        self._ino = 1
        self._seen_dirs = set()

    def _header(self, name, mode, size, nlink=1, rdevmajor=0, rdevminor=0):
        name_b = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, nlink, 0, size, 0, 0, rdevmajor, rdevminor,
            len(name_b), 0,
        ]
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._f.write(hdr)
        self._f.write(name_b)
        self._pad(len(hdr) + len(name_b))

    def _pad(self, n):
        rem = (-n) % 4
        if rem:
            self._f.write(b"\0" * rem)

    @staticmethod
    def _norm(path):
        path = path.lstrip("/")
        if not path:
            raise ValueError("empty path")
        return path

    def ensure_parents(self, path):
        parts = self._norm(path).split("/")[:-1]
        cur = ""
        for p in parts:
            cur = p if not cur else cur + "/" + p
            self.directory(cur)

    def directory(self, path, mode=0o755):
        path = self._norm(path)
        if path in self._seen_dirs:
            return
        self._seen_dirs.add(path)
        self._header(path, stat.S_IFDIR | mode, 0, nlink=2)

    def file(self, path, data, mode=0o644):
        path = self._norm(path)
        self._header(path, stat.S_IFREG | mode, len(data))
        self._f.write(data)
        self._pad(len(data))

    def symlink(self, path, target):
        path = self._norm(path)
        data = target.encode()
        self._header(path, stat.S_IFLNK | 0o777, len(data))
        self._f.write(data)
        self._pad(len(data))

    def chardev(self, path, major, minor, mode=0o600):
        path = self._norm(path)
        self._header(path, stat.S_IFCHR | mode, 0, rdevmajor=major, rdevminor=minor)

    def close(self):
        self._header(_TRAILER, 0, 0, nlink=1)
        self._f.flush()


def write_tree(writer, root, prefix=""):
    """Add everything under directory `root` (sorted, parents first) at `prefix`."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        base = prefix.strip("/")
        if rel != ".":
            base = f"{base}/{rel}" if base else rel
        if base:
            writer.ensure_parents(base + "/x")
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            full = os.path.join(dirpath, name)
            dest = f"{base}/{name}" if base else name
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                writer.symlink(dest, os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    writer.file(dest, fh.read(), mode=stat.S_IMODE(st.st_mode))
