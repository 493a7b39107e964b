"""Run the REAL xenstore-* tools (Debian xenstore-utils 4.17) against the
xenstored test double in tests/xenstored.py and pin their exact behaviour.

Run with: /usr/bin/python3 -m pytest tests/unit/test_xenstored.py
"""

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, TESTS)

import xenstored  # noqa: E402
from xenstored import XenstoredDouble  # noqa: E402

TIMEOUT = 20
TOOLS = ['xenstore-read', 'xenstore-write', 'xenstore-rm', 'xenstore-list',
         'xenstore-ls', 'xenstore-exists', 'xenstore-chmod',
         'xenstore-watch']

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS),
    reason='xenstore-utils not installed')


@pytest.fixture
def xsd():
    # AF_UNIX paths are limited to 107 bytes: keep it short.
    d = tempfile.mkdtemp(prefix='xsd')
    try:
        with XenstoredDouble(os.path.join(d, 'socket')) as x:
            yield x
    finally:
        shutil.rmtree(d, ignore_errors=True)


def tool_env(xsd):
    env = dict(os.environ)
    env.update(xsd.env())
    return env


def run(xsd, tool, *args):
    return subprocess.run([tool, *args], env=tool_env(xsd),
                          capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)


# --------------------------------------------------------------- read --

def test_env_is_xenstored_path(xsd):
    assert xsd.env() == {'XENSTORED_PATH': xsd.socket_path}


def test_read_one_key(xsd):
    xsd.write('/local/domain/0/backend/vbd/1/51712/params', 'rbd:pool/img')
    r = run(xsd, 'xenstore-read',
            '/local/domain/0/backend/vbd/1/51712/params')
    assert (r.returncode, r.stdout, r.stderr) == (0, 'rbd:pool/img\n', '')


def test_read_several_keys_one_value_per_line(xsd):
    xsd.write('/k/a', 'one')
    xsd.write('/k/b', 'two words')
    xsd.write('/k/c', '')
    r = run(xsd, 'xenstore-read', '/k/a', '/k/b', '/k/c')
    assert (r.returncode, r.stdout, r.stderr) == (0, 'one\ntwo words\n\n', '')


def test_read_prefix_option(xsd):
    xsd.write('/k/a', 'one')
    r = run(xsd, 'xenstore-read', '-p', '/k/a')
    assert (r.returncode, r.stdout) == (0, '/k/a: one\n')


def test_read_missing_key(xsd):
    r = run(xsd, 'xenstore-read', '/k/missing')
    assert r.returncode == 1
    assert r.stdout == ''
    assert r.stderr == 'xenstore-read: couldn\'t read path /k/missing\n'


def test_read_existing_then_missing_prints_first_and_fails(xsd):
    # perform() buffers output, stops at the first failure, aborts the
    # transaction and still flushes what it buffered.
    xsd.write('/k/a', 'one')
    r = run(xsd, 'xenstore-read', '/k/a', '/k/missing')
    assert r.returncode == 1
    assert r.stdout == 'one\n'
    assert r.stderr == 'xenstore-read: couldn\'t read path /k/missing\n'


def test_read_missing_then_existing_prints_nothing(xsd):
    xsd.write('/k/a', 'one')
    r = run(xsd, 'xenstore-read', '/k/missing', '/k/a')
    assert r.returncode == 1
    assert r.stdout == ''
    assert r.stderr == 'xenstore-read: couldn\'t read path /k/missing\n'


def test_read_directory_node_has_empty_value(xsd):
    xsd.write('/k/a/b', 'x')
    r = run(xsd, 'xenstore-read', '/k/a')
    assert (r.returncode, r.stdout) == (0, '\n')


def test_read_invalid_path_fails_like_missing(xsd):
    # '.' is not a valid node name character (EINVAL from xenstored); the
    # tool reports it exactly like a missing key.
    r = run(xsd, 'xenstore-read', '/k/bad.name')
    assert r.returncode == 1
    assert r.stderr == 'xenstore-read: couldn\'t read path /k/bad.name\n'


