"""Pure helpers of block_rbd.images."""

import pytest

from block_rbd import images
from block_rbd.errors import BlockRbdError, ImageInUse
from block_rbd.target import ImageSpec, parse


def test_parent_spec_from_librbd_dict():
    info = {"pool_name": "rbd", "pool_namespace": "", "image_name": "gold", "snap_name": "base"}
    assert images.parent_spec(info) == ImageSpec("rbd", "gold", "", "base")
    info["pool_namespace"] = "ns"
    assert str(images.parent_spec(info)) == "rbd/ns/gold@base"


def test_parent_spec_matches_parsed_clone_option():
    target = parse("rbd/vm1,clone=rbd/gold@base")
    info = {"pool_name": "rbd", "pool_namespace": "", "image_name": "gold", "snap_name": "base"}
    assert images.parent_spec(info) == target.clone


def test_other_watchers_excludes_own_client():
    watchers = [{"addr": "a", "id": 1, "cookie": 5}, {"addr": "b", "id": 2, "cookie": 6}]
    assert images.other_watchers(watchers, 1) == [watchers[1]]
    assert images.other_watchers(watchers[:1], 1) == []
    assert images.other_watchers([], 1) == []


@pytest.mark.parametrize("wanted,ok", [(None, True), (100, True), (200, True), (99, False)])
def test_check_clone_size(wanted, ok):
    golden = ImageSpec("rbd", "gold", snap="s")
    if ok:
        images.check_clone_size(wanted, 100, golden)
    else:
        with pytest.raises(BlockRbdError, match="smaller than the golden snapshot rbd/gold@s"):
            images.check_clone_size(wanted, 100, golden)


def test_snapshot_rows():
    snaps = [{"name": "a", "id": 4, "size": 10, "timestamp": "t"}, {"name": "b", "id": 5, "size": 20}]
    rows = images.snapshot_rows(snaps, {"a": True})
    assert rows == [{"name": "a", "id": 4, "size": 10, "protected": True, "timestamp": "t"},
                    {"name": "b", "id": 5, "size": 20, "protected": False, "timestamp": None}]


def test_need_snap():
    with pytest.raises(BlockRbdError, match="POOL/IMAGE@SNAP"):
        images.need_snap(ImageSpec("rbd", "x"), "snapshot create")
    spec = ImageSpec("rbd", "x", snap="s")
    assert images.need_snap(spec, "x") is spec


def test_refuse_if_attached_names_holders_and_watchers_in_one_error():
    spec = ImageSpec("rbd", "vm1", snap="s")
    images.refuse_if_attached(spec, [], [])
    with pytest.raises(ImageInUse, match=r"^rbd/vm1 is attached \(h1, h2\): detach it before rolling back$"):
        images.refuse_if_attached(spec, ["h2", "h1"], [])
    with pytest.raises(ImageInUse, match=r"^rbd/vm1 is attached \(watched by a1, a2\): detach"):
        images.refuse_if_attached(spec, [], ["a2", "a1"])
    with pytest.raises(ImageInUse, match=r"\(h1, watched by a1\)"):
        images.refuse_if_attached(spec, ["h1"], ["a1"])
