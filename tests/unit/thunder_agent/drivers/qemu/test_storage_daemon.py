"""StorageDaemon's monitor and process checks against a fake QMP server
(a unix socket speaking the protocol from a thread): every monitor step has
a deadline, errors are BackendErrors."""

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading

import pytest

from tests import socket_server
from thunder_agent.drivers.qemu import storage_daemon
from thunder_agent import exception

GREETING = {'QMP': {'version': {'qemu': {'major': 7, 'minor': 2,
                                         'micro': 0}, 'package': ''},
                    'capabilities': []}}


@pytest.fixture
def run_path():
    path = tempfile.mkdtemp(prefix='sd-', dir='/tmp')
    yield path
    shutil.rmtree(path, ignore_errors=True)


class FakeQmp(socket_server.AcceptLoop):
    """*answers* maps a command to its reply (``{'return': ...}`` or
    ``{'error': ...}``); None leaves it unanswered. ``greet=False`` never
    sends the greeting (a stopped daemon's socket still accepts)."""

    def __init__(self, path, answers=None, greet=True):
        self.answers = dict(answers or {})
        self.greet = greet
        self.received = []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen()
        self.conns = []
        self.serve_in_background()

    def handle(self, conn):
        self.conns.append(conn)
        if self.greet:
            threading.Thread(target=self._talk, args=(conn,),
                             daemon=True).start()

    @staticmethod
    def _messages(conn):
        # QMP messages are JSON objects, not necessarily one per line.
        decoder = json.JSONDecoder()
        buf = ''
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                yield msg

    def _talk(self, conn):
        try:
            conn.sendall(json.dumps(GREETING).encode() + b'\n')
            for msg in self._messages(conn):
                self.received.append((msg['execute'], msg.get('arguments')))
                reply = ({'return': {}} if msg['execute'] ==
                         'qmp_capabilities'
                         else self.answers.get(msg['execute']))
                if reply is None:
                    continue
                if 'id' in msg:
                    reply = dict(reply, id=msg['id'])
                conn.sendall(json.dumps(reply).encode() + b'\n')
        except OSError:
            # The client went away (it gave up, or the test ended).
            pass

    def close(self):
        for conn in self.conns:
            conn.close()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def daemon(run_path):
    return storage_daemon.StorageDaemon('t', run_path, start_timeout=0.5)


def test_commands_run_in_order_on_one_connection(daemon):
    qmp = FakeQmp(daemon.qmp_path, {
        'query-block-exports': {'return': [{'id': 'template'}]},
        'block-export-add': {'return': {}}})
    try:
        assert daemon.command('query-block-exports') == [{'id': 'template'}]
        # 'name' is an argument like any other.
        assert daemon.commands(
            ('block-export-add', {'id': 'x', 'name': 'img'}),
            ('query-block-exports', {})) == [{}, [{'id': 'template'}]]
        assert [c for c in qmp.received if c[0] != 'qmp_capabilities'] == [
            ('query-block-exports', None),
            ('block-export-add', {'id': 'x', 'name': 'img'}),
            ('query-block-exports', None)]
    finally:
        qmp.close()


def test_an_error_reply_is_a_backend_error(daemon):
    qmp = FakeQmp(daemon.qmp_path, {'blockdev-add': {'error': {
        'class': 'GenericError', 'desc': 'Duplicate node name'}}})
    try:
        with pytest.raises(exception.BackendError,
                           match='blockdev-add on t: .*Duplicate node name'):
            daemon.command('blockdev-add', driver='null-co')
    finally:
        qmp.close()


def test_a_silent_monitor_fails_at_the_deadline(daemon):
    qmp = FakeQmp(daemon.qmp_path, greet=False)
    try:
        with pytest.raises(exception.BackendError,
                           match='cannot reach QMP of t'):
            daemon.command('query-block-exports')
    finally:
        qmp.close()


def test_an_unanswered_command_fails_at_the_deadline(daemon):
    qmp = FakeQmp(daemon.qmp_path, {'quit': None})
    try:
        with pytest.raises(exception.BackendError,
                           match='quit on t: no answer within 0.5 s'):
            daemon.command('quit')
    finally:
        qmp.close()


def test_no_monitor_is_a_backend_error(daemon):
    with pytest.raises(exception.BackendError, match='cannot reach QMP'):
        daemon.command('query-block-exports')


def test_pid_must_be_a_daemon_with_our_monitor(daemon):
    assert daemon.pid is None and not daemon.is_running()
    # A live process that is not this daemon (pids are reused).
    with open(daemon.pid_path, 'w') as f:
        f.write('%d\n' % os.getpid())
    assert daemon.pid is None
    with open(daemon.pid_path, 'w') as f:
        f.write('garbage')
    assert daemon.pid is None
    assert daemon.io_counters() is None
    # Stopping a daemon that is not running touches nothing.
    daemon.stop()
    assert os.path.exists(daemon.pid_path)


def test_socket_path_length_is_checked():
    with pytest.raises(exception.BackendError, match='too long'):
        storage_daemon.StorageDaemon('x' * 120, '/tmp')


def test_listening_socket_has_nagle_off():
    sock = storage_daemon.listening_socket('127.0.0.1', 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockname()[0] == '127.0.0.1'
    finally:
        sock.close()
    with pytest.raises(exception.BackendError, match='cannot listen on'):
        storage_daemon.listening_socket('localhost', 0)


def test_secret_data_never_reaches_the_log(daemon, caplog):
    qmp = FakeQmp(daemon.qmp_path, {'object-add': {'return': {}}})
    caplog.set_level(logging.DEBUG)
    try:
        daemon.command('object-add', **{'qom-type': 'secret', 'id': 's',
                                        'data': 'Sekrit-Passw0rd'})
    finally:
        qmp.close()
    assert ('object-add', {'qom-type': 'secret', 'id': 's',
                           'data': 'Sekrit-Passw0rd'}) in qmp.received
    # qemu.qmp traced the message, masked.
    assert '"object-add"' in caplog.text
    assert 'Sekrit' not in caplog.text


def test_start_gives_the_nbd_server_an_explicit_cap(run_path, monkeypatch):
    """QEMU's own default (100 clients) is never left in place by the
    agent: --nbd-server carries max-connections."""
    ran = []

    def run(cmd, **kwargs):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)
    monkeypatch.setattr(storage_daemon.subprocess, 'run', run)
    daemon = storage_daemon.StorageDaemon('t', run_path)
    with pytest.raises(exception.BackendError, match='failed to start'):
        daemon.start(nbd_server={'type': 'unix', 'path': '/run/t.nbd'},
                     max_connections=7)
    cmd, = ran
    server = json.loads(cmd[cmd.index('--nbd-server') + 1])
    assert server == {'addr': {'type': 'unix', 'path': '/run/t.nbd'},
                      'max-connections': 7}
