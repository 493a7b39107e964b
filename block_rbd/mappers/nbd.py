"""rbd-nbd: librbd in a userspace daemon behind the kernel's nbd driver.

For images whose features the kernel's rbd driver lacks, for kernels without
rbd, and for disks with I/O limits.  The daemon authenticates with
--id/--keyring: no secret in argv.

Devices are set up through netlink with a cookie of ours (the device's
backend identifier, in block-rbd's record), so they outlive their daemon: the
kernel holds their I/O for the reattach timeout, and `block-rbd upkeep`
attaches a new daemon to a device whose daemon is gone (heal) or, after an
upgrade of Ceph, replaces each daemon in turn (restart).  The cookie also tells
which daemon serves which device, whatever /sys/block/nbdN/pid says (the
kernel keeps the first daemon's pid there after a reattach).  A daemon is a
process run by root from the rbd-nbd executable: any user can name a process
rbd-nbd and give it a daemon's command line.
"""

import contextlib
import fcntl
import glob
import logging
import os
import shutil
import signal
import time
import uuid

from .. import deadline, process
from ..errors import AccessDenied, ClusterError, CommandError, HotplugTimeout, MapperError, TargetError
from ..target import parse_spec
from ..state import local_state
from . import nbd_netlink
from .base import Mapper, Mapping, block_read_only, device_size

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
# How long the kernel holds a device's I/O for a new daemon when its daemon is gone
# (rbd-nbd's --reattach-timeout, its default): upkeep attaches one within seconds.
REATTACH_TIMEOUT = 30
# A request that was with a daemon when it died is sent again only when it times out:
# with no timeout (rbd-nbd's and the kernel's default) it hung the healed disk for good
# on Linux 6.1 and 6.12 alike (3 of 4 gate runs).  So a heal gives the device a timeout
# until the dead daemon's requests have timed out once (their 30 s tick), then none again:
# a live daemon's request that outlasts a timeout is dropped with its connection, and a
# disk must wait out a cluster outage, not lose its daemon to it.  A restart does the
# same: a daemon that exits on SIGTERM shuts its socket before its last replies (a
# guest's write waited 61 s after a restart in the gate, sent again on its timeout).
HEAL_IO_TIMEOUT = 60  # longer than the window: no request sent after the heal times out
HEAL_WINDOW = 40
# The budget of one heal or restart of one device (an attach is a map's work).
ATTACH_BUDGET = 30
# Our cookies say they are ours: a netlink device left without daemon and without a
# record by a map given up too late to undo (an overloaded boot storm) is swept by upkeep.
COOKIE_PREFIX = "brbd-"


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


def option_value(argv, name):
    """The value of option `name` in an argv (`--name V` or `--name=V`); None if absent."""
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(name + "="):
            return word[len(name) + 1:]
    return None


def _read(path):
    with open(path, "rb") as handle:
        return handle.read().decode(errors="replace")


def _devices(sys_root, proc_root):
    """[(name, backend, pid, argv or None)] of every connected nbd device.

    argv is the command line of the rbd-nbd daemon serving it: the one its
    pid file names, unless that one carries another cookie (or is gone, or is
    no rbd-nbd: pids are reused), else the daemon whose --cookie is the
    device's backend identifier, or which was attached with --device to it.
    Only real rbd-nbd daemons count (_daemon_argv).
    """
    found = []
    everyone = None
    executables = rbd_nbd_executables()
    for pid_file in sorted(glob.glob(os.path.join(sys_root, "block", "nbd*", "pid")),
                           key=lambda p: int(p.split(os.sep)[-2][3:] or 0)):
        name = pid_file.split(os.sep)[-2]
        try:
            pid = int(_read(pid_file).strip())
        except (OSError, ValueError):
            continue  # disconnected between the glob and the read
        try:
            backend = _read(os.path.join(sys_root, "block", name, "backend")).strip()
        except OSError:
            backend = ""  # set up by ioctl, or without an identifier
        argv = _daemon_argv(proc_root, pid, executables)
        if argv is not None and backend and option_value(argv, "--cookie") not in (None, backend):
            argv = None  # another device's daemon, with the pid the first one had
        if argv is None:
            if everyone is None:
                everyone = daemons(proc_root, executables)
            for other, other_argv in everyone:
                if ((backend and option_value(other_argv, "--cookie") == backend)
                        or ("attach" in other_argv and option_value(other_argv, "--device") == "/dev/" + name)):
                    pid, argv = other, other_argv
                    break
        found.append((name, backend, pid, argv))
    return found


