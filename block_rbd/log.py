"""Logging where Xen's own hotplug scripts log: xen-hotplug.log and syslog.

One line per event, prefixed with the backend path when there is one, so
`grep backend/vbd/5/51712 /var/log/xen/xen-hotplug.log` tells one disk's story.
"""

import contextvars
import logging
import logging.handlers
import os
import sys

LOGGER = "block-rbd"


# Per thread of the service, per run in-process: contextvars start empty in a new thread.
_where = contextvars.ContextVar("block_rbd_log_where", default="")


class _Context(logging.Filter):
    """Adds the backend path (or the command) to every record."""

    def filter(self, record):
        record.where = _where.get()
        # One event, one line, whatever the message carried.
        if isinstance(record.msg, str) and "\n" in record.msg:
            record.msg = record.msg.replace("\n", " | ")
        return True


_context = _Context()


def set_context(where):
    _where.set((where + ": ") if where else "")


def stderr_is_journal(environ=os.environ, fd=2):
    """systemd connected our stderr to the journal (a unit's service, not a run libxl forked
    from one: libxl sends a hotplug script's stderr to its own log)."""
    try:
        dev, ino = (int(x) for x in environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(log_file=None, use_syslog=True, verbose=False, stderr_level=logging.WARNING):
    """Configure the block-rbd logger; safe to call more than once."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    logger.addFilter(_context)

    syslog = use_syslog and os.path.exists("/dev/log")
    if not (syslog and stderr_is_journal()):  # the journal has each line once, from syslog
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(logging.DEBUG if verbose else stderr_level)
        stream.setFormatter(logging.Formatter("block-rbd: %(where)s%(message)s"))
        logger.addHandler(stream)

    if log_file:
        try:
            os.makedirs(os.path.dirname(log_file), exist_ok=True)
            handler = logging.FileHandler(log_file)
        except OSError as exc:
            logger.warning("cannot write log file %s: %s", log_file, exc.strerror)
        else:
            handler.setFormatter(logging.Formatter(
                "%(asctime)s block-rbd[%(process)d] %(levelname)s %(where)s%(message)s",
                "%Y-%m-%dT%H:%M:%S"))
            logger.addHandler(handler)

    if syslog:
        try:
            handler = logging.handlers.SysLogHandler(
                "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError:
            handler = None  # no syslog daemon listening: the file log still has it
        if handler is not None:
            handler.setFormatter(logging.Formatter("block-rbd[%(process)d]: %(where)s%(message)s"))
            logger.addHandler(handler)
    return logger
