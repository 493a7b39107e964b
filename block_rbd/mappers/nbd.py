"""rbd-nbd: librbd in a userspace daemon behind the kernel's nbd driver.

For images whose features the kernel's rbd driver lacks, and for kernels
without rbd.  The daemon authenticates with --id/--keyring: no secret in argv.
"""

import glob
import logging
import os
import shutil

from .. import process
from ..errors import CommandError, MapperError, TargetError
from ..target import parse_spec
from .base import Mapper, Mapping, block_read_only

log = logging.getLogger("block-rbd")


# rbd-nbd's own options, and Ceph's common ones, that take the next word as their value.
_VALUED = frozenset((
    "-c", "--conf", "-i", "--id", "-n", "--name", "-k", "--keyring", "--cluster", "--device",
    "--nbds_max", "--max_part", "--timeout", "--io-timeout", "--reattach-timeout",
    "--encryption-format", "--encryption-passphrase-file", "--cookie", "--snap-id",
    "--quiesce-hook", "--format"))


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


def option_args(options):
    """krbd-style "key=value" options as rbd-nbd flags, the way `rbd device map -t nbd` does."""
    args = []
    for option in options:
        key, sep, value = option.partition("=")
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
            result = process.run(self.map_argv(spec, read_only, options))
        except CommandError as exc:
            raise MapperError("rbd-nbd map of %s failed: %s" % (spec, process.last_line(exc.stderr) or exc)) from None
        device = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        if not device.startswith("/dev/nbd"):
            raise MapperError("rbd-nbd map of %s printed no device" % spec)
        log.info("rbd-nbd mapped %s at %s", spec, device)
        return Mapping(self.name, spec, read_only, device, {})

    def unmap(self, mapping):
        if not any(m.device == mapping.device for m in self.mapped()):
            return  # already gone
        try:
            process.run(["rbd-nbd", "unmap", mapping.device])
        except CommandError as exc:
            raise MapperError("rbd-nbd unmap of %s failed: %s" % (mapping.device, exc)) from None
        log.info("rbd-nbd unmapped %s (%s)", mapping.device, mapping.spec)
