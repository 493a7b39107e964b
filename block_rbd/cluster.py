"""The Ceph seam: one librados connection per process, every call bounded.

`Rados.connect(timeout=)` is ignored by librados, so time is bounded with
client_mount_timeout and the mon/osd op timeouts in the connection's own
configuration (measured: connect then fails in the configured time).
"""

import configparser
import contextlib
import errno
import logging
import threading

from . import deadline
from .errors import ClusterError, ImageNotFound

log = logging.getLogger("block-rbd")


def bindings():
    """(rados, rbd): the one place block-rbd imports Ceph's bindings.

    Imported on first use, so paths that never reach the cluster (a
    `remove` with nothing mapped here) do not pay for them.
    """
    try:
        import rados
        import rbd
    except ImportError:
        raise ClusterError("python3-rados/python3-rbd are not installed "
                           "(apt-get install python3-rados python3-rbd)") from None
    return rados, rbd


def translate(exc, what):
    """A librados/librbd exception as a one-line ClusterError naming `what`."""
    rados, rbd = bindings()
    code = getattr(exc, "errno", None)
    if isinstance(exc, (rados.ObjectNotFound, rbd.ImageNotFound)) or code == errno.ENOENT:
        return ImageNotFound("%s does not exist" % what)
    if isinstance(exc, (rados.PermissionDeniedError, rbd.PermissionError)) or code in (errno.EACCES, errno.EPERM):
        return ClusterError("%s: permission denied for this cephx user" % what)
    if isinstance(exc, rados.TimedOut) or code == errno.ETIMEDOUT:
        return ClusterError("%s: the Ceph cluster did not answer in time" % what)
    if code == errno.ESHUTDOWN:
        return ClusterError("%s: this client is blocklisted by the cluster" % what)
    return ClusterError("%s: %s" % (what, " ".join(str(exc).split()) or type(exc).__name__))


def keyring_secret(path, user):
    """The base64 secret of client.<user> in a keyring file (never logged)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        with open(path) as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ClusterError("cannot read keyring %s: %s" % (path, exc.strerror)) from None
    except configparser.Error:
        raise ClusterError("keyring %s is not a valid keyring file" % path) from None
    section = "client.%s" % user
    if not parser.has_option(section, "key"):
        raise ClusterError("keyring %s has no key for %s" % (path, section))
    return parser.get(section, "key").strip()


class Cluster:
    """A lazily opened, time-bounded connection as the configured cephx user."""

    def __init__(self, config):
        self.config = config
        self._rados = None
        self._connecting = threading.Lock()  # the service's threads share one connection

    @property
    def rados(self):
        if self._rados is None:
            with self._connecting:
                if self._rados is None:
                    self._rados = self._connect()
        return self._rados

    @property
    def connected(self):
        return self._rados is not None

    # What a connection is made of: a configuration that differs in these needs another.
    IDENTITY = ("ceph.conf", "ceph.id", "ceph.keyring", "timeouts.connect", "timeouts.op")

    def serves(self, config):
        """Whether this connection is the one `config` would make."""
        return all(self.config[key] == config[key] for key in self.IDENTITY)

    def _connect(self):
        rados, _rbd = bindings()
        cfg = self.config
        conf = {
            "keyring": cfg.keyring,
            # The cap protects the rest of the budget from a cluster that is down.
            "client_mount_timeout": str(max(1, int(deadline.limit(cfg["timeouts.connect"],
                                                                  what="connecting to Ceph")))),
            "rados_mon_op_timeout": str(cfg["timeouts.op"]),
            "rados_osd_op_timeout": str(cfg["timeouts.op"]),
            # A hotplug script must not spend its budget on logs nobody reads.
            "log_to_stderr": "false",
            "err_to_stderr": "false",
            "log_file": "",
        }
        try:
            handle = rados.Rados(conffile=cfg["ceph.conf"], rados_id=cfg["ceph.id"], conf=conf)
        except rados.Error as exc:
            raise ClusterError("cannot read %s: %s" % (cfg["ceph.conf"], exc)) from None
        try:
            handle.connect()
        except rados.Error as exc:
            handle.shutdown()
            raise translate(exc, "connecting to the Ceph cluster as client.%s" % cfg["ceph.id"]) from None
        log.debug("connected to cluster %s as client.%s", handle.get_fsid(), cfg["ceph.id"])
        return handle

    def close(self):
        if self._rados is not None:
            self._rados.shutdown()
            self._rados = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def ioctx(self, pool, namespace=""):
        rados, _rbd = bindings()
        try:
            ioctx = self.rados.open_ioctx(pool)
        except rados.Error as exc:
            raise translate(exc, "pool %s" % pool) from None
        try:
            if namespace:
                ioctx.set_namespace(namespace)
            yield ioctx
        finally:
            ioctx.close()

    @contextlib.contextmanager
    def image(self, spec, read_only=True):
        """Open the image (at spec.snap if set)."""
        rados, rbd = bindings()
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            try:
                image = rbd.Image(ioctx, spec.image, snapshot=spec.snap, read_only=read_only)
            except (rados.Error, rbd.Error) as exc:
                raise translate(exc, "image %s" % spec) from None
            try:
                yield image
            finally:
                image.close()

    def check_image(self, spec):
        """Raise ImageNotFound unless the image (and snapshot) exist.

        A head image is checked by its id object, one round trip instead of
        a full image open (which reads the header, snapshots and parent).
        """
        if spec.snap:
            with self.image(spec):
                return
        rados, _rbd = bindings()
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            for name in ("rbd_id." + spec.image, spec.image + ".rbd"):  # format 2, format 1
                try:
                    ioctx.stat(name)
                    return
                except rados.ObjectNotFound:
                    continue
                except rados.Error as exc:
                    raise translate(exc, "image %s" % spec) from None
        raise ImageNotFound("image %s does not exist" % spec)

    def mon_host(self):
        """mon_host as the cluster configuration gives it (no network round trip)."""
        return self.rados.conf_get("mon_host")

    def fsid(self):
        return self.rados.get_fsid()
