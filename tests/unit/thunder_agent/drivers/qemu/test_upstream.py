"""The forwarder of a relaying template, with a real socat between two
plain sockets of the test (no NBD needed: socat forwards bytes)."""

import os
import shutil
import socket
import tempfile
import threading

import pytest

from thunder_agent.drivers.qemu import upstream
from thunder_agent import exception
from thunder_agent import records

IMAGE = '3a1f6d0e-8c2b-4b5e-a7a4-6a0f5e9b2c11'


@pytest.fixture
def socat():
    if shutil.which(upstream.SOCAT) is None:
        pytest.skip('socat is not installed (Debian package socat): the '
                    'forwarder cannot run here')


@pytest.fixture
def run_path():
    # Short: unix socket paths are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix='up-', dir='/tmp')
    yield path
    shutil.rmtree(path, ignore_errors=True)


class EchoServer:
    """Answers every connection with its *name* and closes it."""

    def __init__(self, name, family=socket.AF_INET,
                 address=('127.0.0.1', 0)):
        self.name = name
        self.sock = socket.socket(family)
        self.sock.bind(address)
        self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.name.encode())

    def close(self):
        # shutdown wakes the accept() of the serving thread.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(10)


def _ask(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        data = b''
        while True:
            chunk = s.recv(100)
            if not chunk:
                return data.decode()
            data += chunk


def _tcp(server):
    host, port = server.sock.getsockname()
    return records.Endpoint('nbd', {'host': host, 'port': port,
                                    'export': IMAGE})


def test_describe_unix_and_tcp_sources():
    assert upstream.describe(records.Endpoint(
        'nbd', {'socket': '/run/thunder/o.sock', 'export': IMAGE})) == (
        'UNIX-CONNECT:/run/thunder/o.sock')
    assert upstream.describe(records.Endpoint(
        'nbd', {'host': '192.0.2.1', 'port': 10809})) == (
        'TCP:192.0.2.1:10809')
    assert upstream.Upstream.describe(records.Endpoint(
        'nbd', {'host': '2001:DB8:0::1', 'port': 10809})) == (
        'TCP:[2001:db8::1]:10809')
    assert upstream.describe(records.Endpoint(
        'nbd', {'host': 'parent-3.storage.example', 'port': 1})) == (
        'TCP:parent-3.storage.example:1')


@pytest.mark.parametrize('data', [
    {'host': '192.0.2.1:22', 'port': 10809},
    {'host': 'a,fork', 'port': 10809},
    {'host': 'a!!b', 'port': 10809},
    {'host': '192.0.2.1', 'port': 0},
    {'host': '192.0.2.1', 'port': True},
    {'socket': '/run/a,b.sock'},
    {'socket': 'relative.sock'},
])
def test_describe_refuses_what_socat_would_parse(data):
    with pytest.raises(exception.BackendError):
        upstream.describe(records.Endpoint('nbd', data))


def test_forwarder_start_replace_stop(socat, run_path):
    first = EchoServer('first')
    second_path = os.path.join(run_path, 'second.sock')
    second = EchoServer('second', socket.AF_UNIX, second_path)
    up = upstream.Upstream(IMAGE, run_path)
    try:
        assert up.pid is None and up.target() is None
        up.start(_tcp(first))
        pid = up.pid
        assert pid is not None
        assert up.target() == 'TCP:127.0.0.1:%d' % (
            first.sock.getsockname()[1])
        assert up.points_at(_tcp(first))
        assert _ask(up.socket) == 'first'
        # The socket is the agent's only.
        assert os.stat(up.socket).st_mode & 0o777 == 0o600

        # Re-parent: a new forwarder at the same socket.
        unix = records.Endpoint('nbd', {'socket': second_path,
                                        'export': IMAGE})
        up.start(unix)
        assert up.pid not in (None, pid)
        assert not os.path.exists('/proc/%d' % pid)
        assert up.target() == 'UNIX-CONNECT:%s' % second_path
        assert not up.points_at(_tcp(first))
        assert _ask(up.socket) == 'second'

        # A new instance (a restarted agent) finds it from its pid file.
        again = upstream.Upstream(IMAGE, run_path)
        assert again.pid == up.pid and again.points_at(unix)
        last = up.pid
    finally:
        up.stop()
        first.close()
        second.close()
    assert not os.path.exists('/proc/%d' % last)
    assert up.pid is None and up.target() is None
    assert not os.path.exists(up.socket)
    assert not os.path.exists(up.pid_path)
    up.remove_log()
    os.unlink(second_path)
    assert os.listdir(run_path) == []
    # Stopping what is not running is fine.
    up.stop()


def test_dead_forwarder_is_not_taken_for_a_live_one(socat, run_path):
    server = EchoServer('only')
    up = upstream.Upstream(IMAGE, run_path)
    try:
        up.start(_tcp(server))
        pid = up.pid
        os.killpg(pid, 9)
        os.waitpid(pid, 0)
        assert up.pid is None
        assert up.target() is None
        assert not up.points_at(_tcp(server))
    finally:
        up.stop()
        server.close()