# What the kernel appends to /proc/PID/exe once the file was removed or replaced: an
# upgrade of rbd-nbd under its running daemons.
_DELETED = " (deleted)"


def rbd_nbd_executables():
    """The paths /proc/PID/exe of a real rbd-nbd daemon may show: the rbd-nbd block-rbd
    runs (the first on PATH) and one in each system directory (`rbd device map -t nbd`
    runs its own directory's), each also with its links resolved as the kernel shows them.
    By name, not by existence: a daemon outlives the removal of its package."""
    paths = [os.path.join(d, "rbd-nbd") for d in process.SYSTEM_PATH]
    on_path = shutil.which("rbd-nbd")
    if on_path:
        paths.append(os.path.abspath(on_path))
    return frozenset(paths) | frozenset(os.path.realpath(p) for p in paths)


def _read_at(dir_fd, name):
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    with open(fd, "rb") as handle:
        return handle.read().decode(errors="replace")


def _run_by_root(status):
    """True if /proc/PID/status says real and effective uid 0.  Not the owner of
    /proc/PID: that is root also for any process that made itself non-dumpable."""
    for line in status.splitlines():
        if line.startswith("Uid:"):
            uids = line.split()[1:]
            return len(uids) >= 2 and uids[0] == "0" and uids[1] == "0"
    return False


