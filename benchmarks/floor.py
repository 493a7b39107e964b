"""The floor of an attach: a mapper's bare map command(s) plus one xenstore-write.

Shared by attach.py and boot_storm.py.  `run(argv, env=None)` runs one command
and returns its stdout, raising on failure: each benchmark passes its own, so
it can time or account the commands as it needs.
"""

import os
import time

from block_rbd.mappers.base import device_numbers


def floor_map(mapper, cluster, image, point, backend, env, run):
    """Map `image` the bare way (fuse: rbd-fuse at `point` + losetup) and write
    physical-device under `backend`; returns the device."""
    spec = cluster.pool + "/" + image
    auth = ["-c", cluster.conf, "--id", cluster.user, "--keyring", cluster.user_keyring]
    if mapper == "fuse":
        os.makedirs(point, exist_ok=True)
        run(["rbd-fuse"] + auth + ["-p", cluster.pool, "-r", image, point])
        device = run(["losetup", "--find", "--show", os.path.join(point, image)]).strip()
    elif mapper == "nbd":
        device = run(["rbd-nbd", "map"] + auth + [spec]).strip()
    else:
        device = run(["rbd", "device", "map", "-o", "noudev"] + auth + [spec]).strip()
    run(["xenstore-write", backend + "/physical-device", "%x:%x" % device_numbers(device)], env=env)
    return device


def floor_unmap(mapper, device, point, run, busy_for=5.0):
    """Undo floor_map.  fusermount is retried for up to `busy_for` seconds: a
    detached loop device lets go of its file asynchronously."""
    if mapper == "fuse":
        run(["losetup", "--detach", device])
        deadline = time.monotonic() + busy_for
        while True:
            try:
                run(["fusermount", "-u", point])
                break
            except Exception:  # whatever the caller's run() raises: a busy mount, retried until busy_for
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    elif mapper == "nbd":
        run(["rbd-nbd", "unmap", device])
    else:
        run(["rbd", "device", "unmap", "-o", "noudev", device])
