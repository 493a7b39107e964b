#!/usr/bin/env python3
"""Soak: N simulated hosts race for `w` on one image, round after round.

Each host is its own process with its own cephx user and connection.  Prints
the winners per round (summary), and the check latency (median, p99) against
the bare cost of one lock operation (cls_lock take + release on the header)
measured in the same run.

    python3 benchmarks/access_soak.py [--rounds 1000] [--hosts 4] [--cluster DIR]

Without --cluster a throwaway cluster is started (tools/testcluster.py).
"""

import argparse
import collections
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))


def host_config(cluster, tmp, name, user, keyring):
    from block_rbd import config as config_mod
    return config_mod.from_dict({
        "ceph": {"conf": cluster.conf, "id": user, "keyring": keyring}, "pool": cluster.pool,
        "host": name, "state_dir": os.path.join(tmp, name, "state"), "ledger_dir": os.path.join(tmp, name, "ledger"),
        "log": {"file": None, "syslog": False}})


def racer(cfg_values, image, rounds, barrier, results, index):
    from block_rbd.cluster import Cluster
    from block_rbd.config import Config
    from block_rbd.errors import AccessDenied
    from block_rbd.policy import Request
    from block_rbd.registry import Registry
    from block_rbd.target import parse_spec

    config = Config(cfg_values, "<soak>")
    registry = Registry(config)
    spec = parse_spec(image)
    holder = "backend/vbd/%d/51712" % (index + 1)
    out = []
    with Cluster(config) as cluster:
        cluster.rados
        for round_no in range(rounds):
            barrier.wait(timeout=120)
            started = time.monotonic()
            try:
                registry.acquire(cluster, spec, Request(holder, "w", vm="vm-%d" % index, domid=str(index + 1),
                                                        devid="51712"))
                won = True
            except AccessDenied:
                won = False
            out.append((round_no, index, won, time.monotonic() - started))
            barrier.wait(timeout=120)
            if won:
                registry.release(cluster, spec, holder)
            barrier.wait(timeout=120)
    results.put(out)


def bare_lock_cost(cluster_conf, user, keyring, pool, image, samples=1000):
    """Seconds per cls_lock take+release on the image header, uncontended."""
    import rados
    import rbd
    handle = rados.Rados(conffile=cluster_conf, rados_id=user, conf={"keyring": keyring})
    handle.connect()
    try:
        ioctx = handle.open_ioctx(pool)
        with rbd.Image(ioctx, image, read_only=True) as img:
            header = "rbd_header." + img.id()
        times = []
        for _ in range(samples):
            started = time.monotonic()
            ioctx.lock_exclusive(header, "soak-bare", "c", desc="", duration=5)
            ioctx.unlock(header, "soak-bare", "c")
            times.append(time.monotonic() - started)
        ioctx.close()
        return times
    finally:
        handle.shutdown()


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def run(cluster, rounds, nhosts, tmp):
    import rados
    import rbd
    users = [("brbd-soak%d" % i, cluster.make_user("brbd-soak%d" % i)) for i in range(1, nhosts + 1)]
    admin = rados.Rados(conffile=cluster.conf, rados_id=cluster.user, conf={"keyring": cluster.user_keyring})
    admin.connect()
    ioctx = admin.open_ioctx(cluster.pool)
    name = "soak-%d" % os.getpid()
    rbd.RBD().create(ioctx, name, 64 << 20, old_format=False)
    try:
        configs = [host_config(cluster, tmp, "soakhost%d" % (i + 1), u, k).values
                   for i, (u, k) in enumerate(users)]
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(nhosts)
        results = ctx.Queue()
        image = "%s/%s" % (cluster.pool, name)
        started = time.monotonic()
        procs = [ctx.Process(target=racer, args=(configs[i], image, rounds, barrier, results, i))
                 for i in range(nhosts)]
        for proc in procs:
            proc.start()
        rows = [row for _ in procs for row in results.get(timeout=rounds * 2 + 60)]
        for proc in procs:
            proc.join(timeout=30)
        wall = time.monotonic() - started
        bare = bare_lock_cost(cluster.conf, cluster.user, cluster.user_keyring, cluster.pool, name)
    finally:
        rbd.RBD().remove(ioctx, name)
        ioctx.close()
        admin.shutdown()

    per_round = collections.defaultdict(list)
    for round_no, index, won, _elapsed in rows:
        if won:
            per_round[round_no].append(index)
        else:
            per_round.setdefault(round_no, [])
    counts = collections.Counter(len(per_round[r]) for r in range(rounds))
    by_host = collections.Counter(w[0] for w in per_round.values() if len(w) == 1)
    checks = [e for *_x, e in rows]
    wins = [e for _r, _i, won, e in rows if won]
    losses = [e for _r, _i, won, e in rows if not won]
    bare_med = statistics.median(bare)
    print("access soak: %d rounds, %d hosts racing for w on one image, %.1f s" % (rounds, nhosts, wall))
    print("winners per round: %s" % ", ".join("%d winner(s): %d rounds" % (k, v) for k, v in sorted(counts.items())))
    print("wins by host: %s" % ", ".join("soakhost%d: %d" % (i + 1, by_host[i]) for i in range(nhosts)))
    print("bare lock op (cls_lock take+release, uncontended): median %.2f ms, p99 %.2f ms"
          % (bare_med * 1e3, pct(bare, 99) * 1e3))
    for label, values in (("check, all", checks), ("check, winner", wins), ("check, refused", losses)):
        med, p99 = statistics.median(values), pct(values, 99)
        print("%-15s median %6.2f ms (%4.1fx bare), p99 %6.2f ms (%4.1fx bare), max %6.2f ms"
              % (label, med * 1e3, med / bare_med, p99 * 1e3, p99 / bare_med, max(values) * 1e3))
    ok = counts == collections.Counter({1: rounds}) and max(checks) <= 5
    print("RESULT: %s" % ("exactly one winner every round; every check <= 5 s" if ok else "FAILED"))
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--cluster", help="directory of a running tools/testcluster.py cluster")
    args = ap.parse_args()
    from testcluster import TestCluster
    tmp = tempfile.mkdtemp(prefix="brbd-soak-")
    if args.cluster:
        return run(TestCluster(args.cluster), args.rounds, args.hosts, tmp)
    with TestCluster(os.path.join(tmp, "cluster")) as cluster:
        return run(cluster, args.rounds, args.hosts, tmp)


if __name__ == "__main__":
    sys.exit(main())
