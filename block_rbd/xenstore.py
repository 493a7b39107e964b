"""xenstore through Xen's own command-line tools.

Debian ships no Python bindings for xenstore, and the tools are what every
hotplug script uses.  Each method is one tool run; several keys written in one
`xenstore-write` are one transaction (the tool wraps its work in one).
"""

import re

from . import deadline, process
from .errors import CommandError, XenstoreError

# libxenstore's sanitise_value(): bytes outside ' '..'~' become \t \n \r \\,
# \ooo (below 010) or \xhh; the value's bytes are UTF-8 text for us.
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[0-7]{3}|.)", re.DOTALL)
_NAMED = {b"t": b"\t", b"n": b"\n", b"r": b"\r", b"a": b"\a", b"b": b"\b", b"f": b"\f", b"v": b"\v",
          b"\\": b"\\"}


def unescape(text):
    """Undo the tools' quoting of a value (`\\\\`, `\\n`, `\\ooo`, `\\xhh`...)."""
    def one(match):
        code = match.group(1)
        if code[:1] == b"x" and len(code) == 3:
            return bytes([int(code[1:], 16)])
        if len(code) == 3:
            return bytes([int(code, 8)])
        return _NAMED.get(code, code)
    return _ESCAPE.sub(one, text.encode("utf-8", "surrogateescape")).decode("utf-8", "replace")


def parse_ls(output, prefix):
    """Parse `xenstore-ls -f PREFIX` output into {relative key: value}."""
    prefix = prefix.rstrip("/") + "/"
    values = {}
    for line in output.splitlines():
        path, sep, rest = line.partition(' = "')
        if not sep or not rest.endswith('"'):
            continue
        if path.startswith(prefix):
            values[path[len(prefix):]] = unescape(rest[:-1])
    return values


class Xenstore:
    """The xenstore seam.  `env` points the tools elsewhere (tests).

    A tool run may take what is left of the run's budget: a busy dom0 makes
    them slow, not wrong.  `timeout` caps one run only where it is given
    (outside a budget a wedged xenstored still ends in DEFAULT_TIMEOUT).
    """

    DEFAULT_TIMEOUT = 30

    def __init__(self, env=None, timeout=None):
        self.env = env
        self.timeout = timeout

    def _run(self, tool, *args, check=True):
        try:
            return process.run([tool, *args], timeout=self._limit(tool), env=self.env, check=check)
        except CommandError as exc:
            raise XenstoreError(str(exc)) from None

    def _limit(self, tool):
        return deadline.limit(self.timeout, self.DEFAULT_TIMEOUT, tool)

    def read_optional(self, path):
        """The value at `path`, or None when it does not exist."""
        result = self._run("xenstore-read", path, check=False)
        if result.returncode != 0:
            return None
        return unescape(result.stdout.rstrip("\n"))

    def ls(self, path):
        """Every key below `path` as {relative path: value}; {} if `path` is missing."""
        result = self._run("xenstore-ls", "-f", path, check=False)
        if result.returncode != 0:
            return {}
        return parse_ls(result.stdout, path)

    def write(self, pairs):
        """Write {path: value} (ordered) in one transaction; values stored verbatim."""
        args = []
        for path, value in pairs.items():
            args += [path, str(value)]
        self._run("xenstore-write", "-R", *args)

    def exists(self, path):
        return self._run("xenstore-exists", path, check=False).returncode == 0
