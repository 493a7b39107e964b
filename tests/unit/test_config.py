"""The YAML configuration (block_rbd/config.py): defaults, the file's place, every fault."""

import os
import socket
import time

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


# ---- attacks ----------------------------------------------------------------------------

def test_a_byte_that_is_not_utf8_is_one_line_not_a_traceback(tmp_path):
    path = tmp_path / "block-rbd.yaml"
    path.write_bytes(b"pool: rbd\nhost: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == "%s: line 2: not UTF-8 text (byte 0xe9)" % path


@pytest.mark.parametrize("key", ["connect", "op", "map", "unmap", "lock", "hotplug"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400", "3601"])
def test_timeouts_are_finite_and_sane(tmp_path, key, value):
    path = write(tmp_path, "timeouts:\n  %s: %s\n" % (key, value))
    with pytest.raises(ConfigError, match="timeouts.%s = .*: expected seconds" % key):
        load(path)


@pytest.mark.parametrize("digits", [400, 5000])
def test_a_huge_integer_timeout_is_one_line(tmp_path, digits):
    path = write(tmp_path, "timeouts:\n  op: 1%s\n" % ("0" * digits))
    with pytest.raises(ConfigError, match="timeouts.op = .*: expected seconds > 0, at most 3600|"
                                          "not valid YAML: Exceeds the limit") as info:
        load(path)
    assert len(str(info.value)) - len(path) < 200 and "\n" not in str(info.value)


def test_access_timeout_is_finite_too():
    with pytest.raises(ConfigError, match="access.timeout = inf: expected seconds > 0, at most 3600"):
        from_dict({"access": {"timeout": float("inf")}})
    assert from_dict({"timeouts": {"map": 3600, "op": 0.5}})["timeouts.map"] == 3600


# "Billion laughs", kept to a million here (each level ten times the one before): a few
# hundred bytes of YAML, megabytes once written out.
LAUGHS = "pool:\n  - &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    "  - &%s [%s]\n" % (level, ", ".join(["*" + chr(ord(level) - 1)] * 10)) for level in "bcdef")


def test_yaml_aliases_are_refused_in_one_short_line(tmp_path):
    path = write(tmp_path, LAUGHS)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load(path)
    assert time.monotonic() - started < 2
    message = str(info.value)
    assert message == "%s: line 3: not valid YAML: alias *a: YAML aliases are not allowed here" % path


def test_a_huge_value_is_shown_bounded():
    nested = ["x" * 100] * 10
    for _ in range(4):
        nested = [nested] * 10  # 10^5 strings, 10 MB written out in full: what an alias costs
    with pytest.raises(ConfigError) as info:
        from_dict({"pool": nested, "host": "h"})
    assert len(str(info.value)) < 200 and str(info.value).startswith("<dict>: pool = [[")
    with pytest.raises(ConfigError) as info:
        from_dict({"x" * 10000: 1})
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("key", ["krbd", "nbd"])
@pytest.mark.parametrize("option", ["--log-file=/etc/passwd", "log_file=/etc/passwd", "-x", "a b", "Bad",
                                    "keyring=k", "id=admin", "queue_depth=1\n", "a,b"])
def test_mapper_options_are_checked_as_map_options(tmp_path, key, option):
    with pytest.raises(ConfigError) as info:
        from_dict({key: {"options": ["notrim", option]}}, "/etc/xen/block-rbd.yaml")
    assert str(info.value).startswith("/etc/xen/block-rbd.yaml: %s.options = ['notrim', " % key)
    assert "expected a list of" in str(info.value) and "KEY or KEY=VALUE, as map_options=" in str(info.value)


def test_good_mapper_options_pass():
    cfg = from_dict({"krbd": {"options": ["ms_mode=prefer-crc", "queue_depth=128"]},
                     "nbd": {"options": ["rbd_cache=false", "io_timeout=30", "try_netlink"]}})
    assert cfg["nbd.options"] == ["rbd_cache=false", "io_timeout=30", "try_netlink"]


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o620])
def test_a_config_writable_by_others_is_refused(tmp_path, mode):
    path = write(tmp_path, "pool: tank\n")
    os.chmod(path, mode)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == "%s is writable by others (mode %04o): refusing it" % (path, mode)


def test_a_config_not_owned_by_root_is_refused(tmp_path):
    path = write(tmp_path, "pool: tank\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == "%s is owned by uid 65534, not root (mode 0644): refusing it" % path


def test_a_config_in_a_directory_others_can_write_is_refused(tmp_path):
    os.chmod(tmp_path, 0o777)  # anyone could put another file in its place
    path = write(tmp_path, "pool: tank\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == "%s is writable by others (mode 0777): refusing it" % tmp_path


def test_a_config_in_a_sticky_directory_like_tmp_is_fine(tmp_path):
    os.chmod(tmp_path, 0o1777)  # others cannot replace root's file there
    assert load(write(tmp_path, "pool: tank\n"))["pool"] == "tank"


def test_a_config_reached_by_a_link_is_checked_where_it_is(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.chmod(real, 0o777)
    target = write(real, "pool: tank\n")
    os.symlink(target, tmp_path / "block-rbd.yaml")
    with pytest.raises(ConfigError, match="%s is writable by others" % real):
        load(str(tmp_path / "block-rbd.yaml"))


def test_the_test_configs_umask_022_and_root_are_accepted(tmp_path):
    old = os.umask(0o022)
    try:
        assert load(write(tmp_path, "pool: tank\n"))["pool"] == "tank"
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode, owner, fault", [
    (0o666, 0, "is writable by others (mode 0666)"),
    (0o620, 0, "is writable by others (mode 0620)"),
    (0o600, 65534, "is owned by uid 65534, not root (mode 0600)"),
])
def test_a_keyring_others_could_change_is_refused(tmp_path, mode, owner, fault):
    keyring = tmp_path / "k.keyring"
    keyring.write_text("[client.admin]\n\tkey = AQ==\n")
    os.chmod(keyring, mode)
    os.chown(keyring, owner, 0)
    cfg = from_dict({"ceph": {"keyring": str(keyring)}})
    with pytest.raises(ConfigError) as info:
        cfg.keyring
    assert str(info.value) == "%s %s: refusing it" % (keyring, fault)


def test_a_private_keyring_is_used(tmp_path):
    keyring = tmp_path / "k.keyring"
    keyring.write_text("[client.admin]\n\tkey = AQ==\n")
    os.chmod(keyring, 0o600)
    assert from_dict({"ceph": {"keyring": str(keyring)}}).keyring == str(keyring)


# ---- found by fuzzing (tests/fuzz/test_fuzz_config.py) -------------------------------

@pytest.mark.parametrize("text", ["[" * 400, "- " * 400 + "x", "{a: " * 400, "pool: " + "[" * 1000 + "]" * 1000])
def test_yaml_nested_past_pythons_stack_is_one_line(tmp_path, text):
    """PyYAML composes recursively: a few hundred bytes raised RecursionError, a traceback."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == "%s: not valid YAML: nested too deeply" % path


@pytest.mark.parametrize("text, error", [
    ("pool: !!timestamp x\n", "AttributeError"),
    ("pool: !!bool maybe\n", "KeyError"),
    ("pool: !!int ''\n", "IndexError"),
    ("pool: !!float\n", "IndexError"),
])
def test_a_tagged_value_pyyaml_cannot_build_is_one_line(tmp_path, text, error):
    """SafeLoader's constructors raise these, not a YAMLError, for a tag on a value it does not fit."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith("%s: not valid YAML: a value its tag cannot build (%s: " % (path, error))
    assert "\n" not in message and len(message) - len(path) < 200


@pytest.mark.parametrize("qos", ["iops:\u00b2", "bps:" + "9" * 5000])
def test_a_qos_number_int_cannot_read_is_a_config_error(tmp_path, qos):
    """The qos check caught TargetError only: int()'s ValueError escaped config.load."""
    path = write(tmp_path, "qos: '%s'\n" % qos)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith("%s: qos = " % path) and len(str(info.value)) - len(path) < 250
