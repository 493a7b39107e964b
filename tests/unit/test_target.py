"""The target grammar (block_rbd/target.py): every form, every option, every fault."""

import re

import pytest

from block_rbd.errors import TargetError
from block_rbd.target import (ImageSpec, Target, effective_mode, format_qos, parse, parse_qos, parse_size,
                              parse_spec, qos_options, read_only)


# ---- the forms that name an image ---------------------------------------------------

@pytest.mark.parametrize("text, spec", [
    ("rbd:vm1", ImageSpec("rbd", "vm1")),                      # the original block-rbd form
    ("rbd/vm1", ImageSpec("rbd", "vm1")),
    ("rbd/tenant/vm1", ImageSpec("rbd", "vm1", "tenant")),
    ("vm1", ImageSpec("dflt", "vm1")),                         # bare image: default pool
    ("rbd:vm1@snap", ImageSpec("rbd", "vm1", "", "snap")),
    ("rbd/vm1@snap", ImageSpec("rbd", "vm1", "", "snap")),
    ("rbd/tenant/vm1@snap", ImageSpec("rbd", "vm1", "tenant", "snap")),
    ("vm1@snap", ImageSpec("dflt", "vm1", "", "snap")),
    ("my-pool.1:img_2.raw", ImageSpec("my-pool.1", "img_2.raw")),
    ("p/ns/i@s-1.2_3", ImageSpec("p", "i", "ns", "s-1.2_3")),
    ("  rbd:vm1  ", ImageSpec("rbd", "vm1")),
    ("\trbd/vm1\n", ImageSpec("rbd", "vm1")),
    ("rbd:vm1@a@b", None),  # checked below: '@' inside a snapshot name is refused
])
def test_image_forms(text, spec):
    if spec is None:
        with pytest.raises(TargetError, match="snapshot name"):
            parse(text, default_pool="dflt")
        return
    target = parse(text, default_pool="dflt")
    assert target == Target(spec=spec)
    assert target.mode is None and target.mapper is None and target.clone is None
    assert target.size is None and target.map_options == ()


def test_default_pool_is_rbd():
    assert parse("vm1").spec == ImageSpec("rbd", "vm1")


def test_unicode_names_are_accepted_and_bounded_in_bytes():
    assert parse("rbd:d\u00e9j\u00e0").spec.image == "d\u00e9j\u00e0"
    with pytest.raises(TargetError, match="image name is longer than 255 bytes"):
        parse("rbd:" + "\u00e9" * 128)  # 128 characters, 256 bytes


def test_name_length_limit():
    assert parse("rbd:" + "a" * 255).spec.image == "a" * 255
    with pytest.raises(TargetError, match="longer than 255 bytes"):
        parse("rbd:" + "a" * 256)


# ---- ImageSpec ------------------------------------------------------------------------

@pytest.mark.parametrize("spec, text", [
    (ImageSpec("rbd", "vm1"), "rbd/vm1"),
    (ImageSpec("rbd", "vm1", "ns"), "rbd/ns/vm1"),
    (ImageSpec("rbd", "vm1", "ns", "s"), "rbd/ns/vm1@s"),
    (ImageSpec("rbd", "vm1", "", "s"), "rbd/vm1@s"),
])
def test_spec_str_round_trips(spec, text):
    assert str(spec) == text
    assert parse_spec(text) == spec


def test_spec_key_is_file_name_safe_and_unique():
    keys = {ImageSpec("a", "b/c".replace("/", "x")).key, ImageSpec("a", "b", "c").key,
            ImageSpec("a", "b", "", "c").key, ImageSpec("a", "b").key}
    assert len(keys) == 4
    for key in keys:
        assert "/" not in key and "@" not in key
    assert ImageSpec("rbd", "vm1", "ns", "s").key == "rbd%2Fns%2Fvm1%40s"


def test_spec_head_drops_the_snapshot():
    assert ImageSpec("p", "i", "n", "s").head() == ImageSpec("p", "i", "n")


