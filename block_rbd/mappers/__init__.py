"""The mappers, and the choice among them.

`auto` prefers krbd (the kernel's client: fastest, no daemon), then rbd-nbd,
then rbd-fuse + loop for kernels with neither.
"""

import logging

from ..errors import MapperUnavailable
from .fuse import FuseMapper
from .krbd import KrbdMapper
from .nbd import NbdMapper

log = logging.getLogger("block-rbd")

MAPPERS = {"krbd": KrbdMapper, "nbd": NbdMapper, "fuse": FuseMapper}
AUTO_ORDER = ("krbd", "nbd", "fuse")


def get(name, config, cluster=None):
    """The mapper called `name` (not checked for availability)."""
    return MAPPERS[name](config, cluster)


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
