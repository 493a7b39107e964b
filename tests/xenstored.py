#!/usr/bin/python3
"""Test double of xenstored: a userspace daemon speaking the xenstore wire
protocol on a Unix socket, so that the REAL xenstore-* client tools (Debian
package xenstore-utils, libxenstore 4.17) run unmodified against it.

libxenstore (tools/libs/store/xs.c + tools/xenstore/xs_lib.c, Xen 4.17)
connects to the path in $XENSTORED_PATH: xs_open() first tries
xs_daemon_socket() (= $XENSTORED_PATH, else $XENSTORED_RUNDIR/socket), then
xs_domain_dev() (= $XENSTORED_PATH, else /dev/xen/xenbus); get_handle()
stat()s the path and uses connect() when it is a socket.  So
``env XENSTORED_PATH=<socket> xenstore-read ...`` talks to this double.

Semantics follow C xenstored of Xen 4.17 (tools/xenstore/xenstored_core.c,
xenstored_transaction.c, xenstored_watch.c), for a privileged dom0
connection:

* node names: absolute, or relative to /local/domain/0 (the DAEMON
  canonicalizes relative names against the connection's implicit path);
  valid characters [A-Za-z0-9-/_@], no trailing '/', no '//' -> EINVAL.
* XS_WRITE creates missing ancestors with empty values (permissions
  inherited from the nearest existing ancestor); children are listed in
  creation order.
* XS_RM of a missing node succeeds if its parent exists, ENOENT otherwise;
  rm of "/" is EINVAL; rm removes the whole subtree.
* transactions: per-connection ids starting at 1; nodes are copied into the
  transaction on first access; at commit every node whose first access was
  a read (every write reads first) must still have the same generation
  globally, else the commit fails with EAGAIN (the tools retry).  Watches
  for changes made in a transaction fire at commit.
* watches fire once immediately on XS_WATCH, then for every change of the
  watched node or a descendant (rm: ancestors' watches once for the removed
  root; exact watches on each removed descendant).  Relative watches get
  relative event paths.
* permissions are not enforced (dom0 is privileged) but stored, so
  xenstore-chmod / XS_GET_PERMS round-trip.

Standard library only.  Usage:
    python3 tests/xenstored.py --socket /tmp/xs.sock
    XENSTORED_PATH=/tmp/xs.sock xenstore-ls -f
"""

import argparse
import os
import queue
import re
import signal
import socket
import struct
import sys
import threading
import time

# enum xsd_sockmsg_type (xen/include/public/io/xs_wire.h)
XS_DEBUG = 0
XS_DIRECTORY = 1
XS_READ = 2
XS_GET_PERMS = 3
XS_WATCH = 4
XS_UNWATCH = 5
XS_TRANSACTION_START = 6
XS_TRANSACTION_END = 7
XS_INTRODUCE = 8
XS_RELEASE = 9
XS_GET_DOMAIN_PATH = 10
XS_WRITE = 11
XS_MKDIR = 12
XS_RM = 13
XS_SET_PERMS = 14
XS_WATCH_EVENT = 15
XS_ERROR = 16
XS_IS_DOMAIN_INTRODUCED = 17
XS_RESUME = 18
XS_SET_TARGET = 19
XS_RESTRICT = 20
XS_RESET_WATCHES = 21
XS_DIRECTORY_PART = 22

XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_REL_PATH_MAX = 2048

HEADER = struct.Struct('<IIII')  # type, req_id, tx_id, len

DOM0_HOME = '/local/domain/0'

_VALID_CHARS = re.compile(r'\A[A-Za-z0-9\-/_@]*\Z')
_LOCAL_DOMAIN = re.compile(r'\A/local/domain/\d{1,5}/')

NO_GENERATION = None


class XsError(Exception):
    """An error reply; args[0] is the errno name sent on the wire."""


