"""The xenstore seam (block_rbd/xenstore.py) against the wire-protocol double,
driven through Debian's REAL xenstore-* tools (XENSTORED_PATH points them at it)."""

import pytest

from block_rbd import process
from block_rbd.errors import XenstoreError
from block_rbd.xenstore import Xenstore, parse_ls, unescape

BASE = "/local/domain/0/backend/vbd/5/51712"

# Values a backend may hold; the tools escape some of them on output.
AWKWARD = [
    "plain",
    "with spaces  inside ",
    "a,b,c",
    "back\\slash",
    "two\\\\slashes",
    "tab\there",
    "quote\"d",
    "equals = sign",
    "rbd/ns/img@snap,mode=r!,mapper=fuse",
    "caf\u00e9 d\u00e9j\u00e0 \u2603",
    "ctl\x01\x07\x08\x0b\x1b\x7f",
    "x" * 1500,  # longer than any terminal: xenstore-ls must not truncate it
    "",
]


# ---- pure parsing ----------------------------------------------------------------------

@pytest.mark.parametrize("escaped, value", [
    ("plain", "plain"),
    ("back\\\\slash", "back\\slash"),
    ("tab\\there", "tab\there"),
    ("nl\\nhere", "nl\nhere"),
    ("oct\\001al", "oct\x01al"),
    ("quote\\\"d", "quote\"d"),
    ("\\\\\\\\", "\\\\"),
    ("caf\\xc3\\xa9", "caf\u00e9"),          # libxenstore: bytes >= 010 as \\xhh ...
    ("\\x0b\\x7f\\x1B", "\x0b\x7f\x1b"),
    ("\\001\\007", "\x01\x07"),             # ... and below 010 as \\ooo
])
def test_unescape(escaped, value):
    assert unescape(escaped) == value


def test_parse_ls_relative_keys_and_escapes():
    output = "\n".join([
        '/local/domain/0/backend/vbd/5/51712 = ""',
        '/local/domain/0/backend/vbd/5/51712/params = "rbd:vm1,mode=r"',
        '/local/domain/0/backend/vbd/5/51712/sub = ""',
        '/local/domain/0/backend/vbd/5/51712/sub/key = "a b \\\\ c"',
        '/local/domain/0/backend/vbd/5/517120/other = "not below"',
        '/local/domain/0/backend/vbd/5/51712/perms = "x"  (n0)',  # -p output: not a plain value line
        'garbage line',
    ])
    assert parse_ls(output, BASE + "/") == {"params": "rbd:vm1,mode=r", "sub": "", "sub/key": "a b \\ c"}


# ---- against the double with the real tools --------------------------------------------

@pytest.fixture
def xs(xenstored):
    return Xenstore()


def test_relative_paths_are_dom0s_home(xs, xenstored):
    xenstored.write(BASE + "/params", "rbd:vm1")
    assert xs.read_optional("backend/vbd/5/51712/params") == "rbd:vm1"
    assert xs.ls("backend/vbd/5/51712") == {"params": "rbd:vm1"}


def test_read_optional(xs, xenstored):
    assert xs.read_optional(BASE + "/nope") is None
    xenstored.write(BASE + "/v", "with spaces")
    assert xs.read_optional(BASE + "/v") == "with spaces"
    xenstored.write(BASE + "/empty", "")
    assert xs.read_optional(BASE + "/empty") == ""


@pytest.mark.parametrize("value", AWKWARD)
def test_raw_writes_round_trip(xs, xenstored, value):
    """Values are stored verbatim (-R: no unescaping by xenstore-write)."""
    xs.write({BASE + "/value": value})
    assert xenstored.read(BASE + "/value") == value   # what the daemon holds
    assert xs.read_optional(BASE + "/value") == value  # what xenstore-read gives back
    assert xs.ls(BASE) == {"value": value}              # what xenstore-ls -f gives back


def test_multi_key_write_is_one_transaction(xs, xenstored, mocker):
    spy = mocker.spy(process, "run")
    pairs = {BASE + "/physical-device": "7:0", BASE + "/physical-device-path": "/dev/loop0",
             BASE + "/block-rbd-image": "rbd/vm 1,x\\y"}
    xs.write(pairs)
    assert spy.call_count == 1
    assert spy.call_args.args[0][:2] == ["xenstore-write", "-R"]
    for path, value in pairs.items():
        assert xenstored.read(path) == value


def test_ls_parses_every_value_with_escaping(xs, xenstored):
    for i, value in enumerate(AWKWARD):
        xenstored.write("%s/k%d" % (BASE, i), value)
    xenstored.write(BASE + "/dir/deep", "x, y")
    xenstored.write(BASE + "0/sibling", "must not appear")
    got = xs.ls(BASE)
    expected = {"k%d" % i: value for i, value in enumerate(AWKWARD)}
    expected.update({"dir": "", "dir/deep": "x, y"})
    assert got == expected


def test_ls_of_a_missing_path_is_empty(xs):
    assert xs.ls(BASE + "/nothing") == {}


def test_exists(xs, xenstored):
    assert not xs.exists(BASE + "/x")
    xenstored.write(BASE + "/x", "")
    assert xs.exists(BASE + "/x")


def test_unreachable_daemon_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "no-socket"))
    xs = Xenstore(timeout=5)
    assert xs.read_optional(BASE + "/params") is None
    assert xs.ls(BASE) == {}
    with pytest.raises(XenstoreError) as info:
        xs.write({BASE + "/x": "1"})
    assert "\n" not in str(info.value)


def test_env_is_passed_to_the_tools(xenstored, tmp_path, monkeypatch):
    env = xenstored.env()
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "elsewhere"))
    xs = Xenstore(env=dict(env, PATH="/usr/bin:/bin"))
    xs.write({BASE + "/x": "1"})
    assert xenstored.read(BASE + "/x") == "1"
