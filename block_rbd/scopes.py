"""Guests' daemons that block-rbd 0.1.0 left inside its own units, moved into scopes.

0.1.0 started rbd-nbd and rbd-fuse from block-rbd.service and block-rbd-upkeep.service,
whose KillMode=process spared them when the unit stopped.  Since 0.2.0 each daemon
runs in a scope of its own (process.Scope) and the units kill their whole cgroup, so
the upgrade's restart of those units would kill every daemon still inside one: each
running guest's disk would die.  The package's postinst therefore moves them first,
through systemd's StartTransientUnit with the daemon's PID (busctl: no D-Bus binding
needed), into the scope 0.2.0 would have started it in.
"""

import logging
import os
import re

from . import process
from .errors import BlockRbdError
from .mappers.nbd import spec_of_cmdline

log = logging.getLogger("block-rbd")

DAEMONS = {"rbd-nbd": "nbd", "rbd-fuse": "fuse"}
# the unified hierarchy's line of /proc/PID/cgroup for a process of a block-rbd service
_UNIT_CGROUP = re.compile(r"^0::/system\.slice/(block-rbd[A-Za-z0-9_.-]*\.service)$", re.MULTILINE)
_UID = re.compile(r"^Uid:\s+(\d+)", re.MULTILINE)


def fuse_image(argv):
    """POOL[/NAMESPACE]/IMAGE of an rbd-fuse command line as block-rbd builds it
    (-p POOL, -s NAMESPACE, -r IMAGE); None without -r."""
    values = {}
    words = iter(argv[1:])
    for word in words:
        if word in ("-p", "-s", "-r", "-c", "--id", "--keyring"):
            values[word] = next(words, "")
    if not values.get("-r"):
        return None
    return "/".join([values.get("-p") or "rbd"] + ([values["-s"]] if values.get("-s") else []) + [values["-r"]])


def _read(path):
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", "replace")


def _real_daemon(base, kind):
    """Its executable is the daemon's own, in a system directory (comm and argv are any
    process's to set); an upgrade shows the replaced file as "PATH (deleted)"."""
    try:
        exe = os.readlink(os.path.join(base, "exe"))
    except OSError:
        return False
    exe = exe[:-len(" (deleted)")] if exe.endswith(" (deleted)") else exe
    return os.path.basename(exe) == "rbd-" + kind and os.path.dirname(exe) in process.SYSTEM_PATH


def strays(proc="/proc"):
    """[(pid, kind, image, unit)] of the rbd-nbd and rbd-fuse daemons, run by root, that
    live in a block-rbd service's cgroup (none once every daemon is in a scope)."""
    found = []
    for entry in sorted(os.listdir(proc), key=lambda e: (len(e), e)):
        if not entry.isdigit():
            continue
        base = os.path.join(proc, entry)
        try:
            kind = DAEMONS.get(_read(os.path.join(base, "comm")).strip())
            if kind is None:
                continue
            uid = _UID.search(_read(os.path.join(base, "status")))
            unit = _UNIT_CGROUP.search(_read(os.path.join(base, "cgroup")))
            argv = _read(os.path.join(base, "cmdline")).split("\0")
        except OSError:  # gone meanwhile
            continue
        if not uid or uid.group(1) != "0" or not unit or not _real_daemon(base, kind):
            continue
        if kind == "nbd":
            spec = spec_of_cmdline([a for a in argv if a])
            image = str(spec) if spec else None
        else:
            image = fuse_image([a for a in argv if a])
        found.append((int(entry), kind, image or "pid-%s" % entry, unit.group(1)))
    return found


def adopt_argv(pid, scope, unit):
    """busctl's call of StartTransientUnit that makes `pid` scope `unit`, with the
    properties systemd-run gives a daemon's scope (process.scoped)."""
    props = [("PIDs", "au", ["1", str(pid)]), ("Description", "s", [scope.description]),
             ("CollectMode", "s", ["inactive-or-failed"])]
    for prop in process.SCOPE_PROPERTIES:
        key, _, value = prop.partition("=")
        names = value.split()
        props.append((key, "as", [str(len(names))] + names))
    argv = ["busctl", "call", "--quiet", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
            unit, "fail", str(len(props))]
    for key, signature, values in props:
        argv += [key, signature] + values
    return argv + ["0"]


def adopt_all(proc="/proc", runtime=process.SYSTEMD_RUNTIME):
    """Move every stray daemon into a scope of its own; [(pid, image, scope unit)].
    Raises BlockRbdError naming the daemons it could not move."""
    if not process.under_systemd(runtime):
        return []
    moved, failed = [], []
    for pid, kind, image, unit in strays(proc):
        scope = process.Scope(kind, image)
        name = scope.unit()
        try:
            process.run(adopt_argv(pid, scope, name), timeout=30)
        except BlockRbdError as exc:
            failed.append("%s %d (%s): %s" % (kind, pid, image, exc))
            continue
        log.info("rbd-%s %d serving %s moved from %s into %s", kind, pid, image, unit, name)
        moved.append((pid, image, name))
    if failed:
        raise BlockRbdError("could not move into a scope: " + "; ".join(failed))
    return moved
