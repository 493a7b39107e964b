"""krbd: the kernel's own RBD client, driven through sysfs.

Mapping writes "<mons> <options> <pool> <image> <snap>" to
/sys/bus/rbd/add_single_major with the cephx key in the kernel keyring (never
on a command line), as Ceph's own krbd library does.  That avoids `rbd device
map`, which waits for udev (forever where none runs) and costs seconds.
Devices are identified by their sysfs attributes, never by udev symlinks.
"""

import base64
import ctypes
import errno
import logging
import os
import platform
import socket

from .. import deadline, process
from ..cluster import keyring_secret
from ..errors import CommandError, FeaturesUnsupported, MapperError, MapperUnavailable
from ..target import ImageSpec
from .base import Mapper, Mapping, block_read_only, retry_busy

log = logging.getLogger("block-rbd")

_ADD_KEY = {"x86_64": 248, "aarch64": 217, "ppc64le": 269, "s390x": 278, "i686": 286}
KEY_SPEC_PROCESS_KEYRING = -2

# What the kernel's errno means for a map, in an operator's words.
_MAP_ERRORS = {
    errno.ENOENT: "image, snapshot or pool not found",
    errno.ENXIO: "the image uses features this kernel's rbd driver lacks "
                 "(use mapper=nbd, or disable object-map/fast-diff/deep-flatten on the image)",
    errno.ENOKEY: "the cephx key is not in the kernel keyring",
    errno.EACCES: "permission denied for this cephx user",
    errno.EPERM: "permission denied for this cephx user",
    errno.ETIMEDOUT: "the Ceph cluster did not answer in time",
    errno.EIO: "the Ceph cluster could not be reached",
    errno.EINVAL: "the kernel rejected the map options",
    errno.EBUSY: "another client holds the image's exclusive lock",
    errno.EROFS: "the image is read-only",
}


def kernel_mon_addrs(mon_host, msgr2):
    """mon_host from ceph.conf as the kernel wants it: "ip:port,ip:port".

    Accepts addrvecs ("[v2:1.2.3.4:3300/0,v1:1.2.3.4:6789/0]"), plain
    "host[:port]" lists separated by commas or spaces, and host names.
    msgr2 selects the v2 addresses (the kernel needs ms_mode= for those).
    """
    want, default_port = ("v2", 3300) if msgr2 else ("v1", 6789)
    addrs = []
    text = mon_host.replace(" ", ",")
    pos = 0
    while pos < len(text):
        if text[pos] == ",":
            pos += 1
            continue
        if text[pos] == "[" and text[pos + 1:pos + 4] in ("v1:", "v2:"):
            end = _closing_bracket(text, pos)
            vec = [a for a in text[pos + 1:end].split(",") if a]
            pos = end + 1
            picked = [a[3:] for a in vec if a.startswith(want + ":")]
            if not picked:
                continue
            addrs.append(picked[0].split("/")[0])
            continue
        end = text.find(",", pos)
        end = len(text) if end < 0 else end
        item = text[pos:end].split("/")[0]
        pos = end
        if item.startswith(("v1:", "v2:")):
            if item.startswith(want + ":"):
                addrs.append(item[3:])
            continue
        if item.startswith("["):  # [ipv6]:port or [ipv6]
            host, _, port = item[1:].partition("]")
            port = port.lstrip(":") or str(default_port)
            addrs.append("[%s]:%s" % (host, port))
            continue
        host, _, port = item.partition(":")
        addrs.append("%s:%s" % (_resolve(host), port or default_port))
    if not addrs:
        raise MapperError("no %s monitor address in mon_host %r" % (want, mon_host))
    return ",".join(addrs)


def _closing_bracket(text, start):
    """Index of the "]" closing the "[" at `start`: an addrvec holds "[ipv6]" addresses."""
    depth = 0
    for pos in range(start, len(text)):
        if text[pos] == "[":
            depth += 1
        elif text[pos] == "]":
            depth -= 1
            if depth == 0:
                return pos
    raise MapperError("unbalanced '[' in mon_host %r" % text)


def _resolve(host):
    """The kernel takes addresses only; resolve a name the way Ceph's client would."""
    try:
        socket.inet_aton(host)
        return host
    except OSError:
        pass
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except OSError:
        raise MapperError("cannot resolve monitor host %r" % host) from None


