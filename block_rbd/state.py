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

Trust: state_dir and ledger_dir (and the directories under them) must be root's and
writable by nobody else, or they are refused: a record names what `remove` unmaps
and which registrations are released.  No file in them is opened through a symbolic
link, and temporary files are created new (O_EXCL).  A file that cannot be read
(truncated, not JSON, a field missing) is a CorruptRecord naming it: listed by
corrupt_records() and corrupt_ledger(), never silently skipped, and set aside as
NAME.corrupt by what acts on it (remove, release-pending).
"""

import contextlib
import errno
import fcntl
import functools
import json
import logging
import math
import os
import stat
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from . import deadline
from .config import shown, untrusted
from .errors import CorruptRecord, LockTimeout, StateError, TargetError
from .target import MAPPERS, MODES, parse_spec

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
        """The record `data` (read from `where`); CorruptRecord naming what is wrong."""
        version = _version(data, where, 1)
        if version > RECORD_VERSION:
            raise StateError("%s was written by a newer block-rbd (record version %s); "
                             "refusing to misread it" % (where, version))
        try:
            holders = {}
            for name, held in (_field(data, "holders", (dict,), {}) or {}).items():
                if not isinstance(held, dict):
                    raise _Bad("holder %s is %s, not an object" % (shown(name), shown(held)))
                _holder_name(name)
                mode = _field(held, "mode", (str,))
                if mode not in MODES:
                    raise _Bad("holder %s has mode %s" % (shown(name), shown(mode)))
                # Version 1 kept the whole request (host, backend, ...): only these mattered.
                holders[name] = Holder(mode=mode, since=int(_time(held, 0)),
                                       vm=_field(held, "vm", (str,), None),
                                       domid=_opt_str(_field(held, "domid", (str, int), None)),
                                       devid=_opt_str(_field(held, "devid", (str, int), None)))
            mapper = _field(data, "mapper", (str,), None)
            if mapper is not None and mapper not in MAPPERS:
                raise _Bad("mapper %s" % shown(mapper))
            options = _field(data, "options", (list,), []) or []
            if not all(isinstance(o, str) for o in options):
                raise _Bad("options %s" % shown(options))
            return cls(image=_image(data), read_only=_field(data, "read_only", (bool,)), mapper=mapper,
                       device=_field(data, "device", (str,), None), holders=holders,
                       cookie=_field(data, "cookie", (str,), None), options=list(options))
        except (_Bad, ValueError) as exc:
            raise CorruptRecord(where, exc) from None


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
        if _version(data, where, RECORD_VERSION) > RECORD_VERSION:
            raise StateError("%s was written by a newer block-rbd; refusing to misread it" % where)
        try:
            return cls(image=_image(data), holder=_holder(data), since=_time(data),
                       reason=_field(data, "reason", (str,), "") or "")
        except _Bad as exc:
            raise CorruptRecord(where, exc) from None


def _registration_note(data, where):
    """(image, holder, since, boot) of a registration note; CorruptRecord if it is none."""
    if not isinstance(data, dict):
        raise CorruptRecord(where, "not a JSON object")
    try:
        return _image(data), _holder(data), _time(data), _field(data, "boot", (str,))
    except _Bad as exc:
        raise CorruptRecord(where, exc) from None


class _Bad(Exception):
    """What is wrong with a field (CorruptRecord says where)."""


_MISSING = object()


def _field(data, name, kinds, default=_MISSING):
    """data[name], of one of `kinds` (None allowed when there is a default)."""
    value = data.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise _Bad("no field %r" % name)
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _Bad("field %r is %s" % (name, shown(value)))
    return value


def _time(data, default=_MISSING):
    """data["since"]: seconds since the epoch, a finite number (0 if absent, with a default)."""
    value = _field(data, "since", (int, float), default)
    since = float(value) if abs(value) < 1e11 else math.inf  # (a huge int would overflow a float)
    if not math.isfinite(since):
        raise _Bad("field 'since' is %s" % shown(value))
    return since


def _image(data):
    image = _field(data, "image", (str,))
    try:
        parse_spec(image)
    except TargetError as exc:
        raise _Bad("image %s: %s" % (shown(image), exc)) from None
    if image != image.strip():  # parse_spec() strips it; a line naming it would break at it
        raise _Bad("image %s has space around it" % shown(image))
    return image


def _holder(data):
    holder = _field(data, "holder", (str,))
    if not holder:
        raise _Bad("empty holder")
    return _holder_name(holder)


def _holder_name(name):
    """A holder (a backend path, "manual") has no space or control character: one that
    does would split the line that names it (doctor, showmapped)."""
    if not name.isprintable() or any(c.isspace() for c in name):
        raise _Bad("holder %s" % shown(name))
    return name


def _version(data, where, default):
    if not isinstance(data, dict):
        raise CorruptRecord(where, "not a JSON object")
    version = data.get("version", default)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CorruptRecord(where, "version %s" % shown(version))
    return version


def _opt_str(value):
    return None if value is None or value == "" else str(value)


class LocalState:
    def __init__(self, state_dir, lock_timeout=10.0, ledger_dir=None):
        self.state_dir = state_dir
        self.ledger_dir = ledger_dir or state_dir
        self.maps_dir = os.path.join(state_dir, "maps")
        self.locks_dir = os.path.join(state_dir, "locks")
        self.timeouts_dir = os.path.join(state_dir, "nbd-timeouts")
        self.pending_dir = os.path.join(self.ledger_dir, "pending")
        self.registered_dir = os.path.join(self.ledger_dir, "registered")
        # block-rbd before 0.2 kept pending releases under state_dir: still read, and finished
        self.old_pending_dirs = [d for d in [os.path.join(state_dir, "pending")] if d != self.pending_dir]
        self.lock_timeout = lock_timeout
        self._trusted = set()

    # ---- trust: every directory of ours is root's alone -------------------------------

    def _top(self, directory):
        if directory in (self.pending_dir, self.registered_dir):
            return "ledger_dir", self.ledger_dir
        return "state_dir", self.state_dir

    def _checked(self, path, what, top):
        """Whether `path` exists; StateError if someone other than root could change it."""
        if path in self._trusted:
            return True
        try:
            st = os.stat(path) if top else os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise StateError("%s %s is not a directory: refusing it" % (what, path))
        problem = untrusted(path, st, what)
        if problem:
            raise StateError(problem)
        self._trusted.add(path)
        return True

    def _dir(self, directory, create=True):
        """`directory` (one of ours, under state_dir or ledger_dir) made if need be and
        checked, its top too; False when it does not exist (and create is False)."""
        what, top = self._top(directory)
        if create and top not in self._trusted:
            with contextlib.suppress(FileExistsError):
                os.makedirs(top, mode=0o700)
        if not self._checked(top, what, True):
            return False
        if create and directory not in self._trusted:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o700)
        return self._checked(directory, what, False)

    def _lock_fd(self, name):
        self._dir(self.locks_dir)
        return _open(os.path.join(self.locks_dir, name), os.O_RDWR | os.O_CREAT)

    @contextlib.contextmanager
    def lock(self, spec, wait=True):
        """Exclusive lock on one image (all its snapshots and modes) on this host.

        Within a run's budget the wait may take what is left of it; outside
        one (operator commands) at most lock_timeout.  With wait=False the
        body runs at once, told (as the `with` value) whether it holds the lock.
        """
        fd = self._lock_fd(spec.head().key + ".lock")
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
        fd = self._lock_fd(name + ".claim")
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
        fds = []
        try:
            for i in range(count):
                fds.append(self._lock_fd("%s.%d.slot" % (kind, i)))

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

    def _write(self, directory, path, data, durable=False):
        self._dir(directory)
        _write_json(directory, path, data, durable)

    def _read(self, directory, path):
        """The JSON in `path` (None if absent); CorruptRecord if it cannot be read."""
        return _read_json(path) if self._dir(directory, create=False) else None

    def _read_all(self, directory):
        """([(path, data)], [CorruptRecord]) of the .json files in `directory`."""
        return _read_all(directory) if self._dir(directory, create=False) else ([], [])

    # ---- mapping records --------------------------------------------------------

    def _path(self, spec, read_only):
        return os.path.join(self.maps_dir, "%s.%s.json" % (spec.key, "ro" if read_only else "rw"))

    def load(self, spec, read_only):
        """The record of spec in that mode, or None; CorruptRecord if it cannot be read."""
        path = self._path(spec, read_only)
        data = self._read(self.maps_dir, path)
        return None if data is None else MapRecord.from_json(data, path)

    def save(self, record):
        """Write atomically: a reader never sees half a record."""
        self._write(self.maps_dir, self._path(record.spec, record.read_only), record.to_json())

    def delete(self, spec, read_only):
        _unlink(self._path(spec, read_only))

    def set_aside(self, spec, read_only):
        """Move the unreadable record of spec in that mode aside (NAME.corrupt); its new path."""
        return _set_aside(self._path(spec, read_only), lambda data, path: MapRecord.from_json(data, path))

    def _records(self):
        """([MapRecord], [CorruptRecord], [StateError of a newer block-rbd])."""
        found, corrupt, newer = [], [], []
        entries, unreadable = self._read_all(self.maps_dir)
        for path, data in entries:
            try:
                found.append(MapRecord.from_json(data, path))
            except CorruptRecord as exc:
                corrupt.append(exc)
            except StateError as exc:
                newer.append(exc)
        return found, unreadable + corrupt, newer

    def records(self, strict=False):
        """Every mapping record on this host (for showmapped, status and doctor).

        One written by a newer block-rbd is left out with a warning, one that
        cannot be read is left out (corrupt_records() names it), or, when
        `strict`, either is refused (StateError): what depends on every holder
        must not go on without one.
        """
        found, corrupt, newer = self._records()
        if strict and (newer or corrupt):
            raise (newer + corrupt)[0]
        for exc in newer:
            log.warning("%s", exc)
        return found

    def corrupt_records(self):
        """[CorruptRecord] of every mapping record that cannot be read."""
        return self._records()[1]

    def holders_of_image(self, spec):
        """Every holder name of any mapping of the image `spec` (any snapshot, any mode)."""
        head = spec.head()
        found, corrupt, newer = self._records()
        if newer:
            raise newer[0]
        for bad in corrupt:  # one of another image's must not hold up this one
            named = record_of_path(bad.path)
            if named is not None and named[0].head() == head:
                raise bad
        names = set()
        for record in found:
            if record.spec.head() == head:
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
        self._write(self.timeouts_dir, self._timeout_path(device),
                    {"device": device, "cookie": cookie, "image": image, "until": until, "after": after})

    def request_timeout(self, device):
        try:
            data = self._read(self.timeouts_dir, self._timeout_path(device))
        except CorruptRecord:
            return None  # not one (half, or a later layout): the next one set replaces it
        return data if _is_timeout(data) else None

    def request_timeouts(self):
        """Every such timeout on this host: [dict]."""
        return [data for _path, data in self._read_all(self.timeouts_dir)[0] if _is_timeout(data)]

    def drop_request_timeout(self, device):
        _unlink(self._timeout_path(device))

    # ---- the ledger: registrations made, cluster-wide releases still to do -----------

    def _name(self, directory, spec, holder):
        return os.path.join(directory, "%s.%s.json" % (spec.head().key, urllib.parse.quote(holder, safe="")))

    def _pending_path(self, spec, holder):
        return self._name(self.pending_dir, spec, holder)

    def note_registered(self, spec, holder):
        """Before `holder`'s registration on spec goes to Ceph: on disk, with this boot's id."""
        self._write(self.registered_dir, self._name(self.registered_dir, spec, holder),
                    {"image": str(spec.head()), "holder": holder, "since": time.time(), "boot": boot_id(),
                     "version": RECORD_VERSION}, durable=True)

    def forget_registered(self, spec, holder):
        """The note goes: the registration was never made, or a pending release names it now."""
        _unlink(self._name(self.registered_dir, spec, holder))

    def _earlier_boot(self, spec, holder):
        try:
            data = self._read(self.registered_dir, self._name(self.registered_dir, spec, holder))
        except CorruptRecord:
            return False  # corrupt_ledger() says what is wrong with it
        return isinstance(data, dict) and data.get("boot") != boot_id()

    def pend_release(self, spec, holder, reason=""):
        item = PendingRelease(str(spec.head()), holder, time.time(), reason)
        self._write(self.pending_dir, self._pending_path(spec, holder), item.to_json(), durable=True)

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

    def _ledger(self):
        """({(image, holder): PendingRelease}, [CorruptRecord]) of the whole ledger."""
        items, corrupt = {}, []
        for directory in self.old_pending_dirs + [self.pending_dir]:
            entries, unreadable = self._read_all(directory)
            corrupt += unreadable
            for path, data in entries:
                try:
                    item = PendingRelease.from_json(data, path)
                except CorruptRecord as exc:
                    corrupt.append(exc)
                    continue
                except StateError as exc:  # a newer block-rbd's: not acted upon, not misread
                    log.warning("%s", exc)
                    continue
                items[(item.image, item.holder)] = item
        now = boot_id()
        entries, unreadable = self._read_all(self.registered_dir)
        corrupt += unreadable
        for path, data in entries:
            try:
                image, holder, since, boot = _registration_note(data, path)
            except CorruptRecord as exc:
                corrupt.append(exc)
                continue
            if boot == now or (image, holder) in items:
                continue
            items[(image, holder)] = PendingRelease(
                image, holder, since, "registered in an earlier boot of this host, never released (power loss?)")
        return items, corrupt

    def pending(self):
        """Every release still to do in Ceph, oldest first: the pending ones, and the
        registrations an earlier boot made and never released (it lost power).  A file
        that cannot be read is left out: corrupt_ledger() names it."""
        items = self._ledger()[0]
        return sorted(items.values(), key=lambda p: (p.since, p.image, p.holder))

    def corrupt_ledger(self):
        """[CorruptRecord] of every pending release or registration note that cannot be read."""
        return self._ledger()[1]

    def set_aside_ledger(self, bad):
        """Move the unreadable ledger file of CorruptRecord `bad` aside (NAME.corrupt): it is
        never retried, and kept for the operator.  Its new path, or None if it changed meanwhile."""
        def check(data, path):
            if os.path.dirname(bad.path) == self.registered_dir:
                _registration_note(data, path)
            else:
                PendingRelease.from_json(data, path)
        return _set_aside(bad.path, check)

    def set_aside_files(self):
        """Every file set aside as unreadable (NAME.corrupt) in our directories, for doctor."""
        found = []
        for directory in [self.maps_dir, self.pending_dir, self.registered_dir] + self.old_pending_dirs:
            if not self._dir(directory, create=False):
                continue
            found += [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if n.endswith(CORRUPT)]
        return found


CORRUPT = ".corrupt"


def record_of_path(path):
    """(ImageSpec, read_only) a mapping record's file name stands for, or None."""
    name = os.path.basename(path)
    for suffix, read_only in ((".rw.json", False), (".ro.json", True)):
        if name.endswith(suffix):
            try:
                return parse_spec(urllib.parse.unquote(name[:-len(suffix)])), read_only
            except TargetError:
                return None
    return None


