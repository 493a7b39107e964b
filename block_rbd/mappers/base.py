"""What every mapper offers: idempotent map, bounded unmap, discovery.

A mapper turns an image (or snapshot) into a block device in dom0.  Discovery
reads what the kernel or the mapper's own tool says is mapped, so `remove` can
undo a mapping even when `add` was killed before recording it.
"""

import abc
import os
from dataclasses import dataclass, field

from .. import deadline
from ..errors import DeviceBusy


@dataclass
class Mapping:
    mapper: str
    spec: "object"  # target.ImageSpec
    read_only: bool
    device: str
    details: dict = field(default_factory=dict)


def device_numbers(device):
    """(major, minor) of a block device node."""
    st = os.stat(device)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def block_read_only(name, sys_root="/sys"):
    """Whether /sys/block/NAME says the device is read-only."""
    try:
        with open(os.path.join(sys_root, "block", name, "ro")) as handle:
            return handle.read().strip() == "1"
    except OSError:
        return False


def device_size(device, sys_root="/sys"):
    """The size of /dev/NAME in bytes, from /sys/block/NAME/size (512-byte sectors)."""
    with open(os.path.join(sys_root, "block", os.path.basename(device), "size")) as handle:
        return int(handle.read().strip()) * 512


def retry_busy(attempt, cap, what):
    """Call attempt() until it returns True, for at most `cap` seconds of the run's budget.

    The first retries come quickly (a loop device lets go of its file a moment
    after its detach), then every 250 ms, as Ceph's own krbd unmap retries.
    """
    deadline.retry(attempt, what=what, cap=cap, interval=0.02, max_interval=0.25,
                   give_up=lambda waited: DeviceBusy(
                       "%s is still in use after %.0f s; close it (or stop the guest) and retry" % (what, waited)))


class Mapper(abc.ABC):
    """One transport from an RBD image to a dom0 block device."""

    name = None
    sys_root = "/sys"

    def __init__(self, config, cluster=None):
        self.config = config
        self.cluster = cluster

    @abc.abstractmethod
    def unavailable(self):
        """None when this host can use the mapper, else the reason (one line)."""

    @abc.abstractmethod
    def mapped(self):
        """Every mapping of this mapper on this host."""

    @abc.abstractmethod
    def _map(self, spec, read_only, options):
        """Create a new mapping; returns a Mapping."""

    @abc.abstractmethod
    def unmap(self, mapping):
        """Remove the mapping, retrying a busy device for timeouts.unmap seconds."""

    def follow_size(self, mapping, size=None):
        """Make the device follow its image's size (`size`, when the caller knows it);
        the device's size in bytes.  krbd follows the image header by itself.
        """
        return device_size(mapping.device, self.sys_root)

    def discard_partial(self, spec, read_only):
        """Undo what a map killed half-way left short of a mapping (nothing, for a one-step map)."""

    def find(self, spec, read_only):
        for mapping in self.mapped():
            if mapping.spec == spec and mapping.read_only == read_only:
                return mapping
        return None

    def map(self, spec, read_only, options=()):
        """Map, or return the existing mapping of the same image, snapshot and mode."""
        existing = self.find(spec, read_only)
        if existing is not None:
            return existing
        return self._map(spec, read_only, tuple(options))
