"""The qemu driver on real qemu-storage-daemons, qemu-img and qemu-nbd.

The test plays the manager: it builds the records, calls the driver and
stores what the driver returns in them. Two drivers with their own run
directories stand for two hosts where a template relays to another.
"""

import contextlib
import copy
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time

import nbd
import pytest

from oslo_config import cfg

from tests.conftest import sha256_file
from thunder_agent import conf as agent_conf
from thunder_agent.drivers.qemu import driver as qemu_driver
from thunder_agent.drivers.qemu import storage_daemon
from thunder_agent.drivers.qemu import upstream
from thunder_agent import exception
from thunder_agent import manifest as manifest_mod
from thunder_agent import origin as origin_mod
from thunder_agent import prefetch
from thunder_agent import records
from thunder_lab.emulation import reader

pytestmark = pytest.mark.functional

MIB = 1 << 20
CHUNK = 1 << 20

# The cache cluster: what one probe read makes a parent fetch.
CLUSTER = 65536


def _conf(workdir, name, port_min=None, listen='127.0.0.1'):
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    conf.set_override('run_path', os.path.join(workdir, name, 'run'),
                      group='agent')
    conf.set_override('state_path', os.path.join(workdir, name, 'state'),
                      group='agent')
    conf.set_override('listen_address', listen, group='relay')
    if port_min is not None:
        conf.set_override('port_min', port_min, group='relay')
        conf.set_override('port_max', port_min + 7, group='relay')
    conf.set_override('flush_timeout', 1, group='qemu')
    # These tests are about the relay's data plane and its re-parenting
    # over a unix-socket origin; the TLS links have test_relay_export.py.
    conf.set_override('enabled', False, group='tls')
    return conf


def _free_port_range(width=8, host='127.0.0.1'):
    """The first of *width* consecutive free ports near an ephemeral
    one."""
    with socket.socket(socket.AF_INET6 if ':' in host
                       else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1] - width


class Host:
    """One node: a driver with its own run path and template dirs."""

    def __init__(self, workdir, name, port_min=None, listen='127.0.0.1'):
        self.name = name
        self.conf = _conf(workdir, name, port_min, listen)
        self.driver = qemu_driver.QemuDriver(self.conf)
        self.driver.start()
        self.state = self.conf.agent.state_path
        self.templates = []

    def tdir(self, template):
        path = os.path.join(self.state, 'templates', template.image_id)
        os.makedirs(path, exist_ok=True)
        return path

    def sdir(self, instance_id):
        path = os.path.join(self.state, 'snapshots', instance_id)
        os.makedirs(path, exist_ok=True)
        return path

    def template(self, image, origin, sources=None, relay=False, taken=()):
        template = records.Template(
            image_id=image['id'], origin=origin, size=image['size'],
            image_format='raw', driver='qemu',
            sources=sources or [records.Source.origin(origin)])
        if relay:
            address = self.driver.relay_address(image['id'], set(taken))
            template.export = records.Export('qemu', {}, address)
        before = copy.deepcopy(template.to_dict())
        build = self.driver.create_template(template, self.tdir(template))
        # Drivers return values; the record is the manager's.
        assert template.to_dict() == before
        template.export = build.export
        template.driver_state = build.driver_state
        template.state = records.READY
        self.templates.append(template)
        return template

    def snapshot(self, template, instance_id):
        conn = self.driver.create_snapshot(template, self.tdir(template),
                                           instance_id,
                                           self.sdir(instance_id))
        return records.Snapshot(instance_id, template.image_id,
                                records.READY, connection_info=conn)

    def stats(self, template):
        stats, state = self.driver.template_stats(template,
                                                  self.tdir(template))
        if state is not None:
            template.driver_state = state
        return stats

    def daemon(self, template):
        return storage_daemon.StorageDaemon(template.image_id,
                                            self.conf.agent.run_path)

    def teardown(self):
        for template in self.templates:
            self.driver.delete_template(template, self.tdir(template))

    def run_files(self):
        return sorted(os.listdir(self.conf.agent.run_path))


