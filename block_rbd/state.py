"""This host's record of its mappings, and the per-image local lock.

Concurrent hotplug runs for *different* images never wait for each other; runs
for the same image are serialised (they share one mapping and its holder
list).  The lock file descriptor is close-on-exec, so no daemon we spawn
(rbd-nbd, rbd-fuse) inherits it and keeps the image locked.

A MapRecord names the mapper and device and who holds the mapping: a backend
path for libxl, "manual" for `block-rbd map`.  A holder is written *before*
mapping, so a `remove` after a SIGKILLed `add` still knows what to undo.

A PendingRelease is a cluster-wide registration this host has let go of
locally but could not yet delete in Ceph (cluster down, run killed): written
before the cluster call, deleted after it, completed by the next run that
reaches the cluster.  Every registration this host makes is also noted, with the
boot it was made in, before it is written to Ceph: after a power loss these
notes of an earlier boot are pending releases too.  Both live in the ledger
(ledger_dir, on disk: they must outlive a reboot), the rest under state_dir
(tmpfs, like the mappings it describes).  Records carry a version; an older one is migrated on
read, a newer one is refused rather than misread (version 3 added the rbd-nbd
cookie and map options; 2 dropped the request kept per holder).
"""

import contextlib
import fcntl
import functools
import json
import logging
import os
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from . import deadline
from .errors import LockTimeout, StateError
from .target import parse_spec

log = logging.getLogger("block-rbd")

RECORD_VERSION = 3


@dataclass
class Holder:
    """One user of a mapping: its mode and, for libxl's holders, the guest."""

    mode: str
    since: int
    vm: Optional[str] = None
    domid: Optional[str] = None
    devid: Optional[str] = None


@dataclass
class MapRecord:
    """This host's mapping of one image (or snapshot) in one mode."""

    image: str
    read_only: bool
    mapper: Optional[str] = None
    device: Optional[str] = None
    holders: Dict[str, Holder] = field(default_factory=dict)
    # rbd-nbd: the device's backend identifier and the map options, so that a new
    # daemon can be attached to the device (upkeep); neither is a secret.
    cookie: Optional[str] = None
    options: List[str] = field(default_factory=list)

    @property
    def spec(self):
        return parse_spec(self.image)

    def hold(self, name, holder):
        self.holders[name] = holder

    def drop(self, name):
        """Remove holder `name`; whether it was there."""
        return self.holders.pop(name, None) is not None

    def mapped_by(self, mapping):
        self.mapper, self.device = mapping.mapper, mapping.device
        self.cookie = mapping.details.get("cookie")
        self.options = list(mapping.details.get("options") or ())

    def to_json(self):
        data = asdict(self)
        data["version"] = RECORD_VERSION
        return data

    @classmethod
    def from_json(cls, data, where):
        version = data.get("version", 1)
        if version > RECORD_VERSION:
            raise StateError("%s was written by a newer block-rbd (record version %s); "
                             "refusing to misread it" % (where, version))
        holders = {}
        for name, held in (data.get("holders") or {}).items():
            # Version 1 kept the whole request (host, backend, ...): only these mattered.
            holders[name] = Holder(mode=held["mode"], since=int(held.get("since") or 0), vm=held.get("vm"),
                                   domid=_opt_str(held.get("domid")), devid=_opt_str(held.get("devid")))
        return cls(image=data["image"], read_only=bool(data["read_only"]), mapper=data.get("mapper"),
                   device=data.get("device"), holders=holders, cookie=data.get("cookie"),
                   options=list(data.get("options") or ()))


@dataclass
class PendingRelease:
    """A registration of `holder` on `image` to delete in Ceph once the cluster answers."""

    image: str
    holder: str
    since: float
    reason: str = ""

    @property
    def spec(self):
        return parse_spec(self.image)

    def to_json(self):
        return dict(asdict(self), version=RECORD_VERSION)

    @classmethod
    def from_json(cls, data, where):
        if data.get("version", RECORD_VERSION) > RECORD_VERSION:
            raise StateError("%s was written by a newer block-rbd; refusing to misread it" % where)
        return cls(image=data["image"], holder=data["holder"], since=float(data["since"]),
                   reason=data.get("reason", ""))


def _opt_str(value):
    return None if value is None or value == "" else str(value)


