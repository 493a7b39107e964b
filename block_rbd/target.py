"""The target grammar: what follows `target=` in a domU disk line.

    [POOL:]IMAGE[@SNAP][,KEY=VALUE]...
    POOL/IMAGE[@SNAP][,KEY=VALUE]...
    POOL/NAMESPACE/IMAGE[@SNAP][,KEY=VALUE]...

`rbd:vm1` (the original block-rbd form) is pool `rbd`, image `vm1`.  A bare
IMAGE uses the configured default pool.  Options:

    mode=r|w|r!|w!        overrides libxl's mode (xl itself rejects `!`)
    mapper=krbd|nbd|fuse  overrides the configured mapper
    clone=POOL/IMAGE@SNAP create the image as a clone of SNAP if missing
    size=10G              grow a new clone to this size (K, M, G, T: powers of 1024)
    map_options=A+B=1     extra krbd/rbd-nbd map options, joined by `+`
    qos=iops:500+bps:50M  I/O limits of this disk (librbd's, so rbd-nbd only);
                          qos=none drops the configured default

Pure functions only: no I/O, so every rule is unit-tested exhaustively.
"""

import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .errors import TargetError

MODES = ("r", "w", "r!", "w!")
MAPPERS = ("krbd", "nbd", "fuse")

# Ceph's own spec syntax reserves '/' and '@'; ours adds ':' and ','.  krbd's
# sysfs interface is whitespace-separated, so whitespace can never work either.
_BAD_NAME_CHARS = re.compile(r"[/@:,\s\x00-\x1f\x7f]")
# librbd caps image names well below this; the kernel's sysfs line and file
# names on this host need a bound too.
MAX_NAME = 255
# librbd's limits and sizes are 64-bit: 20 digits at most (int() refuses over 4300)
MAX_DIGITS = 20
_SIZE = re.compile(r"^([0-9]+)([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_MAP_OPTION = re.compile(r"[a-z0-9_]+(=[A-Za-z0-9_.\-]+)?")
# What block-rbd sets itself (the cephx identity, the cluster, its files and devices):
# an option of these names would override it.
RESERVED_OPTIONS = frozenset(("name", "id", "key", "keyfile", "keyring", "secret", "conf", "cluster",
                              "mon_host", "cookie", "device", "log_file", "admin_socket", "_pool_ns"))

# qos= keys -> librbd's limit options.  *iops: operations per second; *bps: bytes per
# second (K, M, G suffixes: powers of 1024).
QOS_LIMITS = {
    "iops": "rbd_qos_iops_limit", "read_iops": "rbd_qos_read_iops_limit",
    "write_iops": "rbd_qos_write_iops_limit", "bps": "rbd_qos_bps_limit",
    "read_bps": "rbd_qos_read_bps_limit", "write_bps": "rbd_qos_write_bps_limit",
}


@dataclass(frozen=True)
class ImageSpec:
    """One image (or one snapshot of it) in one pool and namespace."""

    pool: str
    image: str
    namespace: str = ""
    snap: Optional[str] = None

    def __str__(self):
        parts = [self.pool] + ([self.namespace] if self.namespace else []) + [self.image]
        return "/".join(parts) + ("@" + self.snap if self.snap else "")

    @property
    def key(self):
        """A file-name-safe, unique identity (lock and state files)."""
        return urllib.parse.quote(str(self), safe="")

    def head(self):
        """The same image without the snapshot."""
        return ImageSpec(self.pool, self.image, self.namespace, None)


@dataclass(frozen=True)
class Target:
    spec: ImageSpec
    mode: Optional[str] = None
    mapper: Optional[str] = None
    clone: Optional[ImageSpec] = None
    size: Optional[int] = None
    map_options: Tuple[str, ...] = field(default_factory=tuple)
    # None: the configured default applies; (): no limits (qos=none)
    qos: Optional[Tuple[Tuple[str, int], ...]] = None


def check_name(kind, name):
    """Raise TargetError unless `name` is a valid Ceph pool/namespace/image/snap name."""
    if not name:
        raise TargetError("empty %s name" % kind)
    bad = _BAD_NAME_CHARS.search(name)
    if bad:
        raise TargetError("%s name %r contains %r, which is not allowed" % (kind, name, bad.group()))
    if len(name.encode()) > MAX_NAME:
        raise TargetError("%s name is longer than %d bytes" % (kind, MAX_NAME))
    if name in (".", ".."):
        raise TargetError("%s name %r is not allowed" % (kind, name))
    if name.startswith("-"):
        # rbd-nbd and rbd-fuse take the spec as an argument: it would read as an option
        raise TargetError("%s name %r starts with '-', which is not allowed" % (kind, name))
    return name


def parse_spec(text, default_pool=None):
    """Parse `POOL:IMAGE[@SNAP]`, `POOL/[NS/]IMAGE[@SNAP]` or `IMAGE[@SNAP]`."""
    text = text.strip()
    if not text:
        raise TargetError("no image named")
    namespace = ""
    if ":" in text:
        pool, rest = text.split(":", 1)
        if "/" in rest:
            raise TargetError("%r: the POOL:IMAGE form takes no namespace; write POOL/NAMESPACE/IMAGE" % text)
    elif "/" in text:
        parts = text.split("/")
        if len(parts) > 3:
            raise TargetError("%r: too many '/' (expected POOL/IMAGE or POOL/NAMESPACE/IMAGE)" % text)
        if len(parts) == 3:
            pool, namespace, rest = parts
            check_name("namespace", namespace)
        else:
            pool, rest = parts
    else:
        if not default_pool:
            raise TargetError("%r names no pool and no default pool is configured" % text)
        pool, rest = default_pool, text
    check_name("pool", pool)
    snap = None
    if "@" in rest:
        rest, snap = rest.split("@", 1)
        check_name("snapshot", snap)
    check_name("image", rest)
    return ImageSpec(pool, rest, namespace, snap)


def parse_size(text):
    match = _SIZE.match(text.strip())
    if not match or len(match.group(1)) > MAX_DIGITS or int(match.group(1)) == 0:
        raise TargetError("size=%s: expected a positive number with an optional K, M, G or T suffix" % text)
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def _mode(value, _pool):
    if value not in MODES:
        raise TargetError("mode=%s: expected one of %s" % (value, ", ".join(MODES)))
    return value


def _mapper(value, _pool):
    if value not in MAPPERS:
        raise TargetError("mapper=%s: expected one of %s" % (value, ", ".join(MAPPERS)))
    return value


def _clone(value, pool):
    spec = parse_spec(value, pool)
    if not spec.snap:
        raise TargetError("clone=%s: name the golden snapshot as POOL/IMAGE@SNAP" % value)
    return spec


def check_map_option(option):
    """Raise TargetError unless `option` is KEY or KEY=VALUE of the allow-list (no leading
    '-', no '/', no ',' or space): it becomes a kernel map option or an rbd-nbd flag."""
    if not isinstance(option, str) or not _MAP_OPTION.fullmatch(option):
        raise TargetError("map_options: %r is not a valid map option" % (option,))
    if option.partition("=")[0] in RESERVED_OPTIONS:
        raise TargetError("map_options: %r sets what block-rbd sets itself (identity, cluster, files): "
                          "not allowed" % option)
    return option


def _map_options(value, _pool):
    return tuple(check_map_option(o) for o in value.split("+"))


def parse_qos(text):
    """`iops:500+bps:50M` -> (("iops", 500), ("bps", 52428800)); `none` -> ()."""
    text = text.strip()
    if text == "none":
        return ()
    limits = {}
    for item in text.split("+"):
        key, sep, value = (part.strip() for part in item.partition(":"))
        if key not in QOS_LIMITS or not sep:
            raise TargetError("qos=%s: %r is not LIMIT:VALUE with LIMIT one of %s (or qos=none)"
                              % (text, item, ", ".join(QOS_LIMITS)))
        if key in limits:
            raise TargetError("qos=%s: %s given twice" % (text, key))
        if key.endswith("iops"):
            # ASCII digits only ("\u00b2".isdigit() too, and int() refuses it), not past 64 bits
            if not (value.isascii() and value.isdigit()) or len(value) > MAX_DIGITS or int(value) == 0:
                raise TargetError("qos=%s: %s:%s: expected a positive number of operations per second"
                                  % (text, key, value))
            limits[key] = int(value)
        else:
            try:
                limits[key] = parse_size(value)
            except TargetError:
                raise TargetError("qos=%s: %s:%s: expected bytes per second, e.g. 50M" % (text, key, value)) from None
    return tuple(limits.items())


def qos_options(qos):
    """librbd config options ("rbd_qos_iops_limit=500", ...) for parsed qos limits."""
    return tuple("%s=%d" % (QOS_LIMITS[key], value) for key, value in qos or ())


def format_qos(qos):
    return "+".join("%s:%d" % item for item in qos) if qos else "none"


# key -> (Target field, parser(value, default_pool)); new options go here.
OPTIONS = {
    "mode": ("mode", _mode),
    "mapper": ("mapper", _mapper),
    "clone": ("clone", _clone),
    "size": ("size", lambda value, _pool: parse_size(value)),
    "map_options": ("map_options", _map_options),
    "qos": ("qos", lambda value, _pool: parse_qos(value)),
}


def parse(text, default_pool="rbd"):
    """Parse a whole target string into a Target; TargetError names the fault."""
    if text is None or not text.strip():
        raise TargetError("empty target: expected POOL:IMAGE or POOL/IMAGE")
    head, *options = text.strip().split(",")
    spec = parse_spec(head, default_pool)
    values = {}
    for option in options:
        option = option.strip()
        if not option:
            raise TargetError("empty option in target %r" % text.strip())
        if "=" not in option:
            raise TargetError("option %r in target: expected KEY=VALUE" % option)
        key, value = (part.strip() for part in option.split("=", 1))
        if key not in OPTIONS:
            raise TargetError("unknown option %r in target (known: %s)" % (key, ", ".join(sorted(OPTIONS))))
        attr, parser = OPTIONS[key]
        if attr in values:
            raise TargetError("option %r given twice in target" % key)
        if not value:
            raise TargetError("option %r in target has an empty value" % key)
        values[attr] = parser(value, spec.pool)
    if "size" in values and "clone" not in values:
        raise TargetError("size= only applies with clone=")
    return Target(spec=spec, **values)


def effective_mode(target, xl_mode):
    """The access mode: the target's mode= wins over libxl's `r`/`w`."""
    if target.mode:
        return target.mode
    if xl_mode not in ("r", "w"):
        raise TargetError("libxl mode %r: expected r or w" % xl_mode)
    return xl_mode


def read_only(mode):
    return mode.startswith("r")
