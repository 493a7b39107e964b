"""fuse: rbd-fuse exposes the image as a file, a loop device makes it a disk.

For dom0 kernels with neither rbd nor nbd.  rbd-fuse is started with -r IMAGE
so it opens (and watches) only that image, not every image of the pool, under
a mount directory only root can enter (rbd-fuse shows the file as 0666).

rbd-fuse 18.2 built with libfuse 3.17 (Debian 13) crashes at start whenever it is given
a pool or a namespace: libfuse now frees an option's previous value, and rbd-fuse's
defaults ("rbd", "") are string literals.  So the default pool goes unnamed (every
version's default), and a crash with -p or -s says which mappers to use instead.
"""

import fcntl
import glob
import logging
import os
import shutil
import signal
import urllib.parse

from .. import process
from ..errors import CommandError, MapperError, TargetError
from ..target import parse_spec
from .base import Mapper, Mapping, block_read_only, device_size, retry_busy

log = logging.getLogger("block-rbd")

LOOP_SET_CAPACITY = 0x4C07  # linux/loop.h
DEFAULT_POOL = "rbd"  # rbd-fuse's own default
CRASHES = (-signal.SIGSEGV, -signal.SIGABRT)


def parse_mountinfo(text, mount_dir):
    """Mount points of rbd-fuse mounts directly below mount_dir."""
    mount_dir = mount_dir.rstrip("/")
    points = []
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        fstype = line.split(" - ", 1)[1].split()[0]
        point = fields[4].replace("\\040", " ")
        if fstype.startswith("fuse") and os.path.dirname(point) == mount_dir:
            points.append(point)
    return points


DELETED = " (deleted)"


def loop_devices(sys_root="/sys"):
    """{backing file: [(loop name, read_only)]} for every attached loop device.

    A file whose directory entry the kernel dropped while the loop held it open (rbd-fuse
    18.2 answered a lookup "no such file" for a moment, seen after an online resize) is
    shown "PATH (deleted)": it is still the same open file, so it counts under PATH, and
    remove still finds and detaches the loop device before unmounting.
    """
    backing = {}
    for path in glob.glob(os.path.join(sys_root, "block", "loop*", "loop", "backing_file")):
        name = path.split(os.sep)[-3]
        try:
            with open(path) as handle:
                target = handle.read().rstrip("\n")
        except OSError:
            continue  # detached between glob and open
        target = target[:-len(DELETED)] if target.endswith(DELETED) else target.strip()
        backing.setdefault(target, []).append((name, block_read_only(name, sys_root)))
    return backing


