"""rbd-nbd: librbd in a userspace daemon behind the kernel's nbd driver.

For images whose features the kernel's rbd driver lacks, and for kernels
without rbd.  The daemon authenticates with --id/--keyring: no secret in argv.
"""

import json
import logging
import os
import shutil

from .. import process
from ..errors import CommandError, MapperError
from ..target import ImageSpec
from .base import Mapper, Mapping, block_read_only

log = logging.getLogger("block-rbd")


def parse_list_mapped(text, sys_root="/sys"):
    """Mappings from `rbd-nbd list-mapped --format json` output."""
    try:
        entries = json.loads(text or "[]")
    except ValueError:
        raise MapperError("rbd-nbd list-mapped printed something that is not JSON") from None
    mappings = []
    for entry in entries:
        snap = entry.get("snap") or None
        device = entry["device"]
        spec = ImageSpec(entry["pool"], entry["image"], entry.get("namespace", ""),
                         None if snap in (None, "-") else snap)
        mappings.append(Mapping("nbd", spec, block_read_only(os.path.basename(device), sys_root),
                                device, {"pid": entry.get("id")}))
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

    def __init__(self, config, cluster=None, sys_root="/sys"):
        super().__init__(config, cluster)
        self.sys_root = sys_root

    def unavailable(self):
        if not shutil.which("rbd-nbd"):
            return "rbd-nbd is not installed (apt-get install rbd-nbd)"
        if not os.path.isdir(os.path.join(self.sys_root, "module", "nbd")):
            try:
                process.run(["modprobe", "nbd"], timeout=self.config["timeouts.map"])
            except CommandError as exc:
                return "no nbd driver in this kernel (%s)" % exc
        return None

    def _common(self):
        cfg = self.config
        return ["-c", cfg["ceph.conf"], "--id", cfg["ceph.id"], "--keyring", cfg.keyring]

    def mapped(self):
        result = process.run(["rbd-nbd", "list-mapped", "--format", "json"],
                             timeout=self.config["timeouts.op"])
        return parse_list_mapped(result.stdout, self.sys_root)

    def map_argv(self, spec, read_only, options):
        argv = ["rbd-nbd", "map"] + self._common()
        if read_only:
            argv.append("--read-only")
        argv += option_args(list(self.config["nbd.options"]) + list(options))
        return argv + [str(spec)]

    def _map(self, spec, read_only, options):
        try:
            result = process.run(self.map_argv(spec, read_only, options), timeout=self.config["timeouts.map"])
        except CommandError as exc:
            raise MapperError("rbd-nbd map of %s failed: %s" % (spec, process.first_line(exc.stderr) or exc)) from None
        device = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        if not device.startswith("/dev/nbd"):
            raise MapperError("rbd-nbd map of %s printed no device" % spec)
        log.info("rbd-nbd mapped %s at %s", spec, device)
        return Mapping(self.name, spec, read_only, device, {})

    def unmap(self, mapping):
        if not any(m.device == mapping.device for m in self.mapped()):
            return  # already gone
        try:
            process.run(["rbd-nbd", "unmap", mapping.device], timeout=self.config["timeouts.unmap"])
        except CommandError as exc:
            raise MapperError("rbd-nbd unmap of %s failed: %s" % (mapping.device, exc)) from None
        log.info("rbd-nbd unmapped %s (%s)", mapping.device, mapping.spec)
