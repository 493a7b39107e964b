"""Reading what the real xenstore-* tools print (tests only: block-rbd itself speaks the
wire protocol).  xenstore-ls quotes values as libxenstore's sanitise_value() does."""

import re

# bytes outside ' '..'~' become \t \n \r \\, \ooo (below 010) or \xhh; the value's bytes
# are UTF-8 text for us.
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