class FuseMapper(Mapper):
    name = "fuse"

    def __init__(self, config, cluster=None, sys_root="/sys", mountinfo="/proc/self/mountinfo"):
        super().__init__(config, cluster)
        self.sys_root = sys_root
        self.mountinfo = mountinfo
        self.mount_dir = config["fuse.mount_dir"]

    def unavailable(self):
        for tool, package in (("rbd-fuse", "rbd-fuse"), ("losetup", "mount"), ("fusermount", "fuse")):
            if not shutil.which(tool):
                return "%s is not installed (apt-get install %s)" % (tool, package)
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse (modprobe fuse)"
        return None

    def mountpoint(self, spec):
        return os.path.join(self.mount_dir, spec.head().key)

    def _mounts(self):
        with open(self.mountinfo) as handle:
            return parse_mountinfo(handle.read(), self.mount_dir)

    def mapped(self):
        loops = loop_devices(self.sys_root)
        mappings = []
        for point in self._mounts():
            try:
                spec = parse_spec(urllib.parse.unquote(os.path.basename(point)))
            except TargetError:
                continue  # not one of ours
            image_file = os.path.join(point, spec.image)
            for name, read_only in loops.get(image_file, []):
                mappings.append(Mapping(self.name, spec, read_only, "/dev/" + name,
                                        {"mountpoint": point, "file": image_file}))
        return mappings

    def follow_size(self, mapping, size=None):
        """LOOP_SET_CAPACITY once the image file has grown past the loop device.

        rbd-fuse reports the image's current size (its image handle watches the
        header) when the kernel's attribute cache asks again, after 1 s; a loop
        device keeps the size it was set up with until told (`losetup -c`).
        """
        size = os.stat(mapping.details["file"]).st_size
        if size > device_size(mapping.device, self.sys_root):
            fd = os.open(mapping.device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
            finally:
                os.close(fd)
            log.info("%s follows %s: now %d bytes", mapping.device, mapping.spec, size)
        return device_size(mapping.device, self.sys_root)

    def mount_argv(self, spec, point):
        cfg = self.config
        argv = ["rbd-fuse", "-c", cfg["ceph.conf"], "--id", cfg["ceph.id"], "--keyring", cfg.keyring]
        if spec.pool != DEFAULT_POOL:
            argv += ["-p", spec.pool]
        if spec.namespace:
            argv += ["-s", spec.namespace]
        return argv + ["-r", spec.image, point]

    def _map(self, spec, read_only, options):
        if spec.snap:
            raise MapperError("the fuse mapper cannot map snapshots (%s); use mapper=krbd or nbd" % spec)
        if options:
            raise MapperError("the fuse mapper takes no map options (%s)" % "+".join(options))
        point = self.mountpoint(spec)
        image_file = os.path.join(point, spec.image)
        mounted_here = False
        if point not in self._mounts():
            os.makedirs(self.mount_dir, mode=0o700, exist_ok=True)
            os.chmod(self.mount_dir, 0o700)
            os.makedirs(point, mode=0o700, exist_ok=True)
            try:
                process.run(self.mount_argv(spec, point), scope=process.Scope("fuse", str(spec)))
            except CommandError as exc:
                _rmdir(point)
                if exc.returncode in CRASHES and (spec.pool != DEFAULT_POOL or spec.namespace):
                    raise MapperError(
                        "rbd-fuse crashed on being given the pool or namespace of %s (rbd-fuse "
                        "with libfuse 3.17, as on Debian 13, serves only pool %s without a "
                        "namespace): use mapper=nbd or mapper=krbd for it" % (spec, DEFAULT_POOL)) from None
                raise MapperError("rbd-fuse mount of %s failed: %s" % (spec, exc)) from None
            mounted_here = True
        try:
            if not os.path.exists(image_file):
                raise MapperError("rbd-fuse shows no image %s" % spec)
            argv = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else []) + [image_file]
            try:
                device = process.run(argv).stdout.strip()
            except CommandError as exc:
                raise MapperError("losetup for %s failed: %s" % (spec, exc)) from None
        except MapperError:
            if mounted_here:
                self._unmount(point)
            raise
        log.info("fuse mapped %s at %s (via %s)", spec, device, point)
        return Mapping(self.name, spec, read_only, device, {"mountpoint": point, "file": image_file})

    def discard_partial(self, spec, read_only):
        """A map killed between rbd-fuse and losetup leaves a mount and no loop: unmount it."""
        point = self.mountpoint(spec)
        if point in self._mounts() and not loop_devices(self.sys_root).get(os.path.join(point, spec.image)):
            self._unmount(point)
            log.info("fuse unmounted %s, left without a loop device by an earlier map", point)

    def unmap(self, mapping):
        point = mapping.details.get("mountpoint") or self.mountpoint(mapping.spec)
        image_file = os.path.join(point, mapping.spec.image)
        name = os.path.basename(mapping.device)
        if self._holds(name, image_file):
            try:
                process.run(["losetup", "--detach", mapping.device])
            except CommandError as exc:
                raise MapperError("losetup --detach %s failed: %s" % (mapping.device, exc)) from None
            # The kernel detaches when the last opener closes the device, which may be after
            # losetup returns: until then the mount is still in use by this very loop.
            retry_busy(lambda: not self._holds(name, image_file), self.config["timeouts.unmap"],
                       mapping.device)
        # The mount stays while another loop (the other mode) still uses it.
        if not loop_devices(self.sys_root).get(image_file) and point in self._mounts():
            self._unmount(point)
        log.info("fuse unmapped %s (%s)", mapping.device, mapping.spec)

    def _holds(self, name, image_file):
        return any(n == name for n, _ro in loop_devices(self.sys_root).get(image_file, []))

    def _unmount(self, point):
        def attempt():
            result = process.run(["fusermount", "-u", point], check=False)
            return result.ok or point not in self._mounts()

        retry_busy(attempt, self.config["timeouts.unmap"], point)
        _rmdir(point)


def _rmdir(path):
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty or already gone: nothing of ours to clean