@pytest.fixture
def hosts(workdir):
    made = []

    def make(name, port_min=None, listen='127.0.0.1'):
        host = Host(workdir, name, port_min, listen)
        made.append(host)
        return host

    yield make
    for host in made:
        host.teardown()


@pytest.fixture
def nbd_origin(workdir, image, qemu_tools):
    """The image served under its id on a unix socket."""
    server = origin_mod.OriginServer(
        image['path'], 'raw', image['id'],
        {'type': 'unix', 'path': os.path.join(workdir, 'origin.sock')},
        os.path.join(workdir, 'origin-run')).start()
    yield server
    server.stop()


def _endpoint(server):
    return records.Endpoint.from_dict(server.connection())


def _image_sha(image, offset, length):
    with open(image['path'], 'rb') as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


def _read_sha(handle, offset, length):
    digest = hashlib.sha256()
    for start in range(offset, offset + length, CHUNK):
        digest.update(handle.pread(min(CHUNK, offset + length - start),
                                   start))
    return digest.hexdigest()


def _queued_to(port):
    """Bytes waiting in the receive queues of connections accepted on
    local TCP *port* (/proc/net/tcp: rx_queue of ESTABLISHED sockets)."""
    queued = 0
    with open('/proc/net/tcp') as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == '01' and int(local.split(':')[1], 16) == port:
                queued += int(queues.split(':')[1], 16)
    return queued


