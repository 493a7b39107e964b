#!/usr/bin/python3
"""Attach benchmark: `block-rbd add` against the floor of its own mapper.

For each mapper usable on this host:
  add    time from starting `block-rbd add` (as libxl does) until it exits with
         hotplug-status=connected written;
  floor  the mapper's bare map command(s) plus one xenstore-write, measured
         in the same run on the same cluster.
Then 16 concurrent adds of distinct images (all must succeed) and their removes.
Prints medians and ratios; asserts nothing about time.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools"), os.path.join(ROOT, "tests")]

from block_rbd import config as config_mod  # noqa: E402
from block_rbd import mappers  # noqa: E402
from floor import floor_map, floor_unmap  # noqa: E402
from testcluster import TestCluster  # noqa: E402
from xenstored import XenstoredDouble  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "block-rbd")


def run(argv, env=None, timeout=60):
    return subprocess.run(argv, env=env, check=True, capture_output=True, text=True, timeout=timeout)


class Bench:
    def __init__(self, cluster, work, xsd_env):
        self.cluster = cluster
        self.work = work
        self.env = dict(os.environ, **xsd_env)
        self.config_path = os.path.join(work, "block-rbd.yaml")
        self.backends = 0

    def write_config(self, mapper):
        with open(self.config_path, "w") as handle:
            handle.write("ceph: {conf: %s, id: %s, keyring: %s}\nmapper: %s\nstate_dir: %s\n"
                         "ledger_dir: %s\nfuse: {mount_dir: %s}\nlog: {file: %s, syslog: false}\n"
                         % (self.cluster.conf, self.cluster.user, self.cluster.user_keyring, mapper,
                            os.path.join(self.work, "state"), os.path.join(self.work, "ledger"),
                            os.path.join(self.work, "fuse"),
                            os.path.join(self.work, "hotplug.log")))
        self.env["BLOCK_RBD_CONFIG"] = self.config_path
        return config_mod.load(self.config_path)

    def backend(self, image):
        self.backends += 1
        domid = 10 + self.backends
        path = "backend/vbd/%d/51712" % domid
        run(["xenstore-write", path + "/params", "%s:%s" % (self.cluster.pool, image), path + "/mode", "w",
             path + "/frontend-id", str(domid), "/local/domain/%d/vm" % domid, "/vm/bench-%d" % domid],
            env=self.env)
        return path

    def hotplug(self, command, path):
        env = dict(self.env, XENBUS_PATH=path, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend")
        started = time.monotonic()
        result = subprocess.run([sys.executable, SCRIPT, command], env=env, capture_output=True,
                                text=True, timeout=60, cwd="/", stdin=subprocess.DEVNULL)
        elapsed = time.monotonic() - started
        if result.returncode != 0:
            raise SystemExit("%s %s failed: %s" % (command, path, result.stderr.strip()))
        return elapsed

    def floor(self, mapper, image, path):
        """The bare map command(s) of this mapper, then one xenstore-write; unmapped after."""
        point = os.path.join(self.work, "floor-mnt")
        started = time.monotonic()
        device = floor_map(mapper.name, self.cluster, image, point, path, self.env, self.run_stdout)
        elapsed = time.monotonic() - started
        floor_unmap(mapper.name, device, point, self.run_stdout)
        return elapsed

    @staticmethod
    def run_stdout(argv, env=None):
        return run(argv, env=env).stdout


def create_images(cluster, names):
    import rados
    import rbd
    handle = rados.Rados(conffile=cluster.conf, rados_id=cluster.user, conf={"keyring": cluster.user_keyring})
    handle.connect()
    with handle.open_ioctx(cluster.pool) as ioctx:
        for name in names:
            rbd.RBD().create(ioctx, name, 64 << 20, old_format=False)
    handle.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--concurrent", type=int, default=16)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="brbd-bench-")
    with TestCluster(os.path.join(work, "ceph")) as cluster, \
            XenstoredDouble(os.path.join(tempfile.mkdtemp(prefix="xsd"), "s")) as xsd:
        bench = Bench(cluster, work, xsd.env())
        create_images(cluster, ["bench"] + ["par%d" % i for i in range(args.concurrent)])
        print("block-rbd attach benchmark: %d rounds per mapper, medians" % args.rounds)
        print("%-6s %10s %10s %8s" % ("mapper", "floor ms", "add ms", "ratio"))
        for name in mappers.AUTO_ORDER:
            config = bench.write_config(name)
            mapper = mappers.get(name, config)
            reason = mapper.unavailable()
            if reason:
                print("%-6s not usable on this host: %s" % (name, reason))
                continue
            floors, adds = [], []
            for _ in range(args.rounds):
                path = bench.backend("bench")
                floors.append(bench.floor(mapper, "bench", path))
                path = bench.backend("bench")
                adds.append(bench.hotplug("add", path))
                bench.hotplug("remove", path)
            floor, add = statistics.median(floors), statistics.median(adds)
            print("%-6s %10.1f %10.1f %7.2fx" % (name, floor * 1000, add * 1000, add / floor))

        config = bench.write_config("auto")
        paths = [bench.backend("par%d" % i) for i in range(args.concurrent)]
        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrent) as pool:
            times = list(pool.map(lambda p: bench.hotplug("add", p), paths))
        wall = time.monotonic() - started
        connected = sum(xsd.read("/local/domain/0/%s/hotplug-status" % p) == "connected" for p in paths)
        print("%d concurrent adds: %d/%d connected, wall %.2f s, per add median %.0f ms, max %.0f ms"
              % (args.concurrent, connected, args.concurrent, wall, statistics.median(times) * 1000,
                 max(times) * 1000))
        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrent) as pool:
            list(pool.map(lambda p: bench.hotplug("remove", p), paths))
        print("%d concurrent removes: wall %.2f s" % (args.concurrent, time.monotonic() - started))


if __name__ == "__main__":
    main()