def _daemon_argv(proc_root, pid, executables=None):
    """The argv of process `pid` if it is a real rbd-nbd daemon, else None.

    comm and cmdline are any process's own to set, and a daemon's --cookie is
    world-readable: it counts only when run by root from an rbd-nbd executable.
    Every read goes through one handle on /proc/PID, so a pid reused meanwhile
    fails them (ESRCH) rather than mixing two processes.
    """
    executables = rbd_nbd_executables() if executables is None else executables
    try:
        dir_fd = os.open(os.path.join(proc_root, str(pid)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if _read_at(dir_fd, "comm").strip() != "rbd-nbd" or not _run_by_root(_read_at(dir_fd, "status")):
            return None
        exe = os.readlink("exe", dir_fd=dir_fd)  # a zombie's: ENOENT
        if exe.endswith(_DELETED):
            exe = exe[:-len(_DELETED)]
        if exe not in executables:
            return None
        cmdline = _read_at(dir_fd, "cmdline")
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    return cmdline.split("\0") if cmdline else None  # a zombie's is empty: it serves nothing


def discover(sys_root="/sys", proc_root="/proc"):
    """Every rbd-nbd mapping with a daemon, as the kernel and /proc say it: no process spawned.

    Under load, `rbd-nbd list-mapped` (a C++ program loading librbd) took
    seconds; these are a few small file reads.
    """
    mappings = []
    for name, backend, pid, argv in _devices(sys_root, proc_root):
        spec = spec_of_cmdline(argv) if argv else None
        if spec is not None:
            mappings.append(Mapping("nbd", spec, block_read_only(name, sys_root), "/dev/" + name,
                                    {"pid": pid, "cookie": backend or None}))
    return mappings


def orphans(sys_root="/sys", proc_root="/proc"):
    """{device: backend identifier} of connected nbd devices that no rbd-nbd daemon serves."""
    return {"/dev/" + name: backend for name, backend, _pid, argv in _devices(sys_root, proc_root)
            if argv is None}


def daemons(proc_root="/proc", executables=None):
    """[(pid, argv)] of every real rbd-nbd daemon (_daemon_argv), connected to a device or not."""
    executables = rbd_nbd_executables() if executables is None else executables
    found = []
    for pid_dir in glob.glob(os.path.join(proc_root, "[0-9]*")):
        name = os.path.basename(pid_dir)
        if not name.isdigit():
            continue
        argv = _daemon_argv(proc_root, int(name), executables)
        if argv is not None:
            found.append((int(name), argv))
    return sorted(found)


def terminate(pid):
    """SIGTERM: rbd-nbd closes its image and exits.  A device it set up through
    netlink stays, waiting for a new daemon (what `rbd-nbd detach` does); one set up by
    ioctl goes with it."""
    os.kill(pid, signal.SIGTERM)


def disconnect_netlink(device):
    """NBD_CMD_DISCONNECT: ends a netlink device, also one whose daemon is gone."""
    with nbd_netlink.Nbd(timeout=deadline.limit(5, what="the netlink disconnect of %s" % device)) as nl:
        nl.disconnect(int(os.path.basename(device)[3:]))


# krbd's ms_mode values as librbd's messenger modes, in order of preference.
MS_MODES = {"crc": "crc", "secure": "secure", "prefer-crc": "crc secure", "prefer-secure": "secure crc"}


def option_args(options):
    """krbd-style "key=value" options as rbd-nbd flags, the way `rbd device map -t nbd` does.

    librbd's own options (rbd_*, e.g. the QoS limits) are Ceph config overrides,
    `--rbd_qos_iops_limit=500`: one word, so discovery (spec_of_cmdline) skips it.
    krbd's ms_mode (ms_mode=secure: wire encryption) becomes librbd's messenger modes for
    the monitors and the OSDs alike, so one disk line means the same for both mappers.
    """
    args = []
    for option in options:
        key, sep, value = option.partition("=")
        if key.startswith("rbd_") and sep:
            args.append("--%s=%s" % (key, value))
            continue
        if key == "ms_mode":
            if value not in MS_MODES:
                raise MapperError("ms_mode=%s is not a mode rbd-nbd has (%s)" % (value, ", ".join(MS_MODES)))
            args += ["--ms_mon_client_mode=" + MS_MODES[value], "--ms_client_mode=" + MS_MODES[value]]
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
        """discover(), and the devices of block-rbd's records whose daemon is gone (by cookie)."""
        found = discover(self.sys_root, self.proc_root)
        lost = orphans(self.sys_root, self.proc_root)
        if lost:
            for record in local_state(self.config).records():
                if record.mapper == "nbd" and record.cookie and lost.get(record.device) == record.cookie:
                    found.append(Mapping(self.name, record.spec, record.read_only, record.device,
                                         {"pid": None, "cookie": record.cookie}))
        return found

    def map_argv(self, spec, read_only, options, cookie):
        # The spec right after `map`: discovery (spec_of_cmdline) finds it there whatever
        # options follow.  Netlink, so that the device outlives its daemon.
        argv = ["rbd-nbd", "map", str(spec)] + self._common() + [
            "--try-netlink", "--cookie", cookie, "--reattach-timeout", str(REATTACH_TIMEOUT)]
        if read_only:
            argv.append("--read-only")
        return argv + option_args(list(self.config["nbd.options"]) + list(options))

    def attach_argv(self, record):
        """A new daemon for the record's device: what mapped it, with attach and the device."""
        argv = ["rbd-nbd", "attach", record.image] + self._common() + [
            "--device", record.device, "--cookie", record.cookie, "--reattach-timeout", str(REATTACH_TIMEOUT)]
        if record.read_only:
            argv.append("--read-only")
        return argv + option_args(list(self.config["nbd.options"]) + list(record.options))

    def sets_timeout(self, record):
        """True if the configuration or the disk gives rbd-nbd a request timeout of its own."""
        return any(o.partition("=")[0] in ("io_timeout", "timeout")
                   for o in list(self.config["nbd.options"]) + list(record.options))

    def set_timeout(self, device, seconds, cookie):
        with nbd_netlink.Nbd(timeout=deadline.limit(5, what="the netlink timeout of %s" % device)) as nl:
            nl.set_timeout(int(os.path.basename(device)[3:]), seconds, cookie)

    @contextlib.contextmanager
    def _free_device(self, state):
        """A free nbd device, claimed host-wide until the block ends (None: let rbd-nbd pick).

        Without --device, concurrent netlink connects all go for the first free
        device and all but one are refused ("Device being setup by another task")
        and retry: in a boot storm that took a third of the maps past the budget.
        """
        names = sorted((os.path.basename(p) for p in glob.glob(os.path.join(self.sys_root, "block", "nbd*"))),
                       key=lambda n: int(n[3:] or 0))
        for name in names:
            if os.path.exists(os.path.join(self.sys_root, "block", name, "pid")):
                continue
            with state.claim("nbd-device." + name) as mine:
                if mine and not os.path.exists(os.path.join(self.sys_root, "block", name, "pid")):
                    yield "/dev/" + name
                    return
        yield None

    def _map(self, spec, read_only, options):
        cookie = COOKIE_PREFIX + str(uuid.uuid4())
        state = local_state(self.config)
        try:
            with state.slot("nbd-map", MAP_SLOTS), contextlib.ExitStack() as stack:
                argv = self.map_argv(spec, read_only, options, cookie)
                if "--device" not in argv:
                    device = stack.enter_context(self._free_device(state))
                    if device:
                        argv += ["--device", device]
                result = process.run(argv, scope=process.Scope("nbd", str(spec)))
        except CommandError as exc:
            raise MapperError("rbd-nbd map of %s failed: %s" % (spec, process.last_line(exc.stderr) or exc)) from None
        device = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        if not device.startswith("/dev/nbd"):
            raise MapperError("rbd-nbd map of %s printed no device" % spec)
        netlink = self.backend(device) == cookie  # else the kernel took the ioctl fallback
        log.info("rbd-nbd mapped %s at %s%s", spec, device, "" if netlink else " (ioctl: cannot outlive its daemon)")
        return Mapping(self.name, spec, read_only, device,
                       {"cookie": cookie if netlink else None, "options": list(options)})

    def follow_size(self, mapping, size=None):
        """rbd-nbd follows its image's header, but rbd-nbd 16.2 resizes a netlink device
        without its backend identifier and the kernel refuses that ("must specify
        backend"; fixed in 18.2): a device that lags `size` is resized here, with it."""
        now = device_size(mapping.device, self.sys_root)
        cookie = mapping.details.get("cookie")
        if size is not None and now < size and cookie:
            with nbd_netlink.Nbd(timeout=deadline.limit(5, what="the netlink resize of %s" % mapping.device)) as nl:
                nl.resize(int(os.path.basename(mapping.device)[3:]), size, cookie)
            log.info("%s follows %s: now %d bytes (netlink resize)", mapping.device, mapping.spec, size)
            now = device_size(mapping.device, self.sys_root)
        return now

    def backend(self, device):
        """The backend identifier (our cookie) of a netlink device; "" if none."""
        try:
            return _read(os.path.join(self.sys_root, "block", os.path.basename(device), "backend")).strip()
        except OSError:
            return ""

    def unmap(self, mapping):
        current = next((m for m in self.mapped() if m.device == mapping.device), None)
        if current is None:
            return  # already gone
        self._end(current)

    def _end(self, mapping):
        """Disconnect the device (netlink or ioctl, as it was set up), wait for its daemon's exit."""
        pid = mapping.details.get("pid")
        try:
            if mapping.details.get("cookie"):
                disconnect_netlink(mapping.device)
            else:
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
        daemon of this image and mode that serves no device is such a one; a
        netlink device it set up meanwhile outlives it, and is found by its cookie.
        """
        serving = {m.details.get("pid") for m in discover(self.sys_root, self.proc_root)}
        cookies = set()
        for pid, argv in daemons(self.proc_root):
            if pid in serving or spec_of_cmdline(argv) != spec or ("--read-only" in argv) != read_only:
                continue
            try:
                terminate(pid)
            except ProcessLookupError:
                continue
            cookies.add(option_value(argv, "--cookie"))
            log.info("stopped rbd-nbd %d, left mapping %s by a map that was given up", pid, spec)
            deadline.retry(lambda: self._exited(pid), what="the exit of rbd-nbd %d" % pid, default=DAEMON_EXIT,
                           give_up=lambda waited: MapperError(
                               "rbd-nbd %d (a map of %s that was given up) was still running %.0f s after SIGTERM"
                               % (pid, spec, waited)))
        for device, backend in orphans(self.sys_root, self.proc_root).items():
            if backend and backend in cookies:
                self._end(Mapping(self.name, spec, read_only, device, {"pid": None, "cookie": backend}))
        # It may have connected a device before the signal (ioctl): unmapped like any other.
        mapping = self.find(spec, read_only)
        if mapping is not None:
            self.unmap(mapping)

    def _exited(self, pid):
        if pid is None:
            return True
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

    # ---- a new daemon for a live device ------------------------------------------------

    def serving(self, device):
        """The pid of the rbd-nbd daemon serving `device`, or None."""
        return next((m.details["pid"] for m in discover(self.sys_root, self.proc_root) if m.device == device),
                    None)

    def attach(self, record):
        """Start a new rbd-nbd daemon for the record's device; its pid."""
        try:
            with local_state(self.config).slot("nbd-map", MAP_SLOTS):
                process.run(self.attach_argv(record), scope=process.Scope("nbd", record.image))
        except CommandError as exc:
            raise MapperError("rbd-nbd attach of %s to %s failed: %s"
                              % (record.image, record.device, process.last_line(exc.stderr) or exc)) from None
        pid = self.serving(record.device)
        if pid is None:
            raise MapperError("rbd-nbd attach of %s to %s started no daemon serving it" % (record.image, record.device))
        return pid


_lost = set()  # (device, cookie) heal() has reported as beyond healing


def _attach(mapper, record, cluster, registry):
    """mapper.attach(record), through registry.rehome where the cluster answers."""
    if cluster is None or registry is None or record.spec.snap:
        return mapper.attach(record)
    attached = []
    try:
        return registry.rehome(cluster, record.spec, list(record.holders),
                               lambda: attached.append(mapper.attach(record)) or attached[-1])
    except (ClusterError, AccessDenied, HotplugTimeout) as exc:
        if attached:  # the device is served; the registrations still name the dead daemon
            log.error("upkeep: %s (%s): the new rbd-nbd daemon serves it, but its registration could "
                      "not be updated: %s", record.device, record.image, exc)
            return attached[-1]
        log.warning("upkeep: %s (%s): the cluster did not answer (%s); attaching without fencing the dead "
                    "daemon (the new one waits for its lock to time out)", record.device, record.image, exc)
        return mapper.attach(record)


def _nbd_records(state):
    return [r for r in state.records() if r.mapper == "nbd" and r.device]


def heal(config, cluster=None, registry=None, mapper=None):
    """A new daemon for every block-rbd nbd device whose daemon is gone; [(device, pid)].

    Each under its image's lock, skipped while a hotplug run holds it (the run
    sees to it).  With the cluster (`cluster`, `registry`), the dead daemon is
    fenced first, so that the new one takes the image's exclusive lock at once,
    and the cluster-wide registrations name the new one (Registry.rehome);
    without it (unreachable) the device is healed all the same.  One log line
    per device healed, or per failure.
    """
    state = local_state(config)
    mapper = mapper or NbdMapper(config)
    healed = []
    records = [r for r in _nbd_records(state) if r.cookie]
    served = {m.device for m in discover(mapper.sys_root, mapper.proc_root)} if records else set()
    for found in records:
        if found.device in served:
            continue
        with state.lock(found.spec, wait=False) as held:
            record = state.load(found.spec, found.read_only) if held else None
            if record is None or record.device != found.device or not record.cookie:
                continue
            if mapper.serving(record.device) is not None:
                continue
            if mapper.backend(record.device) != record.cookie:
                if (record.device, record.cookie) not in _lost:  # said once, not every round
                    _lost.add((record.device, record.cookie))
                    log.error("upkeep: %s (%s) has lost its rbd-nbd daemon and is no longer connected; "
                              "detach the disk and attach it again", record.device, record.image)
                continue
            started = time.monotonic()
            try:
                with deadline.budget(deadline.Deadline(ATTACH_BUDGET)):
                    pid = _attach(mapper, record, cluster, registry)
            except MapperError as exc:
                log.error("upkeep: the rbd-nbd daemon of %s (%s) is gone and a new one failed: %s",
                          record.device, record.image, exc)
                continue
            log.info("upkeep: the rbd-nbd daemon of %s (%s) was gone: rbd-nbd %d attached in %.1f s",
                     record.device, record.image, pid, time.monotonic() - started)
            healed.append((record.device, pid))
            if not mapper.sets_timeout(record):
                _resend_held(mapper, record, state, "heal")
    return healed


def _resend_held(mapper, record, state, after):
    """Give the device HEAL_IO_TIMEOUT for HEAL_WINDOW after a heal or a restart (`after`),
    so that what its previous daemon held is sent again; upkeep ends it (end_request_timeouts).
    Called under the image's local lock."""
    try:
        mapper.set_timeout(record.device, HEAL_IO_TIMEOUT, record.cookie)
    except (OSError, HotplugTimeout) as exc:
        prefix, previous = ("upkeep: ", "dead") if after == "heal" else ("", "old")  # restart-nbd's own line
        log.error("%s%s (%s): no request timeout set (%s): a request its %s daemon held may never complete",
                  prefix, record.device, record.image, exc, previous)
        return
    state.set_request_timeout(record.device, record.cookie, record.image, time.monotonic() + HEAL_WINDOW, after)


def end_request_timeouts(config, mapper=None, now=None):
    """Back to no request timeout, for each device whose window after a heal or a restart
    is over; [device].  Under the image's lock: one held (a run, a restart) waits a round."""
    now = time.monotonic() if now is None else now
    state = local_state(config)
    due = [t for t in state.request_timeouts() if t["until"] <= now]
    if not due:
        return []
    mapper = mapper or NbdMapper(config)
    ended = []
    for found in sorted(due, key=lambda t: t["device"]):
        with state.lock(parse_spec(found["image"]), wait=False) as held:
            timeout = state.request_timeout(found["device"]) if held else None
            if timeout is None or timeout["until"] > now:  # taken meanwhile, or a restart moved it on
                continue
            device, cookie = timeout["device"], timeout["cookie"]
            if mapper.backend(device) == cookie:  # else disconnected, or another disk's by now
                mapper.set_timeout(device, 0, cookie)  # an error: the next round tries again
                log.info("upkeep: %s: the request timeout of its %s is over, none again", device, timeout["after"])
            state.drop_request_timeout(device)
            ended.append(device)
    return ended


def sweep(config, mapper=None):
    """Disconnect netlink devices of ours (by cookie) that no daemon serves and no record
    names: what a map given up too late to undo left (an overloaded boot storm); they
    can never be healed (no record says what they were).  [device]."""
    mapper = mapper or NbdMapper(config)
    lost = orphans(mapper.sys_root, mapper.proc_root)
    if not lost:
        return []
    known = {r.cookie for r in _nbd_records(local_state(config))}
    swept = []
    for device, backend in sorted(lost.items()):
        if not backend.startswith(COOKIE_PREFIX) or backend in known:
            continue
        with deadline.budget(deadline.Deadline(ATTACH_BUDGET)):
            disconnect_netlink(device)
            deadline.retry(lambda: mapper._released(device, None), what="the release of %s" % device,
                           give_up=lambda waited: MapperError("%s still connected %.0f s after the disconnect"
                                                              % (device, waited)))
        log.info("upkeep: disconnected %s, left without daemon or record by a map that was given up", device)
        swept.append(device)
    return swept


def follow_sizes(config, cluster, mapper=None):
    """Every block-rbd nbd device of an image that grew, grown (see NbdMapper.follow_size):
    the image's size from the cluster.  [(device, bytes)] of those grown."""
    from ..registry import image_size
    mapper = mapper or NbdMapper(config)
    ours = {(r.device, r.cookie) for r in _nbd_records(local_state(config)) if r.cookie}
    grown = []
    for mapping in mapper.mapped() if ours else ():
        if (mapping.device, mapping.details.get("cookie")) not in ours or mapping.spec.snap:
            continue
        with cluster.ioctx(mapping.spec.pool, mapping.spec.namespace) as ioctx:
            size = image_size(ioctx, mapping.spec)
        before = device_size(mapping.device, mapper.sys_root)
        if size > before:
            grown.append((mapping.device, mapper.follow_size(mapping, size)))
    return grown


def restart(config, cluster, registry, mapper=None):
    """Replace every block-rbd nbd daemon, one device at a time (after an upgrade of Ceph
    in dom0); [(device, old pid, new pid)].  The old daemon exits cleanly (its lock and
    watch go with it), the guest's I/O waits in the kernel meanwhile, the device has a
    heal's request timeout for a while (what the old daemon took last is sent again), and
    the registrations name the new daemon after (Registry.rehome)."""
    state = local_state(config)
    mapper = mapper or NbdMapper(config)
    done = []
    for found in _nbd_records(state):
        with state.lock(found.spec):
            record = state.load(found.spec, found.read_only)
            if record is None or record.mapper != "nbd" or not record.device:
                continue
            if not record.cookie:
                raise MapperError("%s (%s) was mapped by ioctl, without a cookie: its daemon cannot be replaced "
                                  "live; detach and attach the disk" % (record.device, record.image))
            old = mapper.serving(record.device)
            started = time.monotonic()

            def replace():
                if old is not None:
                    terminate(old)  # like `rbd-nbd detach`: the netlink device stays
                    deadline.retry(lambda: mapper._exited(old), what="the exit of rbd-nbd %d" % old,
                                   give_up=lambda waited: MapperError(
                                       "rbd-nbd %d (%s) was still running %.0f s after SIGTERM"
                                       % (old, record.device, waited)))
                pid = mapper.attach(record)
                if not mapper.sets_timeout(record):  # before the registrations: they may fail
                    _resend_held(mapper, record, state, "restart")
                return pid
            with deadline.budget(deadline.Deadline(ATTACH_BUDGET)):
                if record.spec.snap:
                    new = replace()  # snapshots are not registered
                else:
                    new = registry.rehome(cluster, record.spec, list(record.holders), replace, fence=False)
            log.info("restarted the rbd-nbd daemon of %s (%s): %s -> %d in %.1f s", record.device, record.image,
                     old, new, time.monotonic() - started)
            done.append((record.device, old, new))
    return done
