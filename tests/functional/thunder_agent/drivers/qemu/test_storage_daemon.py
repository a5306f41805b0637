"""The TCP NBD listener handed to qemu-storage-daemon."""

import ctypes
import hashlib
import os
import signal
import socket

import nbd
import pytest

from thunder_agent import exception
from thunder_agent import origin as origin_mod
from thunder_agent.drivers.qemu import storage_daemon

pytestmark = pytest.mark.functional

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
libc = ctypes.CDLL(None, use_errno=True)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def tcp_sockets_of(pid):
    """Duplicates of every TCP socket *pid* holds, taken with
    pidfd_getfd, so their options can be read here."""
    pidfd = libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    assert pidfd >= 0, os.strerror(ctypes.get_errno())
    found = []
    try:
        for name in os.listdir('/proc/%d/fd' % pid):
            try:
                target = os.readlink('/proc/%d/fd/%s' % (pid, name))
            except FileNotFoundError:
                continue
            if not target.startswith('socket:'):
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            assert fd >= 0, os.strerror(ctypes.get_errno())
            sock = socket.socket(fileno=fd)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                found.append(sock)
            else:
                sock.close()
    finally:
        os.close(pidfd)
    return found


@pytest.fixture
def tcp_origin(workdir, image, qemu_tools):
    port = free_port()
    server = origin_mod.OriginServer(
        image['path'], 'raw', image['id'],
        {'type': 'inet', 'host': '127.0.0.1', 'port': port},
        os.path.join(workdir, 'origin-run'))
    server.start()
    yield server, port
    server.stop()


def test_tcp_export_serves_with_nodelay(tcp_origin, image):
    server, port = tcp_origin
    handle = nbd.NBD()
    handle.set_export_name(image['id'])
    handle.connect_tcp('127.0.0.1', str(port))
    try:
        # The listener and the accepted connection both have Nagle off.
        sockets = tcp_sockets_of(server.daemon.pid)
        assert len(sockets) == 2
        for sock in sockets:
            assert sock.getsockopt(socket.IPPROTO_TCP,
                                   socket.TCP_NODELAY) != 0
            sock.close()
        digest = hashlib.sha256()
        size = handle.get_size()
        for offset in range(0, size, 4 << 20):
            digest.update(handle.pread(min(4 << 20, size - offset), offset))
        assert size == image['size']
        assert digest.hexdigest() == image['sha256']
    finally:
        handle.shutdown()


def test_port_in_use_is_a_clear_error_and_starts_nothing(
        workdir, image, qemu_tools):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = origin_mod.OriginServer(
            image['path'], 'raw', image['id'],
            {'type': 'inet', 'host': '127.0.0.1', 'port': port},
            os.path.join(workdir, 'origin-run'))
        with pytest.raises(exception.BackendError,
                           match='cannot listen on 127.0.0.1:%d' % port):
            server.start()
        assert server.daemon.pid is None


def test_listening_socket_rejects_a_host_name():
    with pytest.raises(exception.BackendError, match='cannot listen on'):
        storage_daemon.listening_socket('not-an-address', 10809)


def test_monitor_of_a_stopped_daemon_gives_up(workdir, image, qemu_tools):
    server = origin_mod.OriginServer(
        image['path'], 'raw', image['id'],
        {'type': 'unix', 'path': os.path.join(workdir, 'o.sock')},
        os.path.join(workdir, 'origin-run'))
    server.daemon.start_timeout = 1
    server.start()
    pid = server.daemon.pid
    try:
        assert sorted(e['id'] for e in server.daemon.command(
            'query-block-exports')) == ['manifest', 'origin']
        os.kill(pid, signal.SIGSTOP)
        try:
            # Its socket still accepts; the greeting never comes.
            with pytest.raises(exception.BackendError,
                               match='cannot reach QMP'):
                server.daemon.command('query-block-exports')
        finally:
            os.kill(pid, signal.SIGCONT)
        assert sorted(e['id'] for e in server.daemon.command(
            'query-block-exports')) == ['manifest', 'origin']
    finally:
        server.stop()
    assert not storage_daemon.StorageDaemon._alive(pid)
