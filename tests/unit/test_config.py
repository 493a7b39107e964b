"""The YAML configuration (block_rbd/config.py): defaults, the file's place, every fault."""

import os
import socket

import pytest

from block_rbd import config as config_mod
from block_rbd.config import DEFAULT_PATH, ENV_VAR, SCHEMA, from_dict, load
from block_rbd.errors import ConfigError


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def write(tmp_path, text, name="block-rbd.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- defaults -------------------------------------------------------------------------

def test_defaults():
    cfg = from_dict({})
    assert cfg["ceph.conf"] == "/etc/ceph/ceph.conf"
    assert cfg["ceph.id"] == "admin"
    assert cfg["ceph.keyring"] is None
    assert cfg["pool"] == "rbd"
    assert cfg["mapper"] == "auto"
    assert cfg["state_dir"] == "/run/block-rbd"
    assert cfg["log.file"] == "/var/log/xen/xen-hotplug.log"
    assert cfg["log.syslog"] is True and cfg["log.verbose"] is False
    assert cfg["krbd.options"] == [] and cfg["nbd.options"] == []
    assert cfg["fuse.mount_dir"] == "/run/block-rbd/fuse"
    # every Ceph call is bounded, and the whole run ends before libxl's 40 s SIGKILL
    assert 0 < cfg["timeouts.hotplug"] < 40
    for key in ("connect", "op", "map", "unmap", "lock"):
        assert cfg["timeouts." + key] > 0
    assert cfg.host == socket.gethostname()
    assert set(cfg.values) == set(SCHEMA)


def test_none_and_empty_document_mean_defaults(tmp_path):
    assert load(write(tmp_path, "")).values == from_dict({}).values
    assert load(write(tmp_path, "# only a comment\n")).values == from_dict({}).values


def test_missing_default_file_means_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", str(tmp_path / "absent.yaml"))
    cfg = load()
    assert cfg.values == from_dict({}).values
    assert cfg.path == str(tmp_path / "absent.yaml")


def test_default_path():
    assert DEFAULT_PATH == "/etc/xen/block-rbd.yaml"
    assert ENV_VAR == "BLOCK_RBD_CONFIG"


def test_environment_names_the_file(monkeypatch, tmp_path):
    path = write(tmp_path, "pool: tank\nceph:\n  id: dom0a\n")
    monkeypatch.setenv(ENV_VAR, path)
    cfg = load()
    assert cfg.path == path
    assert cfg["pool"] == "tank" and cfg["ceph.id"] == "dom0a"
    assert cfg["mapper"] == "auto"  # the rest stays at the defaults


def test_explicit_path_wins_over_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, write(tmp_path, "pool: fromenv\n", "env.yaml"))
    assert load(write(tmp_path, "pool: explicit\n"))["pool"] == "explicit"


def test_named_file_that_is_missing_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load()


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="%s: Is a directory" % tmp_path):
        load(str(tmp_path))


def test_full_file(tmp_path):
    path = write(tmp_path, """
ceph:
  conf: /etc/ceph/other.conf
  id: dom0a
  keyring: /etc/ceph/dom0a.keyring
pool: tank
mapper: fuse
host: dom0-a
state_dir: /run/x
timeouts: {connect: 2, op: 3.5, map: 7, unmap: 8, lock: 9, hotplug: 35}
log: {file: null, syslog: false, verbose: true}
krbd: {options: [queue_depth=128, ms_mode=secure]}
nbd: {options: [try_netlink]}
fuse: {mount_dir: /run/y}
access: {stale: fence, exclusive_map: true}
""")
    cfg = load(path)
    assert cfg["ceph.conf"] == "/etc/ceph/other.conf"
    assert cfg.keyring == "/etc/ceph/dom0a.keyring"
    assert cfg.host == "dom0-a"
    assert cfg["timeouts.op"] == 3.5 and cfg["timeouts.hotplug"] == 35
    assert cfg["log.file"] is None and cfg["log.verbose"] is True
    assert cfg["krbd.options"] == ["queue_depth=128", "ms_mode=secure"]
    assert cfg["access.stale"] == "fence"


def test_keyring_search_follows_ceph(tmp_path, monkeypatch):
    cfg = from_dict({"ceph": {"id": "dom0a"}})
    # nothing exists: Ceph's first candidate, so the error names a sensible file
    monkeypatch.setattr(os.path, "exists", lambda p: False)
    assert cfg.keyring == "/etc/ceph/ceph.client.dom0a.keyring"
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/etc/ceph/ceph.keyring")
    assert cfg.keyring == "/etc/ceph/ceph.keyring"


# ---- faults: the file and the key are named -------------------------------------------

@pytest.mark.parametrize("text, fault", [
    ("colour: red\n", "unknown key 'colour'"),
    ("ceph:\n  user: x\n", "unknown key 'ceph.user'"),
    ("timeouts:\n  forever: 1\n", "unknown key 'timeouts.forever'"),
    ("mapper: rbd-nbd\n", "mapper = 'rbd-nbd': expected auto, krbd, nbd or fuse"),
    ("ceph:\n  id: client.admin\n", "ceph.id = 'client.admin': expected a cephx user name without 'client.'"),
    ("ceph:\n  id: ''\n", "ceph.id = '': expected"),
    ("ceph:\n  conf: 7\n", "ceph.conf = 7: expected a file path"),
    ("ceph: /etc/ceph\n", "ceph must be a mapping"),
    ("timeouts: 5\n", "timeouts must be a mapping"),
    ("pool: ''\n", "pool = '': expected a pool name"),
    ("timeouts:\n  op: 0\n", "timeouts.op = 0: expected seconds > 0"),
    ("timeouts:\n  op: -1\n", "timeouts.op = -1: expected seconds > 0"),
    ("timeouts:\n  op: five\n", "timeouts.op = 'five': expected seconds > 0"),
    ("timeouts:\n  op: true\n", "timeouts.op = True: expected seconds > 0"),
    ("timeouts:\n  hotplug: 40\n", "timeouts.hotplug = 40: expected seconds, at most 35"),
    ("state_dir: run/x\n", "state_dir = 'run/x': expected an absolute path"),
    ("fuse:\n  mount_dir: rel\n", "fuse.mount_dir = 'rel': expected an absolute path"),
    ("log:\n  syslog: 'yes'\n", "log.syslog = 'yes': expected true or false"),
    ("krbd:\n  options: queue_depth=1\n", "krbd.options = 'queue_depth=1': expected a list of krbd map options"),
    ("krbd:\n  options: ['']\n", "krbd.options = \\[''\\]: expected"),
    ("access:\n  stale: kill\n", "access.stale = 'kill': expected refuse or fence"),
    ("host: ''\n", "host = '': expected this dom0's name"),
    ("- a\n- b\n", "the top level must be a mapping"),
    ("just a string\n", "the top level must be a mapping"),
])
def test_bad_files_name_file_and_key(tmp_path, text, fault):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=fault) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(path + ":")
    assert "\n" not in message


@pytest.mark.parametrize("text, line", [
    ("pool: [rbd\n", None),
    ("pool: rbd\nmapper: fuse\n  bad: indent\n", 3),
    ("a: b: c\n", 1),
    ("\t- tab\n", 1),
])
def test_invalid_yaml(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load(path)
    message = str(info.value)
    assert message.startswith(path + ":")
    assert "\n" not in message
    if line:
        assert ("line %d" % line) in message


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "pool: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(path)