def _is_timeout(data):
    return (isinstance(data, dict) and all(isinstance(data.get(k), str) for k in ("device", "cookie", "image", "after"))
            and isinstance(data.get("until"), (int, float)))


def _open(path, flags, mode=0o600):
    """os.open, never through a symbolic link (an error naming the file if one is there)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError("%s is a symbolic link: refusing to follow it" % path) from None
        if isinstance(exc, (FileNotFoundError, FileExistsError)):
            raise
        raise StateError("%s: %s" % (path, exc.strerror)) from None


def _read_json(path):
    """The JSON in `path`, None if there is no such file; CorruptRecord if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptRecord(path, "a symbolic link, not followed" if exc.errno == errno.ELOOP
                            else exc.strerror) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen(), which refuses a directory itself
        os.close(fd)
        raise CorruptRecord(path, "not a regular file")
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CorruptRecord(path, "not UTF-8 text") from None
    except ValueError as exc:
        raise CorruptRecord(path, "not JSON: %s" % exc) from None
    except RecursionError:  # "[[[[..." of a few KiB: json decodes recursively
        raise CorruptRecord(path, "not JSON: nested too deeply") from None
    if data is None:  # what a missing file reads as: its readers would skip it, unnamed
        raise CorruptRecord(path, "null, not a JSON object")
    return data


