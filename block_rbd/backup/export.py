"""Backups of a snapshot to files, through librbd only.

Full backup: a sparse RAW file, or a QCOW2 made from it by `qemu-img convert`
(the reference writer: `qemu-img check` passes by construction, and the
conversion of the already sparse RAW is a local pass over the allocated data
only).  Only allocated extents are read (diff iteration, from the object map
when the image has a valid fast-diff) and all-zero blocks are not written.

Incremental backup (`--since SNAP`): Ceph's own rbd diff v1 stream (format.py).

restore.py uses this module's threaded librbd I/O, sparse-file extents,
progress and qemu-img calls too.
"""

import concurrent.futures
import ctypes
import errno
import json
import logging
import os
import tempfile
import uuid

from .. import images, process
from ..cluster import bindings, translate
from ..errors import BackupError, BlockRbdError, ImageNotFound
from ..target import ImageSpec
from .extents import chunks, is_zero, merge, nonzero_runs, outside, zero_gaps
from .format import DiffWriter, read_diff

log = logging.getLogger("block-rbd")

# Reads in flight: librbd's own export keeps 10 ops in flight; threads with
# blocking reads do the same here (librbd drops the GIL while it waits).
WORKERS = 8
# qemu-img gets a generous, size-proportional bound (measured ~80 ms per 64 MiB).
QEMU_IMG_BASE = 60
QEMU_IMG_PER_GIB = 60

# renameat2(2): linux/fcntl.h, linux/fs.h.
AT_FDCWD = -100
RENAME_NOREPLACE = 1

# Start writeback after this many bytes written, so the final fsync finds
# little dirty data (measured: 1 GiB written + fsync 0.35 s instead of 0.6-2.2 s).
WRITEBACK = 16 << 20


def fast_diff_usable(features, flags, rbd):
    """Whether the object map may answer diff iteration (fast-diff on, map valid)."""
    return bool(features & rbd.RBD_FEATURE_FAST_DIFF) and not flags & (
        rbd.RBD_FLAG_FAST_DIFF_INVALID | rbd.RBD_FLAG_OBJECT_MAP_INVALID)


def temp_snap_name():
    return "block-rbd-backup-%s" % uuid.uuid4().hex[:12]


def data_segments(fd, size):
    """(offset, length) of the data (non-hole) regions of a sparse file."""
    segments, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break  # ENXIO: only a hole is left
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        segments.append((start, end - start))
        pos = end
    return segments


