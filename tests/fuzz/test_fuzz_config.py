"""Fuzz (c): the configuration file (/etc/xen/block-rbd.yaml) as arbitrary YAML documents
and arbitrary bytes.  config.load must return a Config whose every value passes its check,
or raise a BlockRbdError of one bounded line naming the file; nothing else, and never much
memory (aliases are refused).

A case's bytes are made from one hypothesis draw (fuzzkit.Genome): drawing a YAML document
value by value costs hypothesis more than parsing it costs PyYAML.
"""

import os
import resource
import shutil
import tempfile

import pytest
import yaml
from hypothesis import given, note, seed

from block_rbd import config as config_mod
from block_rbd.errors import BlockRbdError
from fuzzkit import ODD_SCALARS, SETTINGS, Genome, fast_dir, genomes, fuzzer  # noqa: F401 (fuzzer: a fixture)

SEED = 2602
MAX_MESSAGE = 300

# ---- a case: the file's bytes, made from the genome -------------------------------------

SECTIONS = sorted({key.split(".")[0] for key in config_mod.SCHEMA if "." in key})
LEAVES = sorted(config_mod.SCHEMA)
NUMBERS = [0, 1, -1, 5, 35, 36, 3600, 3601, 1e400, -1e400, float("nan"), 1e-300, 2 ** 64, 0.5, 20.0]
STRINGS = ["/etc/ceph/ceph.conf", "relative/path", "auto", "krbd", "nbd", "fuse", "floppy", "refuse", "fence",
           "client.admin", "admin", "", "/", "null", "yes"]

# Values the checks parse themselves: qos (LIMIT:VALUE+...) and map options, with numbers
# past what int() takes and digits that are no ASCII ("\u00b2".isdigit() is true).
NUMBERISH = ["500", "50M", "0", "1K", "2G", "10KiB", "\u00b2", "\u0663", "\u2155", "\uff15", "9" * 5000, "1" * 20,
             "1" * 21, "-1", "1.5", "", " 5 ", "5x"]
QOS_KEYS = ["iops", "bps", "read_iops", "write_iops", "read_bps", "write_bps", "none", "x", "IOPS"]
MAP_OPTIONS = ["queue_depth=128", "exclusive", "noshare", "key=x", "-x", "a/b", "", "ms_mode=prefer-crc",
               "conf=/etc/passwd", "a b", "x=\u00b2"]


def qos(g):
    if g.one_in(8):
        return "none"
    items = []
    for _ in range(1 + g.below(4)):
        number = g.pick(NUMBERISH) if g.below(3) else g.text(8, "0123456789KMGTiB\u00b2\u0663")
        items.append(g.pick(QOS_KEYS) + g.pick([":", ":", ":", "", "::"]) + number)
    return "+".join(items)


def scalar(g):
    kind = g.below(8)
    if kind == 0:
        return g.pick(ODD_SCALARS)
    if kind == 1:
        return g.pick(NUMBERS)
    if kind == 2:
        return int.from_bytes(g.raw(9), "big", signed=True)
    if kind == 3:
        return 10 ** (4290 + g.below(100))  # past what str() writes out
    if kind == 4:
        return qos(g)
    if kind == 5:
        return g.pick(MAP_OPTIONS)
    if kind == 6:
        return g.pick(STRINGS)
    return g.text(30)


def value(g, depth=2):
    kind = g.below(6 if depth else 1)
    if kind < 4:
        return scalar(g)
    if kind == 4:
        return [value(g, depth - 1) for _ in range(g.below(4))]
    return {g.pick(LEAVES) if g.below(2) else g.text(8): value(g, depth - 1) for _ in range(g.below(4))}


def document(g):
    """A mapping of known keys (as sections, or dotted) and unknown ones."""
    out = {}
    for _ in range(g.below(8)):
        kind = g.below(4)
        key = g.pick(LEAVES) if kind < 2 else g.pick(SECTIONS) if kind == 2 else g.text(12)
        section, _, leaf = key.partition(".")
        if leaf and g.below(4) and isinstance(out.setdefault(section, {}), dict):
            out[section][leaf] = value(g)
        else:
            out[key] = value(g)
    return out


def focused(g):
    """The keys whose values are parsed further: qos, the map options."""
    out = {}
    if g.below(4):
        out["qos"] = qos(g) if g.below(3) else scalar(g)
    for section in ("krbd", "nbd"):
        if g.one_in(3):
            out[section] = {"options": [g.pick(MAP_OPTIONS) for _ in range(g.below(4))]}
    if g.one_in(2):
        out["mapper"] = g.pick(["auto", "nbd", "krbd", "fuse"])
    return out


DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's: the fuzzer's own time is not the point