def uses_msgr2(options):
    return any(o.split("=", 1)[0] == "ms_mode" and o != "ms_mode=legacy" for o in options)


def has_v1_monitor(mon_host):
    """Whether mon_host names a monitor the kernel can reach without ms_mode (msgr1)."""
    try:
        kernel_mon_addrs(mon_host, False)
        return True
    except MapperError:
        return False


def kernel_has_msgr2(release=None):
    """The kernel's Ceph client speaks msgr2 from Linux 5.11 on."""
    release = release or platform.release()
    try:
        major, minor = (int(n) for n in release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 11)


def msgr2_default(mon_host, options, release=None):
    """ms_mode to add when the options name none and mon_host has no v1 monitor: the
    kernel would otherwise have no address to use (a minimal generated ceph.conf may
    carry v2 addresses only).  None when nothing is to be added."""
    if any(o.split("=", 1)[0] == "ms_mode" for o in options) or has_v1_monitor(mon_host):
        return None
    if not kernel_has_msgr2(release):
        raise MapperError(
            "mon_host offers only msgr2 (v2) monitor addresses and this kernel (%s) has no msgr2 "
            "client (Linux 5.11+): add the monitors' v1 addresses to mon_host in ceph.conf, or use mapper nbd"
            % (release or platform.release()))
    return "ms_mode=prefer-crc"


def add_kernel_key(user, secret):
    """Put client.<user>'s secret in this process's keyring, as `rbd map` does."""
    number = _ADD_KEY.get(platform.machine())
    if number is None:
        raise MapperUnavailable("add_key is not known on %s" % platform.machine())
    try:
        payload = base64.b64decode(secret, validate=True)
    except ValueError:
        raise MapperError("the keyring entry for client.%s is not valid base64" % user) from None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    serial = libc.syscall(ctypes.c_long(number), b"ceph", ("client.%s" % user).encode(),
                          ctypes.c_char_p(payload), ctypes.c_size_t(len(payload)),
                          ctypes.c_int(KEY_SPEC_PROCESS_KEYRING))
    if serial < 0:
        raise MapperError("add_key(ceph, client.%s) failed: %s" % (user, os.strerror(ctypes.get_errno())))


class RbdSysfs:
    """The kernel's rbd bus in sysfs.  Tests replace it with a double."""

    def __init__(self, root="/sys/bus/rbd", dev_root="/dev"):
        self.root = root
        self.dev_root = dev_root

    def present(self):
        return os.path.isdir(self.root)

    def _attr_path(self, name):
        single = os.path.join(self.root, name + "_single_major")
        return single if os.path.exists(single) else os.path.join(self.root, name)

    def add(self, line):
        """Write a map request; raises OSError with the kernel's errno."""
        with open(self._attr_path("add"), "w") as handle:
            handle.write(line)

    def remove(self, dev_id, force=False):
        with open(self._attr_path("remove"), "w") as handle:
            handle.write("%s%s" % (dev_id, " force" if force else ""))

    ATTRS = ("pool", "pool_ns", "name", "current_snap", "client_addr", "client_id")

    def ids(self):
        """The ids of the mapped rbd devices."""
        try:
            return os.listdir(os.path.join(self.root, "devices"))
        except FileNotFoundError:
            return []

    def attr(self, dev_id, attr):
        """One attribute of a device; "" once it is gone."""
        try:
            with open(os.path.join(self.root, "devices", dev_id, attr)) as handle:
                return handle.read().strip()
        except OSError:
            return ""

    def devices(self):
        """{dev_id: {attr: value}} for every mapped rbd device."""
        return {dev_id: {attr: self.attr(dev_id, attr) for attr in self.ATTRS} for dev_id in self.ids()}


