"""The forwarder of a relaying template, with a real socat between two
plain sockets of the test (no NBD needed: socat forwards bytes)."""

import os
import shutil
import socket
import tempfile

import pytest

from tests import socket_server
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


class EchoServer(socket_server.AcceptLoop):
    """Answers every connection with its *name* and closes it."""

    def __init__(self, name, family=socket.AF_INET,
                 address=('127.0.0.1', 0)):
        self.name = name
        self.sock = socket.socket(family)
        self.sock.bind(address)
        self.sock.listen()
        self.serve_in_background()

    def handle(self, conn):
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
    # Python's ipaddress takes anything but '%' and '/' as an IPv6 scope
    # id: this one closed socat's bracket and ran a command.
    {'host': '::1%1]:10809!!SYSTEM:id>pwned #(', 'port': 10809},
    {'host': '[::1%1]:1!!SYSTEM:id #(]', 'port': 10809},
    {'host': 'fe80::1%eth0', 'port': 10809},
    {'host': 'fe80::1%eth0,fork', 'port': 10809},
    {'host': '[::1', 'port': 10809},
    {'host': '::1]', 'port': 10809},
    {'host': None, 'port': 10809},
])
def test_describe_refuses_what_socat_would_parse(data):
    with pytest.raises(exception.BackendError):
        upstream.describe(records.Endpoint('nbd', data))


def test_a_hostile_scope_id_runs_nothing(socat, run_path):
    """The address that made socat run ``id`` as root: refused before any
    process starts, so a connection to the forwarder runs nothing."""
    up = upstream.Upstream(IMAGE, run_path)
    with pytest.raises(exception.BackendError, match='neither an IP'):
        up.start(records.Endpoint('nbd', {
            'host': '::1%1]:10809!!SYSTEM:id>' + run_path + '/pwned #(',
            'port': 10809}))
    assert up.pid is None
    assert not os.path.exists(up.socket)
    assert os.listdir(run_path) == []


@pytest.mark.parametrize('listen, target', [
    ('UNIX-LISTEN:/x,fork,unlink-early,mode=600',
     'TCP:[::1%1]:1!!SYSTEM:id'),
    ('UNIX-LISTEN:/x,fork,unlink-early,mode=600', 'SYSTEM:id'),
    ('UNIX-LISTEN:/x,fork,unlink-early,mode=600', 'TCP:1.2.3.4:1,fork'),
    ('UNIX-LISTEN:/x,fork,unlink-early,mode=600!!SYSTEM:id',
     'UNIX-CONNECT:/y'),
    ('TCP4-LISTEN:1,bind=1.2.3.4,reuseaddr,fork,max-children=1,'
     'backlog=1,nodelay,range=1.2.3.4/8,su=nobody', 'UNIX-CONNECT:/y'),
])
def test_only_the_shapes_this_module_makes_reach_socat(listen, target):
    patterns = (upstream._LISTEN, upstream._TARGET)
    with pytest.raises(exception.BackendError, match='refusing'):
        for pattern, address in zip(patterns, (listen, target)):
            upstream._checked(pattern, address)


def test_relay_listener_describe():
    assert upstream.RelayListener.describe(
        '127.0.0.1', 10815, '/run/t/x.nbd', 12, '127.0.0.0/8') == (
        'TCP4-LISTEN:10815,bind=127.0.0.1,reuseaddr,fork,max-children=12,'
        'backlog=16,nodelay,range=127.0.0.0/8', 'UNIX-CONNECT:/run/t/x.nbd')
    assert upstream.RelayListener.describe(
        '2001:DB8::7', 10815, '/run/t/x.nbd', 3) == (
        'TCP6-LISTEN:10815,bind=[2001:db8::7],reuseaddr,fork,'
        'max-children=3,backlog=16,nodelay,ipv6only=1',
        'UNIX-CONNECT:/run/t/x.nbd')
    assert upstream.RelayListener.describe(
        '::1', 1, '/s', 1, '::1/128')[0].endswith(',range=[::1]/128')
    for bad in (('127.0.0.1,fork', 1, '/s', 1), ('127.0.0.1', 0, '/s', 1),
                ('127.0.0.1', 1, '/a b', 1), ('::1%lo', 1, '/s', 1)):
        with pytest.raises(exception.BackendError):
            upstream.RelayListener.describe(*bad)


def _connect_tcp(host, port):
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    s = socket.socket(family)
    s.settimeout(10)
    s.connect((host, port))
    return s


