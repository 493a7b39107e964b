"""Fuzzing of every input a hotplug run reads (issue 26, point 2): bounded, seeded, in CI.

Each fuzzer is a hypothesis function run from inside its pytest test (so the test's
own fixtures are set up once, not per case), with fuzzkit.SETTINGS (10,000 cases, no
deadline, no example database) and a fixed @seed: a run is reproducible, and the
terminal summary prints each fuzzer's seed, its case count, its wall time and what its
cases came to.  A case draws one string of bytes and makes its input from it
(fuzzkit.Genome): cheap enough for 10,000 cases of each input in CI.  A run leaves no
.hypothesis directory in the checkout.

    test_fuzz_hotplug.py   (a) the backend nodes an `add` reads, through hotplug.run
    test_fuzz_xenstore.py  (b) xenstored's replies, against block_rbd/xenstore.py
    test_fuzz_config.py    (c) the configuration file, through config.load
    test_fuzz_state.py     (d) the records and the ledger, through every reader of them

BLOCK_RBD_FUZZ_CASES=N runs N cases per fuzzer instead (while working on one); CI
runs the default.

This module holds what the fuzzers share: their settings, their tally (tests/conftest.py
prints it in the terminal summary; tests/fuzz has no conftest.py of its own, whose module
name would shadow tests/conftest.py when the suites run together), the `fuzzer` fixture
(each fuzz module imports it) and the Genome a case's choices are made from.
"""

import collections
import os
import tempfile
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.internal import reflection

# database=None keeps no examples, but hypothesis still caches its Unicode tables under
# its home directory (./.hypothesis by default): outside the checkout, then.
set_hypothesis_home_dir(os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY")
                        or os.path.join(tempfile.gettempdir(), "block-rbd-hypothesis-%d" % os.getuid()))

CASES = int(os.environ.get("BLOCK_RBD_FUZZ_CASES", "10000"))

# too_slow, data_too_large, filter_too_much: a loaded 2-core CI host trips them, and
# they say nothing about the code under test.
SETTINGS = settings(max_examples=CASES, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])

RUNS = []


class Fuzzer:
    """One fuzzer's tally: cases run, outcomes, wall time."""

    def __init__(self, name, seed):
        self.name, self.seed = name, seed
        self.cases = 0
        self.outcomes = collections.Counter()
        self.started = time.monotonic()
        self.seconds = None

    def case(self, outcome):
        self.cases += 1
        self.outcomes[outcome] += 1

    def finish(self):
        self.seconds = time.monotonic() - self.started
        assert self.cases >= CASES, "%s ran %d cases, not %d" % (self.name, self.cases, CASES)

    def line(self):
        seconds = "%.1f s" % self.seconds if self.seconds is not None else "unfinished"
        outcomes = ", ".join("%s %d" % item for item in sorted(self.outcomes.items()))
        return "%s: %d cases, seed %d, %s (%s)" % (self.name, self.cases, self.seed, seconds, outcomes)


def fast_dir():
    """Where a fuzzer's files go: a tmpfs (as /run, where state_dir is), when there is one.
    Rewriting one file on ext4 10,000 times costs seconds (a truncate flushes its data)."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return tempfile.gettempdir()


# hypothesis 6.67 describes the lambda its @given wraps every test in anew for each case
# (reading and parsing its source: ~1 ms); later versions cache it, as this does.
_describe_lambda = getattr(reflection, "extract_lambda_source", None)
_described = {}


def _described_lambda(f):
    code = getattr(f, "__code__", None)
    if code not in _described:
        _described[code] = _describe_lambda(f)
    return _described[code]


if _describe_lambda is not None:
    reflection.extract_lambda_source = _described_lambda


# ---- a case's choices, from one draw ------------------------------------------------------
# hypothesis spends ~10-30 us on each value it draws: a case of a few hundred of them (a
# directory of JSON files, say) costs 10-20 ms, and 10,000 cases minutes.  A fuzzer that
# needs many choices draws one string of bytes instead and makes its choices from it
# (libFuzzer's FuzzedDataProvider): one draw, still seeded, still shrunk by hypothesis (a
# zero byte, what it shrinks towards, is always the first and plainest choice).

GENOME = 512  # bytes per case: past them every choice is the first


def genomes():
    """What a fuzzer's @given draws: GENOME bytes, for a Genome."""
    return st.binary(min_size=GENOME, max_size=GENOME)

# Odd values for the places that take JSON (or YAML) scalars, plainest first.
ODD_SCALARS = [None, True, False, 0, 1, -1, 3, 4, 2 ** 31, 2 ** 63, 10 ** 30, -10 ** 30, 1e11, -1e11,
               99999999999.0, 0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan"), "", "x", "0", "1",
               "r", "w", "r!", "w!", "krbd", "nbd", "fuse", "manual", "rbd/vm1", "rbd/vm1@snap", "vm1", "a b",
               "-x", "\u2028", "\x00", "\n", "\ufffd", "\U0001f600", "caf\u00e9", "9" * 30]
# Characters for text, plainest first: the ones that split lines or names, the non-ASCII.
ALPHABET = ("a", "b", "1", "0", "/", "@", ":", ",", "=", "+", "-", "_", ".", " ", "%", "!", "\n", "\r",
            "\t", "\x00", "\x0b", "\x1c", "\x85", "\u2028", "\u00e9", "\u00b2", "\u0663", "\ufeff", "\ufffd",
            "\U0001f600", "\\", "\"", "'", "[", "{", "*", "&", "#", "~", "x", "y", "z")


class Genome:
    """Choices made from `data` (bytes), in order; past its end every choice is the first."""

    def __init__(self, data):
        self.data = data
        self.at = 0

    def byte(self):
        if self.at >= len(self.data):
            return 0
        self.at += 1
        return self.data[self.at - 1]

    def below(self, n):
        """0 <= choice < n."""
        if n <= 1:
            return 0
        value = self.byte()
        if n > 256:
            value = value << 8 | self.byte()
        return value % n

    def pick(self, choices):
        return choices[self.below(len(choices))]

    def one_in(self, n):
        """True about once in `n` (never for a zero byte)."""
        return self.below(n) == n - 1

    def raw(self, most):
        size = self.below(most + 1)
        got = self.data[self.at:self.at + size]
        self.at += size
        return got

    def text(self, most, alphabet=ALPHABET):
        return "".join(self.pick(alphabet) for _ in range(self.below(most + 1)))

    def json(self, depth=2):
        """Any JSON value (NaN and the infinities too, as json.loads takes them)."""
        kind = self.below(6 if depth > 0 else 3)
        if kind == 0:
            return self.pick(ODD_SCALARS)
        if kind == 1:
            return self.text(8)
        if kind == 2:
            return int.from_bytes(self.raw(9), "big", signed=True)
        if kind == 3:
            return [self.json(depth - 1) for _ in range(self.below(4))]
        return {self.text(6): self.json(depth - 1) for _ in range(self.below(4))}


@pytest.fixture
def fuzzer():
    """fuzzer(name, seed): a Fuzzer, reported in the terminal summary (a failed one too)."""
    def make(name, seed):
        RUNS.append(Fuzzer(name, seed))
        return RUNS[-1]
    return make
