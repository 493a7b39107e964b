"""One time budget per run (block_rbd/deadline.py): limit(), retry(), cleanup()."""

import threading
import time

import pytest

from block_rbd import deadline
from block_rbd.deadline import CLEANUP_END, Deadline, budget, cleanup, current, limit, retry
from block_rbd.errors import HotplugTimeout, LockTimeout


def used(seconds, ago):
    """A budget of `seconds` for a run that started `ago` seconds ago."""
    return Deadline(seconds, started=time.monotonic() - ago)


# ---- Deadline and budget() ------------------------------------------------------------------

def test_a_deadline_counts_down_on_the_monotonic_clock():
    d = Deadline(10)
    assert 9.5 < d.remaining() <= 10
    assert 0 <= d.elapsed() < 0.5
    assert d.end == d.started + 10
    d.check("anything")  # time left: no error
    assert -0.1 < used(10, 4).remaining() - 6 <= 0


def test_no_budget_outside_a_run():
    assert current() is None


def test_budget_sets_and_restores():
    d = Deadline(10)
    with budget(d) as inside:
        assert inside is d and current() is d
    assert current() is None


def test_budget_is_restored_after_an_error():
    with pytest.raises(RuntimeError):
        with budget(Deadline(10)):
            raise RuntimeError("boom")
    assert current() is None


def test_nesting_the_inner_budget_replaces_the_outer_one():
    outer, inner = Deadline(10), Deadline(100)
    with budget(outer):
        with budget(inner):
            assert current() is inner
            assert 99 < limit() <= 100  # replaced, not capped by the outer one
        assert current() is outer
        with budget(Deadline(1)):
            assert limit() <= 1
        assert 9 < limit() <= 10
    assert current() is None


# ---- limit() --------------------------------------------------------------------------------

def test_limit_outside_a_budget_is_the_cap_else_the_default():
    assert limit() is None  # unbounded
    assert limit(5) == 5
    assert limit(None, default=3) == 3
    assert limit(5, default=3) == 5


def test_limit_inside_a_budget_is_the_cap_within_what_is_left():
    with budget(Deadline(10)):
        assert 9.5 < limit() <= 10
        assert limit(2) == 2                    # a cap smaller than what is left
        assert 9.5 < limit(100) <= 10           # a cap larger: what is left
        assert 9.5 < limit(None, default=3) <= 10  # the default is for code outside any budget
    with budget(used(10, 8)):
        assert 1.5 < limit(5) <= 2


@pytest.mark.parametrize("spent", [Deadline(0), used(30, 30), used(30, 45)])
def test_an_exhausted_budget_raises_before_a_step_starts(spent):
    with budget(spent):
        with pytest.raises(HotplugTimeout) as info:
            limit(5, what="rbd-nbd")
        message = str(info.value)
        assert message == "the run's time budget (%.0f s) was used up before rbd-nbd" % (spent.end - spent.started)
        with pytest.raises(HotplugTimeout, match="before the next step$"):
            limit()


# ---- retry() --------------------------------------------------------------------------------

class Attempts:
    """attempt() returning the given results in turn, recording when it was called."""

    def __init__(self, *results, then=None):
        self.results = list(results)
        self.then = then
        self.times = []

    def __call__(self):
        self.times.append(time.monotonic())
        return self.results.pop(0) if self.results else self.then


def give_up(waited):
    return LockTimeout("held for over %.1f s" % waited)


def test_retry_returns_the_first_result():
    attempt = Attempts(None, False, None, "got it", "later")
    assert retry(attempt, what="x", give_up=give_up, cap=5, interval=0.001) == "got it"
    assert len(attempt.times) == 4


def test_retry_returns_at_once_when_the_first_attempt_succeeds():
    attempt = Attempts(True)
    started = time.monotonic()
    assert retry(attempt, what="x", give_up=give_up, cap=5) is True
    assert len(attempt.times) == 1 and time.monotonic() - started < 0.1


@pytest.mark.parametrize("answer", [[], 0, ""])
def test_retry_only_none_and_false_mean_try_again(answer):
    # an empty list (no watchers, say) is an answer, not a failure
    assert retry(Attempts(None, answer), what="x", give_up=give_up, cap=5, interval=0.001) == answer