# ---- options --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["r", "w", "r!", "w!"])
def test_mode_option(mode):
    assert parse("rbd:vm1,mode=%s" % mode).mode == mode


@pytest.mark.parametrize("mapper", ["krbd", "nbd", "fuse"])
def test_mapper_option(mapper):
    assert parse("rbd:vm1,mapper=%s" % mapper).mapper == mapper


def test_clone_and_size_options():
    target = parse("rbd/tenant/vm1,clone=gold/base@v1,size=10G")
    assert target.clone == ImageSpec("gold", "base", "", "v1")
    assert target.size == 10 << 30
    # clone= without a pool uses the target's pool, not the configured default
    assert parse("tank/vm1,clone=base@v1", default_pool="rbd").clone == ImageSpec("tank", "base", "", "v1")
    assert parse("rbd:vm1,clone=gold/ns/base@v1").clone == ImageSpec("gold", "base", "ns", "v1")


@pytest.mark.parametrize("text, size", [
    ("1", 1), ("512", 512), ("1K", 1 << 10), ("1k", 1 << 10), ("10M", 10 << 20), ("2G", 2 << 30),
    ("3T", 3 << 40), ("10GiB", 10 << 30), ("10GB", 10 << 30), (" 4M ", 4 << 20),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "0G", "-1G", "1.5G", "G", "10X", "10 G", "", "1P", "0x10"])
def test_bad_sizes(text):
    with pytest.raises(TargetError, match="size=.*positive number"):
        parse_size(text)


def test_map_options():
    target = parse("rbd:vm1,map_options=queue_depth=128+exclusive+alloc_size=65536")
    assert target.map_options == ("queue_depth=128", "exclusive", "alloc_size=65536")
    assert parse("rbd:vm1,map_options=ms_mode=prefer-crc").map_options == ("ms_mode=prefer-crc",)


def test_qos_option():
    target = parse("rbd:vm1,qos=iops:500+bps:50M")
    assert target.qos == (("iops", 500), ("bps", 50 << 20))
    assert qos_options(target.qos) == ("rbd_qos_iops_limit=500", "rbd_qos_bps_limit=52428800")
    assert parse("rbd:vm1,qos=read_iops:10+write_iops:20+read_bps:1K+write_bps:2G").qos == (
        ("read_iops", 10), ("write_iops", 20), ("read_bps", 1024), ("write_bps", 2 << 30))
    assert parse("rbd:vm1,qos=none").qos == () and qos_options(()) == ()
    assert parse("rbd:vm1").qos is None  # the configured default applies
    assert format_qos((("iops", 500), ("bps", 1024))) == "iops:500+bps:1024"


@pytest.mark.parametrize("text, fault", [
    ("iops", "'iops' is not LIMIT:VALUE with LIMIT one of iops, read_iops, write_iops, bps"),
    ("speed:5", "'speed:5' is not LIMIT:VALUE"),
    ("iops:0", "iops:0: expected a positive number of operations per second"),
    ("iops:1.5", "iops:1.5: expected a positive number of operations per second"),
    ("bps:fast", "bps:fast: expected bytes per second, e.g. 50M"),
    ("iops:5+iops:6", "iops given twice"),
])
def test_bad_qos(text, fault):
    with pytest.raises(TargetError, match="^qos=%s: %s" % (re.escape(text), re.escape(fault))):
        parse("rbd:vm1,qos=" + text)


def test_all_options_together_with_whitespace():
    target = parse("  rbd/ns/vm1@s , mode = r! ,mapper=nbd, map_options=notrim ,clone=g/b@v ,size=1G  ")
    assert target == Target(spec=ImageSpec("rbd", "vm1", "ns", "s"), mode="r!", mapper="nbd",
                            clone=ImageSpec("g", "b", "", "v"), size=1 << 30, map_options=("notrim",))


# ---- every malformed target: one line, naming the fault -------------------------------