def dumped(g, doc):
    """`doc` as a YAML dumper writes it, in one of its styles."""
    try:
        return yaml.dump(doc, Dumper=DUMPER, default_flow_style=g.pick([None, True, False]),
                         allow_unicode=g.pick([True, False])).encode("utf-8")
    except (ValueError, yaml.YAMLError):  # an int too long for str(), say
        return b"pool: rbd\n"


# What YAML's grammar has beyond plain mappings: anchors, aliases, tags (Python's ones
# too), merges, directives, block scalars, flow collections, odd scalars.
TOKENS = [
    "&a ", "*a", "&b [*a, *a, *a]", "!!python/object/apply:os.system ['true']", "!!python/name:os.system",
    "!!binary aGVsbG8=", "!!set {a, b}", "!!timestamp 2001-12-14", "!!int", "!!float", "!!str", "!!map",
    "!!bool", "!!omap", "!!timestamp", "!foo", "<<: ", "<<: *a", "- ", "[", "]", "{", "}", ", ", "? ", ": ", "---",
    "...", "%YAML 1.1", "%TAG ! tag:x,2000:", "|", ">-", "'", '"', "\\x", "#", "\n", "\n  ", "\n- ", "\t", " ",
    "~", "null", "yes", "No", "0x1F", "0o17", "1_000", "1e400", ".inf", "-.nan", "2001-12-14t21:59:43.10-05:00",
    "timeouts", "hotplug", "pool", "rbd", "log", "qos", "iops:500", "ceph", "keyring", "9" * 5000,
    "\ufeff", "\x00", "\x85", "\u2028", "\ud7ff", "\U0001f600",
] + LEAVES + SECTIONS
GOOD = (b"pool: rbd\nmapper: fuse\nhost: h\nstate_dir: /run/x\nledger_dir: /var/lib/x\n"
        b"timeouts: {hotplug: 20, connect: 5}\nlog: {file: /tmp/x.log, syslog: false}\n"
        b"qos: iops:500+bps:50M\nkrbd: {options: [queue_depth=128]}\n")


def mutated(g):
    """A good configuration with a few bytes changed, cut or inserted."""
    good = bytearray(GOOD)
    for _ in range(1 + g.below(4)):
        at = g.below(len(good) + 1)
        action = g.below(4)
        piece = bytes(g.raw(4)) or b"\0"
        if action == 0:
            good[at:at] = piece
        elif action == 1:
            del good[at:at + len(piece)]
        elif action == 2:
            good[at:at + len(piece)] = piece
        else:
            del good[at:]
    return bytes(good)


def contents(g):
    kind = g.below(50)
    if kind == 49:
        # Deep nesting: a few hundred bytes that recurse past Python's stack (PyYAML composes
        # and builds recursively).  Slow to parse (~10 ms each): one case in 50.
        opener = g.pick(["- ", "- ", "[", "{a: "])
        return (opener * (250 + g.below(170)) + g.pick(["", "1", "]" * 5, "}"])).encode()
    kind %= 7
    if kind == 0:
        return bytes(g.raw(300))
    if kind == 1:
        return g.text(120).encode("utf-8", "surrogatepass")
    if kind == 2:
        return dumped(g, document(g) if g.below(3) else value(g))
    if kind == 3:
        return dumped(g, focused(g))
    if kind == 4:
        return "".join(g.pick(TOKENS) for _ in range(g.below(30))).encode("utf-8", "surrogatepass")
    if kind == 5:
        return mutated(g)
    return GOOD if g.below(2) else dumped(g, document(g))


# ---- the fuzzer ------------------------------------------------------------------------

@pytest.fixture
def config_file():
    directory = tempfile.mkdtemp(prefix="brbdfz", dir=fast_dir())  # short: the path is in every message
    yield os.path.join(directory, "block-rbd.yaml")
    shutil.rmtree(directory, ignore_errors=True)


def test_fuzz_config_file(config_file, fuzzer):
    tally = fuzzer("config file (c)", SEED)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @seed(SEED)
    @SETTINGS
    @given(genomes())
    def case(genome):
        raw = contents(Genome(genome))
        note(repr(raw))
        fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, raw)
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o600)  # root's alone: the loader refuses anything else
        finally:
            os.close(fd)
        try:
            got = config_mod.load(config_file)
        except BlockRbdError as exc:
            message = str(exc)
            assert len(message.splitlines()) <= 1, message
            assert len(message) <= MAX_MESSAGE, message
            assert message.startswith(config_file), message
            tally.case("refused")
            return
        assert isinstance(got, config_mod.Config)
        for key, (_default, check, _what) in config_mod.SCHEMA.items():
            assert check(got[key]), (key, got[key])
        tally.case("loaded")

    case()
    tally.finish()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before  # KiB
    assert grown < 200 * 1024, "the peak resident size grew by %d MiB" % (grown >> 10)
