"""Hard mode (access.exclusive_map): which mappings get the `exclusive` map option."""

import pytest

from block_rbd import config as config_mod
from block_rbd.attachments import _options
from block_rbd.target import parse


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("mapper", ["krbd", "nbd", "fuse"])
@pytest.mark.parametrize("read_only", [False, True])
def test_exclusive_only_for_hard_mode_writers(hard, mapper, read_only):
    config = config_mod.from_dict({"access": {"exclusive_map": hard}})
    target = parse("rbd/vm1,map_options=queue_depth=128")
    expected = ("queue_depth=128",) + (("exclusive",) if hard and not read_only and mapper != "fuse" else ())
    assert _options(config, mapper, read_only, target) == expected


def test_exclusive_given_by_the_target_is_not_doubled():
    config = config_mod.from_dict({"access": {"exclusive_map": True}})
    assert _options(config, "krbd", False, parse("rbd/vm1,map_options=exclusive")) == ("exclusive",)
