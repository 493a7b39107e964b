"""The one place block-rbd starts a subprocess.

Argument lists only (never a shell), every call bounded by the run's budget
(block_rbd.deadline) and by the caller's cap where it gives one, one log line per
command, and output captured in temporary files rather than pipes: rbd-nbd and
rbd-fuse fork daemons that inherit stdout, and a pipe would then never close.
"""

import logging
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

from . import deadline
from .errors import CommandError

log = logging.getLogger("block-rbd")

# libxl gives hotplug scripts whatever PATH xl had; the tools we call live here.
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

# Outside any budget (operator commands), an uncapped command still ends.
DEFAULT_TIMEOUT = 120

# A cephx secret is 40 base64 characters starting with AQ.  Refusing to run a
# command that carries one keeps a coding mistake from reaching `ps`.
_SECRET = re.compile(r"AQ[A-Za-z0-9+/]{36,}={0,2}")


@dataclass
class Result:
    argv: list
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self):
        return self.returncode == 0


def fix_path(environ=os.environ):
    """Append the standard directories missing from PATH (in place)."""
    parts = [p for p in environ.get("PATH", "").split(":") if p]
    parts += [p for p in SYSTEM_PATH if p not in parts]
    environ["PATH"] = ":".join(parts)


def last_line(text):
    """The last non-empty line of a tool's output: where tools put the cause."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run(argv, *, timeout=None, check=True, input=None, env=None, quiet=False):
    """Run argv, return a Result.

    It may take what is left of the run's budget, and at most `timeout`
    seconds where the caller caps it (outside a budget: `timeout`, else
    DEFAULT_TIMEOUT).
    `input` (str) is fed on stdin: the channel for anything sensitive.
    With check=True a non-zero exit raises CommandError naming the command
    and the tool's own last line of stderr.
    """
    argv = [str(a) for a in argv]
    for arg in argv:
        if _SECRET.search(arg):
            raise CommandError("refusing to put a cephx secret on a command line: %s" % argv[0])
    limit = deadline.limit(timeout, DEFAULT_TIMEOUT, what=argv[0])
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                close_fds=True,
                cwd="/",
            )
        except OSError as exc:
            raise CommandError("%s: %s" % (argv[0], exc.strerror), returncode=None) from None
        try:
            proc.communicate(input.encode() if input is not None else None, timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            why = "its cap" if timeout is not None and limit >= timeout else "the run's time budget"
            log.warning("timed out after %g s (%s): %s", round(limit, 1), why, " ".join(argv))
            raise CommandError("%s timed out after %g s (%s)" % (" ".join(argv[:2]), round(limit, 1), why),
                               returncode=None) from None
        out.seek(0)
        err.seek(0)
        result = Result(argv, proc.returncode, out.read().decode(errors="replace"),
                        err.read().decode(errors="replace"))
    elapsed = time.monotonic() - started
    if not quiet:
        log.debug("ran (%.3f s, rc=%d): %s", elapsed, result.returncode, " ".join(argv))
    if check and not result.ok:
        cause = last_line(result.stderr) or last_line(result.stdout) or "exit code %d" % result.returncode
        raise CommandError("%s failed: %s" % (" ".join(argv[:2]), cause),
                           returncode=result.returncode, stderr=result.stderr)
    return result