def parallel(fn, items, workers=WORKERS):
    """fn(*item) for each item with `workers` in flight; yields (item, result) in order."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        window = []
        for item in items:
            window.append((item, pool.submit(fn, *item)))
            if len(window) >= workers * 2:
                first, future = window.pop(0)
                yield first, future.result()
        for item, future in window:
            yield item, future.result()


def allocated(image, from_snap=None):
    """Extents to back up: [(offset, length, exists)], whole objects when fast-diff answers."""
    _rados, rbd = bindings()
    extents = []
    whole = fast_diff_usable(image.features(), image.flags(), rbd)
    image.diff_iterate(0, image.size(), from_snap, lambda o, n, e: extents.append((o, n, e)),
                       include_parent=True, whole_object=whole)
    if not whole or not from_snap:
        return extents
    # The object map names whole objects; an increment asks each changed
    # object for its changed ranges (one list-snaps op), or unchanged data
    # would go into the diff.  A full backup reads whole objects: librbd's
    # sparse reads do not send the unwritten parts (measured: as fast as
    # refining, without one round trip per object).
    refined = []
    for offset, length, exists in extents:
        if not exists:
            refined.append((offset, length, exists))
            continue
        image.diff_iterate(offset, length, from_snap, lambda o, n, e: refined.append((o, n, e)),
                           include_parent=True, whole_object=False)
    return refined


def read_extents(image, extents):
    """Yield (offset, data) for extents, read in CHUNK pieces, in order."""
    for (offset, _length), data in parallel(image.read, chunks(extents)):
        yield offset, data


class Progress:
    """Counts bytes against a total; `callback(count, total)` after each step is the display (or None)."""

    def __init__(self, callback=None):
        self.callback = callback
        self.total = 0
        self.done = 0

    def start(self, total):
        self.total = total
        self.step(0)

    def step(self, count):
        self.done += count
        if self.callback:
            self.callback(count, self.total)


def _open_snap(cluster, spec):
    if not spec.snap:
        raise BlockRbdError("%s: a backup reads a snapshot (POOL/IMAGE@SNAP)" % spec)
    return cluster.image(spec)


def _wrap(exc, what):
    rados, rbd = bindings()
    if isinstance(exc, (rados.Error, rbd.Error)):
        return translate(exc, what)
    return exc


def write_raw(cluster, spec, path, progress=None, durable=True):
    """Write the snapshot as a sparse RAW file at path; returns {size, extents, written}.

    durable=False: no fsync, and the data stays in the page cache (for qemu-img to read).
    """
    progress = progress or Progress()
    with _open_snap(cluster, spec) as image:
        try:
            size = image.size()
            extents = merge((o, n) for o, n, e in allocated(image) if e)
            progress.start(sum(n for _o, n in extents))
            written = 0
            synced = unsynced = 0  # start of the range not yet sent to writeback; its bytes
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)
                for offset, data in read_extents(image, extents):
                    for start, end in nonzero_runs(data):
                        os.pwrite(fd, memoryview(data)[start:end], offset + start)
                        written += end - start
                        unsynced += end - start
                    if durable and unsynced >= WRITEBACK:
                        # DONTNEED starts writeback of the dirty pages now (and keeps
                        # the backup out of the page cache).
                        os.posix_fadvise(fd, synced, offset + len(data) - synced, os.POSIX_FADV_DONTNEED)
                        synced, unsynced = offset + len(data), 0
                    progress.step(len(data))
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except Exception as exc:
            raise _wrap(exc, "backing up %s" % spec) from None
    return {"size": size, "extents": extents, "written": written}


def verify_raw(cluster, spec, path, extents=None):
    """Compare the RAW file with the snapshot: allocated extents byte for byte, zeros elsewhere."""
    with _open_snap(cluster, spec) as image:
        try:
            size = image.size()
            if extents is None:
                extents = merge((o, n) for o, n, e in allocated(image) if e)
            if os.path.getsize(path) != size:
                raise BackupError("%s: size %d, the snapshot has %d bytes" % (path, os.path.getsize(path), size))
            with open(path, "rb") as handle:
                for offset, data in read_extents(image, extents):
                    handle.seek(offset)
                    if handle.read(len(data)) != data:
                        raise BackupError("%s differs from %s near offset %d" % (path, spec, offset))
                # What the file holds outside the extents must be zeros.
                covered = merge(extents)
                for offset, length in data_segments(handle.fileno(), size):
                    for piece_off, piece_len in outside(offset, length, covered):
                        for off, step in chunks([(piece_off, piece_len)]):
                            handle.seek(off)
                            if not is_zero(handle.read(step)):
                                raise BackupError("%s holds data at offset %d where %s has none"
                                                  % (path, off, spec))
        except BackupError:
            raise
        except Exception as exc:
            raise _wrap(exc, "verifying %s" % path) from None


def qemu_img_timeout(size):
    return QEMU_IMG_BASE + QEMU_IMG_PER_GIB * (size / (1 << 30))


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def to_qcow2(raw, dest, size, verify=False):
    """qemu-img convert of the sparse RAW (zero clusters stay unallocated)."""
    timeout = qemu_img_timeout(size)
    process.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, dest], timeout=timeout)
    if verify:
        process.run(["qemu-img", "check", "-q", "-f", "qcow2", dest], timeout=timeout)
        process.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", raw, dest], timeout=timeout)


def to_raw(qcow2, raw):
    """qemu-img convert of a QCOW2 backup to a sparse RAW file."""
    info = process.run(["qemu-img", "info", "--output=json", "-f", "qcow2", qcow2], timeout=QEMU_IMG_BASE)
    size = json.loads(info.stdout)["virtual-size"]
    process.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", qcow2, raw],
                timeout=qemu_img_timeout(size))


def write_diff(cluster, spec, since, path, progress=None):
    """Write the changes from snapshot `since` to spec.snap as an rbd diff v1 file."""
    progress = progress or Progress()
    with _open_snap(cluster, spec) as image:
        try:
            if not image.snap_exists(since):
                raise ImageNotFound("snapshot %s@%s does not exist" % (spec.head(), since))
            size = image.size()
            extents = allocated(image, since)
            progress.start(sum(n for _o, n, _e in extents))
            written = 0
            with open(path, "wb") as handle:
                diff = DiffWriter(handle)
                diff.header(since, spec.snap, size)
                changed = [(o, n) for o, n, e in extents if e]
                # Zeroed ranges and data go out in offset order, as export-diff writes them.
                zeroed = iter(sorted((o, n) for o, n, e in extents if not e))
                pending = next(zeroed, None)
                for offset, data in read_extents(image, changed):
                    while pending and pending[0] < offset:
                        diff.zero(*pending)
                        progress.step(pending[1])
                        pending = next(zeroed, None)
                    runs = nonzero_runs(data)
                    records = [(s, e, True) for s, e in runs] + [(s, e, False) for s, e in zero_gaps(runs, len(data))]
                    for start, end, has_data in sorted(records):
                        if has_data:
                            diff.data(offset + start, memoryview(data)[start:end])
                            written += end - start
                        else:
                            diff.zero(offset + start, end - start)
                    progress.step(len(data))
                while pending:
                    diff.zero(*pending)
                    progress.step(pending[1])
                    pending = next(zeroed, None)
                diff.end()
                handle.flush()
                os.fsync(handle.fileno())
        except BlockRbdError:
            raise
        except Exception as exc:
            raise _wrap(exc, "backing up %s since %s" % (spec, since)) from None
    return {"size": size, "extents": extents, "written": written}


def verify_diff(cluster, spec, path):
    """Re-read the diff file and compare every record with the snapshot."""
    with _open_snap(cluster, spec) as image:
        try:
            with open(path, "rb") as handle:
                for record in read_diff(handle, path):
                    if record[0] == "w":
                        _kind, offset, data = record
                        if image.read(offset, len(data)) != data:
                            raise BackupError("%s differs from %s near offset %d" % (path, spec, offset))
                    elif record[0] == "z":
                        for off, step in chunks([record[1:]]):
                            if not is_zero(image.read(off, step)):
                                raise BackupError("%s: range at %d is not zero in %s" % (path, off, spec))
        except BackupError:
            raise
        except Exception as exc:
            raise _wrap(exc, "verifying %s" % path) from None


def _temp_beside(dest, suffix):
    """A new empty file beside dest, 0600 from its creation (mkstemp: O_EXCL)."""
    directory = os.path.dirname(os.path.abspath(dest))
    try:
        fd, path = tempfile.mkstemp(prefix=".%s." % os.path.basename(dest), suffix=suffix, dir=directory)
    except OSError as exc:
        raise BackupError("cannot write a backup in %s: %s" % (directory, exc.strerror or exc)) from None
    os.close(fd)
    return path


def _renameat2_noreplace(src, dest):
    """rename(2) that fails with EEXIST rather than replace dest (Linux 3.15+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):  # glibc before 2.28
        raise OSError(errno.ENOSYS, "no renameat2 in this C library", dest)
    if libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dest), RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dest)