def _free_tcp_port(host='127.0.0.1'):
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Greeter(socket_server.AcceptLoop):
    """A unix socket server that says hello on each connection and keeps
    it open until the test closes the server (an idle NBD client's
    connection, as far as a forwarder can tell). ``open_at_accept`` holds,
    for each connection, how many earlier ones were still open (not at
    end of file) when it arrived."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(64)
        self.conns = []
        self.open_at_accept = []
        self.serve_in_background()

    @staticmethod
    def _is_open(conn):
        try:
            return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b''
        except BlockingIOError:
            return True
        except OSError:
            return False

    def handle(self, conn):
        self.open_at_accept.append(
            sum(self._is_open(c) for c in self.conns))
        self.conns.append(conn)
        conn.sendall(b'hello')

    def close(self):
        for conn in self.conns:
            conn.close()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(10)


@pytest.mark.parametrize('host, network', [('127.0.0.1', '127.0.0.0/8'),
                                           ('::1', '::1/128')])
def test_relay_listener_forwards_caps_and_is_readopted(socat, run_path,
                                                       host, network):
    target = os.path.join(run_path, 'daemon.sock')
    greeter = Greeter(target)
    port = _free_tcp_port(host)
    listener = upstream.RelayListener(IMAGE, run_path)
    clients = []
    try:
        listener.start(host, port, target, 2, network)
        assert listener.points_at(host, port, target, 2, network)
        assert not listener.points_at(host, port, target, 3, network)
        for _ in range(2):
            clients.append(_connect_tcp(host, port))
            assert clients[-1].recv(5) == b'hello'
        # A third connects (the kernel's queue takes it) while two are
        # served; it is forwarded only once one of them has left.
        clients.append(_connect_tcp(host, port))
        clients.pop(0).close()
        assert clients[1].recv(5) == b'hello'
        assert greeter.open_at_accept == [0, 1, 1]

        # A restarted agent finds it from its pid file.
        again = upstream.RelayListener(IMAGE, run_path)
        assert again.pid == listener.pid
        assert again.points_at(host, port, target, 2, network)
        pid = listener.pid
    finally:
        for client in clients:
            client.close()
        listener.stop()
        greeter.close()
    assert not os.path.exists('/proc/%d' % pid)
    assert listener.pid is None
    listener.remove_log()
    os.unlink(target)
    assert os.listdir(run_path) == []


def test_relay_listener_refuses_peers_outside_its_range(socat, run_path):
    target = os.path.join(run_path, 'daemon.sock')
    greeter = Greeter(target)
    port = _free_tcp_port()
    listener = upstream.RelayListener(IMAGE, run_path)
    try:
        # 127.0.0.1 is not in 127.0.0.2/32.
        listener.start('127.0.0.1', port, target, 2, '127.0.0.2/32')
        with _connect_tcp('127.0.0.1', port) as client:
            # Closed at once, never forwarded, no slot taken.
            assert client.recv(5) == b''
        assert greeter.conns == []
    finally:
        listener.stop()
        greeter.close()


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


# -- the verifier ------------------------------------------------------------
ORIGIN = records.Endpoint('nbd', {'socket': '/run/thunder/origin.sock',
                                  'export': IMAGE})
VERIFY = upstream.Verify(ORIGIN, '/var/lib/thunder/t/manifest',
                         tls_dir='/etc/thunder-agent/pki', parent_wait=20)


def _parent(**data):
    return records.Endpoint('nbd', dict({'host': '192.0.2.9', 'port': 10809,
                                         'export': IMAGE}, **data))


def test_verifier_params_of_a_parent_and_of_the_origin():
    params = upstream.verifier_params(_parent(), VERIFY, '/r/a', '/r/b')
    assert params == [
        'origin_socket=/run/thunder/origin.sock', 'origin_export=' + IMAGE,
        'parent_host=192.0.2.9', 'parent_port=10809',
        'parent_export=' + IMAGE, 'manifest=/var/lib/thunder/t/manifest',
        'report=/r/a', 'stats=/r/b', 'parent_wait=20', 'connections=4',
        'tls_dir=/etc/thunder-agent/pki']
    # Reading the origin itself: no parent parameters.
    params = upstream.verifier_params(ORIGIN, VERIFY, '/r/a', '/r/b')
    assert not any(p.startswith('parent_h') for p in params)
    # IPv6 in canonical form, as libnbd checks it against the IP SANs.
    params = upstream.verifier_params(_parent(host='2001:DB8:0::5'),
                                      VERIFY, '/r/a', '/r/b')
    assert 'parent_host=2001:db8::5' in params


@pytest.mark.parametrize('data', [
    {'host': 'parent.example.com'},        # a name: resolved by whoever
    {'host': 'fe80::1%eth0 tls_dir=/x'},   # scope id: free text
    {'host': '192.0.2.9 manifest=/etc/x'},
    {'host': None}, {'port': '10809'}, {'port': 0}, {'port': True},
    {'export': 'x manifest=/etc/shadow'}, {'export': ''},
    {'export': '../../x'}, {'export': None},
    {'socket': '/run/x.sock'},             # a parent is never a socket
])
def test_hostile_parent_values_never_reach_nbdkit(monkeypatch, run_path,
                                                  data):
    started = []
    monkeypatch.setattr(upstream.subprocess, 'Popen',
                        lambda *a, **k: started.append(a))
    endpoint = _parent(**data)
    if 'socket' in data:
        endpoint = records.Endpoint('nbd', {'socket': data['socket'],
                                            'export': IMAGE})
    with pytest.raises(exception.BackendError):
        upstream.Upstream(IMAGE, run_path).start_verifier(endpoint, VERIFY)
    assert started == []


def test_verifier_command_line(monkeypatch, run_path):
    started = []

    class Proc:
        pid = os.getpid()

        def poll(self):
            return 1

    def popen(cmd, **kwargs):
        started.append((cmd, kwargs))
        return Proc()

    monkeypatch.setattr(upstream.subprocess, 'Popen', popen)
    up = upstream.Upstream(IMAGE, run_path, start_timeout=0)
    with pytest.raises(exception.BackendError):
        up.start_verifier(_parent(), VERIFY)     # "exits" at once
    (cmd, kwargs), = started
    assert cmd[:7] == ['nbdkit', '-f', '-r', '-U', up.socket, 'python',
                       upstream.PLUGIN]
    assert cmd[7:] == upstream.verifier_params(
        _parent(), VERIFY, up.report_path, up.stats_path)
    assert kwargs['start_new_session'] and kwargs['umask'] == 0o077


def test_mismatch_and_stats_files(run_path):
    up = upstream.Upstream(IMAGE, run_path)
    assert up.mismatch() is None and up.verifier_stats() is None
    with open(up.report_path, 'w') as f:
        f.write('{"parent": "192.0.2.9:10809/x", "bad_blocks": [3]}')
    assert up.mismatch()['bad_blocks'] == [3]
    with open(up.stats_path, 'w') as f:
        f.write('[1, 2')                    # torn: not taken
    assert up.verifier_stats() is None
