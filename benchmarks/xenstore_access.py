#!/usr/bin/env python3
"""What one add costs in xenstore: block-rbd's wire protocol against the xenstore-* tools.

One add reads the backend directory, the frontend's VM uuid and name, writes the
device keys in one transaction and then hotplug-status.  The baseline is that same
work done with the xenstore-* tools (what block-rbd ran before, and what Xen's own
block script runs), measured in the same run against the same xenstored double, alone
and with N adds at once.  Prints wall time per add, CPU-s per add (this process and
its children) and the ratio baseline / block-rbd.  Needs xenstore-utils.

    python3 benchmarks/xenstore_access.py [--rounds 20] [--concurrent 16]
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from block_rbd.xenstore import Xenstore  # noqa: E402
from xenstored import XenstoredDouble  # noqa: E402

BACKEND_KEYS = {"params": "rbd:vm1,mode=w!", "mode": "w", "frontend-id": "7", "dev": "xvda",
                "type": "phy", "state": "2", "frontend": "/local/domain/7/device/vbd/51712",
                "online": "1", "removable": "0", "bootable": "1"}
DEVICE_KEYS = {"physical-device": "fb:0", "physical-device-path": "/dev/rbd0",
               "block-rbd-image": "rbd/vm1", "block-rbd-mode": "w!", "block-rbd-mapper": "krbd"}


def backend(daemon, n):
    path = "/local/domain/0/backend/vbd/%d/51712" % (100 + n)
    for key, value in BACKEND_KEYS.items():
        daemon.write("%s/%s" % (path, key), value)
    daemon.write("/local/domain/%d/vm" % (100 + n), "/vm/0b0c7e4e-0000-4000-8000-%012d" % n)
    daemon.write("/local/domain/%d/name" % (100 + n), "guest%d" % n)
    return path


def with_tools(path, env):
    def tool(*argv):
        return subprocess.run(list(argv), capture_output=True, text=True, env=env, check=True)
    domid = path.split("/")[-2]
    tool("xenstore-ls", "-f", path)
    tool("xenstore-read", "/local/domain/%s/vm" % domid)
    tool("xenstore-read", "/local/domain/%s/name" % domid)
    args = []
    for key, value in DEVICE_KEYS.items():
        args += ["%s/%s" % (path, key), value]
    tool("xenstore-write", "-R", *args)
    tool("xenstore-write", "-R", path + "/hotplug-status", "connected")


def with_wire(path, env):
    xs = Xenstore(env=env)
    domid = path.split("/")[-2]
    xs.ls(path)
    xs.read_optional("/local/domain/%s/vm" % domid)
    xs.read_optional("/local/domain/%s/name" % domid)
    xs.write({"%s/%s" % (path, k): v for k, v in DEVICE_KEYS.items()})
    xs.write({path + "/hotplug-status": "connected"})
    xs.close()


def cpu_seconds():
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(work, paths, env, concurrent):
    """(wall s per add, CPU-s per add) of len(paths) adds, `concurrent` at a time."""
    cpu0, t0 = cpu_seconds(), time.monotonic()
    for start in range(0, len(paths), concurrent):
        threads = [threading.Thread(target=work, args=(p, env)) for p in paths[start:start + concurrent]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall, cpu = time.monotonic() - t0, cpu_seconds() - cpu0
    return wall / len(paths), cpu / len(paths)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="adds per measurement")
    parser.add_argument("--concurrent", type=int, default=16, help="adds at once in the storm")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="xsb")
    with XenstoredDouble(os.path.join(directory, "sock")) as daemon:
        env = dict(os.environ, **daemon.env())
        paths = [backend(daemon, n) for n in range(max(args.rounds, args.concurrent))]
        with_wire(paths[0], env)  # warm both paths (imports, page cache)
        with_tools(paths[0], env)
        print("xenstore work of one add (ls + 2 reads + 2 transactions), %d adds, same double"
              % len(paths))
        print("%-12s %12s %12s %10s" % ("", "tools ms", "wire ms", "ratio"))
        for label, concurrent in (("alone", 1), ("%d at once" % args.concurrent, args.concurrent)):
            tools = measure(with_tools, paths, env, concurrent)
            wire = measure(with_wire, paths, env, concurrent)
            print("%-12s %12.1f %12.1f %9.1fx  wall per add" % (label, tools[0] * 1000, wire[0] * 1000,
                                                               tools[0] / wire[0]))
            print("%-12s %12.1f %12.1f %9.1fx  CPU per add" % ("", tools[1] * 1000, wire[1] * 1000,
                                                              tools[1] / wire[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