MALFORMED = [
    ("", "empty target"),
    ("   ", "empty target"),
    (None, "empty target"),
    ("rbd:", "empty image name"),
    (":vm1", "empty pool name"),
    ("rbd/", "empty image name"),
    ("/vm1", "empty pool name"),
    ("rbd//vm1", "empty namespace name"),
    ("rbd/ns/", "empty image name"),
    ("rbd/a/b/c", "too many '/'"),
    ("rbd:ns/vm1", "POOL:IMAGE form takes no namespace"),
    ("rbd:vm1@", "empty snapshot name"),
    ("rbd:@snap", "empty image name"),
    ("rbd:vm 1", "image name 'vm 1' contains ' '"),
    ("rbd:vm\t1", "image name .* contains '\\\\t'"),
    ("rbd:vm1\x00", "image name .* contains '\\\\x00'"),
    ("rbd:vm1\x7f", "image name .* contains"),
    ("r b:vm1", "pool name 'r b' contains ' '"),
    ("rbd:a:b", "image name 'a:b' contains ':'"),
    ("rbd:..", "image name '..' is not allowed"),
    ("rbd/./vm1", "namespace name '.' is not allowed"),
    ("..:vm1", "pool name '..' is not allowed"),
    ("rbd:vm1,", "empty option"),
    ("rbd:vm1,,mode=r", "empty option"),
    ("rbd:vm1,mode", "option 'mode' in target: expected KEY=VALUE"),
    ("rbd:vm1,mode=", "option 'mode' in target has an empty value"),
    ("rbd:vm1,mode=rw", "mode=rw: expected one of r, w, r!, w!"),
    ("rbd:vm1,mode=R", "mode=R: expected one of"),
    ("rbd:vm1,mapper=rbd-nbd", "mapper=rbd-nbd: expected one of krbd, nbd, fuse"),
    ("rbd:vm1,mapper=auto", "mapper=auto: expected one of"),
    ("rbd:vm1,colour=red", "unknown option 'colour' in target \\(known: clone, map_options, mapper, mode, qos, size\\)"),
    ("rbd:vm1,=r", "unknown option ''"),
    ("rbd:vm1,mode=r,mode=w", "option 'mode' given twice"),
    ("rbd:vm1,clone=gold/base", "clone=gold/base: name the golden snapshot as POOL/IMAGE@SNAP"),
    ("rbd:vm1,clone=gold/a/b/c@s", "too many '/'"),
    ("rbd:vm1,size=10G", "size= only applies with clone="),
    ("rbd:vm1,clone=g/b@s,size=lots", "size=lots: expected a positive number"),
    ("rbd:vm1,map_options=queue_depth=1+", "map_options: '' is not a valid map option"),
    ("rbd:vm1,map_options=Bad", "map_options: 'Bad' is not a valid map option"),
    ("rbd:vm1,map_options=a=b=c", "map_options: 'a=b=c' is not a valid map option"),
    ("rbd:vm1,map_options=secret=x;rm", "map_options: 'secret=x;rm' is not a valid map option"),
    ("rbd:vm1,map_options=a b", "map_options: 'a b' is not a valid map option"),
]


@pytest.mark.parametrize("text, fault", MALFORMED)
def test_malformed_targets_name_the_fault_in_one_line(text, fault):
    with pytest.raises(TargetError, match=fault) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message


def test_bare_image_without_default_pool():
    with pytest.raises(TargetError, match="'vm1' names no pool and no default pool is configured"):
        parse("vm1", default_pool=None)


def test_multiline_target_error_is_one_line():
    with pytest.raises(TargetError) as info:
        parse("rbd:vm\n1")
    assert "\n" not in str(info.value)


# ---- mode -----------------------------------------------------------------------------