def _wait_for(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _alive(pid):
    return storage_daemon.StorageDaemon._alive(pid)


def test_file_origin_template_snapshot_and_teardown(hosts, image,
                                                    qemu_tools):
    host = hosts('a')
    driver = host.driver
    origin = records.Endpoint('file', {'path': image['path']})
    driver.check_origin(origin)
    assert not driver.can_relay(image['id'], origin)
    info = driver.probe_source(records.Source.origin(origin), 'raw')
    assert info.size == image['size']

    template = host.template(image, origin)
    socket_path = os.path.join(host.conf.agent.run_path,
                               image['id'] + '.nbd')
    assert template.export == records.Export(
        'qemu', {'socket': socket_path, 'export': image['id']}, None)
    assert template.driver_state['cluster_size'] == 65536
    assert driver.is_healthy(template, host.tdir(template))
    pid = host.daemon(template).pid
    assert pid is not None

    snap = host.snapshot(template, 'i-1')
    data = snap.connection_info['data']
    assert snap.connection_info['driver_volume_type'] == 'thunder'
    assert data['backing'] == {'driver': 'nbd', 'socket': socket_path,
                               'export': image['id'], 'format': 'raw',
                               'reconnect_delay': 300}
    assert reader.checksum(snap.connection_info) == (image['sha256'],
                                                     image['size'])
    stats = host.stats(template)
    # The reader read every byte once, each fetched from the file once.
    assert stats.bytes_fetched == image['size']
    assert stats.cached_bytes == image['size']
    assert stats.blocks_cached == image['size'] // 65536
    # Served once; the origin file's reads are fetches, not hits.
    assert image['size'] <= stats.bytes_served <= 1.02 * image['size']

    second = host.snapshot(template, 'i-2')
    assert reader.checksum(second.connection_info)[0] == image['sha256']
    stats = host.stats(template)
    assert stats.bytes_fetched == image['size']
    # Served twice, the second time from the cache, where the zero
    # quarter of the image costs no read.
    assert 1.75 * image['size'] <= stats.bytes_served <= (
        2.02 * image['size'])
    assert driver.disk_usage(template, host.tdir(template)) == (
        stats.disk_bytes)

    for snapshot in (snap, second):
        assert driver.snapshot_users(template, snapshot,
                                     host.sdir(snapshot.instance_id)) is None
        driver.delete_snapshot(template, host.tdir(template), snapshot,
                               host.sdir(snapshot.instance_id))
        assert not os.listdir(host.sdir(snapshot.instance_id))

    driver.delete_template(template, host.tdir(template))
    host.templates.remove(template)
    assert not _alive(pid)
    assert host.run_files() == []


def test_snapshot_in_use_is_not_deleted(hosts, image, nbd_origin):
    host = hosts('a')
    template = host.template(image, _endpoint(nbd_origin))
    snap = host.snapshot(template, 'i-1')
    sdir = host.sdir('i-1')
    with reader.open_snapshot(snap.connection_info) as handle:
        assert _read_sha(handle, 0, MIB) == _image_sha(image, 0, MIB)
        users = host.driver.snapshot_users(template, snap, sdir)
        assert 'qemu-nbd' in users
        with pytest.raises(exception.SnapshotInUse):
            host.driver.delete_snapshot(template, host.tdir(template), snap,
                                        sdir)
        assert os.path.exists(snap.connection_info['data']['path'])
    assert host.driver.snapshot_users(template, snap, sdir) is None
    host.driver.delete_snapshot(template, host.tdir(template), snap, sdir)
    assert not os.path.exists(snap.connection_info['data']['path'])


def test_relay_child_reads_through_parent_and_moves_to_origin(
        hosts, image, nbd_origin):
    port_min = _free_port_range()
    a = hosts('a', port_min)
    b = hosts('b', port_min)
    origin = _endpoint(nbd_origin)
    assert a.driver.can_relay(image['id'], origin)
    parent = a.template(image, origin, relay=True)
    relay = parent.export.relay
    assert relay.host == '127.0.0.1'
    assert relay.export == image['id']
    # Local readers use the daemon's unix socket, children the relay
    # listener on TCP.
    assert parent.export.local == {
        'socket': os.path.join(a.conf.agent.run_path, image['id'] + '.nbd'),
        'export': image['id']}
    listener = upstream.RelayListener(image['id'], a.conf.agent.run_path)
    assert listener.pid is not None

    source = b.driver.parent_source('a', relay, image['id'])
    assert source == records.Source('a', records.Endpoint(
        'nbd', {'host': '127.0.0.1', 'port': relay.port,
                'export': image['id']}))
    assert b.driver.source_ready(source)
    assert b.driver.source_answers(source, 2)
    sent = nbd_origin.bytes_read()
    # (Its first page is read for the inspector: the parent fetches it.)
    assert b.driver.probe_source(source, 'raw').size == image['size']
    # The parent's port is taken (it listens): the child gets another.
    child = b.template(image, origin, sources=[source], relay=True)
    assert child.export.relay.port != relay.port

    snap = b.snapshot(child, 'i-1')
    forwarder = upstream.Upstream(image['id'], b.conf.agent.run_path)
    # The verifier reads the parent, checked against the manifest.
    assert ' parent_host=127.0.0.1 parent_port=%d ' % relay.port in (
        forwarder.target())
    assert ' manifest=%s/manifest ' % b.tdir(child) in forwarder.target()
    half = image['size'] // 2
    rest = image['size'] - half
    parent_pid = a.daemon(parent).pid
    with reader.open_snapshot(snap.connection_info) as handle:
        assert _read_sha(handle, 0, half) == _image_sha(image, 0, half)
        assert a.stats(parent).bytes_fetched == half
        assert b.stats(child).bytes_fetched == half
        # The origin sent the first half once, to the parent (less the
        # first cluster, which the child's readiness probe, a one-sector
        # read, had the parent fetch before).
        first = nbd_origin.bytes_read() - sent
        assert half - CLUSTER <= first <= 1.01 * half

        # The parent hangs (its daemon and its relay listener); the reader
        # goes on and its reads wait...
        os.kill(parent_pid, signal.SIGSTOP)
        os.killpg(listener.pid, signal.SIGSTOP)
        try:
            result = {}
            started = threading.Event()

            def read_rest():
                started.set()
                result['sha'] = _read_sha(handle, half, rest)

            thread = threading.Thread(target=read_rest, daemon=True)
            thread.start()
            started.wait()
            # ... in the stopped parent's socket, as nothing else can
            # answer them.
            assert _wait_for(lambda: _queued_to(relay.port) > 0)
            assert 'sha' not in result

            before = copy.deepcopy(child.to_dict())
            to_origin = [records.Source.origin(origin)]
            tdir = b.tdir(child)
            assert b.driver.set_sources(child, tdir, to_origin) is None
            assert child.to_dict() == before
            child.sources = to_origin
            assert forwarder.target().startswith('origin_socket=%s ' % (
                origin.data['socket']))
            assert 'parent_host' not in forwarder.target()
            assert b.driver.is_healthy(child, tdir)
            # The child's NBD client reconnects through the new
            # forwarder, to the origin, and re-sends what was in flight.
            thread.join(120)
            assert result['sha'] == _image_sha(image, half, rest)
        finally:
            os.killpg(listener.pid, signal.SIGCONT)
            os.kill(parent_pid, signal.SIGCONT)
    assert b.stats(child).bytes_fetched == image['size']
    # Each block crossed the origin's link once per template that
    # fetched it: the parent its half (and what it took from requests
    # queued while it was stopped), the child the rest.
    parent_fetched = a.stats(parent).bytes_fetched
    total = nbd_origin.bytes_read() - sent
    assert parent_fetched + rest - CLUSTER <= total <= 1.01 * (
        parent_fetched + rest)

    for host, template in ((b, child), (a, parent)):
        pid = host.daemon(template).pid
        host.driver.delete_template(template, host.tdir(template))
        host.templates.remove(template)
        assert not _alive(pid)
    assert a.run_files() == [] and b.run_files() == []


def test_killed_daemon_is_rebuilt_from_its_cache(hosts, image, nbd_origin):
    host = hosts('a')
    driver = host.driver
    template = host.template(image, _endpoint(nbd_origin))
    tdir = host.tdir(template)
    snap = host.snapshot(template, 'i-1')
    assert reader.checksum(snap.connection_info)[0] == image['sha256']
    # Stats flush the cache's metadata to disk.
    stats = host.stats(template)
    assert stats.bytes_fetched == image['size']
    hits = template.driver_state['hit_last']

    # A running daemon is re-adopted as it is.
    pid = host.daemon(template).pid
    build = driver.ensure_template(template, tdir)
    assert build.export == template.export
    assert build.driver_state is None
    assert host.daemon(template).pid == pid

    # The cache is verified against the image's manifest: all of it is
    # good and kept.
    with open(image['path'], 'rb') as f:
        manifest_mod.build(lambda o, n: os.pread(f.fileno(), n, o),
                           image['size']).write(
            os.path.join(tdir, qemu_driver.MANIFEST_FILE))
    os.kill(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.05)
    assert not driver.is_healthy(template, tdir)
    before = copy.deepcopy(template.to_dict())
    build = driver.ensure_template(template, tdir)
    assert template.to_dict() == before
    # Readers keep their address; the gone daemon's hits are kept.
    assert build.export == template.export
    assert build.driver_state['hit_base'] == hits
    assert build.driver_state['hit_last'] == 0
    template.driver_state = build.driver_state
    assert driver.is_healthy(template, tdir)
    assert host.daemon(template).pid not in (None, pid)

    sent = nbd_origin.bytes_read()
    assert reader.checksum(snap.connection_info)[0] == image['sha256']
    # Nothing was fetched again.
    assert nbd_origin.bytes_read() - sent == 0
    stats = host.stats(template)
    assert stats.bytes_fetched == image['size']
    assert stats.bytes_served >= image['size'] + hits


def test_flush_of_a_stopped_daemon_gives_up(hosts, image, nbd_origin):
    host = hosts('a')
    template = host.template(image, _endpoint(nbd_origin))
    tdir = host.tdir(template)
    host.driver.flush_template(template, tdir)
    pid = host.daemon(template).pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(exception.BackendError,
                           match='did not finish within 1 s'):
            host.driver.flush_template(template, tdir)
        assert not host.driver.source_ready(records.Source.origin(
            records.Endpoint('nbd', template.export.local)))
    finally:
        os.kill(pid, signal.SIGCONT)
    host.driver.flush_template(template, tdir)


def test_source_checks_of_an_absent_server(hosts, workdir, image,
                                           qemu_tools):
    host = hosts('a')
    gone = records.Source.origin(records.Endpoint(
        'nbd', {'socket': os.path.join(workdir, 'nobody.sock'),
                'export': image['id']}))
    assert not host.driver.source_ready(gone)
    assert not host.driver.source_answers(gone, 1)
    with pytest.raises(exception.OriginUnavailable):
        host.driver.probe_source(gone, 'raw')


def test_qcow2_origin_naming_a_backing_file_is_refused(hosts, workdir,
                                                       image, qemu_tools):
    path = os.path.join(image['dir'], 'top.qcow2')
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw',
                    '-b', image['path'], path], check=True)
    source = records.Source.origin(records.Endpoint('file', {'path': path}))
    with pytest.raises(exception.UnsafeImage, match='backing_file'):
        hosts('a').driver.probe_source(source, 'qcow2')
    # The image file itself is untouched.
    assert sha256_file(image['path']) == image['sha256']