def publish(temp, dest):
    """Give the finished temp file the name dest, never replacing what is there.

    A link fails if dest exists, even one created after the check at the start
    (a rename would replace it); on file systems without hard links, renameat2
    with RENAME_NOREPLACE.  The temp file is gone after, either way.
    """
    try:
        try:
            os.link(temp, dest, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            _renameat2_noreplace(temp, dest)
    except FileExistsError:
        raise BackupError("%s was created while the backup was written: refusing to overwrite it" % dest) from None
    except OSError as exc:
        raise BackupError("cannot name the backup %s: %s" % (dest, exc.strerror or exc)) from None
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)


def backup(cluster, spec, dest, fmt="raw", since=None, verify=False, progress=None):
    """Back up spec (a snapshot, or the live image through a temporary snapshot) to dest.

    Written under a temporary name beside dest, 0600 from the start (a backup
    holds a guest's disk), and published at the end without overwriting
    anything (publish), so dest is either complete or absent.
    """
    if os.path.lexists(dest):  # a dangling link too: early, before reading a whole snapshot
        raise BackupError("%s exists: refusing to overwrite a backup" % dest)
    if since and fmt != "raw":
        raise BackupError("an incremental backup (--since) is an rbd diff stream, not %s" % fmt)
    temp = None
    if not spec.snap:
        temp = ImageSpec(spec.pool, spec.image, spec.namespace, temp_snap_name())
        images.snapshot_create(cluster, temp)
        spec = temp
    directory = os.path.dirname(os.path.abspath(dest))
    partial = qcow = None
    try:
        partial = _temp_beside(dest, ".partial")
        if since:
            stats = write_diff(cluster, spec, since, partial, progress)
            if verify:
                verify_diff(cluster, spec, partial)
            publish(partial, dest)
        elif fmt == "raw":
            stats = write_raw(cluster, spec, partial, progress)
            if verify:
                verify_raw(cluster, spec, partial, stats["extents"])
            publish(partial, dest)
        else:
            stats = write_raw(cluster, spec, partial, progress, durable=False)
            if verify:
                verify_raw(cluster, spec, partial, stats["extents"])
            # qemu-img writes into an existing file as it is: created 0600 here, never
            # under the caller's umask, and never a name someone else could have made.
            qcow = _temp_beside(dest, ".partial.qcow2")
            made = os.lstat(qcow)
            to_qcow2(partial, qcow, stats["size"], verify)
            now = os.lstat(qcow)
            if (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino) or now.st_mode & 0o077:
                raise BackupError("qemu-img replaced %s instead of writing into it: backup abandoned" % qcow)
            _fsync_file(qcow)  # qemu-img leaves its output in the page cache
            publish(qcow, dest)
        _fsync_file(directory)  # the new name must survive a crash too
    finally:
        for path in (partial, qcow):
            if path and os.path.lexists(path):
                os.unlink(path)
        if temp is not None:
            try:
                images.snapshot_remove(cluster, temp)
            except BlockRbdError as exc:
                log.error("could not remove the temporary snapshot %s: %s", temp, exc)
    stats["snapshot"] = None if temp else spec.snap
    return stats
