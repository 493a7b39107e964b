"""Several dom0s on one machine: one config, cephx user, state and fuse dir each.

Shared by the access-mode tests (tests/integration/test_access_*.py).
"""

import os
import subprocess
import sys
import time

from conftest import SCRIPT, fuse_daemons, write_config

from block_rbd import config as config_mod


class Host:
    """One simulated dom0 of the cluster."""

    def __init__(self, name, cluster, tmp, user, keyring, libxl=None, **overrides):
        self.name = name
        self.tmp = os.path.join(str(tmp), name)
        os.makedirs(self.tmp, exist_ok=True)
        self.libxl = libxl
        self.cluster = cluster
        self._user, self._keyring = user, keyring
        self.config_path = self.write(**overrides)
        self.added = []  # backend paths this host ran `add` for, in order

    def write(self, **overrides):
        values = {"host": self.name, "ceph.id": self._user, "ceph.keyring": self._keyring}
        values.update(overrides)
        path = os.path.join(self.tmp, "block-rbd.yaml")
        return write_config(path, self.cluster, self.tmp, **values)

    def config(self):
        return config_mod.load(self.config_path)

    def env(self):
        return {"BLOCK_RBD_CONFIG": self.config_path}

    def backend(self, image, mode="w", domid=5, vm=None, params_extra="", name=None):
        return self.libxl.backend("%s/%s%s" % (self.cluster.pool, image, params_extra), mode=mode,
                                  domid=domid, vm=vm, name=name)

    def add(self, path):
        self.added.append(path)
        return self.libxl.run("add", path, env=self.env())

    def remove(self, path):
        return self.libxl.run("remove", path, env=self.env())

    def cli(self, *args, timeout=60):
        return subprocess.run([sys.executable, SCRIPT, "--config", self.config_path] + list(args),
                              capture_output=True, text=True, timeout=timeout, cwd="/",
                              stdin=subprocess.DEVNULL)


def watchers(ioctx, image):
    import rbd
    with rbd.Image(ioctx, image, read_only=True) as handle:
        return [w["addr"] for w in handle.watchers_list()]


def wait_watcher_gone(ioctx, image, addr, timeout=60):
    """Killed clients' watches linger until the OSD's watch timeout (~30 s)."""
    deadline = time.monotonic() + timeout
    while addr in watchers(ioctx, image):
        if time.monotonic() > deadline:
            raise AssertionError("watcher %s of %s still there after %d s" % (addr, image, timeout))
        time.sleep(0.5)


def fuse_pid(mountpoint):
    """Pid of the rbd-fuse process serving `mountpoint`."""
    daemons = fuse_daemons(mountpoint)
    return daemons[0][0] if daemons else None
