"""clone= on attach against the real cluster: v1 and v2 clones, size=, the race, errors."""

import os
import shutil
import tempfile
import threading
import uuid

import pytest

from conftest import new_cluster, remove_image
from images_helpers import MiB, cluster_for, image_bytes, write_pattern

from block_rbd import images
from block_rbd.target import ImageSpec, parse


@pytest.fixture
def golden(rbd_admin, make_image):
    """A golden image with data and an (unprotected) snapshot `base`; clones removed first."""
    import rbd
    _handle, ioctx = rbd_admin
    name = make_image(size=64 * MiB)
    write_pattern(ioctx, name, [(0, b"golden" * 1000), (10 * MiB, os.urandom(MiB))])
    with rbd.Image(ioctx, name) as image:
        image.create_snap("base")
    clones = []
    yield name, clones
    for clone in clones:
        remove_image(ioctx, clone)


def new_name(clones):
    name = "vm-" + uuid.uuid4().hex[:8]
    clones.append(name)
    return name


def parent(ioctx, name):
    import rbd
    with rbd.Image(ioctx, name, read_only=True) as image:
        return image.get_parent_image_spec(), image.size(), image.op_features()


def test_attach_creates_clone_v1_and_grows_it(libxl, config_path, rbd_admin, ceph_cluster, golden):
    import rbd
    _handle, ioctx = rbd_admin
    gold, clones = golden
    name = new_name(clones)
    path = libxl.backend("rbd/%s,clone=rbd/%s@base,size=128M" % (name, gold), mode="w")
    result = libxl.run("add", path)
    assert result.returncode == 0, result.stderr
    keys = libxl.keys(path)
    assert keys["hotplug-status"] == "connected"
    info, size, op_features = parent(ioctx, name)
    assert (info["image_name"], info["snap_name"]) == (gold, "base")
    assert size == 128 * MiB
    with rbd.Image(ioctx, gold, read_only=True) as image:
        assert image.is_protected_snap("base")  # this cluster defaults to clone v1
    assert not op_features & rbd.RBD_OPERATION_FEATURE_CLONE_CHILD
    with open(keys["physical-device-path"], "rb") as device:
        assert device.read(6000) == b"golden" * 1000
    assert libxl.run("remove", path).returncode == 0
    # A second attach finds the clone and uses it as it is.
    path = libxl.backend("rbd/%s,clone=rbd/%s@base,size=256M" % (name, gold), mode="w")
    assert libxl.run("add", path).returncode == 0
    assert parent(ioctx, name)[1] == 128 * MiB
    assert libxl.run("remove", path).returncode == 0


def test_missing_golden_snapshot_is_one_clear_line(libxl, config_path, rbd_admin, golden):
    _handle, ioctx = rbd_admin
    gold, clones = golden
    name = new_name(clones)
    path = libxl.backend("rbd/%s,clone=rbd/%s@nope" % (name, gold), mode="w")
    result = libxl.run("add", path)
    assert result.returncode == 1
    error = libxl.keys(path)["hotplug-error"]
    assert error == "add failed: golden snapshot rbd/%s@nope does not exist" % gold
    assert "\n" not in error
    path = libxl.backend("rbd/%s,clone=rbd/no-such-golden@base" % name, mode="w")
    assert libxl.run("add", path).returncode == 1
    assert "golden image rbd/no-such-golden does not exist" in libxl.keys(path)["hotplug-error"]
    import rbd
    assert name not in rbd.RBD().list(ioctx)


def test_size_smaller_than_golden_is_refused(config_path, golden):
    gold, clones = golden
    with cluster_for(config_path) as cluster:
        with pytest.raises(images.BlockRbdError, match="smaller than the golden snapshot"):
            images.clone(cluster, ImageSpec("rbd", gold, snap="base"), ImageSpec("rbd", new_name(clones)),
                         size=MiB)


def test_racing_hosts_end_with_one_clone(config_path, rbd_admin, golden):
    """Four 'hosts' (own connections) clone the same image at once: all succeed, one clone."""
    _handle, ioctx = rbd_admin
    gold, clones = golden
    name = new_name(clones)
    spec, src = ImageSpec("rbd", name), ImageSpec("rbd", gold, snap="base")
    barrier = threading.Barrier(4)
    outcomes, errors = [], []

    def host():
        with cluster_for(config_path) as cluster:
            cluster.rados  # connect before the start line
            barrier.wait()
            try:
                outcomes.append(images.clone(cluster, src, spec, size=96 * MiB))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
    threads = [threading.Thread(target=host) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(outcomes).count("created") == 1 and len(outcomes) == 4
    info, size, _ = parent(ioctx, name)
    assert (info["image_name"], info["snap_name"], size) == (gold, "base", 96 * MiB)
    assert image_bytes(ioctx, name)[:6000] == b"golden" * 1000


def test_race_loser_finding_another_image_is_an_error(config_path, rbd_admin, golden, make_image,
                                                      monkeypatch):
    gold, _clones = golden
    other = make_image(size=8 * MiB)
    monkeypatch.setattr(images, "CLONE_SETTLE", 0.3)
    with cluster_for(config_path) as cluster:
        with pytest.raises(images.CloneConflict, match="%s already exists and is not a clone of" % other):
            images.clone(cluster, ImageSpec("rbd", gold, snap="base"), ImageSpec("rbd", other))
        # clone= on attach simply uses an image that exists already.
        assert images.ensure_clone(cluster, parse("rbd/%s,clone=rbd/%s@base" % (other, gold))) == "exists"


@pytest.fixture(scope="module")
def mimic_cluster():
    """A cluster of its own: require_min_compat_client is cluster-wide and sticky."""
    directory = tempfile.mkdtemp(prefix="brbd-ceph-v2-")
    cluster = new_cluster(directory)
    cluster.start()
    cluster.ceph("osd", "set-require-min-compat-client", "mimic")
    yield cluster
    cluster.stop()
    shutil.rmtree(directory, ignore_errors=True)


def test_clone_v2_needs_no_protection(mimic_cluster, tmp_path):
    import rados
    import rbd
    from conftest import write_config
    path = write_config(tmp_path / "c.yaml", mimic_cluster, str(tmp_path))
    handle = rados.Rados(conffile=mimic_cluster.conf, rados_id=mimic_cluster.user,
                         conf={"keyring": mimic_cluster.user_keyring})
    handle.connect()
    try:
        ioctx = handle.open_ioctx(mimic_cluster.pool)
        rbd.RBD().create(ioctx, "gold", 16 * MiB, old_format=False)
        write_pattern(ioctx, "gold", [(0, b"v2" * 100)])
        with rbd.Image(ioctx, "gold") as image:
            image.create_snap("base")
        with cluster_for(path) as cluster:
            target = parse("rbd/child,clone=rbd/gold@base,size=32M")
            assert images.ensure_clone(cluster, target) == "created"
            assert images.ensure_clone(cluster, target) == "exists"
        with rbd.Image(ioctx, "gold", read_only=True) as image:
            assert not image.is_protected_snap("base")
        info, size, op_features = parent(ioctx, "child")
        assert info["snap_name"] == "base" and size == 32 * MiB
        assert op_features & rbd.RBD_OPERATION_FEATURE_CLONE_CHILD
        assert image_bytes(ioctx, "child")[:200] == b"v2" * 100
        ioctx.close()
    finally:
        handle.shutdown()