# -- hostile input --------------------------------------------------------

def _nbd_server(workdir, path, name):
    """qemu-nbd exporting the bytes of *path* as they are (raw), as an
    NBD origin serving a tenant's file would; returns (socket, pid)."""
    sock = os.path.join(workdir, name + '.sock')
    pid_file = os.path.join(workdir, name + '.pid')
    subprocess.run(['qemu-nbd', '--fork', '--read-only', '-f', 'raw',
                    '-x', name, '-k', sock, '--pid-file', pid_file, path],
                   check=True)
    with open(pid_file) as f:
        return sock, int(f.read())


def _qemu_img(*args):
    subprocess.run(['qemu-img'] + list(args), check=True,
                   capture_output=True)


@pytest.fixture
def secret(workdir):
    """A host file only root may read, as /etc/shadow."""
    path = os.path.join(workdir, 'shadow')
    with open(path, 'wb') as f:
        f.write(b'root:secret-hash:19000::::::\n'.ljust(MIB, b'\0'))
    os.chmod(path, 0o600)
    return path


@pytest.mark.parametrize('attack, claimed, words', [
    ('backing file', 'qcow2', 'backing_file'),
    ('backing file', 'raw', 'content is qcow2, not raw'),
    ('vmdk descriptor', 'raw', 'cannot open its first bytes'),
])
def test_nbd_origin_with_hostile_content_is_refused(hosts, workdir, image,
                                                    secret, qemu_tools,
                                                    attack, claimed, words):
    """The agent opens an NBD origin's content through its own format
    node: the bytes an NBD server sends are inspected first."""
    path = os.path.join(workdir, 'hostile')
    if attack == 'backing file':
        _qemu_img('create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', secret,
                  path, str(MIB))
    else:
        with open(path, 'w') as f:
            f.write('# Disk DescriptorFile\nversion=1\ncreateType='
                    '"monolithicFlat"\nRW 2048 FLAT "%s" 0\n' % secret)
    os.truncate(path, MIB)
    sock, pid = _nbd_server(workdir, path, image['id'])
    host = hosts('a')
    try:
        origin = records.Source.origin(records.Endpoint(
            'nbd', {'socket': sock, 'export': image['id']}))
        with pytest.raises(exception.UnsafeImage, match=words):
            host.driver.probe_source(origin, claimed)
    finally:
        os.kill(pid, signal.SIGTERM)
    assert host.run_files() == []