def test_read_without_args_is_usage_error(xsd):
    r = run(xsd, 'xenstore-read')
    assert r.returncode == 1
    assert r.stdout == ''
    # Xen 4.20's tools no longer offer -s (they always use the socket)
    assert re.fullmatch(r'xenstore-read: Usage: xenstore-read \[-h\] \[-p\] (\[-s\] )?'
                        r'\[-R\] key \[\.\.\.\]\n', r.stderr), r.stderr


# -------------------------------------------------------------- write --

def test_write_several_pairs(xsd):
    r = run(xsd, 'xenstore-write', '/w/a', '1', '/w/b', '2', '/w/c/d', '3')
    assert (r.returncode, r.stdout, r.stderr) == (0, '', '')
    assert xsd.tree('/w') == {'/w': '', '/w/a': '1', '/w/b': '2',
                              '/w/c': '', '/w/c/d': '3'}


def test_write_odd_number_of_args_is_usage_error(xsd):
    r = run(xsd, 'xenstore-write', '/w/a', '1', '/w/b')
    assert r.returncode == 1
    assert re.fullmatch(r'xenstore-write: Usage: xenstore-write \[-h\] (\[-s\] )?'
                        r'\[-R\] key value \[\.\.\.\]\n', r.stderr), r.stderr
    assert xsd.read('/w/a') is None


def test_write_invalid_path_fails_and_is_atomic(xsd):
    r = run(xsd, 'xenstore-write', '/w/a', '1', '/w/bad:name', '2')
    assert r.returncode == 1
    assert r.stderr == 'xenstore-write: could not write path /w/bad:name\n'
    # The failing transaction is aborted: nothing was written.
    assert xsd.read('/w/a') is None


@pytest.mark.parametrize('value', [
    'with space', 'a,b,c', 'k=v', 'a = b, c=d', "quote'\"", 'tab:\tx',
    'utf8-\u00e9',
])
def test_write_read_roundtrip_special_values(xsd, value):
    r = run(xsd, 'xenstore-write', '/v/x', value)
    assert r.returncode == 0, r.stderr
    assert xsd.read('/v/x') == value
    r = run(xsd, 'xenstore-read', '/v/x')
    # sanitise_value(): printable ASCII except '\' verbatim, \t \n \r \\
    # escaped, other bytes as \xNN (or \NNN octal below 010).
    expected = (value.replace('\t', '\\t')
                .replace('\u00e9', '\\xc3\\xa9'))
    assert r.stdout == expected + '\n'


def test_backslash_in_values(xsd):
    # xenstore-write un-escapes its argument (unsanitise_value): a
    # backslash before an unknown character is dropped ...
    r = run(xsd, 'xenstore-write', '/v/one', 'a\\b')
    assert r.returncode == 0
    assert xsd.read('/v/one') == 'ab'
    # ... a doubled backslash stores one backslash ...
    r = run(xsd, 'xenstore-write', '/v/two', 'a\\\\b')
    assert xsd.read('/v/two') == 'a\\b'
    # ... which xenstore-read prints escaped again.
    r = run(xsd, 'xenstore-read', '/v/two')
    assert r.stdout == 'a\\\\b\n'
    # Escapes like \n \t \x41 \101 are decoded on write.
    run(xsd, 'xenstore-write', '/v/esc', 'x\\ny\\x41\\101')
    assert xsd.read('/v/esc') == 'x\nyAA'
    r = run(xsd, 'xenstore-read', '/v/esc')
    assert r.stdout == 'x\\nyAA\n'
    # -R writes and reads raw bytes (read -R adds no newline).
    run(xsd, 'xenstore-write', '-R', '/v/raw', 'a\\b')
    assert xsd.read('/v/raw') == 'a\\b'
    r = run(xsd, 'xenstore-read', '-R', '/v/raw')
    assert (r.returncode, r.stdout) == (0, 'a\\b')