def _write_json(directory, path, data, durable=False):
    """Write `path` whole (readers never see half of it); `durable`: on disk before
    returning, the rename too, whatever power loss follows."""
    tmp = "%s.%d.%d.tmp" % (path, os.getpid(), threading.get_ident())
    try:
        fd = _open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        # Left by a run killed with this pid and thread id (before a reboot): ours to replace.
        _unlink(tmp)
        fd = _open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, sort_keys=True)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    if durable:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _set_aside(path, check):
    """Rename the unreadable `path` to NAME.corrupt; its new path.  If what was renamed reads
    well after all (`check(data, path)` passes: rewritten meanwhile), it goes back, and None."""
    aside = path + CORRUPT
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    try:
        check(_read_json(aside), path)
    except (StateError, TypeError):
        return aside
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)  # unless a newer one is there already
    _unlink(aside)
    return None


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
    """([(path, data)], [CorruptRecord]) of the .json files in directory.  Writes are
    atomic (a temporary file, renamed): a .json that cannot be read is corrupt."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return [], []
    found, corrupt = [], []
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            data = _read_json(path)
        except CorruptRecord as exc:
            corrupt.append(exc)
            continue
        if data is not None:  # else removed right now
            found.append((path, data))
    return found, corrupt


def local_state(config):
    """This host's block-rbd state as the configuration places it."""
    return LocalState(config["state_dir"], config["timeouts.lock"], config["ledger_dir"])