def _template_record(image, origin, relay_address):
    return records.Template(
        image_id=image['id'], origin=origin, size=image['size'],
        image_format='raw', driver='qemu',
        sources=[records.Source.origin(origin)],
        export=records.Export('qemu', {}, relay_address))


def test_hostile_parent_addresses_run_nothing(hosts, image, nbd_origin,
                                              workdir, monkeypatch):
    """Forged coordinator answers through parent_source, set_sources and
    a rebuild from a record: socat's grammar ('!!SYSTEM:' after an IPv6
    scope id that closes socat's bracket) must be unreachable. Before the
    checks, the first of these ran ``id`` as root on the first read."""
    # Where a SYSTEM: command would write (socat's cwd is the agent's).
    monkeypatch.chdir(workdir)
    bait = socket.socket(socket.AF_INET6)
    bait.bind(('::1', 0))
    bait.listen()
    port = bait.getsockname()[1]
    hostile = ['::1%%1]:%d!!SYSTEM:id>pwned-1 #(' % port,
               '::1%%lo]:%d!!SYSTEM:id>pwned-2 #(' % port,
               '127.0.0.1!!SYSTEM:id>pwned-3',
               '127.0.0.1,fork',
               '10.255.255.1']
    port_min = _free_port_range()
    host = hosts('b', port_min)
    origin = _endpoint(nbd_origin)
    template = host.template(image, origin, relay=True)
    tdir = host.tdir(template)
    forwarder = upstream.Upstream(image['id'], host.conf.agent.run_path)
    to_origin = forwarder.target()
    try:
        for name in hostile:
            address = records.RelayAddress(name, port_min, image['id'])
            with pytest.raises(exception.InvalidAddress):
                host.driver.parent_source('evil', address, image['id'])
            forged = records.Source('evil', records.Endpoint('nbd', {
                'host': name, 'port': port_min, 'export': image['id']}))
            with pytest.raises(exception.InvalidAddress):
                host.driver.set_sources(template, tdir, [forged])
            # A record that names it (written before the checks).
            recorded = copy.deepcopy(template)
            recorded.sources = [forged]
            os.kill(host.daemon(template).pid, signal.SIGKILL)
            forwarder.stop()
            with pytest.raises(exception.InvalidAddress):
                host.driver.ensure_template(recorded, tdir)
            # Whatever runs at the forwarder's socket, a connection to it
            # starts nothing.
            if os.path.exists(forwarder.socket):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(forwarder.socket)
                    s.settimeout(2)
                    with contextlib.suppress(OSError):
                        s.recv(1)
            assert [f for f in os.listdir(workdir)
                    if f.startswith('pwned')] == []
            host.driver.ensure_template(template, tdir)
            assert forwarder.target() == to_origin
    finally:
        bait.close()
    # The template still reads its origin.
    snap = host.snapshot(template, 'i-1')
    assert reader.checksum(snap.connection_info)[0] == image['sha256']


