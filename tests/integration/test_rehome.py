"""Registry.rehome against the real cluster: a mapping client that died is replaced (what
upkeep does for an rbd-nbd daemon): the dead client is blocklisted (its watch goes with
it, so the new client need not wait for the OSD's watch timeout for the image's lock),
and the registration names the new client, so that no host takes it for stale."""

import os
import signal

import rados
import rbd

from access_hosts import fuse_pid, watchers, wait_watcher_gone
from block_rbd import config as config_mod
from block_rbd.cluster import Cluster
from block_rbd.registry import Registry
from block_rbd.target import parse_spec
from conftest import NOTHING, leftovers


def _locks(config_path, image):
    from images_helpers import block_rbd_cli
    import json
    result = block_rbd_cli("locks", image, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["registrations"]


def test_a_dead_client_is_fenced_and_the_registration_names_the_new_one(
        libxl, config_path, ceph_cluster, rbd_admin, make_image, fuse_cleanup):
    name = make_image()
    path = libxl.backend("rbd/" + name, mode="w")
    assert libxl.run("add", path).returncode == 0
    (reg,) = _locks(config_path, name)
    old = reg["client"]
    mountpoint = os.path.join(config_mod.load(config_path)["fuse.mount_dir"], "rbd%2F" + name)
    os.kill(fuse_pid(mountpoint), signal.SIGKILL)  # the mapping client dies
    assert old in watchers(rbd_admin[1], name)     # its watch lingers (OSD watch timeout)
    config = config_mod.load(config_path)
    new_client = rados.Rados(conffile=ceph_cluster.conf, rados_id=ceph_cluster.user,
                             conf={"keyring": ceph_cluster.user_keyring})
    new_client.connect(timeout=10)
    ioctx = new_client.open_ioctx(ceph_cluster.pool)
    opened = []
    try:
        with Cluster(config) as cluster:
            got = Registry(config).rehome(cluster, parse_spec("rbd/" + name), [path],
                                          lambda: opened.append(rbd.Image(ioctx, name)) or "started")
        assert got == "started"
        assert any(e.get("addr", "").startswith(old) for e in ceph_cluster.ceph("osd", "blocklist", "ls"))
        wait_watcher_gone(rbd_admin[1], name, old)  # fenced: the OSDs drop its watch
        (reg,) = _locks(config_path, name)
        assert reg["client"] != old and reg["client"] in watchers(rbd_admin[1], name)
        assert reg["state"] == "alive"
        opened[0].write(b"new client writes", 0)  # takes the lock the dead one held
    finally:
        for image in opened:
            image.close()
        ioctx.close()
        new_client.shutdown()
        assert libxl.run("remove", path).returncode == 0
    assert leftovers(config_path, [name]) == NOTHING
