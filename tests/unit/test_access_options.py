"""Map options from the configuration: hard mode (access.exclusive_map) adds `exclusive`;
QoS (qos=, config qos) adds librbd's limits and decides the mapper."""

import pytest

from block_rbd import config as config_mod
from block_rbd.attachments import _options, mapper_for
from block_rbd.errors import ConfigError, TargetError
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


@pytest.mark.parametrize("mapper", ["krbd", "nbd", "fuse"])
def test_qos_limits_go_to_rbd_nbd_only(mapper):
    config = config_mod.from_dict({})
    target = parse("rbd/vm1,qos=iops:500+write_bps:4M")
    expected = ("rbd_qos_iops_limit=500", "rbd_qos_write_bps_limit=4194304") if mapper == "nbd" else ()
    assert _options(config, mapper, False, target) == expected


def test_configured_qos_is_the_default_and_qos_none_drops_it():
    config = config_mod.from_dict({"qos": "iops:100"})
    assert _options(config, "nbd", False, parse("rbd/vm1")) == ("rbd_qos_iops_limit=100",)
    assert _options(config, "nbd", False, parse("rbd/vm1,qos=bps:1M")) == ("rbd_qos_bps_limit=1048576",)
    assert _options(config, "nbd", False, parse("rbd/vm1,qos=none")) == ()


@pytest.mark.parametrize("configured, target, chosen", [
    ("auto", "rbd/vm1", None),                       # no limits: the configured choice
    ("auto", "rbd/vm1,mapper=krbd", "krbd"),
    ("auto", "rbd/vm1,qos=iops:5", "nbd"),           # limits: auto means rbd-nbd
    ("nbd", "rbd/vm1,qos=iops:5", "nbd"),
    ("auto", "rbd/vm1,qos=iops:5,mapper=nbd", "nbd"),
    ("krbd", "rbd/vm1,qos=none", None),
    ("krbd", "rbd/vm1,qos=iops:5", "nbd"),           # the disk's own limits win over a default
])
def test_mapper_for(configured, target, chosen):
    assert mapper_for(config_mod.from_dict({"mapper": configured}), parse(target)) == chosen


@pytest.mark.parametrize("configured, target, named", [
    ("auto", "rbd/vm1,qos=iops:5,mapper=krbd", "krbd"),
    ("auto", "rbd/vm1,qos=bps:1M,mapper=fuse", "fuse"),
    ("nbd", "rbd/vm1,qos=iops:5,mapper=krbd", "krbd"),
])
def test_qos_with_another_mapper_is_refused_in_one_line(configured, target, named):
    with pytest.raises(TargetError) as err:
        mapper_for(config_mod.from_dict({"mapper": configured}), parse(target))
    assert str(err.value) == ("qos=%s needs mapper=nbd (librbd's limits); %s has no I/O limits: use mapper=nbd "
                              "or qos=none" % (parse(target).qos and "+".join("%s:%d" % q for q in parse(target).qos),
                                               named))


@pytest.mark.parametrize("configured", ["krbd", "fuse"])
def test_configured_qos_with_a_configured_mapper_without_limits_is_refused(configured):
    config = config_mod.from_dict({"mapper": configured, "qos": "iops:100"}, "/etc/xen/block-rbd.yaml")
    with pytest.raises(TargetError) as err:
        mapper_for(config, parse("rbd/vm1"))
    assert str(err.value) == ("the configured qos (iops:100) needs rbd-nbd but the configured mapper is %s, "
                              "which has no I/O limits: change one of them in /etc/xen/block-rbd.yaml"
                              % configured)
    assert mapper_for(config, parse("rbd/vm1,qos=none")) is None
    assert mapper_for(config_mod.from_dict({"mapper": "auto", "qos": "iops:100"}), parse("rbd/vm1")) == "nbd"


def test_configured_qos_is_checked():
    with pytest.raises(ConfigError, match="qos = 'iops:fast': expected null or I/O limits"):
        config_mod.from_dict({"qos": "iops:fast"})
