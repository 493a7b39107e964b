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
"""

import pytest

from fuzzkit import RUNS, Fuzzer


@pytest.fixture
def fuzzer():
    """fuzzer(name, seed): a Fuzzer, reported in the terminal summary (a failed one too)."""
    def make(name, seed):
        RUNS.append(Fuzzer(name, seed))
        return RUNS[-1]
    return make


def pytest_terminal_summary(terminalreporter):
    if RUNS:
        terminalreporter.section("fuzzing (hypothesis, fixed seeds)")
        for run in RUNS:
            terminalreporter.write_line(run.line())