def test_value_written_directly_with_newline_is_escaped_by_read(xsd):
    xsd.write('/v/nl', 'l1\nl2\\')
    r = run(xsd, 'xenstore-read', '/v/nl')
    assert r.stdout == 'l1\\nl2\\\\\n'


# ------------------------------------------------------ ls and list ----

def test_ls_flat_output(xsd):
    run(xsd, 'xenstore-write', '/b/vbd/1', '', '/b/vbd/1/params', 'p q',
        '/b/vbd/1/mode', 'w', '/b/vbd/2/state', '4')
    r = run(xsd, 'xenstore-ls', '-f', '/b')
    assert r.returncode == 0
    # Children are listed in creation order, not sorted.
    assert r.stdout == ('/b/vbd = ""\n'
                        '/b/vbd/1 = ""\n'
                        '/b/vbd/1/params = "p q"\n'
                        '/b/vbd/1/mode = "w"\n'
                        '/b/vbd/2 = ""\n'
                        '/b/vbd/2/state = "4"\n')


def test_ls_flat_whole_store(xsd):
    r = run(xsd, 'xenstore-ls', '-f')
    assert r.returncode == 0
    assert r.stdout == ('/tool = ""\n'
                        '/tool/xenstored = ""\n'
                        '/local = ""\n'
                        '/local/domain = ""\n'
                        '/local/domain/0 = ""\n'
                        '/local/domain/0/domid = "0"\n'
                        '/local/domain/0/name = "Domain-0"\n')


def test_ls_indented_and_truncated_when_not_a_tty(xsd):
    xsd.write('/l/a/b', 'x' * 100)
    r = run(xsd, 'xenstore-ls', '/l')
    # stdout is a pipe: TIOCGWINSZ fails, max_width stays 80; long values
    # are cut to 80 - len(' = "..."') - indent - len(name) characters.
    assert r.stdout == ('a = ""\n'
                        ' b = "' + 'x' * (80 - 8 - 2) + '\\..."\n')


def test_ls_missing_path(xsd):
    r = run(xsd, 'xenstore-ls', '/nope')
    assert r.returncode == 1
    assert r.stdout == ''
    assert r.stderr == 'xenstore-ls: xs_directory (/nope): No such file or directory\n'


def test_list(xsd):
    run(xsd, 'xenstore-write', '/li/z', '1', '/li/a', '2', '/li/m/n', '3')
    r = run(xsd, 'xenstore-list', '/li')
    assert (r.returncode, r.stdout, r.stderr) == (0, 'z\na\nm\n', '')
    r = run(xsd, 'xenstore-list', '-p', '/li')
    assert r.stdout == '/li/z\n/li/a\n/li/m\n'
    r = run(xsd, 'xenstore-list', '/li/z')
    assert (r.returncode, r.stdout) == (0, '')


def test_list_missing(xsd):
    r = run(xsd, 'xenstore-list', '/nope')
    assert r.returncode == 1
    assert r.stderr == 'xenstore-list: could not list path /nope\n'


def test_list_many_children_uses_directory_part(xsd):
    # > 4096 bytes of child names: XS_DIRECTORY replies E2BIG and
    # libxenstore falls back to XS_DIRECTORY_PART.
    names = ['child-%04d-%s' % (i, 'x' * 20) for i in range(300)]
    for n in names:
        xsd.write('/many/' + n, '')
    r = run(xsd, 'xenstore-list', '/many')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == names


# ----------------------------------------------------------------- rm --

def test_rm_existing_removes_subtree(xsd):
    run(xsd, 'xenstore-write', '/r/a/b', '1', '/r/a/c/d', '2', '/r/e', '3')
    r = run(xsd, 'xenstore-rm', '/r/a')
    assert (r.returncode, r.stdout, r.stderr) == (0, '', '')
    assert xsd.tree('/r') == {'/r': '', '/r/e': '3'}


