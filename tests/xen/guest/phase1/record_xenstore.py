#!/usr/bin/python3
"""Run in dom0: record the exact behaviour of the real xenstore tools (stdout, stderr,
exit code) for the project's xenstore test double.  Writes /brbd/out/recorded/xenstore/
cases.json (exact strings) and one readable .txt per case (stdout/stderr shown with
repr() so newlines and backslashes stay visible)."""

import json
import os
import subprocess

OUT = "/brbd/out/recorded/xenstore"
D = "/brbd-rec"          # absolute test directory
SPECIAL = "a b, c\nd\\e"  # spaces, a comma, a newline, a backslash

CASES = [
    # (name, argv)
    ("write-pairs", ["xenstore-write", f"{D}/k1", "v1", f"{D}/k2", "v2"]),
    ("read-both-exist", ["xenstore-read", f"{D}/k1", f"{D}/k2"]),
    ("read-second-missing", ["xenstore-read", f"{D}/k1", f"{D}/missing"]),
    ("read-first-missing", ["xenstore-read", f"{D}/missing", f"{D}/k1"]),
    ("read-missing", ["xenstore-read", f"{D}/missing"]),
    ("write-odd-args", ["xenstore-write", f"{D}/k3", "v3", f"{D}/k4"]),
    ("write-special", ["xenstore-write", f"{D}/special", SPECIAL]),
    ("read-special", ["xenstore-read", f"{D}/special"]),
    ("read-special-raw", ["xenstore-read", "-R", f"{D}/special"]),
    ("write-escape-seq", ["xenstore-write", f"{D}/esc", "x\\x41\\ny"]),
    ("read-escape-seq", ["xenstore-read", f"{D}/esc"]),
    ("read-escape-seq-raw", ["xenstore-read", "-R", f"{D}/esc"]),
    ("write-tab-quote-utf8", ["xenstore-write", f"{D}/misc", "t\tq\"s'u\u00e9"]),
    ("read-tab-quote-utf8", ["xenstore-read", f"{D}/misc"]),
    ("write-double-backslash", ["xenstore-write", f"{D}/bs2", "p\\\\q"]),
    ("read-double-backslash", ["xenstore-read", f"{D}/bs2"]),
    ("read-double-backslash-raw", ["xenstore-read", "-R", f"{D}/bs2"]),
    ("write-raw-special", ["xenstore-write", "-R", f"{D}/rawspecial", SPECIAL]),
    ("read-raw-special", ["xenstore-read", f"{D}/rawspecial"]),
    ("read-raw-special-raw", ["xenstore-read", "-R", f"{D}/rawspecial"]),
    ("write-trailing-backslash", ["xenstore-write", f"{D}/tbs", "end\\"]),
    ("read-trailing-backslash-raw", ["xenstore-read", "-R", f"{D}/tbs"]),
    ("write-empty", ["xenstore-write", f"{D}/empty", ""]),
    ("read-empty", ["xenstore-read", f"{D}/empty"]),
    ("write-nested", ["xenstore-write", f"{D}/sub/deep/leaf", "x"]),
    ("ls-f-dir", ["xenstore-ls", "-f", D]),
    ("ls-dir", ["xenstore-ls", D]),
    ("ls-f-missing", ["xenstore-ls", "-f", f"{D}/missing"]),
    ("ls-f-leaf", ["xenstore-ls", "-f", f"{D}/k1"]),
    ("list-dir", ["xenstore-list", D]),
    ("list-missing", ["xenstore-list", f"{D}/missing"]),
    ("list-leaf", ["xenstore-list", f"{D}/k1"]),
    ("list-p-dir", ["xenstore-list", "-p", D]),
    ("exists-present", ["xenstore-exists", f"{D}/k1"]),
    ("exists-dir", ["xenstore-exists", f"{D}/sub"]),
    ("exists-missing", ["xenstore-exists", f"{D}/missing"]),
    ("exists-two-one-missing", ["xenstore-exists", f"{D}/k1", f"{D}/missing"]),
    ("rm-missing", ["xenstore-rm", f"{D}/missing"]),
    ("rm-missing-parent", ["xenstore-rm", f"{D}/nope/missing"]),
    ("rm-existing", ["xenstore-rm", f"{D}/k2"]),
    ("rm-t-missing", ["xenstore-rm", "-t", f"{D}/sub/deep/leaf"]),
    ("read-after-rm", ["xenstore-read", f"{D}/k2"]),
    ("write-relative", ["xenstore-write", "brbd-rel/x", "1"]),
    ("read-relative", ["xenstore-read", "brbd-rel/x"]),
    ("read-relative-as-absolute", ["xenstore-read", "/local/domain/0/brbd-rel/x"]),
    ("ls-f-relative", ["xenstore-ls", "-f", "brbd-rel"]),
    ("read-no-args", ["xenstore-read"]),
    ("write-no-args", ["xenstore-write"]),
    ("ls-f-dir-final", ["xenstore-ls", "-f", D]),
    ("rm-dir", ["xenstore-rm", D]),
    ("rm-relative", ["xenstore-rm", "brbd-rel"]),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    subprocess.run(["xenstore-rm", D], timeout=30, capture_output=True)
    results = []
    for name, argv in CASES:
        p = subprocess.run(argv, capture_output=True, timeout=30)
        r = {"name": name, "argv": argv,
             "stdout": p.stdout.decode("utf-8", "surrogateescape"),
             "stderr": p.stderr.decode("utf-8", "surrogateescape"),
             "rc": p.returncode}
        results.append(r)
        with open(os.path.join(OUT, f"{len(results):02d}-{name}.txt"), "w") as fh:
            fh.write(f"argv: {argv!r}\nrc: {p.returncode}\nstdout: {r['stdout']!r}\n"
                     f"stderr: {r['stderr']!r}\n")
    with open(os.path.join(OUT, "cases.json"), "w") as fh:
        json.dump({"tool_package": "xenstore-utils 4.17 (Debian 12), C xenstored 4.17",
                   "cases": results}, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    print(f"recorded {len(results)} xenstore tool cases")


if __name__ == "__main__":
    main()
