"""rbd-nbd: librbd in a userspace daemon behind the kernel's nbd driver.

For images whose features the kernel's rbd driver lacks, and for kernels
without rbd.  The daemon authenticates with --id/--keyring: no secret in argv.
"""

import fcntl
import glob
import logging
import os
import shutil
import signal

from .. import deadline, process
from ..errors import CommandError, MapperError, TargetError
from ..target import parse_spec
from ..state import local_state
from .base import Mapper, Mapping, block_read_only

log = logging.getLogger("block-rbd")

# How many `rbd-nbd map`s may start at once on this host.  Each is a C++ client that
# connects and opens its image, mostly CPU; in a boot storm, all of them at once share
# the CPUs and finish late together, past libxl's limit, while a few at a time finish
# early one after another (TCG dom0, 16 disks: 1 of 16 attached in time, all at once).
MAP_SLOTS = max(2, 2 * (os.cpu_count() or 1))

NBD_DISCONNECT = 0xAB08  # _IO(0xab, 8), linux/nbd.h
# How long a daemon may take to flush, close its image and exit after the disconnect,
# outside a run's budget: rbd-nbd unmap's own wait (its --reattach-timeout default).
DAEMON_EXIT = 30


def disconnect(device):
    """NBD_DISCONNECT: the kernel ends the connection; the device's rbd-nbd daemon then
    flushes, closes its image and exits.  The kernel takes this ioctl for devices set up
    by ioctl and by netlink alike.  `rbd-nbd unmap` ends in the same call but first
    starts a C++ program that loads librbd: in a TCG dom0, 16 of those at once took 13 s each.
    """
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, NBD_DISCONNECT)
    finally:
        os.close(fd)


def spec_of_cmdline(argv):
    """The image an rbd-nbd daemon serves, from its command line; None if unsure.

    rbd-nbd's own list-mapped reads the same: /proc/PID/cmdline of the pid
    that /sys/block/nbdN/pid names.  The spec is the first word after the
    command (map/attach) that is neither an option nor an option's value;
    block-rbd, like `rbd device map -t nbd`, puts it right after the command.
    Should an option we do not know stand before it, the answer is None:
    missing a mapping is safe, naming the wrong image is not.
    """
    rest = iter(argv[1:])
    command = None
    for word in rest:
        if not word:
            continue
        if word.startswith("-"):
            if "=" in word or word in _FLAGS:
                continue
            if word in _VALUED:
                next(rest, None)
                continue
            return None  # unknown: its value, if any, could look like a spec
        if command is None:
            if word not in ("map", "attach"):
                return None
            command = word
            continue
        try:
            return parse_spec(word, default_pool="rbd")  # rbd-nbd's default pool
        except TargetError:
            return None
    return None


# Options that take the next word as their value (rbd-nbd's own and Ceph's common ones),
# and those that take none.
_VALUED = frozenset((
    "-c", "--conf", "-i", "--id", "-n", "--name", "-k", "--keyring", "--cluster", "--device",
    "--nbds_max", "--max_part", "--timeout", "--io-timeout", "--reattach-timeout",
    "--encryption-format", "--encryption-passphrase-file", "--cookie", "--snap-id",
    "--quiesce-hook", "--format"))
_FLAGS = frozenset(("--read-only", "--exclusive", "--notrim", "--try-netlink", "--show-cookie",
                    "--quiesce", "--pretty-format"))


def discover(sys_root="/sys", proc_root="/proc"):
    """Every rbd-nbd mapping, as the kernel and /proc say it: no process spawned.

    Under load, `rbd-nbd list-mapped` (a C++ program loading librbd) took
    seconds; these are a few small file reads.
    """
    mappings = []
    for pid_file in sorted(glob.glob(os.path.join(sys_root, "block", "nbd*", "pid")),
                           key=lambda p: int(p.split(os.sep)[-2][3:] or 0)):
        name = pid_file.split(os.sep)[-2]
        try:
            with open(pid_file) as handle:
                pid = int(handle.read().strip())
            with open(os.path.join(proc_root, str(pid), "comm")) as handle:
                comm = handle.read().strip()
            with open(os.path.join(proc_root, str(pid), "cmdline"), "rb") as handle:
                argv = handle.read().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue  # disconnected, or its daemon gone, between the reads
        if comm != "rbd-nbd":
            continue
        spec = spec_of_cmdline(argv)
        if spec is not None:
            mappings.append(Mapping("nbd", spec, block_read_only(name, sys_root), "/dev/" + name, {"pid": pid}))
    return mappings


def daemons(proc_root="/proc"):
    """[(pid, argv)] of every rbd-nbd process, connected to a device or not."""
    found = []
    for comm_file in glob.glob(os.path.join(proc_root, "[0-9]*", "comm")):
        pid_dir = os.path.dirname(comm_file)
        try:
            with open(comm_file) as handle:
                if handle.read().strip() != "rbd-nbd":
                    continue
            with open(os.path.join(pid_dir, "cmdline"), "rb") as handle:
                argv = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        found.append((int(os.path.basename(pid_dir)), argv))
    return sorted(found)


