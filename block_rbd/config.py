"""The YAML configuration: /etc/xen/block-rbd.yaml, or $BLOCK_RBD_CONFIG.

Hotplug scripts get no options, so the environment is how tests and operators
point at another file.  A missing file means the defaults; an unknown key or a
bad value is an error naming the file and the key.
"""

import math
import os
import reprlib
import socket
import stat
from dataclasses import dataclass
from typing import Any, Dict

from .errors import ConfigError, TargetError

DEFAULT_PATH = "/etc/xen/block-rbd.yaml"
ENV_VAR = "BLOCK_RBD_CONFIG"


# The longest any wait may be: an infinite or absurd one would overflow (or never end)
# where it becomes a kernel, librados or deadline value.
MAX_SECONDS = 3600


def _seconds(value):
    # (compared before isfinite(): a huge int is no float)
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_SECONDS
            and math.isfinite(value))


def _str_list(value):
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _map_options(value):
    """The allow-list of a target's map_options= (each KEY or KEY=VALUE, no leading '-',
    no path): these become kernel map options or rbd-nbd flags."""
    from .target import check_map_option  # pure; imported here to keep config's imports minimal

    if not _str_list(value):
        return False
    try:
        for option in value:
            check_map_option(option)
    except TargetError:
        return False
    return True


def _opt_str(value):
    return value is None or (isinstance(value, str) and value != "")


def _qos(value):
    from .target import parse_qos  # pure; imported here to keep config's imports minimal

    if value is None:
        return True
    if not isinstance(value, str):
        return False
    try:
        parse_qos(value)
    except TargetError:
        return False
    return True


# dotted key -> (default, check, what a good value looks like)
SCHEMA = {
    "ceph.conf": ("/etc/ceph/ceph.conf", lambda v: isinstance(v, str) and v, "a file path"),
    "ceph.id": ("admin", lambda v: isinstance(v, str) and v and not v.startswith("client."),
                "a cephx user name without 'client.'"),
    "ceph.keyring": (None, _opt_str, "a keyring file path"),
    "pool": ("rbd", lambda v: isinstance(v, str) and v, "a pool name"),
    "mapper": ("auto", lambda v: v in ("auto", "krbd", "nbd", "fuse"), "auto, krbd, nbd or fuse"),
    "host": (None, _opt_str, "this dom0's name in the cluster"),
    "state_dir": ("/run/block-rbd", lambda v: isinstance(v, str) and v.startswith("/"), "an absolute path"),
    "ledger_dir": ("/var/lib/block-rbd", lambda v: isinstance(v, str) and v.startswith("/"), "an absolute path"),
    "timeouts.connect": (5, _seconds, "seconds > 0, at most %d" % MAX_SECONDS),
    "timeouts.op": (5, _seconds, "seconds > 0, at most %d" % MAX_SECONDS),
    "timeouts.map": (20, _seconds, "seconds > 0, at most %d" % MAX_SECONDS),
    "timeouts.unmap": (10, _seconds, "seconds > 0, at most %d" % MAX_SECONDS),
    "timeouts.lock": (10, _seconds, "seconds > 0, at most %d" % MAX_SECONDS),
    # libxl SIGKILLs the script at 40 s; we give up (and clean up) before that.
    "timeouts.hotplug": (30, lambda v: _seconds(v) and v <= 35, "seconds, at most 35"),
    "log.file": ("/var/log/xen/xen-hotplug.log", _opt_str, "a file path, or null"),
    "log.syslog": (True, lambda v: isinstance(v, bool), "true or false"),
    "log.verbose": (False, lambda v: isinstance(v, bool), "true or false"),
    "krbd.options": ([], _map_options, "a list of krbd map options (KEY or KEY=VALUE, as map_options=)"),
    "nbd.options": ([], _map_options, "a list of rbd-nbd options (KEY or KEY=VALUE, as map_options=)"),
    "qos": (None, _qos, "null or I/O limits as in a target's qos=, e.g. iops:500+bps:50M"),
    "fuse.mount_dir": ("/run/block-rbd/fuse", lambda v: isinstance(v, str) and v.startswith("/"),
                       "an absolute path"),
    "access.stale": ("refuse", lambda v: v in ("refuse", "fence"), "refuse or fence"),
    "access.exclusive_map": (False, lambda v: isinstance(v, bool), "true or false"),
    # Bound of one cluster-wide access check, waits for a busy check included.
    "access.timeout": (5, _seconds, "seconds > 0, at most %d" % MAX_SECONDS),
}


@dataclass(frozen=True)
class Config:
    values: Dict[str, Any]
    path: str

    def __getitem__(self, key):
        return self.values[key]

    @property
    def host(self):
        return self.values["host"] or socket.gethostname()

    @property
    def keyring(self):
        """The keyring file for ceph.id: the configured one or Ceph's default search.

        Refused (ConfigError) when someone other than root could change it: it
        says which key, so which cluster identity, every map uses.
        """
        path = self.values["ceph.keyring"] or self._keyring_search()
        refuse_untrusted_file(path, ConfigError)
        return path

    def _keyring_search(self):
        user = self.values["ceph.id"]
        for path in ("/etc/ceph/ceph.client.%s.keyring" % user, "/etc/ceph/ceph.keyring",
                     "/etc/ceph/keyring", "/etc/ceph/keyring.bin"):
            if os.path.exists(path):
                return path
        return "/etc/ceph/ceph.client.%s.keyring" % user


# ---- trust: what root's hotplug runs read must be root's alone ----------------------------