class LocalState:
    def __init__(self, state_dir, lock_timeout=10.0, ledger_dir=None):
        self.maps_dir = os.path.join(state_dir, "maps")
        self.locks_dir = os.path.join(state_dir, "locks")
        self.timeouts_dir = os.path.join(state_dir, "nbd-timeouts")
        ledger_dir = ledger_dir or state_dir
        self.pending_dir = os.path.join(ledger_dir, "pending")
        self.registered_dir = os.path.join(ledger_dir, "registered")
        # block-rbd before 0.2 kept pending releases under state_dir: still read, and finished
        self.old_pending_dirs = [d for d in [os.path.join(state_dir, "pending")] if d != self.pending_dir]
        self.lock_timeout = lock_timeout

    @contextlib.contextmanager
    def lock(self, spec, wait=True):
        """Exclusive lock on one image (all its snapshots and modes) on this host.

        Within a run's budget the wait may take what is left of it; outside
        one (operator commands) at most lock_timeout.  With wait=False the
        body runs at once, told (as the `with` value) whether it holds the lock.
        """
        os.makedirs(self.locks_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.locks_dir, spec.head().key + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            def attempt():
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    return False

            if not wait:
                yield attempt()
                return
            deadline.retry(attempt, what="the local lock of %s" % spec.head(), default=self.lock_timeout,
                           give_up=lambda waited: LockTimeout(
                               "another block-rbd run on this host has held %s for over %.0f s"
                               % (spec.head(), waited)))
            yield True
        finally:
            os.close(fd)  # closing releases the flock

    @contextlib.contextmanager
    def claim(self, name):
        """A host-wide claim on `name`: yields True when it was free (held until the
        block ends), False at once when another run holds it."""
        os.makedirs(self.locks_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.locks_dir, name + ".claim"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def slot(self, kind, count):
        """One of `count` host-wide slots for `kind`: at most `count` holders at once.

        Waits within the run's budget (outside one at most lock_timeout).
        """
        os.makedirs(self.locks_dir, mode=0o700, exist_ok=True)
        fds = [os.open(os.path.join(self.locks_dir, "%s.%d.slot" % (kind, i)),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600) for i in range(count)]
        try:
            def attempt():
                for fd in fds:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        return True
                    except BlockingIOError:
                        pass
                return False

            deadline.retry(attempt, what="a %s slot" % kind, default=self.lock_timeout, max_interval=0.1,
                           give_up=lambda waited: LockTimeout(
                               "all %d %s slots of this host stayed busy for %.0f s" % (count, kind, waited)))
            yield
        finally:
            for fd in fds:
                os.close(fd)  # closing releases the flock

    # ---- mapping records --------------------------------------------------------

    def _path(self, spec, read_only):
        return os.path.join(self.maps_dir, "%s.%s.json" % (spec.key, "ro" if read_only else "rw"))

    def load(self, spec, read_only):
        path = self._path(spec, read_only)
        data = _read_json(path)
        return None if data is None else MapRecord.from_json(data, path)

    def save(self, record):
        """Write atomically: a reader never sees half a record."""
        _write_json(self.maps_dir, self._path(record.spec, record.read_only), record.to_json())

    def delete(self, spec, read_only):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(spec, read_only))

    def records(self, strict=False):
        """Every mapping record on this host (for showmapped, status and doctor).

        One written by a newer block-rbd is left out with a warning, or, when
        `strict`, refused (StateError): what depends on every holder must not
        go on without one.
        """
        found = []
        for path, data in _read_all(self.maps_dir):
            try:
                found.append(MapRecord.from_json(data, path))
            except StateError as exc:
                if strict:
                    raise
                log.warning("%s", exc)
        return found

    def holders_of_image(self, spec):
        """Every holder name of any mapping of the image `spec` (any snapshot, any mode)."""
        head = str(spec.head())
        names = set()
        for record in self.records(strict=True):
            if str(record.spec.head()) == head:
                names.update(record.holders)
        return names

    # ---- request timeouts nbd devices have for a while (after a heal or a restart) ------
    # On file, not in upkeep's memory: a restart-nbd run sets one that upkeep ends, and
    # one outlives an upkeep restarted meanwhile.

    def _timeout_path(self, device):
        return os.path.join(self.timeouts_dir, os.path.basename(device) + ".json")

    def set_request_timeout(self, device, cookie, image, until, after):
        """`device` (served under `cookie`, of `image`) has a request timeout until `until`
        (time.monotonic(), the same clock in every process) because of `after`."""
        _write_json(self.timeouts_dir, self._timeout_path(device),
                    {"device": device, "cookie": cookie, "image": image, "until": until, "after": after})

    def request_timeout(self, device):
        data = _read_json(self._timeout_path(device))
        return data if _is_timeout(data) else None

    def request_timeouts(self):
        """Every such timeout on this host: [dict]."""
        return [data for _path, data in _read_all(self.timeouts_dir) if _is_timeout(data)]

    def drop_request_timeout(self, device):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._timeout_path(device))

    # ---- the ledger: registrations made, cluster-wide releases still to do -----------

    def _name(self, directory, spec, holder):
        return os.path.join(directory, "%s.%s.json" % (spec.head().key, urllib.parse.quote(holder, safe="")))

    def _pending_path(self, spec, holder):
        return self._name(self.pending_dir, spec, holder)

    def note_registered(self, spec, holder):
        """Before `holder`'s registration on spec goes to Ceph: on disk, with this boot's id."""
        _write_json(self.registered_dir, self._name(self.registered_dir, spec, holder),
                    {"image": str(spec.head()), "holder": holder, "since": time.time(), "boot": boot_id(),
                     "version": RECORD_VERSION}, durable=True)

    def forget_registered(self, spec, holder):
        """The note goes: the registration was never made, or a pending release names it now."""
        _unlink(self._name(self.registered_dir, spec, holder))

    def _earlier_boot(self, spec, holder):
        try:
            data = _read_json(self._name(self.registered_dir, spec, holder))
        except ValueError:
            return False  # pending() says what is wrong with it
        return isinstance(data, dict) and data.get("boot") != boot_id()

    def pend_release(self, spec, holder, reason=""):
        item = PendingRelease(str(spec.head()), holder, time.time(), reason)
        _write_json(self.pending_dir, self._pending_path(spec, holder), item.to_json(), durable=True)

    def pending_moot(self, spec, holder):
        """`holder`'s key holds a new registration: an older release of it is moot."""
        for directory in [self.pending_dir] + self.old_pending_dirs:
            _unlink(self._name(directory, spec, holder))

    def release_done(self, spec, holder):
        self.pending_moot(spec, holder)
        self.forget_registered(spec, holder)

    def is_pending(self, spec, holder):
        return (any(os.path.exists(self._name(d, spec, holder)) for d in [self.pending_dir] + self.old_pending_dirs)
                or self._earlier_boot(spec, holder))

    def pending(self):
        """Every release still to do in Ceph, oldest first: the pending ones, and the
        registrations an earlier boot made and never released (it lost power)."""
        items = {}
        for directory in self.old_pending_dirs + [self.pending_dir]:
            for path, data in _read_all(directory):
                try:
                    item = PendingRelease.from_json(data, path)
                except (StateError, KeyError, TypeError, ValueError) as exc:
                    log.warning("%s: not a pending release, left as it is (%s)", path, exc)
                    continue
                items[(item.image, item.holder)] = item
        now = boot_id()
        for path, data in _read_all(self.registered_dir):
            try:
                if data["boot"] == now or (data["image"], data["holder"]) in items:
                    continue
                items[(data["image"], data["holder"])] = PendingRelease(
                    data["image"], data["holder"], float(data["since"]),
                    "registered in an earlier boot of this host, never released (power loss?)")
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("%s: not a registration note, left as it is (%s)", path, exc)
        return sorted(items.values(), key=lambda p: (p.since, p.image, p.holder))


def _is_timeout(data):
    return (isinstance(data, dict) and all(isinstance(data.get(k), str) for k in ("device", "cookie", "image", "after"))
            and isinstance(data.get("until"), (int, float)))


def _read_json(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def _write_json(directory, path, data, durable=False):
    """Write `path` whole (readers never see half of it); `durable`: on disk before
    returning, the rename too, whatever power loss follows."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = "%s.%d.%d.tmp" % (path, os.getpid(), threading.get_ident())
    with open(tmp, "w") as handle:
        json.dump(data, handle, sort_keys=True)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unlink(path):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_BOOT_ID = "/proc/sys/kernel/random/boot_id"


@functools.lru_cache(maxsize=None)
def boot_id(path=_BOOT_ID):
    """This boot's id (the kernel's): a registration noted under another was made before a reboot."""
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _read_all(directory):
    """(path, data) of every complete .json file in directory."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path) as handle:
                found.append((path, json.load(handle)))
        except (FileNotFoundError, ValueError):
            continue  # removed or being replaced right now
    return found


def local_state(config):
    """This host's block-rbd state as the configuration places it."""
    return LocalState(config["state_dir"], config["timeouts.lock"], config["ledger_dir"])