class _Node:
    __slots__ = ('value', 'children', 'perms', 'generation')

    def __init__(self, value=b'', children=None, perms=None, generation=0):
        self.value = value
        self.children = list(children or [])
        self.perms = list(perms or ['n0'])
        self.generation = generation

    def copy(self):
        return _Node(self.value, self.children, self.perms, self.generation)


class _Access:
    """accessed_node of xenstored_transaction.c."""
    __slots__ = ('node', 'generation', 'check_gen', 'modified',
                 'fire_watch', 'watch_exact')

    def __init__(self):
        self.node = None
        self.generation = NO_GENERATION
        self.check_gen = False
        self.modified = False
        self.fire_watch = False
        self.watch_exact = False


class _Transaction:
    def __init__(self, tid):
        self.id = tid
        self.accessed = {}      # path -> _Access, insertion ordered


def _parent(path):
    if path == '/':
        return None
    p = path.rsplit('/', 1)[0]
    return p or '/'


def _basename(path):
    return path.rsplit('/', 1)[1]


def _child_path(parent, name):
    return '/' + name if parent == '/' else parent + '/' + name


def _is_child(child, parent):
    """xenstored_watch.c is_child(): child is parent or below it."""
    if parent == '/':
        return True
    if not child.startswith(parent):
        return False
    rest = child[len(parent):]
    return rest == '' or rest.startswith('/')


def is_valid_nodename(node):
    if not node.startswith('/'):
        return False
    if node.endswith('/') and node != '/':
        return False
    if '//' in node:
        return False
    m = _LOCAL_DOMAIN.match(node)
    local_off = m.end() if m else 0
    if len(node) > local_off + XENSTORE_REL_PATH_MAX:
        return False
    return bool(_VALID_CHARS.match(node))


def canonicalize(node):
    if node.startswith('/') or node.startswith('@'):
        return node
    return DOM0_HOME + '/' + node


def _valid_perm(s):
    return (len(s) >= 2 and s[0] in 'rwbn'
            and re.fullmatch(r'[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)',
                             s[1:]) is not None)


class _Watch:
    __slots__ = ('path', 'token', 'relative')

    def __init__(self, path, token, relative):
        self.path = path
        self.token = token
        self.relative = relative


class _Connection:
    def __init__(self, server, sock):
        self.server = server
        self.sock = sock
        self.watches = []
        self.transactions = {}
        self.next_tid = 1
        self.outq = queue.Queue()
        self.closed = False

    # ---- output (one writer thread per connection) -------------------
    def send(self, mtype, req_id, tx_id, payload):
        self.outq.put(HEADER.pack(mtype, req_id, tx_id, len(payload))
                      + payload)

    def writer(self):
        while True:
            data = self.outq.get()
            if data is None:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True
                return

    # ---- input -------------------------------------------------------
    def _recv_exact(self, n):
        buf = b''
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def reader(self):
        w = threading.Thread(target=self.writer, daemon=True)
        w.start()
        try:
            while True:
                hdr = self._recv_exact(HEADER.size)
                if hdr is None:
                    break
                mtype, req_id, tx_id, length = HEADER.unpack(hdr)
                if length > XENSTORE_PAYLOAD_MAX:
                    break       # C xenstored drops such a client
                payload = self._recv_exact(length) if length else b''
                if payload is None:
                    break
                if self.server.delay:
                    time.sleep(self.server.delay)  # a busy dom0: every answer comes late
                self.server.process(self, mtype, req_id, tx_id, payload)
        except OSError:
            pass
        finally:
            self.server.drop_connection(self)
            self.outq.put(None)
            w.join(timeout=5)
            try:
                self.sock.close()
            except OSError:
                pass


