"""block-rbd snapshot create|list|remove|rollback, clone and flatten against the real cluster."""

import json

from images_helpers import MiB, block_rbd_cli, cluster_for, image_bytes, snaps_of, write_pattern


def test_snapshot_create_list_remove(config_path, rbd_admin, make_image):
    _handle, ioctx = rbd_admin
    name = make_image(size=16 * MiB)
    result = block_rbd_cli("snapshot", "create", "rbd/%s@one" % name)
    assert result.exit_code == 0, result.output
    assert block_rbd_cli("snapshot", "create", "%s@two" % name).exit_code == 0  # default pool
    rows = json.loads(block_rbd_cli("snapshot", "list", name, "--format", "json").output)
    assert [r["name"] for r in rows] == ["one", "two"]
    assert rows[0]["size"] == 16 * MiB and rows[0]["protected"] is False
    plain = block_rbd_cli("snapshot", "list", "rbd/" + name).output
    assert plain.splitlines()[0].split() == ["NAME", "SIZE", "PROTECTED", "TIMESTAMP"]
    again = block_rbd_cli("snapshot", "create", "rbd/%s@one" % name)
    assert again.exit_code == 1
    assert "snapshot rbd/%s@one already exists" % name in again.output
    assert block_rbd_cli("snapshot", "remove", "rbd/%s@one" % name).exit_code == 0
    assert snaps_of(ioctx, name) == ["two"]
    missing = block_rbd_cli("snapshot", "remove", "rbd/%s@one" % name)
    assert missing.exit_code == 1 and "does not exist" in missing.output
    assert block_rbd_cli("snapshot", "create", "rbd/" + name).exit_code != 0  # no @SNAP


def test_snapshot_of_attached_image_and_rollback_refused_while_attached(
        libxl, config_path, rbd_admin, make_image):
    _handle, ioctx = rbd_admin
    name = make_image(size=16 * MiB)
    write_pattern(ioctx, name, [(0, b"before" * 10)])
    path = libxl.backend("rbd/" + name, mode="w")
    assert libxl.run("add", path).returncode == 0
    device = libxl.keys(path)["physical-device-path"]
    # Snapshots of an attached w image work (the guest should be frozen for a clean fs).
    assert block_rbd_cli("snapshot", "create", "rbd/%s@s1" % name).exit_code == 0
    with open(device, "r+b") as handle:
        handle.write(b"after!" * 10)
        handle.flush()
    refused = block_rbd_cli("snapshot", "rollback", "rbd/%s@s1" % name)
    assert refused.exit_code == 1
    assert "is attached" in refused.output and "detach it before rolling back" in refused.output
    assert libxl.run("remove", path).returncode == 0
    assert image_bytes(ioctx, name)[:60] == b"after!" * 10
    done = block_rbd_cli("snapshot", "rollback", "rbd/%s@s1" % name)
    assert done.exit_code == 0, done.output
    assert image_bytes(ioctx, name)[:60] == b"before" * 10


def test_rollback_refused_while_registered_without_a_watcher(config_path, rbd_admin, make_image):
    """A registration counts even when no client watches (a pending or stale attachment)."""
    from block_rbd import config
    from block_rbd.policy import Request
    from block_rbd.registry import Registry
    from block_rbd.target import parse_spec
    name = make_image(size=16 * MiB)
    assert block_rbd_cli("snapshot", "create", "rbd/%s@s1" % name).exit_code == 0
    cfg = config.load(config_path)
    spec = parse_spec("rbd/" + name)
    registry = Registry(cfg)
    holder = "backend/vbd/9/51712"
    with cluster_for(config_path) as cluster:
        registry.acquire(cluster, spec, Request(holder, "r", vm="vm-9", domid="9", devid="51712"))
    try:
        refused = block_rbd_cli("snapshot", "rollback", "rbd/%s@s1" % name)
        assert refused.exit_code == 1
        assert "testhost:" + holder in refused.output and "detach it before rolling back" in refused.output
    finally:
        with cluster_for(config_path) as cluster:
            registry.release(cluster, spec, holder)
    assert block_rbd_cli("snapshot", "rollback", "rbd/%s@s1" % name).exit_code == 0


def test_clone_flatten_and_remove_protected_snapshot(config_path, rbd_admin, make_image):
    import rbd
    _handle, ioctx = rbd_admin
    gold = make_image(size=16 * MiB)
    write_pattern(ioctx, gold, [(MiB, b"gold" * 256)])
    assert block_rbd_cli("snapshot", "create", "rbd/%s@g" % gold).exit_code == 0
    child = gold + "-child"
    try:
        result = block_rbd_cli("clone", "rbd/%s@g" % gold, "rbd/" + child, "--size", "32M")
        assert result.exit_code == 0, result.output
        with rbd.Image(ioctx, child, read_only=True) as image:
            assert image.size() == 32 * MiB
            assert image.get_parent_image_spec()["image_name"] == gold
        busy = block_rbd_cli("snapshot", "remove", "rbd/%s@g" % gold)
        assert busy.exit_code == 1 and "has clones" in busy.output
        assert block_rbd_cli("flatten", "rbd/" + child).exit_code == 0
        with rbd.Image(ioctx, child, read_only=True) as image:
            try:
                image.get_parent_image_spec()
                raise AssertionError("still a clone")
            except rbd.ImageNotFound:
                pass
        assert image_bytes(ioctx, child)[MiB:MiB + 1024] == b"gold" * 256
        not_clone = block_rbd_cli("flatten", "rbd/" + child)
        assert not_clone.exit_code == 1 and "is not a clone" in not_clone.output
        assert block_rbd_cli("snapshot", "remove", "rbd/%s@g" % gold).exit_code == 0
        assert snaps_of(ioctx, gold) == []
    finally:
        from conftest import remove_image
        remove_image(ioctx, child)
