"""This host's record of its mappings, and the per-image local lock.

Concurrent hotplug runs for *different* images never wait for each other; runs
for the same image are serialised (they share one mapping and its holder
list).  The lock file descriptor is close-on-exec, so no daemon we spawn
(rbd-nbd, rbd-fuse) inherits it and keeps the image locked.

Each record names the mapper and device and who holds the mapping: a backend
path for libxl, "manual" for `block-rbd map`.  A holder is written *before*
mapping, so a `remove` after a SIGKILLed `add` still knows what to undo.
"""

import contextlib
import errno
import fcntl
import json
import os
import time

from .errors import LockTimeout


class LocalState:
    def __init__(self, state_dir, lock_timeout=10.0):
        self.maps_dir = os.path.join(state_dir, "maps")
        self.locks_dir = os.path.join(state_dir, "locks")
        self.lock_timeout = lock_timeout

    @contextlib.contextmanager
    def lock(self, spec):
        """Exclusive lock on one image (all its snapshots and modes) on this host."""
        os.makedirs(self.locks_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.locks_dir, spec.head().key + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if time.monotonic() >= deadline:
                    raise LockTimeout("another block-rbd run on this host has held %s for over %.0f s"
                                      % (spec.head(), self.lock_timeout))
                time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _path(self, spec, read_only):
        return os.path.join(self.maps_dir, "%s.%s.json" % (spec.key, "ro" if read_only else "rw"))

    def load(self, spec, read_only):
        try:
            with open(self._path(spec, read_only)) as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def save(self, spec, read_only, record):
        """Write atomically: a reader never sees half a record."""
        os.makedirs(self.maps_dir, mode=0o700, exist_ok=True)
        path = self._path(spec, read_only)
        tmp = "%s.%d.tmp" % (path, os.getpid())
        with open(tmp, "w") as handle:
            json.dump(record, handle, sort_keys=True)
        os.replace(tmp, path)

    def delete(self, spec, read_only):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(spec, read_only))

    def records(self):
        """Every record on this host (for showmapped and status)."""
        try:
            names = sorted(os.listdir(self.maps_dir))
        except FileNotFoundError:
            return []
        result = []
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.maps_dir, name)) as handle:
                    result.append(json.load(handle))
            except (FileNotFoundError, ValueError):
                continue  # removed or being replaced right now
        return result


def new_record(spec, read_only):
    return {"image": str(spec), "read_only": read_only, "mapper": None, "device": None, "holders": {}}