class XenstoredDouble:
    """In-process xenstored double serving the real wire protocol.

    with XenstoredDouble('/tmp/x/xs.sock') as xs:
        subprocess.run(['xenstore-read', 'name'], env={**os.environ,
                       **xs.env()})
    """

    def __init__(self, socket_path, populate_dom0=True):
        self.socket_path = socket_path
        self._lock = threading.RLock()
        self._generation = 0
        self._nodes = {}
        self._conns = set()
        self._listener = None
        self._accept_thread = None
        self._threads = []
        self._running = False
        self.conflicts = 0      # transaction commits refused with EAGAIN
        self.delay = 0.0        # seconds before each request over the socket is served
        for path, children in (('/', ['tool']), ('/tool', ['xenstored']),
                               ('/tool/xenstored', [])):
            self._nodes[path] = _Node(b'', children, ['n0'],
                                      self._next_gen())
        if populate_dom0:
            # What xen-init-dom0 (tools/helpers/xen-init-dom0.c) writes.
            self.write(DOM0_HOME + '/domid', '0')
            self.write(DOM0_HOME + '/name', 'Domain-0')

    # ---- lifecycle ---------------------------------------------------
    def env(self):
        return {'XENSTORED_PATH': self.socket_path}

    def start(self):
        if self._running:
            return self
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(self.socket_path)
        lst.listen(128)
        self._listener = lst
        self._running = True
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name='xenstored-accept', daemon=True)
        self._accept_thread.start()
        return self

    def _accept_loop(self):
        while self._running:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                break
            if not self._running:
                sock.close()
                break
            conn = _Connection(self, sock)
            with self._lock:
                self._conns.add(conn)
            t = threading.Thread(target=conn.reader, daemon=True,
                                 name='xenstored-conn')
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
            t.start()

    def stop(self):
        if not self._running:
            return
        self._running = False
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._accept_thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self._threads):
            t.join(timeout=5)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def drop_connection(self, conn):
        with self._lock:
            self._conns.discard(conn)
            conn.transactions.clear()
            conn.watches.clear()

    # ---- test conveniences (direct, non-transactional) ----------------
    def read(self, path):
        """Value of node `path` as str, or None if it does not exist."""
        with self._lock:
            node = self._nodes.get(canonicalize(path))
            if node is None:
                return None
            return node.value.decode('utf-8', 'surrogateescape')

    def write(self, path, value):
        """Write like a non-transactional XS_WRITE (fires watches)."""
        if isinstance(value, str):
            value = value.encode('utf-8', 'surrogateescape')
        with self._lock:
            self._op_write(None, canonicalize(path), value)

    def rm(self, path):
        with self._lock:
            self._op_rm(None, canonicalize(path))

    def exists(self, path):
        with self._lock:
            return canonicalize(path) in self._nodes

    def get_perms(self, path):
        with self._lock:
            node = self._nodes.get(canonicalize(path))
            return None if node is None else list(node.perms)

    def tree(self, prefix='/'):
        """{path: value} for `prefix` and every node below it."""
        prefix = canonicalize(prefix)
        with self._lock:
            return {p: n.value.decode('utf-8', 'surrogateescape')
                    for p, n in sorted(self._nodes.items())
                    if _is_child(p, prefix)}

    # ---- node access with transaction semantics -----------------------
    def _next_gen(self):
        self._generation += 1
        return self._generation

    def _read_node(self, txn, path):
        """read_node(): returns a private copy (or None)."""
        if txn is not None:
            acc = txn.accessed.get(path)
            if acc is not None:
                return acc.node.copy() if acc.node else None
            node = self._nodes.get(path)
            acc = _Access()
            acc.node = node.copy() if node else None
            acc.generation = node.generation if node else NO_GENERATION
            acc.check_gen = True
            txn.accessed[path] = acc
            return node.copy() if node else None
        node = self._nodes.get(path)
        return node.copy() if node else None

    def _write_node(self, txn, path, node):
        if txn is None:
            node.generation = self._next_gen()
            self._nodes[path] = node
            return
        acc = txn.accessed.get(path)
        if acc is None:
            acc = _Access()
            txn.accessed[path] = acc
        acc.node = node.copy()
        acc.modified = True

    def _delete_node(self, txn, path):
        if txn is None:
            self._nodes.pop(path, None)
            return
        acc = txn.accessed.get(path)
        if acc is None:
            acc = _Access()
            txn.accessed[path] = acc
        acc.node = None
        acc.modified = True

    def _get_node(self, txn, name):
        if not is_valid_nodename(name):
            raise XsError('EINVAL')
        return self._read_node(txn, name)

    # ---- watches --------------------------------------------------------
    def _fire_watches(self, txn, name, exact):
        if txn is not None:
            acc = txn.accessed.get(name)
            if acc is None:
                return
            if not acc.fire_watch:
                acc.fire_watch = True
                acc.watch_exact = exact
            elif not exact:
                acc.watch_exact = False
            return
        for conn in list(self._conns):
            for w in conn.watches:
                if (name == w.path) if exact else _is_child(name, w.path):
                    self._send_event(conn, w, name)

    @staticmethod
    def _send_event(conn, w, name):
        path = name
        if w.relative:
            path = name[len(DOM0_HOME):]
            if path.startswith('/'):
                path = path[1:]
        conn.send(XS_WATCH_EVENT, 0, 0,
                  path.encode('utf-8', 'surrogateescape') + b'\0'
                  + w.token + b'\0')

    # ---- operations (shared by wire protocol and conveniences) ---------
    def _op_write(self, txn, name, value):
        node = self._get_node(txn, name)
        if node is None:
            self._create_node(txn, name, value)
        else:
            node.value = value
            self._write_node(txn, name, node)
        self._fire_watches(txn, name, False)

    def _create_node(self, txn, name, value):
        """construct_node()+create_node(): create missing ancestors."""
        names = []
        cur = name
        parent = None
        while parent is None:
            names.append(cur)
            cur = _parent(cur)
            if cur is None:
                raise XsError('ENOENT')
            parent = self._read_node(txn, cur)
        parent_name = cur
        created = []
        for n in reversed(names):
            parent.children.append(_basename(n))
            node = _Node(b'', [], parent.perms, 0)
            created.append((parent_name, parent))
            parent_name, parent = n, node
        created.append((parent_name, parent))
        parent.value = value
        for path, node in reversed(created):  # written bottom up
            self._write_node(txn, path, node)

    def _op_rm(self, txn, name):
        node = self._get_node(txn, name)
        if node is None:
            parent_name = _parent(name)
            if parent_name is not None and \
                    self._read_node(txn, parent_name) is not None:
                return
            raise XsError('ENOENT')
        if name == '/':
            raise XsError('EINVAL')
        parent_name = _parent(name)
        parent = self._read_node(txn, parent_name)
        if parent is None:
            raise XsError('EINVAL')
        self._delete_subtree(txn, name, node, name)
        parent.children = [c for c in parent.children
                           if c != _basename(name)]
        self._write_node(txn, parent_name, parent)

    def _delete_subtree(self, txn, path, node, root):
        for child in list(node.children):
            cpath = _child_path(path, child)
            cnode = self._read_node(txn, cpath)
            if cnode is not None:
                self._delete_subtree(txn, cpath, cnode, root)
        self._delete_node(txn, path)
        self._fire_watches(txn, path, path != root)

    def _commit(self, txn):
        for path, acc in txn.accessed.items():
            if acc.check_gen:
                cur = self._nodes.get(path)
                gen = cur.generation if cur else NO_GENERATION
                if gen != acc.generation:
                    self.conflicts += 1
                    raise XsError('EAGAIN')
        for path, acc in txn.accessed.items():
            if acc.modified:
                if acc.node is not None:
                    node = acc.node.copy()
                    node.generation = self._next_gen()
                    self._nodes[path] = node
                else:
                    self._nodes.pop(path, None)
            if acc.fire_watch:
                self._fire_watches(None, path, acc.watch_exact)

    # ---- wire protocol ---------------------------------------------------
    def process(self, conn, mtype, req_id, tx_id, payload):
        with self._lock:
            try:
                reply = self._dispatch(conn, mtype, tx_id, payload)
            except XsError as e:
                conn.send(XS_ERROR, req_id, tx_id,
                          e.args[0].encode() + b'\0')
                return
            rtype, data, after = reply
            if len(data) > XENSTORE_PAYLOAD_MAX:
                conn.send(XS_ERROR, req_id, tx_id, b'E2BIG\0')
                return
            conn.send(rtype, req_id, tx_id, data)
            if after:
                after()

    @staticmethod
    def _onearg(payload):
        # onearg(): exactly one NUL, at the end.
        if not payload or payload.find(b'\0') != len(payload) - 1:
            raise XsError('EINVAL')
        return payload[:-1].decode('utf-8', 'surrogateescape')

    @staticmethod
    def _strings(payload):
        """get_strings(): the NUL-terminated strings in payload."""
        parts = payload.split(b'\0')
        return parts[:-1]

    def _dispatch(self, conn, mtype, tx_id, payload):
        OK = b'OK\0'
        notid = mtype in (XS_WATCH, XS_UNWATCH)
        txn = None
        if not notid and tx_id != 0:
            txn = conn.transactions.get(tx_id)
            if txn is None:
                raise XsError('ENOENT')

        def name_arg():
            return canonicalize(self._onearg(payload))

        if mtype == XS_READ:
            node = self._get_node(txn, name_arg())
            if node is None:
                raise XsError('ENOENT')
            return mtype, node.value, None

        if mtype == XS_DIRECTORY:
            node = self._get_node(txn, name_arg())
            if node is None:
                raise XsError('ENOENT')
            return mtype, b''.join(c.encode('utf-8', 'surrogateescape')
                                   + b'\0' for c in node.children), None

        if mtype == XS_DIRECTORY_PART:
            strs = self._strings(payload)
            if len(strs) != 2:
                raise XsError('EINVAL')
            node = self._get_node(
                txn, canonicalize(strs[0].decode('utf-8', 'surrogateescape')))
            if node is None:
                raise XsError('ENOENT')
            try:
                off = int(strs[1] or b'0')
            except ValueError:
                off = 0
            children = b''.join(c.encode('utf-8', 'surrogateescape') + b'\0'
                                for c in node.children)
            gen = str(node.generation).encode() + b'\0'
            if off >= len(children):
                return mtype, gen + b'\0', None
            maxlen = XENSTORE_PAYLOAD_MAX - len(gen) - 1
            length = 0
            pos = off
            while True:
                end = children.index(b'\0', pos)
                if length + (end - pos) >= maxlen:
                    break
                length += end - pos + 1
                pos = end + 1
                if off + length == len(children):
                    break
            data = gen + children[off:off + length]
            if off + length == len(children):
                data += b'\0'
            return mtype, data, None

        if mtype == XS_GET_PERMS:
            node = self._get_node(txn, name_arg())
            if node is None:
                raise XsError('ENOENT')
            return mtype, b''.join(p.encode() + b'\0'
                                   for p in node.perms), None

        if mtype == XS_WRITE:
            if b'\0' not in payload:
                raise XsError('EINVAL')
            path, value = payload.split(b'\0', 1)
            self._op_write(txn, canonicalize(
                path.decode('utf-8', 'surrogateescape')), value)
            return mtype, OK, None

        if mtype == XS_MKDIR:
            name = name_arg()
            node = self._get_node(txn, name)
            if node is None:
                self._create_node(txn, name, b'')
                self._fire_watches(txn, name, False)
            return mtype, OK, None

        if mtype == XS_RM:
            self._op_rm(txn, name_arg())
            return mtype, OK, None

        if mtype == XS_SET_PERMS:
            strs = [s.decode('utf-8', 'surrogateescape')
                    for s in self._strings(payload)]
            if len(strs) < 2:
                raise XsError('EINVAL')
            name, perms = strs[0], strs[1:]
            if not all(_valid_perm(p) for p in perms):
                raise XsError('EINVAL')
            if name.startswith('@'):
                return mtype, OK, None
            name = canonicalize(name)
            node = self._get_node(txn, name)
            if node is None:
                raise XsError('ENOENT')
            node.perms = perms
            self._write_node(txn, name, node)
            self._fire_watches(txn, name, False)
            return mtype, OK, None

        if mtype == XS_WATCH:
            strs = self._strings(payload)
            if len(strs) != 2:
                raise XsError('EINVAL')
            path = strs[0].decode('utf-8', 'surrogateescape')
            token = strs[1]
            if path.startswith('@'):
                relative = False
                if len(path) > XENSTORE_REL_PATH_MAX:
                    raise XsError('EINVAL')
            else:
                relative = not path.startswith('/')
                path = canonicalize(path)
                if not is_valid_nodename(path):
                    raise XsError('EINVAL')
            for w in conn.watches:
                if w.path == path and w.token == token:
                    raise XsError('EEXIST')
            w = _Watch(path, token, relative)
            conn.watches.append(w)
            # "We fire once up front" - after the ack.
            return mtype, OK, lambda: self._send_event(conn, w, path)

        if mtype == XS_UNWATCH:
            strs = self._strings(payload)
            if len(strs) != 2:
                raise XsError('EINVAL')
            path = canonicalize(strs[0].decode('utf-8', 'surrogateescape'))
            for w in conn.watches:
                if w.path == path and w.token == strs[1]:
                    conn.watches.remove(w)
                    return mtype, OK, None
            raise XsError('ENOENT')

        if mtype == XS_TRANSACTION_START:
            if txn is not None:
                raise XsError('EBUSY')
            tid = conn.next_tid
            while tid == 0 or tid in conn.transactions:
                tid = (tid + 1) & 0xffffffff
            conn.next_tid = (tid + 1) & 0xffffffff
            conn.transactions[tid] = _Transaction(tid)
            return mtype, str(tid).encode() + b'\0', None

        if mtype == XS_TRANSACTION_END:
            arg = self._onearg(payload)
            if arg not in ('T', 'F'):
                raise XsError('EINVAL')
            if txn is None:
                raise XsError('ENOENT')
            del conn.transactions[txn.id]
            if arg == 'T':
                self._commit(txn)
            return mtype, OK, None

        if mtype == XS_GET_DOMAIN_PATH:
            arg = self._onearg(payload)
            m = re.match(r'\s*[+-]?\d+', arg)
            domid = int(m.group(0)) if m else 0
            return mtype, ('/local/domain/%d' % domid).encode() + b'\0', None

        if mtype == XS_IS_DOMAIN_INTRODUCED:
            arg = self._onearg(payload)
            return mtype, (b'T\0' if arg.strip() == '0' else b'F\0'), None

        if mtype == XS_RESET_WATCHES:
            conn.watches.clear()
            conn.transactions.clear()
            return mtype, OK, None

        if mtype in (XS_INTRODUCE, XS_RESUME, XS_SET_TARGET):
            return mtype, OK, None

        if mtype == XS_RELEASE:
            return mtype, OK, None

        raise XsError('ENOSYS')


def main(argv=None):
    ap = argparse.ArgumentParser(
        description='xenstored test double (xenstore wire protocol on a '
                    'Unix socket; point the tools at it with '
                    'XENSTORED_PATH=<socket>)')
    ap.add_argument('--socket', required=True, help='Unix socket path')
    ap.add_argument('--empty', action='store_true',
                    help='do not create /local/domain/0/{domid,name}')
    args = ap.parse_args(argv)
    d = XenstoredDouble(args.socket, populate_dom0=not args.empty)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    d.start()
    print('xenstored double listening on %s (export XENSTORED_PATH=%s)'
          % (args.socket, args.socket), file=sys.stderr, flush=True)
    try:
        while not stop.wait(1):
            pass
    finally:
        d.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