def terminate(pid):
    """SIGTERM: rbd-nbd disconnects what it connected, closes the image and exits."""
    os.kill(pid, signal.SIGTERM)


def option_args(options):
    """krbd-style "key=value" options as rbd-nbd flags, the way `rbd device map -t nbd` does.

    librbd's own options (rbd_*, e.g. the QoS limits) are Ceph config overrides,
    `--rbd_qos_iops_limit=500`: one word, so discovery (spec_of_cmdline) skips it.
    """
    args = []
    for option in options:
        key, sep, value = option.partition("=")
        if key.startswith("rbd_") and sep:
            args.append("--%s=%s" % (key, value))
            continue
        args += ["--" + key.replace("_", "-")] + ([value] if sep else [])
    return args


class NbdMapper(Mapper):
    name = "nbd"

    def __init__(self, config, cluster=None, sys_root="/sys", proc_root="/proc"):
        super().__init__(config, cluster)
        self.sys_root = sys_root
        self.proc_root = proc_root

    def unavailable(self):
        if not shutil.which("rbd-nbd"):
            return "rbd-nbd is not installed (apt-get install rbd-nbd)"
        if not os.path.isdir(os.path.join(self.sys_root, "module", "nbd")):
            try:
                process.run(["modprobe", "nbd"])
            except CommandError as exc:
                return "no nbd driver in this kernel (%s)" % exc
        return None

    def _common(self):
        cfg = self.config
        return ["-c", cfg["ceph.conf"], "--id", cfg["ceph.id"], "--keyring", cfg.keyring]

    def mapped(self):
        return discover(self.sys_root, self.proc_root)

    def map_argv(self, spec, read_only, options):
        # The spec right after `map`: discovery (spec_of_cmdline) finds it there whatever
        # options follow.
        argv = ["rbd-nbd", "map", str(spec)] + self._common()
        if read_only:
            argv.append("--read-only")
        return argv + option_args(list(self.config["nbd.options"]) + list(options))

    def _map(self, spec, read_only, options):
        try:
            with local_state(self.config).slot("nbd-map", MAP_SLOTS):
                result = process.run(self.map_argv(spec, read_only, options))
        except CommandError as exc:
            raise MapperError("rbd-nbd map of %s failed: %s" % (spec, process.last_line(exc.stderr) or exc)) from None
        device = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        if not device.startswith("/dev/nbd"):
            raise MapperError("rbd-nbd map of %s printed no device" % spec)
        log.info("rbd-nbd mapped %s at %s", spec, device)
        return Mapping(self.name, spec, read_only, device, {})

    def unmap(self, mapping):
        current = next((m for m in self.mapped() if m.device == mapping.device), None)
        if current is None:
            return  # already gone
        pid = current.details.get("pid")
        try:
            disconnect(mapping.device)
        except OSError as exc:
            raise MapperError("disconnecting %s failed: %s" % (mapping.device, exc.strerror or exc)) from None
        deadline.retry(lambda: self._released(mapping.device, pid),
                       what="the exit of the rbd-nbd daemon of %s" % mapping.device, default=DAEMON_EXIT,
                       give_up=lambda waited: MapperError(
                           "the rbd-nbd daemon of %s (pid %s) was still running %.0f s after the disconnect"
                           % (mapping.device, pid, waited)))
        log.info("rbd-nbd unmapped %s (%s)", mapping.device, mapping.spec)

    def discard_partial(self, spec, read_only):
        """Stop the daemon of a map that was given up (its time ran out).

        `rbd-nbd map` forks the daemon early; killing the map when the time is
        up leaves the daemon going on, and it may connect a device after the
        add has failed and cleaned up.  Under the image's local lock, an rbd-nbd
        daemon of this image and mode that serves no device is such a one.
        """
        serving = {m.details.get("pid") for m in self.mapped()}
        for pid, argv in daemons(self.proc_root):
            if pid in serving or spec_of_cmdline(argv) != spec or ("--read-only" in argv) != read_only:
                continue
            try:
                terminate(pid)
            except ProcessLookupError:
                continue
            log.info("stopped rbd-nbd %d, left mapping %s by a map that was given up", pid, spec)
            deadline.retry(lambda: self._exited(pid), what="the exit of rbd-nbd %d" % pid, default=DAEMON_EXIT,
                           give_up=lambda waited: MapperError(
                               "rbd-nbd %d (a map of %s that was given up) was still running %.0f s after SIGTERM"
                               % (pid, spec, waited)))
        # It may have connected a device before the signal: unmapped like any other.
        mapping = self.find(spec, read_only)
        if mapping is not None:
            self.unmap(mapping)

    def _exited(self, pid):
        try:
            with open(os.path.join(self.proc_root, str(pid), "cmdline"), "rb") as handle:
                return not handle.read()  # a zombie's is empty
        except OSError:
            return True

    def _released(self, device, pid):
        """The kernel let go of the device and its daemon has exited (a zombie has)."""
        if os.path.exists(os.path.join(self.sys_root, "block", os.path.basename(device), "pid")):
            return False
        return self._exited(pid)