def test_ipv6_relay_end_to_end(hosts, image, nbd_origin):
    """A relaying template listening on [::1], a child reading through
    its forwarder from [::1]:port: the same bytes as the image."""
    port_min = _free_port_range(host='::1')
    a = hosts('a', port_min, listen='::1')
    b = hosts('b', port_min, listen='::1')
    origin = _endpoint(nbd_origin)
    parent = a.template(image, origin, relay=True)
    relay = parent.export.relay
    assert relay.host == '::1'
    # [relay] peer_networks is empty: the network of ::1 (::1/128 on lo).
    source = b.driver.parent_source('a', relay, image['id'])
    assert source.endpoint.data == {'host': '::1', 'port': relay.port,
                                    'export': image['id']}
    assert b.driver.source_ready(source)
    child = b.template(image, origin, sources=[source], relay=True)
    forwarder = upstream.Upstream(image['id'], b.conf.agent.run_path)
    assert ' parent_host=::1 parent_port=%d ' % relay.port in (
        forwarder.target())
    listener = upstream.RelayListener(image['id'], a.conf.agent.run_path)
    assert listener.target().startswith(
        'TCP6-LISTEN:%d,bind=[::1],' % relay.port)
    assert ',range=[::1]/128' in listener.target()
    snap = b.snapshot(child, 'i-1')
    sent = nbd_origin.bytes_read()
    assert reader.checksum(snap.connection_info) == (image['sha256'],
                                                     image['size'])
    # Every byte came through the parent: fetched by both, sent by the
    # origin once.
    assert b.stats(child).bytes_fetched == image['size']
    assert a.stats(parent).bytes_fetched == image['size']
    # (Less the first cluster: the child's readiness probe had the parent
    # fetch it before.)
    assert image['size'] - CLUSTER <= nbd_origin.bytes_read() - sent <= (
        1.01 * image['size'])


