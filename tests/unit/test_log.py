"""Where block-rbd's lines go (block_rbd/log.py): the hotplug log, syslog, and stderr once."""

import logging
import logging.handlers
import os
import socket

import pytest

from block_rbd import log as log_mod


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path):
    with open(tmp_path / "err", "w") as handle:
        st = os.fstat(handle.fileno())
        journal = {"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)}
        assert log_mod.stderr_is_journal(journal, handle.fileno())
        # a hotplug run libxl forked from xendomains inherits the variable, not the stream
        with open(tmp_path / "xl-log", "w") as other:
            assert not log_mod.stderr_is_journal(journal, other.fileno())
        assert not log_mod.stderr_is_journal({}, handle.fileno())
        assert not log_mod.stderr_is_journal({"JOURNAL_STREAM": "junk"}, handle.fileno())


@pytest.fixture
def dev_log(tmp_path, monkeypatch):
    """A syslog socket where /dev/log would be."""
    path = str(tmp_path / "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    real_exists = os.path.exists
    monkeypatch.setattr(log_mod.os.path, "exists", lambda p: True if p == "/dev/log" else real_exists(p))
    class AtPath(logging.handlers.SysLogHandler):
        def __init__(self, _address, facility):
            super().__init__(path, facility=facility)
    monkeypatch.setattr(log_mod.logging.handlers, "SysLogHandler", AtPath)
    yield sock
    sock.close()


def _kinds(logger):
    return sorted("SysLogHandler" if isinstance(h, logging.handlers.SysLogHandler) else type(h).__name__
                  for h in logger.handlers)


def test_under_a_unit_each_line_reaches_the_journal_once(dev_log, monkeypatch):
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", "%d:%d" % (st.st_dev, st.st_ino))
    assert _kinds(log_mod.setup(None, True)) == ["SysLogHandler"]
    assert _kinds(log_mod.setup(None, False)) == ["StreamHandler"]  # no syslog: stderr is the journal's way


def test_elsewhere_stderr_and_syslog_both(dev_log, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logger = log_mod.setup(None, True)
    assert _kinds(logger) == ["StreamHandler", "SysLogHandler"]
    log_mod.set_context("backend/vbd/5/51712")
    logger.warning("one line")
    log_mod.set_context("")
    assert dev_log.recv(4096).endswith(b"block-rbd[%d]: backend/vbd/5/51712: one line\x00" % os.getpid())