def test_retry_gives_up_with_the_callers_error_after_about_the_allowed_time():
    attempt = Attempts(then=False)
    started = time.monotonic()
    with pytest.raises(LockTimeout, match=r"^held for over 0\.[4-9] s$"):
        retry(attempt, what="x", give_up=give_up, cap=0.4)
    elapsed = time.monotonic() - started
    assert 0.38 < elapsed < 1.0
    assert attempt.times[-1] - started >= 0.38  # a last try at the end, not a give-up while sleeping
    assert len(attempt.times) > 3


def test_retry_outside_a_budget_uses_the_default():
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        retry(Attempts(then=None), what="x", give_up=give_up, default=0.3)
    assert 0.28 < time.monotonic() - started < 0.7


def test_retry_backoff_doubles_and_is_bounded():
    attempt = Attempts(then=None)
    with pytest.raises(LockTimeout):
        retry(attempt, what="x", give_up=give_up, cap=0.6, interval=0.01, max_interval=0.08)
    gaps = [b - a for a, b in zip(attempt.times, attempt.times[1:])]
    wanted = [min(0.01 * 2 ** i, 0.08) for i in range(len(gaps))]  # 0.01, 0.02, 0.04, 0.08, 0.08 ...
    assert all(gap >= want - 0.002 for gap, want in zip(gaps[:-1], wanted))  # the last one ends at the cap
    assert max(gaps) < 0.08 + 0.05  # never beyond max_interval (plus scheduling slack)
    assert len(gaps) >= 6


def test_retry_inside_a_budget_is_bounded_by_it():
    started = time.monotonic()
    with budget(Deadline(0.4)):
        with pytest.raises(LockTimeout):
            retry(Attempts(then=False), what="x", give_up=give_up, cap=30)
    assert 0.3 < time.monotonic() - started < 0.8
    # a cap smaller than the budget still applies
    started = time.monotonic()
    with budget(Deadline(30)):
        with pytest.raises(LockTimeout):
            retry(Attempts(then=False), what="x", give_up=give_up, cap=0.3)
    assert 0.28 < time.monotonic() - started < 0.7


def test_retry_with_the_budget_used_up_never_tries():
    attempt = Attempts(True)
    with budget(used(10, 11)):
        with pytest.raises(HotplugTimeout, match="was used up before the access check of rbd/vm1$"):
            retry(attempt, what="the access check of rbd/vm1", give_up=give_up, cap=5)
    assert attempt.times == []


# ---- cleanup() ------------------------------------------------------------------------------

def test_cleanup_outside_a_budget_changes_nothing():
    with cleanup():
        assert current() is None
        assert limit(5) == 5


def test_cleanup_has_time_until_cleanup_end_even_when_the_run_used_its_budget():
    run = used(25, 26)  # the step that failed took it all
    with budget(run):
        with pytest.raises(HotplugTimeout):
            limit()
        with cleanup():
            undo = current()
            assert undo is not run
            assert undo.started == run.started
            assert undo.end == pytest.approx(run.started + CLEANUP_END)
            assert CLEANUP_END - 26 - 0.5 < limit() <= CLEANUP_END - 26
            assert limit(3) == 3
        assert current() is run  # the run's own budget again after undoing


def test_cleanup_ends_before_libxl_kills_the_script():
    assert CLEANUP_END < deadline.LIBXL_KILL == 40
    with budget(used(30, CLEANUP_END + 0.5)):
        with cleanup():
            with pytest.raises(HotplugTimeout):
                limit(what="undo")


def test_cleanup_is_counted_from_the_runs_start_not_from_now():
    with budget(used(10, 1)):
        with cleanup():
            assert CLEANUP_END - 1.5 < limit() <= CLEANUP_END - 1


# ---- threads --------------------------------------------------------------------------------

def test_budgets_are_per_thread():
    seen = {}

    def other():
        seen["current"] = current()
        seen["limit"] = limit(5)
        with budget(Deadline(100)):
            seen["own"] = limit()

    with budget(Deadline(0)):  # used up in this thread
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(5)
        assert seen == {"current": None, "limit": 5, "own": pytest.approx(100, abs=1)}
        with pytest.raises(HotplugTimeout):
            limit()  # the other thread's budget did not leak here


def test_concurrent_budgets_do_not_mix():
    results = {}
    barrier = threading.Barrier(2)

    def run(name, seconds):
        with budget(Deadline(seconds)):
            barrier.wait(5)
            results[name] = limit()

    threads = [threading.Thread(target=run, args=("short", 2)), threading.Thread(target=run, args=("long", 50))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert 1 < results["short"] <= 2 and 49 < results["long"] <= 50