def _handshake(address, timeout):
    """True when an NBD client completes its handshake with *address*
    (``{'socket'}`` or ``{'host', 'port'}``, and ``export``) within
    *timeout* seconds."""
    handle = nbd.NBD()
    handle.set_export_name(address['export'])
    if 'socket' in address:
        handle.aio_connect_unix(address['socket'])
    else:
        handle.aio_connect_tcp(address['host'], str(address['port']))
    deadline = time.monotonic() + timeout
    while handle.aio_is_connecting() and time.monotonic() < deadline:
        handle.poll(100)
    # Dropping the handle closes its connection.
    return handle.aio_is_ready()


STRANGERS = 2


def test_strangers_holding_relay_connections_block_children_only(
        hosts, image, nbd_origin):
    """Strangers holding every relay connection open: a new child's
    handshake waits (its readiness probe says no within [relay]
    parent_probe_timeout, so the manager sends it to the origin), while
    local VMs, the agent's flush and its prefetcher, on the unix socket,
    go on. Once the strangers leave, the child is served."""
    port_min = _free_port_range()
    a = hosts('a', port_min)
    b = hosts('b', port_min)
    a.conf.set_override('relay_connections', STRANGERS, group='qemu')
    parent = a.template(image, _endpoint(nbd_origin), relay=True)
    relay = parent.export.relay
    strangers = []
    try:
        for _ in range(STRANGERS):
            handle = nbd.NBD()
            handle.set_export_name(image['id'])
            handle.connect_tcp(relay.host, str(relay.port))
            strangers.append(handle)
        # More wait in the listener's queue.
        for _ in range(4):
            with contextlib.suppress(nbd.Error):
                handle = nbd.NBD()
                handle.set_export_name(image['id'])
                handle.aio_connect_tcp(relay.host, str(relay.port))
                strangers.append(handle)

        child_source = b.driver.parent_source('a', relay, image['id'])
        assert not b.driver.source_ready(child_source)

        tdir = a.tdir(parent)
        a.driver.flush_template(parent, tdir)
        target = a.driver.prefetch_target(parent, tdir)
        status = prefetch.FullPrefetcher(target, image['size'],
                                         rate=1 << 40).run()
        assert status['state'] == 'done', status
        snap = a.snapshot(parent, 'i-1')
        backing = snap.connection_info['data']['backing']
        assert _handshake(backing, 5)
        assert reader.checksum(snap.connection_info)[0] == image['sha256']
        assert a.stats(parent).bytes_fetched == image['size']
    finally:
        # Dropping the handles closes their connections.
        handle = None
        strangers.clear()
    # Served again as soon as the listener's slots are free (each socat
    # child leaves half a second after its client).
    assert _wait_for(lambda: b.driver.source_ready(child_source))
