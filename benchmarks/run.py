#!/usr/bin/env python3
"""Run every benchmark under benchmarks/ in sequence, with quick, bounded parameters (`make bench`).

Each benchmark starts and removes its own throwaway cluster.  One that runs
past its bound is interrupted (so it cleans up), then killed.  Exits 1 if
any benchmark failed, after running the others.
"""

import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# (script, quick arguments, seconds it may take)
BENCHMARKS = (
    ("attach.py", ["--rounds", "3", "--concurrent", "8"], 600),
    ("bench_images.py", ["--quick", "--rounds", "2"], 900),
    ("access_soak.py", ["--rounds", "100", "--hosts", "4"], 600),
    ("boot_storm.py", ["--n", "16", "--mode", "both"], 900),
    ("xenstore_access.py", ["--rounds", "20", "--concurrent", "16"], 120),
)
# Between the interrupt and SIGKILL: enough to stop a cluster and unmount.
GRACE = 60


def run(script, args, bound):
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, script)] + args, start_new_session=True)
    try:
        return proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        print("%s: still running after %d s: interrupting it" % (script, bound), flush=True)
        return stop(proc)
    except KeyboardInterrupt:
        stop(proc)
        raise


def stop(proc):
    """Interrupt the benchmark alone (it stops its own cluster), then kill what is left."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=GRACE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def main():
    results = []
    for script, args, bound in BENCHMARKS:
        print("\n=== %s %s" % (script, " ".join(args)), flush=True)
        started = time.monotonic()
        code = run(script, args, bound)
        results.append((script, code, time.monotonic() - started))
    print("\n=== summary")
    for script, code, seconds in results:
        print("%-16s %s in %.0f s" % (script, "ok" if code == 0 else "FAILED (exit %s)" % code, seconds))
    return 0 if all(code == 0 for _s, code, _t in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
