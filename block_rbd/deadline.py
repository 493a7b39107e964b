"""One time budget per run, and the one retry helper, which draws on it.

libxl SIGKILLs a hotplug script at 40 s.  Every wait of a run (a tool, a
cluster call, a lock, a busy device) is bounded by what is left of the run's
budget, never by a fixed step timeout that a busy host can exceed while the
run still has time.  A step keeps a cap of its own only where the cap
protects something (a cluster call that would otherwise hang).

The budget of the running code is a context variable: each thread of the
service has its own, and code outside any budget (the operator's commands)
gets the caps and defaults the caller names.
"""

import contextlib
import contextvars
import time

from .errors import HotplugTimeout

# libxl kills the script at 40 s (counted from its fork, as the budget is).  Undoing a
# failed run may go on until CLEANUP_END (what it leaves, the remove libxl runs next
# finishes); reporting it gets until REPORT_END, seconds of its own: on an overloaded
# dom0 one xenstore-write took over a second.
LIBXL_KILL = 40.0
CLEANUP_END = LIBXL_KILL - 7.0
REPORT_END = LIBXL_KILL - 3.0

_current = contextvars.ContextVar("block_rbd_deadline", default=None)


class Deadline:
    """An end time on the monotonic clock (CLOCK_MONOTONIC: the same in every process)."""

    def __init__(self, seconds, started=None):
        self.started = time.monotonic() if started is None else started
        self.end = self.started + seconds

    def remaining(self):
        return self.end - time.monotonic()

    def elapsed(self):
        return time.monotonic() - self.started

    def check(self, what):
        """Raise HotplugTimeout when nothing is left for `what`."""
        if self.remaining() <= 0:
            raise HotplugTimeout("the run's time budget (%.0f s) was used up before %s"
                                 % (self.end - self.started, what))


def current():
    """The budget of the running code, or None outside any."""
    return _current.get()


@contextlib.contextmanager
def budget(deadline):
    """Run the body within `deadline` (nests: an inner budget replaces the outer one)."""
    token = _current.set(deadline)
    try:
        yield deadline
    finally:
        _current.reset(token)


def cleanup():
    """A budget for undoing a failed run: until shortly before libxl's SIGKILL.

    Undo must not be starved by the step that used up the run's budget.
    """
    deadline = _current.get()
    if deadline is None:
        return contextlib.nullcontext()
    return budget(Deadline(CLEANUP_END, started=deadline.started))


def limit(cap=None, default=None, what="the next step"):
    """Seconds the next step may take: its cap within what is left of the budget.

    Outside a budget: the cap, else `default` (None: unbounded).  Inside one
    with nothing left: HotplugTimeout, so no step starts that cannot finish.
    """
    deadline = _current.get()
    if deadline is None:
        return cap if cap is not None else default
    deadline.check(what)
    left = deadline.remaining()
    return left if cap is None else min(cap, left)


def retry(attempt, *, what, give_up, cap=None, default=None, interval=0.02, max_interval=0.25):
    """Call attempt() until it returns something other than None/False; return that.

    Waits at most limit(cap, default) seconds in all, sleeping `interval`
    doubling up to `max_interval` between tries.  Out of time: raises
    give_up(waited_seconds), the caller's own one-line error.
    """
    seconds = limit(cap, default, what)
    end = None if seconds is None else time.monotonic() + seconds
    started = time.monotonic()
    delay = interval
    while True:
        result = attempt()
        if result is not None and result is not False:
            return result
        now = time.monotonic()
        if end is not None and now >= end:
            raise give_up(now - started)
        time.sleep(delay if end is None else max(0.0, min(delay, end - now)))
        delay = min(delay * 2, max_interval)
