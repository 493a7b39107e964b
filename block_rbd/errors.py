"""Every error block-rbd raises on purpose.

Each carries one line meant for an operator: it ends up verbatim in
xenstore's hotplug-error, the log and stderr.  No message may ever hold a
cephx secret.
"""


class BlockRbdError(Exception):
    """Base class; str() is the one-line message."""

    def __init__(self, message):
        # One line, whatever the caller passed: hotplug-error is one line.
        super().__init__(" ".join(str(message).split()))


class TargetError(BlockRbdError):
    """The target string in the domU config is malformed."""


class ConfigError(BlockRbdError):
    """The YAML configuration is malformed or names a bad value."""


class XenstoreError(BlockRbdError):
    """xenstored could not be reached, or a request to it failed or timed out."""


class XenstoreRefused(XenstoreError):
    """xenstored answered a request with an error (ENOENT, EAGAIN, EACCES...): `code`."""

    def __init__(self, code, what):
        super().__init__("xenstore %s: %s" % (what, code))
        self.code = code


class CommandError(BlockRbdError):
    """A subprocess failed or timed out."""

    def __init__(self, message, returncode=None, stderr=""):
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class ClusterError(BlockRbdError):
    """The Ceph cluster could not be reached or refused an operation."""


class ImageNotFound(ClusterError):
    """The pool, namespace, image or snapshot does not exist."""


class MapperError(BlockRbdError):
    """Mapping or unmapping a device failed."""


class MapperUnavailable(MapperError):
    """This host cannot use the mapper (no kernel driver, no tool)."""


class FeaturesUnsupported(MapperError):
    """The kernel's rbd driver lacks a feature the image uses."""


class DeviceBusy(MapperError):
    """The device is still open by someone; unmap was refused."""


class AccessDenied(BlockRbdError):
    """The cluster-wide access policy refuses this attachment."""


class LockTimeout(BlockRbdError):
    """A local lock could not be taken in time."""


class StateError(BlockRbdError):
    """A local record cannot be read safely."""


class HotplugTimeout(BlockRbdError):
    """The hotplug run used up its time budget."""


class ImageInUse(BlockRbdError):
    """The image is attached somewhere and the operation would pull data from under it."""


class CloneConflict(ClusterError):
    """An image of the clone's name exists and is not a clone of the golden snapshot."""


class BackupError(BlockRbdError):
    """A backup or restore file is missing, malformed or does not match."""


class CorruptRecord(StateError):
    """A record or ledger file of this host cannot be read (truncated, not JSON, a field
    missing or of the wrong type): `path` and `problem` say which and what."""

    def __init__(self, path, problem):
        super().__init__("%s: unreadable (%s)" % (path, problem))
        self.path = path
        self.problem = " ".join(str(problem).split())


class AccessRefused(AccessDenied):
    """A refusal naming another attachment.  str() is the whole line (the log, the operator);
    `public` leaves out what another VM's guest must not read (its VM uuid, Ceph client
    addresses): hotplug-error is readable by the frontend."""

    def __init__(self, message, public):
        super().__init__(message)
        self.public = " ".join(str(public).split())


class XenstoreProtocolError(XenstoreError):
    """xenstored's reply does not answer the request (type, request or transaction id), or is malformed."""
