"""The mappers, and the choice among them.

`auto` prefers krbd (the kernel's client: fastest, no daemon), then rbd-nbd,
then rbd-fuse + loop for kernels with neither.
"""

import importlib
import logging

from ..errors import MapperUnavailable

log = logging.getLogger("block-rbd")

# name -> (module, class); imported on first use to keep hotplug start-up lean.
MAPPERS = {"krbd": ("krbd", "KrbdMapper"), "nbd": ("nbd", "NbdMapper"), "fuse": ("fuse", "FuseMapper")}
AUTO_ORDER = ("krbd", "nbd", "fuse")


def get(name, config, cluster=None):
    """The mapper called `name` (not checked for availability)."""
    module, cls = MAPPERS[name]
    return getattr(importlib.import_module("." + module, __name__), cls)(config, cluster)


def choose(config, requested=None, cluster=None):
    """The mapper to use: the target's, else the configured one, else the first available."""
    wanted = requested or config["mapper"]
    if wanted != "auto":
        mapper = get(wanted, config, cluster)
        reason = mapper.unavailable()
        if reason:
            raise MapperUnavailable("mapper %s is not usable here: %s" % (wanted, reason))
        return mapper
    reasons = []
    for name in AUTO_ORDER:
        mapper = get(name, config, cluster)
        reason = mapper.unavailable()
        if reason is None:
            log.info("mapper auto: using %s%s", name,
                     " (%s)" % "; ".join(reasons) if reasons else "")
            return mapper
        reasons.append("%s: %s" % (name, reason))
    raise MapperUnavailable("no mapper is usable here: " + "; ".join(reasons))
