"""The YAML configuration: /etc/xen/block-rbd.yaml, or $BLOCK_RBD_CONFIG.

Hotplug scripts get no options, so the environment is how tests and operators
point at another file.  A missing file means the defaults; an unknown key or a
bad value is an error naming the file and the key.
"""

import os
import socket
from dataclasses import dataclass
from typing import Any, Dict

from .errors import ConfigError, TargetError

DEFAULT_PATH = "/etc/xen/block-rbd.yaml"
ENV_VAR = "BLOCK_RBD_CONFIG"


def _positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _str_list(value):
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


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
    "timeouts.connect": (5, _positive, "seconds > 0"),
    "timeouts.op": (5, _positive, "seconds > 0"),
    "timeouts.map": (20, _positive, "seconds > 0"),
    "timeouts.unmap": (10, _positive, "seconds > 0"),
    "timeouts.lock": (10, _positive, "seconds > 0"),
    # libxl SIGKILLs the script at 40 s; we give up (and clean up) before that.
    "timeouts.hotplug": (30, lambda v: _positive(v) and v <= 35, "seconds, at most 35"),
    "log.file": ("/var/log/xen/xen-hotplug.log", _opt_str, "a file path, or null"),
    "log.syslog": (True, lambda v: isinstance(v, bool), "true or false"),
    "log.verbose": (False, lambda v: isinstance(v, bool), "true or false"),
    "krbd.options": ([], _str_list, "a list of krbd map options"),
    "nbd.options": ([], _str_list, "a list of rbd-nbd options"),
    "qos": (None, _qos, "null or I/O limits as in a target's qos=, e.g. iops:500+bps:50M"),
    "fuse.mount_dir": ("/run/block-rbd/fuse", lambda v: isinstance(v, str) and v.startswith("/"),
                       "an absolute path"),
    "access.stale": ("refuse", lambda v: v in ("refuse", "fence"), "refuse or fence"),
    "access.exclusive_map": (False, lambda v: isinstance(v, bool), "true or false"),
    # Bound of one cluster-wide access check, waits for a busy check included.
    "access.timeout": (5, _positive, "seconds > 0"),
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
        """The keyring file for ceph.id: the configured one or Ceph's default search."""
        if self.values["ceph.keyring"]:
            return self.values["ceph.keyring"]
        user = self.values["ceph.id"]
        for path in ("/etc/ceph/ceph.client.%s.keyring" % user, "/etc/ceph/ceph.keyring",
                     "/etc/ceph/keyring", "/etc/ceph/keyring.bin"):
            if os.path.exists(path):
                return path
        return "/etc/ceph/ceph.client.%s.keyring" % user


def _flatten(data, prefix, path, out):
    if not isinstance(data, dict):
        raise ConfigError("%s: %s must be a mapping" % (path, prefix.rstrip(".") or "the top level"))
    for key, value in data.items():
        dotted = prefix + str(key)
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
                raise ConfigError("%s: %s must be a mapping (got %r)" % (path, key, value))
            raise ConfigError("%s: unknown key %r" % (path, key))
        _default, check, what = SCHEMA[key]
        if not check(value):
            raise ConfigError("%s: %s = %r: expected %s" % (path, key, value, what))
        values[key] = value
    return Config(values, path)


def load(path=None):
    """Load the configuration from `path`, $BLOCK_RBD_CONFIG or the default file."""
    named = path or os.environ.get(ENV_VAR)
    path = named or DEFAULT_PATH
    try:
        with open(path) as handle:
            text = handle.read()
    except FileNotFoundError:
        # No file at the default place means defaults; a file someone named
        # but that is not there is a mistake worth saying.
        if named:
            raise ConfigError("%s does not exist" % path) from None
        return from_dict({}, path)
    except OSError as exc:
        raise ConfigError("%s: %s" % (path, exc.strerror)) from None
    cached = _parsed.get(path)
    if cached is not None and cached[0] == text:
        return cached[1]  # the service reads the file for every run; parse it once
    import yaml  # only when there is a file to read: keeps `remove` start-up lean

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = " line %d" % (mark.line + 1) if mark else ""
        raise ConfigError("%s:%s: not valid YAML: %s" % (path, where, getattr(exc, "problem", exc))) from None
    config = from_dict(data, path)
    _parsed[path] = (text, config)
    return config


_parsed = {}  # path -> (the text last parsed, its Config); Config is immutable