def test_rm_missing_with_existing_parent_succeeds(xsd):
    xsd.write('/r/e', '3')
    r = run(xsd, 'xenstore-rm', '/r/missing')
    assert (r.returncode, r.stdout, r.stderr) == (0, '', '')


def test_rm_missing_parent_fails(xsd):
    r = run(xsd, 'xenstore-rm', '/r/missing/child')
    assert r.returncode == 1
    assert r.stdout == ''
    assert r.stderr == 'xenstore-rm: could not remove path /r/missing/child\n'


def test_rm_several_is_atomic(xsd):
    xsd.write('/r/a', '1')
    r = run(xsd, 'xenstore-rm', '/r/a', '/nope/x')
    assert r.returncode == 1
    assert xsd.read('/r/a') == '1'      # transaction aborted


def test_rm_tidy(xsd):
    xsd.write('/t/a/b/c', '1')
    xsd.write('/t/keep', '1')
    r = run(xsd, 'xenstore-rm', '-t', '/t/a/b/c')
    assert r.returncode == 0
    assert xsd.tree('/t') == {'/t': '', '/t/keep': '1'}


# ------------------------------------------------------------- exists --

def test_exists_exit_codes(xsd):
    xsd.write('/e/a', '')
    r = run(xsd, 'xenstore-exists', '/e/a')
    assert (r.returncode, r.stdout, r.stderr) == (0, '', '')
    r = run(xsd, 'xenstore-exists', '/e/missing')
    assert (r.returncode, r.stdout, r.stderr) == (1, '', '')
    r = run(xsd, 'xenstore-exists', '/e/a', '/e/missing')
    assert (r.returncode, r.stdout, r.stderr) == (1, '', '')


# ------------------------------------------------ relative / absolute --

def test_relative_paths_resolve_to_dom0_home(xsd):
    r = run(xsd, 'xenstore-write', 'rel/key', 'v')
    assert r.returncode == 0
    assert xsd.read('/local/domain/0/rel/key') == 'v'
    assert xsd.read('rel/key') == 'v'
    r = run(xsd, 'xenstore-read', '/local/domain/0/rel/key', 'rel/key',
            'name')
    assert r.stdout == 'v\nv\nDomain-0\n'
    r = run(xsd, 'xenstore-list', '-p', 'rel')
    assert r.stdout == 'rel/key\n'
    r = run(xsd, 'xenstore-ls', '-f', 'rel')
    assert r.stdout == 'rel/key = "v"\n'
    r = run(xsd, 'xenstore-rm', 'rel')
    assert r.returncode == 0
    assert not xsd.exists('/local/domain/0/rel')


# --------------------------------------------------------------- perms --

def test_chmod_roundtrip(xsd):
    xsd.write('/p/a', 'x')
    r = run(xsd, 'xenstore-chmod', '/p/a', 'n0', 'r5', 'b7')
    assert (r.returncode, r.stderr) == (0, '')
    assert xsd.get_perms('/p/a') == ['n0', 'r5', 'b7']
    r = run(xsd, 'xenstore-ls', '-f', '-p', '/p')
    # -p: one space, no dot padding with -f (desired_width 0), then '  ('
    assert r.stdout == '/p/a = "x"   (n0,r5,b7)\n'
    # New nodes inherit the permissions of their parent.
    xsd.write('/p/a/child', 'y')
    assert xsd.get_perms('/p/a/child') == ['n0', 'r5', 'b7']


def test_chmod_missing_node(xsd):
    r = run(xsd, 'xenstore-chmod', '/p/missing', 'n0')
    assert r.returncode == 1
    assert r.stderr == ("xenstore-chmod: Error occurred setting permissions "
                        "on '/p/missing': No such file or directory\n")


# -------------------------------------------------------------- watch --