class KrbdMapper(Mapper):
    name = "krbd"

    def __init__(self, config, cluster=None, sysfs=None, sys_root="/sys"):
        super().__init__(config, cluster)
        self.sysfs = sysfs or RbdSysfs()
        self.sys_root = sys_root

    def unavailable(self):
        if self.sysfs.present():
            return None
        try:
            process.run(["modprobe", "rbd"])
        except CommandError as exc:
            return "no rbd driver in this kernel (%s)" % exc
        return None if self.sysfs.present() else "no rbd driver in this kernel"

    def _mapping(self, dev_id, attrs):
        snap = attrs["current_snap"]
        spec = ImageSpec(attrs["pool"], attrs["name"], attrs["pool_ns"], None if snap in ("", "-") else snap)
        return Mapping(self.name, spec, block_read_only("rbd" + dev_id, self.sys_root),
                       os.path.join(self.sysfs.dev_root, "rbd" + dev_id),
                       {"id": dev_id, "client_addr": attrs["client_addr"], "client_id": attrs["client_id"]})

    def mapped(self):
        return [self._mapping(dev_id, attrs) for dev_id, attrs in sorted(self.sysfs.devices().items())]

    def _of(self, spec, ids):
        """The mappings of spec among device `ids`.  A device's other attributes are read
        only when its name matches: with a boot storm's dozens of devices, reading every
        attribute of every device, three times a map, cost each map seconds."""
        for dev_id in sorted(ids):
            if self.sysfs.attr(dev_id, "name") != spec.image:
                continue
            mapping = self._mapping(dev_id, {attr: self.sysfs.attr(dev_id, attr) for attr in self.sysfs.ATTRS})
            if mapping.spec == spec:
                yield mapping

    def find(self, spec, read_only):
        for mapping in self._of(spec, self.sysfs.ids()):
            if mapping.read_only == read_only:
                return mapping
        return None

    def options(self, spec, read_only, extra):
        cfg = self.config
        user = cfg["ceph.id"]
        opts = ["name=%s" % user, "key=client.%s" % user]
        if spec.namespace:
            opts.append("_pool_ns=%s" % spec.namespace)
        opts += list(cfg["krbd.options"]) + list(extra)
        deadline.limit(what="krbd map")  # no map starts once the run's budget is used up
        if not any(o.startswith("mount_timeout=") for o in opts):
            # The kernel waits 60 s for the cluster by default; libxl kills us at 40 s.  One
            # value for every map, never the budget a run has left: the kernel shares its
            # cluster client only between maps of the same options, and a client per map
            # (its own session, osdmap, OSD connections) multiplies a boot storm's work.  A
            # wait past the budget is cut by the run's alarm, or reported by its watchdog.
            opts.append("mount_timeout=%d" % max(1, int(cfg["timeouts.map"])))
        if read_only:
            opts.append("read_only")
        return opts

    def _map(self, spec, read_only, options):
        cfg = self.config
        opts = self.options(spec, read_only, options)
        mon_host = self.cluster.mon_host()
        added = msgr2_default(mon_host, opts)
        if added:
            opts.append(added)
            log.info("mon_host offers only msgr2 addresses: krbd maps %s with %s", spec, added)
        mons = kernel_mon_addrs(mon_host, uses_msgr2(opts))
        add_kernel_key(cfg["ceph.id"], keyring_secret(cfg.keyring, cfg["ceph.id"]))
        before = set(self.sysfs.ids())
        line = "%s %s %s %s %s" % (mons, ",".join(opts), spec.pool, spec.image, spec.snap or "-")
        try:
            self.sysfs.add(line)
        except OSError as exc:
            cause = _MAP_ERRORS.get(exc.errno, os.strerror(exc.errno or 0))
            kind = FeaturesUnsupported if exc.errno == errno.ENXIO else MapperError
            raise kind("krbd map of %s failed: %s" % (spec, cause)) from None
        for mapping in self._of(spec, set(self.sysfs.ids()) - before):
            log.info("krbd mapped %s at %s", spec, mapping.device)
            return mapping
        raise MapperError("krbd map of %s reported success but no device appeared" % spec)

    def unmap(self, mapping):
        dev_id = mapping.details["id"]

        def attempt():
            try:
                self.sysfs.remove(dev_id)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    return False
                if exc.errno == errno.ENOENT:
                    return True  # already gone: unmap is idempotent
                raise MapperError("krbd unmap of %s failed: %s" % (mapping.device, os.strerror(exc.errno)))
            return True

        retry_busy(attempt, self.config["timeouts.unmap"], mapping.device)
        log.info("krbd unmapped %s (%s)", mapping.device, mapping.spec)
