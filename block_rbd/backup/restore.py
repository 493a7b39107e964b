"""Restore: a new image from a full backup (RAW or QCOW2) plus rbd diff increments."""

import logging
import os
import tempfile

from .. import images
from ..cluster import bindings, translate
from ..errors import BackupError
from .extents import chunks, nonzero_runs
from .export import Progress, data_segments, parallel, to_raw
from .format import check_chain, diff_header, file_format, read_diff

log = logging.getLogger("block-rbd")


def _write_image(image, pieces, progress):
    """Write (offset, data) pieces with export.WORKERS writes in flight."""
    def write(offset, data):
        image.write(data, offset)
        return len(data)
    for _item, count in parallel(write, pieces):
        progress.step(count)


def _raw_pieces(path):
    """(offset, data) of the non-zero blocks of a sparse RAW file."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        for offset, length in chunks(data_segments(handle.fileno(), size)):
            handle.seek(offset)
            data = handle.read(length)
            for start, end in nonzero_runs(data):
                yield offset + start, data[start:end]


def restore(cluster, full, spec, increments=(), progress=None):
    """Create image spec from a full backup (RAW or QCOW2), then apply rbd diff increments.

    Each increment's end snapshot is created on the new image, as
    `rbd import-diff` does, so the image can take further increments.  A
    failed restore removes the image it created.
    """
    rados, rbd = bindings()
    progress = progress or Progress()
    spec = spec.head()
    kind = file_format(full)
    if kind == "diff":
        raise BackupError("%s is an incremental backup; restore starts from a full one" % full)
    headers = [diff_header(p) for p in increments]
    for path in increments:
        if file_format(path) != "diff":
            raise BackupError("%s is not an rbd diff v1 file" % path)
    check_chain(headers, list(increments))
    if images.exists(cluster, spec):
        raise BackupError("%s exists: restore creates a new image" % spec)
    tmpdir = None
    raw = full
    try:
        if kind == "qcow2":
            tmpdir = tempfile.mkdtemp(prefix="block-rbd-restore-")
            raw = os.path.join(tmpdir, "full.raw")
            to_raw(full, raw)
        size = os.path.getsize(raw)
        with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
            try:
                rbd.RBD().create(ioctx, spec.image, size, old_format=False)
            except rbd.ImageExists:
                raise BackupError("%s exists: restore creates a new image" % spec) from None
            except (rados.Error, rbd.Error) as exc:
                raise translate(exc, "creating %s" % spec) from None
        try:
            with cluster.image(spec, read_only=False) as image:
                # Approximate total: the RAW's data plus the increments' sizes.
                with open(raw, "rb") as handle:
                    stored = sum(n for _o, n in data_segments(handle.fileno(), size))
                progress.start(stored + sum(os.path.getsize(p) for p in increments))
                _write_image(image, _raw_pieces(raw), progress)
                if increments and headers[0]["from"]:
                    image.create_snap(headers[0]["from"])
                for path in increments:
                    apply_diff(image, path, progress)
        except BaseException as exc:
            _remove_quietly(cluster, spec)
            if isinstance(exc, (rados.Error, rbd.Error)):
                raise translate(exc, "restoring %s" % spec) from None
            raise
    finally:
        if tmpdir:
            for name in os.listdir(tmpdir):
                os.unlink(os.path.join(tmpdir, name))
            os.rmdir(tmpdir)


def apply_diff(image, path, progress):
    """Apply one rbd diff v1 file to an open image, then create its end snapshot."""
    to_snap = None

    def pieces(handle):
        nonlocal to_snap
        for record in read_diff(handle, path):
            if record[0] == "from":
                if not image.snap_exists(record[1]):
                    raise BackupError("%s starts at snapshot %s, which the image does not have"
                                      % (path, record[1]))
            elif record[0] == "to":
                to_snap = record[1]
            elif record[0] == "size":
                if image.size() != record[1]:
                    image.resize(record[1])
            elif record[0] == "z":
                _kind, offset, length = record
                # write_zeroes, not discard: a partial discard may leave old data behind.
                image.write_zeroes(offset, length)
            else:
                yield record[1], record[2]

    with open(path, "rb") as handle:
        _write_image(image, pieces(handle), progress)
    if to_snap:
        image.create_snap(to_snap)


def _remove_quietly(cluster, spec):
    _rados, rbd = bindings()
    try:
        with cluster.image(spec, read_only=False) as image:
            for snap in list(image.list_snaps()):
                image.remove_snap(snap["name"])
        with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
            rbd.RBD().remove(ioctx, spec.image)
    except Exception as exc:  # report, never mask the restore's own error
        log.error("could not remove the partly restored %s: %s", spec, exc)

