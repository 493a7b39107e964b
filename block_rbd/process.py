"""The one place block-rbd starts a subprocess.

Argument lists only (never a shell), every call bounded by the run's budget
(block_rbd.deadline) and by the caller's cap where it gives one, one log line per
command, and output captured in temporary files rather than pipes: rbd-nbd and
rbd-fuse fork daemons that inherit stdout, and a pipe would then never close.

Under systemd (PID 1) such a daemon is started in a transient scope unit of its own
(`systemd-run --scope`), named for the disk it serves: it then belongs to no
block-rbd unit, so a stop, restart or crash of the service or of upkeep leaves it
alone, and it is stopped at shutdown only after xendomains (its guests are gone by
then) and before the network.
"""

import logging
import os
import re
import subprocess
import tempfile
import time
import uuid
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

# sd_booted(): systemd is PID 1.
SYSTEMD_RUNTIME = "/run/systemd/system"
# A daemon's scope stops after the guests (xendomains stops them first) and before the
# network and the cluster connection go.
SCOPE_PROPERTIES = ("After=network-online.target", "Before=xendomains.service shutdown.target")
_UNIT_CHAR = re.compile(r"[^A-Za-z0-9_.]")


@dataclass(frozen=True)
class Scope:
    """The transient scope a daemon runs in under systemd: `block-rbd-KIND-IMAGE-ID.scope`,
    described as serving that image, so `systemctl status` tells which disk it is."""

    kind: str          # the daemon: "nbd", "fuse"
    image: str         # the image it serves

    def unit(self, unique=None):
        name = _UNIT_CHAR.sub("-", self.image).strip("-")[:120] or "image"
        return "block-rbd-%s-%s-%s.scope" % (self.kind, name, unique or uuid.uuid4().hex[:8])

    @property
    def description(self):
        return "block-rbd: rbd-%s serving %s to Xen" % (self.kind, self.image)


def under_systemd(runtime=SYSTEMD_RUNTIME):
    return os.path.isdir(runtime)


def scoped(argv, scope, runtime=SYSTEMD_RUNTIME, unique=None):
    """argv, run in a transient scope of its own when systemd is PID 1 (else as it is)."""
    if scope is None or not under_systemd(runtime):
        return list(argv)
    wrapper = ["systemd-run", "--scope", "--quiet", "--collect", "--unit=" + scope.unit(unique),
               "--description=" + scope.description]
    for prop in SCOPE_PROPERTIES:
        wrapper += ["--property=" + prop]
    return wrapper + ["--"] + list(argv)


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


def run(argv, *, timeout=None, check=True, input=None, env=None, quiet=False, scope=None):
    """Run argv, return a Result.

    It may take what is left of the run's budget, and at most `timeout`
    seconds where the caller caps it (outside a budget: `timeout`, else
    DEFAULT_TIMEOUT).
    `input` (str) is fed on stdin: the channel for anything sensitive.
    With check=True a non-zero exit raises CommandError naming the command
    and the tool's own last line of stderr.
    `scope` (a Scope): argv starts a daemon, which runs in a scope unit of its own
    under systemd; errors still name the daemon's command.
    """
    shown = [str(a) for a in argv]  # what errors and log lines name: the command itself
    for arg in shown:
        if _SECRET.search(arg):
            raise CommandError("refusing to put a cephx secret on a command line: %s" % shown[0])
    argv = scoped(shown, scope)
    limit = deadline.limit(timeout, DEFAULT_TIMEOUT, what=shown[0])
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
            raise CommandError("%s timed out after %g s (%s)" % (" ".join(shown[:2]), round(limit, 1), why),
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
        raise CommandError("%s failed: %s" % (" ".join(shown[:2]), cause),
                           returncode=result.returncode, stderr=result.stderr)
    return result