def untrusted(path, st, what="", sticky_ok=False):
    """Why `path` (stat result `st`) could be changed by someone other than root, as one
    line; None when it cannot.  Not root's (when running as root; else neither root's nor
    ours), or writable by group or others.  sticky_ok: a directory such as /tmp, whose
    sticky bit keeps others from replacing what is root's in it."""
    mode = stat.S_IMODE(st.st_mode)
    name = "%s %s" % (what, path) if what else path
    if st.st_uid not in (0, os.geteuid()):
        return "%s is owned by uid %d, not root (mode %04o): refusing it" % (name, st.st_uid, mode)
    if mode & 0o022 and not (sticky_ok and stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX):
        return "%s is writable by others (mode %04o): refusing it" % (name, mode)
    return None


def refuse_untrusted_file(path, error, st=None):
    """Raise `error` (one line) if the file `path` or the directory it is in (where it can be
    replaced) could be changed by someone other than root; a missing file is left to its reader."""
    try:
        st = st or os.stat(path)
    except OSError:
        return
    places = [(path, st, False)]
    for directory in dict.fromkeys([os.path.dirname(os.path.abspath(path)),
                                    os.path.dirname(os.path.realpath(path))]):
        try:
            places.append((directory, os.stat(directory), True))
        except OSError:
            continue
    for place, place_st, sticky_ok in places:
        problem = untrusted(place, place_st, sticky_ok=sticky_ok)
        if problem:
            raise error(problem)


# A bad value in an error message, bounded: YAML aliases can make a value of a few bytes
# that is gigabytes once written out in full.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict = 2, 4, 4, 4
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 60, 60, 40
MAX_SHOWN = 120


def shown(value):
    try:
        text = _SHOWN.repr(value)
    except ValueError:  # an int of more digits than Python writes out
        text = "<a %s too long to show>" % type(value).__name__
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def _flatten(data, prefix, path, out):
    if not isinstance(data, dict):
        raise ConfigError("%s: %s must be a mapping" % (path, prefix.rstrip(".") or "the top level"))
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError("%s: key %s%s is not a name" % (path, prefix, shown(key)))
        dotted = prefix + key
        if isinstance(value, dict) and any(k.startswith(dotted + ".") for k in SCHEMA):
            _flatten(value, dotted + ".", path, out)
        else:
            out[dotted] = value


def from_dict(data, path="<dict>"):
    given = {}
    _flatten(data or {}, "", path, given)
    values = {key: default for key, (default, _check, _what) in SCHEMA.items()}
    for key, value in given.items():
        if key not in SCHEMA:
            if any(k.startswith(key + ".") for k in SCHEMA):
                raise ConfigError("%s: %s must be a mapping (got %s)" % (path, key, shown(value)))
            raise ConfigError("%s: unknown key %s" % (path, shown(key)))
        _default, check, what = SCHEMA[key]
        if not check(value):
            raise ConfigError("%s: %s = %s: expected %s" % (path, key, shown(value), what))
        values[key] = value
    return Config(values, path)


def load(path=None):
    """Load the configuration from `path`, $BLOCK_RBD_CONFIG or the default file.

    A file someone other than root could change (or could replace: its directory) is
    refused: it chooses the ceph.conf, the keyring and the options of every map.
    """
    named = path or os.environ.get(ENV_VAR)
    path = named or DEFAULT_PATH
    try:
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            raw = handle.read()
    except FileNotFoundError:
        # No file at the default place means defaults; a file someone named
        # but that is not there is a mistake worth saying.
        if named:
            raise ConfigError("%s does not exist" % path) from None
        return from_dict({}, path)
    except OSError as exc:
        raise ConfigError("%s: %s" % (path, exc.strerror)) from None
    refuse_untrusted_file(path, ConfigError, st)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError("%s: line %d: not UTF-8 text (byte 0x%02x)" % (path, line, raw[exc.start])) from None
    cached = _parsed.get(path)
    if cached is not None and cached[0] == text:
        return cached[1]  # the service reads the file for every run; parse it once
    import yaml  # only when there is a file to read: keeps `remove` start-up lean

    try:
        data = yaml.load(text, Loader=_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = " line %d" % (mark.line + 1) if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError("%s:%s: not valid YAML: %s" % (path, where, shown_text(problem))) from None
    except ValueError as exc:  # a value PyYAML cannot build, e.g. an int of more than 4300 digits
        raise ConfigError("%s: not valid YAML: %s" % (path, shown_text(exc))) from None
    except (LookupError, AttributeError) as exc:  # PyYAML's own slip on a tag: `!!bool x`, `!!timestamp x`
        raise ConfigError("%s: not valid YAML: a value its tag cannot build (%s: %s)"
                          % (path, type(exc).__name__, shown_text(exc))) from None
    except RecursionError:  # PyYAML composes and builds recursively: "[[[[..." of a few KiB
        raise ConfigError("%s: not valid YAML: nested too deeply" % path) from None
    config = from_dict(data, path)
    _parsed[path] = (text, config)
    return config


def shown_text(text):
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


_LOADER = []


def _loader():
    """yaml.SafeLoader without aliases: nothing in this file needs one, and a few of them
    nested make a value of a few bytes that is gigabytes in full ("billion laughs")."""
    if not _LOADER:
        import yaml

        class Loader(yaml.SafeLoader):
            def compose_node(self, parent, index):
                if self.check_event(yaml.AliasEvent):
                    event = self.peek_event()
                    raise yaml.composer.ComposerError(
                        None, None, "alias *%s: YAML aliases are not allowed here" % event.anchor,
                        event.start_mark)
                return super().compose_node(parent, index)

        _LOADER.append(Loader)
    return _LOADER[0]


_parsed = {}  # path -> (the text last parsed, its Config); Config is immutable
