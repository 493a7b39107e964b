#!/usr/bin/env python3
"""Benchmarks of backups and clone-on-attach, each against a baseline measured in the same run.

    .venv/bin/python benchmarks/bench_images.py [--quick]

Starts a throwaway cluster of its own (tools/testcluster.py, memstore raised
so a 4 GiB image at 5 % and a full 1 GiB image fit in RAM), prints ratios,
stops the cluster and removes every file it wrote.  No assertions: targets
are printed next to the measured ratios.
"""

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import rados  # noqa: E402
import rbd  # noqa: E402
from testcluster import TestCluster  # noqa: E402

from block_rbd import attachments, backup, process  # noqa: E402
from block_rbd import config as config_mod  # noqa: E402
from block_rbd.cluster import Cluster  # noqa: E402
from block_rbd.policy import Request  # noqa: E402
from block_rbd.registry import Registry  # noqa: E402
from block_rbd.target import ImageSpec, parse  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
MEMSTORE = 8 * GiB


class BenchCluster(TestCluster):
    """The test cluster with a larger memstore (it keeps all data in RAM)."""

    def _write_conf(self):
        super()._write_conf()
        with open(self.conf) as handle:
            lines = handle.read().splitlines()
        lines = ["memstore_device_bytes = %d" % MEMSTORE if line.startswith("memstore_device_bytes") else line
                 for line in lines]
        with open(self.conf, "w") as handle:
            handle.write("\n".join(lines) + "\n")


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    fn(*args, **kwargs)
    return time.monotonic() - start


def on_disk(path):
    return os.stat(path).st_blocks * 512


def fill(ioctx, name, size, extents):
    """Create an image and write random data at [(offset, length)]."""
    rbd.RBD().create(ioctx, name, size, old_format=False)
    buf = bytearray(os.urandom(4 * MiB))
    with rbd.Image(ioctx, name) as image:
        for offset, length in extents:
            for off in range(offset, offset + length, 4 * MiB):
                buf[:8] = off.to_bytes(8, "little")
                image.write(bytes(buf[:min(4 * MiB, offset + length - off)]), off)
        image.create_snap("snap")


def rbd_cli(cluster, *args, timeout=600):
    return process.run(["rbd", "-c", cluster.conf, "--id", cluster.user, "--keyring", cluster.user_keyring,
                        "--no-progress"] + list(args), timeout=timeout)


def row(label, ours, base, unit="s", target=""):
    ratio = ours / base if base else float("nan")
    print("%-52s ours %8.3f %s   baseline %8.3f %s   ratio %5.2fx  %s" % (label, ours, unit, base, unit, ratio, target))


def bench_backups(tc, cluster, ioctx, out, quick):
    size = (1 if quick else 4) * GiB
    rnd = random.Random(5)
    slots = rnd.sample(range(size // MiB), int(size // MiB * 0.05))  # 5 % in 1 MiB pieces
    fill(ioctx, "sparse", size, [(s * MiB, MiB) for s in sorted(slots)])
    spec = ImageSpec(tc.pool, "sparse", snap="snap")
    ours_file, base_file = os.path.join(out, "ours.raw"), os.path.join(out, "base.raw")
    t_base = timed(rbd_cli, tc, "export", "%s/sparse@snap" % tc.pool, base_file)
    t_ours = timed(backup.backup, cluster, spec, ours_file, "raw")
    print("\n%d GiB image, 5 %% written (%d MiB):" % (size // GiB, len(slots)))
    row("  backup RAW vs rbd export (time)", t_ours, t_base, target="target <= 0.30x")
    row("  space on disk (MiB)", on_disk(ours_file) / MiB, on_disk(base_file) / MiB, unit="MiB")
    t_qcow = timed(backup.backup, cluster, spec, os.path.join(out, "ours.qcow2"), "qcow2")
    t_conv = timed(process.run, ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", base_file,
                                 os.path.join(out, "base.qcow2")], timeout=600)
    row("  backup QCOW2 vs rbd export + qemu-img convert", t_qcow, t_base + t_conv)
    for name in os.listdir(out):
        os.unlink(os.path.join(out, name))
    with rbd.Image(ioctx, "sparse") as image:
        image.remove_snap("snap")
    rbd.RBD().remove(ioctx, "sparse")

    full = (256 * MiB) if quick else GiB
    fill(ioctx, "full", full, [(0, full)])
    spec = ImageSpec(tc.pool, "full", snap="snap")
    t_base = timed(rbd_cli, tc, "export", "%s/full@snap" % tc.pool, base_file)
    os.unlink(base_file)
    t_ours = timed(backup.backup, cluster, spec, ours_file, "raw")
    os.unlink(ours_file)
    print("\n%d MiB image, fully written:" % (full // MiB))
    row("  backup RAW throughput (MiB/s) vs rbd export", full / MiB / t_ours, full / MiB / t_base,
        unit="MiB/s", target="target >= 1.0x")
    with rbd.Image(ioctx, "full") as image:
        image.remove_snap("snap")
    rbd.RBD().remove(ioctx, "full")


def bench_clone_attach(tc, ioctx, work, rounds):
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "block-rbd.yaml")
    from conftest import write_config
    write_config(path, tc, work)
    config = config_mod.load(path)
    request = Request("bench", "w")
    registry = Registry(config)
    print("\nclone-on-attach (fuse mapper, median of %d) vs attaching an existing image:" % rounds)
    rbd.RBD().create(ioctx, "existing", GiB, old_format=False)
    for golden_size in (GiB, 100 * GiB):
        gold = "golden-%dG" % (golden_size // GiB)
        fill(ioctx, gold, golden_size, [(0, 16 * MiB)])
        clone_times, plain_times = [], []
        with Cluster(config) as cluster:
            for i in range(rounds):
                target = parse("%s/vm%d-%s,clone=%s/%s@snap" % (tc.pool, i, gold, tc.pool, gold))
                clone_times.append(timed(attachments.attach, config, cluster, target, request, registry))
                attachments.detach(config, cluster, target.spec, False, "bench", registry)
                existing = parse("%s/existing" % tc.pool)
                plain_times.append(timed(attachments.attach, config, cluster, existing, request, registry))
                attachments.detach(config, cluster, existing.spec, False, "bench", registry)
        row("  golden %3d GiB: attach with clone= vs existing" % (golden_size // GiB),
            statistics.median(clone_times), statistics.median(plain_times), target="target 0.90-1.10x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 GiB / 256 MiB instead of 4 GiB / 1 GiB")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="brbd-bench-")
    tc = BenchCluster(os.path.join(work, "ceph"))
    tc.start()
    handle = None
    try:
        handle = rados.Rados(conffile=tc.conf, rados_id=tc.user, conf={"keyring": tc.user_keyring})
        handle.connect()
        ioctx = handle.open_ioctx(tc.pool)
        out = os.path.join(work, "out")
        os.makedirs(out)
        bench_cfg = os.path.join(work, "cfg")
        os.makedirs(bench_cfg)
        from conftest import write_config
        config = config_mod.load(write_config(os.path.join(bench_cfg, "c.yaml"), tc, bench_cfg,
                                              **{"timeouts.op": 30}))
        with Cluster(config) as cluster:
            bench_backups(tc, cluster, ioctx, out, args.quick)
        bench_clone_attach(tc, ioctx, os.path.join(work, "attach"), args.rounds)
        ioctx.close()
    finally:
        if handle is not None:
            handle.shutdown()
        tc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