def test_watch_initial_and_change_events(xsd):
    xsd.write('/wt', '')
    p = subprocess.Popen(['xenstore-watch', '-n', '4', '/wt'],
                         env=tool_env(xsd), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == '/wt\n'       # initial event
        run(xsd, 'xenstore-write', '/wt/a', '1', '/wt/b', '2')
        xsd.write('/elsewhere', 'x')                # not under /wt
        run(xsd, 'xenstore-rm', '/wt/a')
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    # The transaction's events fire at commit in access order.
    assert sorted(['/wt/a\n', '/wt/b\n']) == sorted(out.splitlines(True)[:2])
    assert out.splitlines(True)[2:] == ['/wt/a\n']


# --------------------------------------------------------- concurrency --

def test_16_concurrent_multi_key_writers_are_atomic(xsd):
    keys = ['/c/vbd/%s' % k for k in ('a', 'b', 'c', 'd')]
    for k in keys:
        xsd.write(k, 'init')
    bad = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            r = run(xsd, 'xenstore-read', *keys)
            vals = r.stdout.splitlines()
            if r.returncode != 0 or len(set(vals)) != 1:
                bad.append((r.returncode, vals, r.stderr))

    def writer(i):
        args = []
        for k in keys:
            args += [k, 'writer-%d' % i]
        r = run(xsd, 'xenstore-write', *args)
        if r.returncode != 0:
            bad.append(('write', i, r.stderr))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(TIMEOUT)
    stop.set()
    for t in readers:
        t.join(TIMEOUT)
    assert bad == []
    print('EAGAIN conflicts:', xsd.conflicts)
    final = {xsd.read(k) for k in keys}
    assert len(final) == 1 and final.pop().startswith('writer-')


# ------------------------------------------ wire protocol (raw client) --

class RawClient:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(TIMEOUT)
        self.s.connect(path)
        self.req = 0

    def _recv(self, n):
        b = b''
        while len(b) < n:
            c = self.s.recv(n - len(b))
            assert c, 'connection closed'
            b += c
        return b

    def recv_msg(self):
        t, rid, tx, ln = struct.unpack('<IIII', self._recv(16))
        return t, tx, self._recv(ln)

    def call(self, mtype, *strings, tx=0, raw=None):
        self.req += 1
        payload = raw if raw is not None else b''.join(
            s.encode() + b'\0' for s in strings)
        self.s.sendall(struct.pack('<IIII', mtype, self.req, tx,
                                   len(payload)) + payload)
        while True:
            t, rtx, data = self.recv_msg()
            if t != xenstored.XS_WATCH_EVENT:
                return t, data

    def close(self):
        self.s.close()


def test_wire_transaction_conflict_eagain(xsd):
    a, b = RawClient(xsd.socket_path), RawClient(xsd.socket_path)
    try:
        xsd.write('/x/k', 'old')
        t, tid = a.call(xenstored.XS_TRANSACTION_START, '')
        assert (t, tid) == (xenstored.XS_TRANSACTION_START, b'1\0')
        tx = int(tid[:-1])
        assert a.call(xenstored.XS_READ, '/x/k', tx=tx)[1] == b'old'
        a.call(xenstored.XS_WRITE, raw=b'/x/other\0new', tx=tx)
        # isolation: not visible outside the transaction yet
        assert b.call(xenstored.XS_READ, '/x/other') == \
            (xenstored.XS_ERROR, b'ENOENT\0')
        b.call(xenstored.XS_WRITE, raw=b'/x/k\0changed')
        assert a.call(xenstored.XS_READ, '/x/k', tx=tx)[1] == b'old'
        assert a.call(xenstored.XS_TRANSACTION_END, 'T', tx=tx) == \
            (xenstored.XS_ERROR, b'EAGAIN\0')
        assert xsd.read('/x/other') is None
        # transaction is gone after end
        assert a.call(xenstored.XS_READ, '/x/k', tx=tx) == \
            (xenstored.XS_ERROR, b'ENOENT\0')
    finally:
        a.close()
        b.close()


def test_wire_misc_errors_and_replies(xsd):
    c = RawClient(xsd.socket_path)
    try:
        E = xenstored.XS_ERROR
        assert c.call(xenstored.XS_RM, '/') == (E, b'EINVAL\0')
        assert c.call(xenstored.XS_READ, '/a/') == (E, b'EINVAL\0')
        assert c.call(xenstored.XS_READ, '/a//b') == (E, b'EINVAL\0')
        assert c.call(xenstored.XS_READ, raw=b'/a') == (E, b'EINVAL\0')
        assert c.call(xenstored.XS_READ, '/tool', tx=99) == (E, b'ENOENT\0')
        assert c.call(xenstored.XS_TRANSACTION_END, 'T') == (E, b'ENOENT\0')
        assert c.call(99, '') == (E, b'ENOSYS\0')
        assert c.call(xenstored.XS_GET_DOMAIN_PATH, '7') == \
            (xenstored.XS_GET_DOMAIN_PATH, b'/local/domain/7\0')
        assert c.call(xenstored.XS_DIRECTORY, '/') == \
            (xenstored.XS_DIRECTORY, b'tool\0local\0')
        assert c.call(xenstored.XS_GET_PERMS, '/tool') == \
            (xenstored.XS_GET_PERMS, b'n0\0')
        assert c.call(xenstored.XS_WRITE, raw=b'/m\0v') == \
            (xenstored.XS_WRITE, b'OK\0')
        assert c.call(xenstored.XS_MKDIR, '/m') == (xenstored.XS_MKDIR,
                                                    b'OK\0')
        assert xsd.read('/m') == 'v'            # mkdir keeps existing
    finally:
        c.close()


def test_wire_watch_relative_and_unwatch(xsd):
    c = RawClient(xsd.socket_path)
    try:
        c.req += 1
        payload = b'dev\0tok\0'
        c.s.sendall(struct.pack('<IIII', xenstored.XS_WATCH, c.req, 0,
                                len(payload)) + payload)
        assert c.recv_msg() == (xenstored.XS_WATCH, 0, b'OK\0')
        assert c.recv_msg() == (xenstored.XS_WATCH_EVENT, 0, b'dev\0tok\0')
        xsd.write('/local/domain/0/dev/x', '1')
        assert c.recv_msg() == (xenstored.XS_WATCH_EVENT, 0,
                                b'dev/x\0tok\0')
        assert c.call(xenstored.XS_WATCH, 'dev', 'tok') == \
            (xenstored.XS_ERROR, b'EEXIST\0')
        assert c.call(xenstored.XS_UNWATCH, 'dev', 'tok') == \
            (xenstored.XS_UNWATCH, b'OK\0')
        assert c.call(xenstored.XS_UNWATCH, 'dev', 'tok') == \
            (xenstored.XS_ERROR, b'ENOENT\0')
    finally:
        c.close()


# ------------------------------------------------------ API and CLI ----

def test_tree_and_read_conveniences(xsd):
    assert xsd.read('/nope') is None
    assert xsd.read('name') == 'Domain-0'
    xsd.write('/q/a', b'bytes')
    assert xsd.tree('/q') == {'/q': '', '/q/a': 'bytes'}
    xsd.rm('/q')
    assert xsd.tree('/q') == {}


def test_empty_store_option():
    d = tempfile.mkdtemp(prefix='xsd')
    try:
        with XenstoredDouble(os.path.join(d, 's'),
                             populate_dom0=False) as x:
            assert x.tree('/') == {'/': '', '/tool': '',
                                   '/tool/xenstored': ''}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_cli_foreground():
    d = tempfile.mkdtemp(prefix='xsd')
    sock = os.path.join(d, 's')
    p = subprocess.Popen([sys.executable,
                          os.path.join(TESTS, 'xenstored.py'),
                          '--socket', sock],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(sock):
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        env = dict(os.environ, XENSTORED_PATH=sock)
        r = subprocess.run(['xenstore-read', 'domid'], env=env,
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert (r.returncode, r.stdout) == (0, '0\n')
    finally:
        p.terminate()
        p.wait(TIMEOUT)
        p.stderr.close()
        shutil.rmtree(d, ignore_errors=True)
    assert p.returncode == 0