@pytest.mark.parametrize("target_mode, xl_mode, mode", [
    (None, "r", "r"), (None, "w", "w"), ("r", "w", "r"), ("w!", "r", "w!"), ("r!", "w", "r!"),
    ("w", "bogus", "w"),  # the target's mode wins even over a mode libxl never writes
])
def test_effective_mode(target_mode, xl_mode, mode):
    assert effective_mode(Target(ImageSpec("rbd", "x"), mode=target_mode), xl_mode) == mode


@pytest.mark.parametrize("xl_mode", ["", "rw", "W", "r!", None])
def test_effective_mode_rejects_bad_libxl_modes(xl_mode):
    with pytest.raises(TargetError, match="libxl mode .*: expected r or w"):
        effective_mode(Target(ImageSpec("rbd", "x")), xl_mode)


@pytest.mark.parametrize("mode, ro", [("r", True), ("r!", True), ("w", False), ("w!", False)])
def test_read_only(mode, ro):
    assert read_only(mode) is ro


# ---- attacks: a name that reads as an option -----------------------------------------
# rbd-nbd and rbd-fuse take the spec as an argument (`rbd-nbd map SPEC ...`): a name
# starting with '-' would be an option to them.

@pytest.mark.parametrize("text, kind, name", [
    ("-x:vm1", "pool", "-x"),
    ("--help/vm1", "pool", "--help"),
    ("rbd:-vm1", "image", "-vm1"),
    ("rbd/--device=nbd3", "image", "--device=nbd3"),
    ("rbd/-ns/vm1", "namespace", "-ns"),
    ("rbd/vm1@-s", "snapshot", "-s"),
    ("-vm1", "image", "-vm1"),  # bare, in the default pool
])
def test_a_name_starting_with_a_dash_is_refused_in_one_line(text, kind, name):
    with pytest.raises(TargetError) as info:
        parse(text)
    assert str(info.value) == "%s name %r starts with '-', which is not allowed" % (kind, name)


def test_a_clone_source_starting_with_a_dash_is_refused():
    with pytest.raises(TargetError, match="image name '-gold' starts with '-'"):
        parse("rbd/vm1,clone=rbd/-gold@s")


def test_a_dash_inside_a_name_is_fine():
    assert parse("my-pool/ns-1/vm-1@snap-2").spec == ImageSpec("my-pool", "vm-1", "ns-1", "snap-2")


@pytest.mark.parametrize("option", ["id=admin", "keyring=x", "conf=ceph", "log_file=x", "admin_socket=x",
                                    "name=admin", "secret=x", "mon_host=h", "device=nbd3", "cookie=c"])
def test_a_map_option_that_would_override_what_block_rbd_sets_is_refused(option):
    with pytest.raises(TargetError) as info:
        parse("rbd/vm1,map_options=notrim+" + option)
    assert str(info.value) == ("map_options: %r sets what block-rbd sets itself (identity, cluster, files): "
                               "not allowed" % option)


def test_a_map_option_with_a_trailing_newline_is_refused():
    with pytest.raises(TargetError, match="is not a valid map option"):
        parse("rbd/vm1,map_options=notrim\n+exclusive")


# ---- found by fuzzing (tests/fuzz/test_fuzz_config.py) -------------------------------

@pytest.mark.parametrize("text", ["iops:\u00b2", "iops:\u0663", "iops:" + "9" * 5000, "bps:" + "9" * 5000,
                                  "iops:" + "9" * 21])
def test_a_qos_number_int_cannot_read_or_past_64_bits_is_a_target_error(text):
    """'\u00b2'.isdigit() is true and int() refuses it; so it does past 4300 digits: a ValueError."""
    with pytest.raises(TargetError, match="^qos="):
        parse_qos(text)


@pytest.mark.parametrize("text", ["9" * 5000, "9" * 21 + "G"])
def test_a_size_past_64_bits_is_a_target_error(text):
    with pytest.raises(TargetError, match="^size="):
        parse_size(text)
    assert parse_size("9" * 20) == int("9" * 20)  # (what librbd makes of it is librbd's to say)
