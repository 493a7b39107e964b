"""Per-host upkeep of live mappings: `block-rbd upkeep` (a systemd service on a dom0).

Every round (2 s), from local files (the cluster only to fence a dead daemon):
- an rbd-nbd daemon serving a block-rbd disk that is gone (killed, crashed, an
  upgrade of Ceph in dom0) gets a new one attached to the same device, long
  before the kernel gives up on it (rbd-nbd's reattach timeout): the guest sees
  a pause, not an I/O error;
- a loop device on rbd-fuse whose image grew (`block-rbd resize` on any host)
  follows it;
- a netlink nbd device of ours left with neither daemon nor record (a map given up
  too late to undo in its run's budget) is disconnected;
- the request timeout a heal or `block-rbd restart-nbd` gave an nbd device ends
  40 s after (on file under state_dir: a restart-nbd run sets it, upkeep ends it).
Every SIZE_EVERY rounds, through the cluster: an nbd device whose image grew
follows it (rbd-nbd 16.2's own netlink resize is refused by the kernel; krbd
follows by itself).  One log line per recovery or change; none while all is well.
"""

import logging
import time

from . import attachments
from .cluster import Cluster
from .errors import BlockRbdError
from .registry import Registry

log = logging.getLogger("block-rbd")

INTERVAL = 2.0
SIZE_EVERY = 15  # 30 s: two small ops per nbd disk, kept off a boot storm's CPU


def once(config, cluster=None, sizes=False):
    """One round; `sizes`: also the nbd size check.  The cluster (connected on first
    use) serves a heal's fencing and that check.  A step's failure is logged and the
    other steps still run."""
    from .mappers import nbd
    steps = [("heal", lambda: nbd.heal(config, cluster, Registry(config) if cluster else None)),
             ("fuse sizes", lambda: attachments.follow_size(config, names=("fuse",))),
             ("nbd leftovers", lambda: nbd.sweep(config)),
             ("nbd request timeouts", lambda: nbd.end_request_timeouts(config))]
    if sizes and cluster is not None:
        steps.append(("nbd sizes", lambda: nbd.follow_sizes(config, cluster)))
    for name, step in steps:
        try:
            step()
        except (BlockRbdError, OSError) as exc:
            if _failing.get(name) != str(exc):  # once per outage, not every round
                log.error("upkeep: %s: %s", name, exc)
            _failing[name] = str(exc)
        else:
            if _failing.pop(name, None) is not None:
                log.info("upkeep: %s works again", name)


_failing = {}  # step -> the error it last logged


def run(config, interval=INTERVAL, rounds=None):
    """Rounds every `interval` seconds, forever (or `rounds` times)."""
    done = 0
    with Cluster(config) as cluster:  # connects on first use, in the first size check
        while rounds is None or done < rounds:
            started = time.monotonic()
            once(config, cluster, sizes=done % SIZE_EVERY == 0)
            done += 1
            if rounds is None or done < rounds:
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
