"""doctor's Xen checks (block_rbd/doctor.py): xenstored reached over its wire protocol."""

from block_rbd import doctor
from block_rbd.xenstore import Xenstore


def test_a_xenstored_that_answers_is_ok(xenstored):
    results = doctor.check_xen(Xenstore(timeout=5))
    assert (doctor.OK, "xenstored answers") in results


def test_an_unreachable_xenstored_fails_in_one_line(tmp_path):
    results = doctor.check_xen(Xenstore(env={"XENSTORED_PATH": str(tmp_path / "none")}, timeout=5))
    assert (doctor.FAIL, "cannot reach xenstored (%s: No such file or directory) (is xenstored running?)"
            % (tmp_path / "none")) in results


def test_without_xen_nothing_is_asked_of_xenstored():
    assert not any("xenstored" in message for _level, message in doctor.check_xen(None))
