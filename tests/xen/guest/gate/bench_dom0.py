#!/usr/bin/python3
"""benchmarks/attach.py's measurement inside dom0, against the real xenstored: for krbd
and nbd, the mapper's bare map command + one xenstore-write (the floor) against
`block-rbd add` as libxl runs it.  Medians over --rounds; relative figures (TCG)."""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, "/opt/block-rbd/benchmarks")
import attach  # noqa: E402
from block_rbd import mappers  # noqa: E402


class Cluster:
    conf = "/etc/ceph/ceph.conf"
    user = os.environ.get("BRBD_ID", "blockrbd")
    user_keyring = os.environ.get("BRBD_KEYRING", "/etc/ceph/ceph.client.blockrbd.keyring")
    pool = os.environ.get("BRBD_POOL", "rbd")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image", default="bench")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="brbd-bench-")
    bench = attach.Bench(Cluster(), work, {})
    made = []
    print("block-rbd attach benchmark in dom0 (real xenstored, TCG): %d rounds, medians" % a.rounds)
    print("%-6s %10s %10s %8s" % ("mapper", "floor ms", "add ms", "ratio"))
    for name in ("krbd", "nbd"):
        config = bench.write_config(name)
        mapper = mappers.get(name, config)
        reason = mapper.unavailable()
        if reason:
            print("%-6s not usable: %s" % (name, reason))
            continue
        floors, adds, removes = [], [], []
        for _ in range(a.rounds):
            path = bench.backend(a.image)
            made.append(path)
            floors.append(bench.floor(mapper, a.image, path))
            path = bench.backend(a.image)
            made.append(path)
            adds.append(bench.hotplug("add", path))
            removes.append(bench.hotplug("remove", path))
        floor, add = statistics.median(floors), statistics.median(adds)
        print("%-6s %10.1f %10.1f %7.2fx   (remove median %.1f ms)"
              % (name, floor * 1000, add * 1000, add / floor, statistics.median(removes) * 1000))
        print("BENCH %s floor=%.3f add=%.3f ratio=%.2f remove=%.3f"
              % (name, floor, add, add / floor, statistics.median(removes)))
    for path in made:
        domid = path.split("/")[2]
        subprocess.run(["xenstore-rm", "/local/domain/0/backend/vbd/" + domid, "/local/domain/" + domid],
                       timeout=30, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
