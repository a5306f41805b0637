"""The qemu driver with fakes at the process boundary: a storage daemon
that records its QMP calls, forwarders that record their targets, a
qemu-img runner answering from a table, libnbd handles on a fake clock, an
interface table. Image files are real (the inspector reads them)."""

import copy
import ipaddress
import json
import os
import shutil
import socket
import subprocess

import nbd
import pytest

from oslo_config import cfg

from thunder_agent import conf as agent_conf
from thunder_agent import drivers
from thunder_agent.drivers import base
from thunder_agent.drivers.qemu import driver as qemu_driver
from thunder_agent.drivers.qemu import recovery
from thunder_agent.drivers.qemu import upstream
from thunder_agent import exception
from thunder_agent import manifest as manifest_mod
from thunder_agent import prefetch
from thunder_agent import records
from thunder_lab import pki

IMAGE = '3a1f6d0e-8c2b-4b5e-a7a4-6a0f5e9b2c11'
SIZE = 64 << 20
NBD_ORIGIN = records.Endpoint('nbd', {'host': '192.0.2.9', 'port': 10809,
                                      'export': IMAGE})
FILE_ORIGIN = records.Endpoint('file', {'path': '/srv/images/disk.raw'})
MANIFEST = manifest_mod.Manifest(
    SIZE, 65536, bytes(32 * manifest_mod.block_count(SIZE, 65536)))
# The first bytes of a qcow2 v3 image (magic, version 3, no backing file,
# 64 KiB clusters), and of one whose header names a backing file.
QCOW2_HEAD = (b'QFI\xfb' + (3).to_bytes(4, 'big') + bytes(8)
              + bytes(4) + (16).to_bytes(4, 'big')
              + SIZE.to_bytes(8, 'big')).ljust(4096, b'\0')
BACKED_HEAD = QCOW2_HEAD[:8] + (512).to_bytes(8, 'big') + QCOW2_HEAD[16:]
ISCSI_ORIGIN = records.Endpoint('iscsi', {
    'target_portal': '192.0.2.20:3260',
    'target_iqn': 'iqn.2010-10.org.openstack:volume-1', 'target_lun': 1,
    'auth_method': 'CHAP', 'auth_username': 'thunder',
    'auth_password': 'Sekrit-Passw0rd'})


class FakeDaemon:
    """A StorageDaemon stand-in: remembers how it was started and every
    QMP call, per daemon name, across the driver's fresh instances."""

    def __init__(self, name):
        self.name = name
        self.running = False
        self.nbd_server = None
        self.calls = []
        self.starts = 0
        self.stops = 0
        self.fail_on = None
        self.rchar = 0

    @property
    def pid(self):
        return 4242 if self.running else None

    def is_running(self):
        return self.running

    def start(self, nbd_server=None, extra_args=(), max_connections=None):
        self.running = True
        self.starts += 1
        self.nbd_server = nbd_server
        self.max_connections = max_connections
        self.calls = []

    def stop(self):
        if self.running:
            self.stops += 1
        self.running = False

    def remove_log(self):
        pass

    def log_tail(self):
        return 'fake log'

    def commands(self, *calls):
        results = []
        for name, args in calls:
            if name == self.fail_on:
                raise exception.BackendError(reason='%s failed' % name)
            self.calls.append((name, args))
            results.append({})
        return results

    def command(self, name, **args):
        self.calls.append((name, args))
        if name == 'quit':
            self.running = False
        if name == 'query-block-exports':
            return [{'id': a['id']} for n, a in self.calls
                    if n == 'block-export-add']
        return {}

    def io_counters(self):
        return {'rchar': self.rchar} if self.running else None


class FakeUpstream:
    def __init__(self, image_id, run_path):
        self.image_id = image_id
        self.socket = os.path.join(run_path, image_id + '.up')
        self.current = None
        self.starts = []

    def target(self):
        return self.current

    def points_at(self, endpoint):
        return self.current == upstream.describe(endpoint)

    def start(self, endpoint):
        self.current = upstream.describe(endpoint)
        self.starts.append(self.current)

    def verifies(self, endpoint, verify):
        return self.points_at(endpoint)

    def start_verifier(self, endpoint, verify):
        self.verify = verify
        self.start(endpoint)

    def mismatch(self):
        return getattr(self, 'report', None)

    def verifier_stats(self):
        return getattr(self, 'counters', None)

    def stop(self):
        self.current = None

    def remove_log(self):
        pass


class FakeListener:
    def __init__(self, image_id, run_path):
        self.image_id = image_id
        self.current = None
        self.starts = []

    def points_at(self, *args):
        return self.current == args

    def start(self, *args):
        self.current = args
        self.starts.append(args)

    def stop(self):
        self.current = None

    def remove_log(self):
        pass


class FakeExporter:
    """A RelayExport stand-in: running or not, and whom it admits."""

    def __init__(self, image_id, run_path, certificates_dir):
        self.socket = os.path.join(run_path, image_id + '.tls')
        self.certificates_dir = certificates_dir
        self.running = False
        self.admitted = None
        self.starts = []

    def is_running(self):
        return self.running

    def start(self, children, max_connections, reconnect_delay,
              open_timeout):
        self.running = True
        self.admitted = sorted(children)
        self.starts.append((max_connections, reconnect_delay,
                            open_timeout))

    def set_children(self, children):
        assert self.running
        self.admitted = sorted(children)

    def stop(self):
        self.running = False
        self.admitted = None

    def remove_log(self):
        pass


class FakeQemuImg:
    """qemu-img: ``create`` makes the file, ``info`` and ``map`` answer
    what the test set."""

    def __init__(self):
        self.runs = []
        self.info = {'format': 'raw', 'virtual-size': SIZE}
        self.extents = []
        self.secrets = []

    def __call__(self, args, timeout, pass_fds=()):
        self.runs.append((list(args), timeout))
        verb = args[1]
        out = ''
        if verb == 'create':
            with open(args[-2], 'w'):
                pass
        elif verb == 'info':
            for fd in pass_fds:
                self.secrets.append(os.read(fd, 100).decode())
            out = json.dumps(self.info)
        elif verb == 'map':
            out = json.dumps(self.extents)
        return subprocess.CompletedProcess(args, 0, out, '')


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeHandle:
    """A libnbd handle on a fake clock: poll(ms) lets that much time pass.

    ``connects`` is how many polls the handshake takes (None: never),
    ``completes`` the same for a flush.
    """

    def __init__(self, clock, connects=1, completes=1, ready=True):
        self.clock = clock
        self.connects = connects
        self.completes = completes
        self.ready = ready
        self.export = None
        self.address = None
        self.tls = None
        self.polls = []
        self.flushes = 0
        self.head = bytes(4096)
        self.reads = []

    def set_export_name(self, name):
        self.export = name

    def set_tls(self, level):
        self.tls = dict(self.tls or {}, level=level)

    def set_tls_certificates(self, path):
        self.tls = dict(self.tls or {}, certificates=path)

    def set_tls_verify_peer(self, verify):
        self.tls = dict(self.tls or {}, verify_peer=verify)

    def aio_connect_unix(self, path):
        self.address = ('unix', path)

    def aio_connect_tcp(self, host, port):
        self.address = ('tcp', host, port)

    def aio_is_connecting(self):
        return self.connects is None or len(self.polls) < self.connects

    def aio_is_ready(self):
        return self.ready and not self.aio_is_connecting()

    def get_size(self):
        if (self.export or '').endswith(manifest_mod.EXPORT_SUFFIX):
            return len(self.head)
        return SIZE

    def poll(self, timeout_ms):
        assert timeout_ms > 0
        self.polls.append(timeout_ms)
        self.clock.now += timeout_ms / 1000.0
        return 0

    def aio_flush(self):
        self.flushes += 1
        self._flush_at = len(self.polls)
        return 7

    def aio_pread(self, buf, offset):
        view = buf.to_buffer()
        view[:] = self.head[offset:offset + len(view)]
        self.reads.append((offset, len(view)))
        return 8

    def aio_command_completed(self, cookie):
        if cookie == 8:
            return True
        assert cookie == 7
        return (self.completes is not None
                and len(self.polls) - self._flush_at >= self.completes)


@pytest.fixture
def conf(tmp_path):
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    conf.set_override('run_path', str(tmp_path / 'run'), group='agent')
    conf.set_override('listen_address', '127.0.0.1', group='relay')
    # Distinct from the defaults, to see which option a value comes from.
    conf.set_override('open_timeout', 7, group='qemu')
    conf.set_override('reconnect_delay', 123, group='qemu')
    conf.set_override('command_timeout', 45, group='qemu')
    conf.set_override('flush_timeout', 3, group='qemu')
    # The TLS wiring has tests of its own (test_tls_* below).
    conf.set_override('enabled', False, group='tls')
    return conf


class Fakes:
    def __init__(self):
        self.daemons = {}
        self.upstreams = {}
        self.listeners = {}
        self.exporters = {}
        self.qemu_img = FakeQemuImg()
        self.clock = Clock()
        self.handles = []
        self.handle_args = {}
        self.head = bytes(4096)
        self.interfaces = {'127.0.0.1': ['127.0.0.0/8']}
        self.lookups = []
        # What QEMU's own format probe of a raw image's head says.
        self.probed = 'raw'
        self.probes = []

    def probe(self, args, timeout):
        with open(args[-1], 'rb') as f:
            self.probes.append((args[:-1], f.read(), timeout))
        return subprocess.CompletedProcess(
            args, 0, json.dumps({'format': self.probed}), '')

    def networks(self, address):
        self.lookups.append(address)
        return [ipaddress.ip_network(n)
                for n in self.interfaces.get(address, [])]

    def listener(self, image_id, run_path):
        return self.listeners.setdefault(image_id,
                                         FakeListener(image_id, run_path))

    def exporter(self, image_id, run_path, certificates_dir, executable,
                 start_timeout):
        return self.exporters.setdefault(
            image_id, FakeExporter(image_id, run_path, certificates_dir))

    def daemon(self, name, run_path, executable, start_timeout):
        return self.daemons.setdefault(name, FakeDaemon(name))

    def upstream(self, image_id, run_path):
        return self.upstreams.setdefault(image_id,
                                         FakeUpstream(image_id, run_path))

    def nbd(self):
        handle = FakeHandle(self.clock, **self.handle_args)
        handle.head = self.head
        self.handles.append(handle)
        return handle


@pytest.fixture
def fakes():
    return Fakes()


@pytest.fixture
def driver(conf, fakes):
    drv = qemu_driver.QemuDriver(
        conf, daemon_factory=fakes.daemon, upstream_factory=fakes.upstream,
        runner=fakes.qemu_img, nbd_factory=fakes.nbd, clock=fakes.clock,
        listener_factory=fakes.listener, networks=fakes.networks,
        probe_runner=fakes.probe, exporter_factory=fakes.exporter)
    drv.start()
    return drv


@pytest.fixture
def raw_file(tmp_path):
    """A raw image file (what FILE_ORIGIN names, made real)."""
    path = tmp_path / 'images' / 'disk.raw'
    path.parent.mkdir()
    path.write_bytes(b'\xeb\x63\x90' + bytes(SIZE // 64 - 3))
    return records.Endpoint('file', {'path': str(path)})


@pytest.fixture
def tdir(tmp_path):
    path = tmp_path / 'templates' / IMAGE
    path.mkdir(parents=True)
    return str(path)


def _template(origin=NBD_ORIGIN, relay=None, sources=None, **kwargs):
    return records.Template(
        image_id=IMAGE, origin=origin, size=SIZE, image_format='raw',
        driver='qemu', sources=sources or [records.Source.origin(origin)],
        export=records.Export('qemu', {}, relay) if relay else None,
        **kwargs)


def _free_ports(count):
    """*count* consecutive ports nothing listens on (near an ephemeral
    one)."""
    while True:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            first = s.getsockname()[1]
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(('127.0.0.1', port))
            return first
        except OSError:
            continue


def _address(port):
    return records.RelayAddress('127.0.0.1', port, IMAGE)


# -- loading and transport ------------------------------------------------

def test_entry_point_loads_the_qemu_driver(conf):
    driver = drivers.load('qemu', conf)
    assert isinstance(driver, qemu_driver.QemuDriver)
    assert isinstance(driver, base.Driver)
    assert driver.name == 'qemu'
    assert driver.ready_poll_interval == 0.05


def test_relay_address_gives_distinct_free_ports_then_refuses(conf, driver):
    first = _free_ports(3)
    conf.set_override('port_min', first, group='relay')
    conf.set_override('port_max', first + 2, group='relay')
    a = driver.relay_address(IMAGE, set())
    assert a == records.RelayAddress('127.0.0.1', first, IMAGE)
    # Another program listens on the next port: it is skipped.
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', first + 1))
        busy.listen()
        b = driver.relay_address(IMAGE, {a})
        assert b.port == first + 2
        with pytest.raises(exception.BackendError,
                           match='no free relay port in %d-%d on 127.0.0.1'
                                 % (first, first + 2)):
            driver.relay_address(IMAGE, {a, b})
    # Once it is gone, the port is free again; taken ones stay taken.
    assert driver.relay_address(IMAGE, {a, b}).port == first + 1


def test_relay_address_needs_a_numeric_listen_address(conf, driver):
    conf.set_override('listen_address', 'storage.example', group='relay')
    with pytest.raises(exception.BackendError, match='must be an IP'):
        driver.relay_address(IMAGE, set())


def test_parent_source_reads_the_parent_export_of_the_image(conf, driver):
    conf.set_override('peer_networks', ['198.51.100.0/24'], group='relay')
    source = driver.parent_source(
        'node-7', records.RelayAddress('198.51.100.7', 10812, IMAGE), IMAGE)
    assert source == records.Source('node-7', records.Endpoint(
        'nbd', {'host': '198.51.100.7', 'port': 10812, 'export': IMAGE}))
    assert not source.is_origin
    # Written back in canonical form.
    conf.set_override('peer_networks', ['2001:db8::/64'], group='relay')
    assert driver.parent_source('n', records.RelayAddress(
        '2001:DB8:0::0:5', 10812, IMAGE), IMAGE).endpoint.data['host'] == (
        '2001:db8::5')


# Hostile parent addresses as a forged coordinator answer could carry them:
# socat address grammar ('!!' joins a second address, SYSTEM: runs a
# command, ',' adds options, '(' and '[' nest), IPv6 scope ids (free text
# after '%', which Python's ipaddress accepts), names, other networks,
# ports and exports.
HOSTILE_HOSTS = [
    '::1%1]:10811!!SYSTEM:id>pwned #(',
    'fe80::1%eth0,fork',
    '::1%lo',
    '127.0.0.1!!SYSTEM:id',
    '127.0.0.1,bind=0.0.0.0',
    '127.0.0.1:10811',
    '[127.0.0.1]',
    'SYSTEM:id',
    'localhost',
    'parent-3.storage.example',
    '',
    '0.0.0.0',
    '::',
    '224.0.0.1',
    '::ffff:127.0.0.1',
    '10.0.0.1',
    '192.0.2.9',
    None,
    7,
]


@pytest.mark.parametrize('host', HOSTILE_HOSTS)
def test_parent_source_refuses_hostile_hosts(driver, host):
    with pytest.raises(exception.InvalidAddress):
        driver.parent_source('p', records.RelayAddress(host, 10811, IMAGE),
                             IMAGE)


@pytest.mark.parametrize('port, export', [
    (22, IMAGE), (10809, IMAGE), (10874, IMAGE), (0, IMAGE), (True, IMAGE),
    ('10811', IMAGE), (10811.0, IMAGE),
    (10811, 'other'), (10811, ''), (10811, IMAGE + ',fork'),
])
def test_parent_source_refuses_other_ports_and_exports(driver, port, export):
    with pytest.raises(exception.InvalidAddress):
        driver.parent_source('p', records.RelayAddress('127.0.0.1', port,
                                                       export), IMAGE)


def test_peer_networks_default_to_the_listen_address_network(
        conf, driver, fakes):
    # 127.0.0.1 is on 127.0.0.0/8 (the fake interface table), so parents
    # there are accepted, looked up once.
    assert driver.parent_source('p', _address(10811), IMAGE)
    assert driver.parent_source('p', records.RelayAddress(
        '127.0.0.9', 10811, IMAGE), IMAGE)
    assert fakes.lookups == ['127.0.0.1']
    conf.set_override('listen_address', '192.0.2.4', group='relay')
    # A listen address on no interface: every parent is refused (and it is
    # looked up again next time)...
    fresh = qemu_driver.QemuDriver(conf, networks=fakes.networks)
    for _ in range(2):
        with pytest.raises(exception.InvalidAddress, match='peer_networks'):
            fresh.parent_source('p', records.RelayAddress(
                '192.0.2.5', 10811, IMAGE), IMAGE)
    assert fakes.lookups[-2:] == ['192.0.2.4'] * 2
    # ... until it is configured.
    fakes.interfaces['192.0.2.4'] = ['192.0.2.0/24']
    assert fresh.parent_source('p', records.RelayAddress(
        '192.0.2.5', 10811, IMAGE), IMAGE)
    # The option replaces the lookup.
    conf.set_override('peer_networks', ['198.51.100.0/24'], group='relay')
    with pytest.raises(exception.InvalidAddress):
        fresh.parent_source('p', records.RelayAddress(
            '192.0.2.5', 10811, IMAGE), IMAGE)


def test_interface_networks_reads_the_kernel_address_table():
    # The loopback interface of this network namespace.
    assert qemu_driver.interface_networks('127.0.0.1') == [
        ipaddress.ip_network('127.0.0.0/8')]
    assert qemu_driver.interface_networks('192.0.2.254') == []


def test_can_relay_nbd_origins_exporting_the_image_id(driver):
    assert driver.can_relay(IMAGE, NBD_ORIGIN)
    assert driver.can_relay(IMAGE, records.Endpoint(
        'nbd', {'socket': '/run/origin.sock', 'export': IMAGE}))
    assert not driver.can_relay(IMAGE, FILE_ORIGIN)
    assert not driver.can_relay(IMAGE, ISCSI_ORIGIN)


@pytest.mark.parametrize('data, words', [
    ({'host': '192.0.2.9', 'port': 10809, 'export': 'disk'},
     'exports \'disk\''),
    ({'host': '192.0.2.9', 'port': 10809, 'export': ''}, 'under its id'),
    # Would be socat address syntax, not a host.
    ({'host': '192.0.2.9,fork', 'port': 10809, 'export': IMAGE},
     'neither an IP address nor a DNS name'),
    ({'socket': '/run/o,fork.sock', 'export': IMAGE}, 'cannot take'),
])
def test_can_relay_refuses_unfit_nbd_origins(driver, data, words):
    with pytest.raises(exception.InvalidOrigin, match=words):
        driver.can_relay(IMAGE, records.Endpoint('nbd', data))


def test_check_origin(driver):
    for origin in (NBD_ORIGIN, FILE_ORIGIN, ISCSI_ORIGIN):
        driver.check_origin(origin)
    with pytest.raises(exception.InvalidOrigin, match='not \'rbd\''):
        driver.check_origin(records.Endpoint('rbd', {'name': 'x'}))
    kerberos = records.Endpoint('iscsi', dict(ISCSI_ORIGIN.data,
                                              auth_method='kerberos'))
    with pytest.raises(exception.InvalidOrigin, match='CHAP only'):
        driver.check_origin(kerberos)


def test_probe_source(driver, fakes, tmp_path):
    info = driver.probe_source(records.Source.origin(NBD_ORIGIN), 'raw')
    assert info == base.OriginInfo(size=SIZE, image_format='raw')
    # The first page was read for the inspector, then qemu-img ran.
    handle, = fakes.handles
    assert handle.reads == [(0, 4096)]
    assert handle.address == ('tcp', '192.0.2.9', '10809')
    (args, timeout), = fakes.qemu_img.runs
    assert timeout == 45
    assert args[:4] == ['qemu-img', 'info', '--output=json', '-U']
    assert json.loads(args[-1][len('json:'):]) == {
        'driver': 'raw', 'file': {
            'driver': 'nbd', 'server': {'type': 'inet', 'host': '192.0.2.9',
                                        'port': '10809'},
            'export': IMAGE, 'read-only': True}}

    # qemu-img disagrees with the declared format.
    fakes.qemu_img.info = {'format': 'qcow2', 'virtual-size': SIZE}
    with pytest.raises(exception.UnsafeImage, match='not raw'):
        driver.probe_source(records.Source.origin(NBD_ORIGIN), 'raw')
    # What the inspector cannot see, qemu-img can: a data file it names.
    qcow2 = tmp_path / 'disk.qcow2'
    qcow2.write_bytes(QCOW2_HEAD)
    origin = records.Source.origin(records.Endpoint('file', {
        'path': str(qcow2)}))
    fakes.qemu_img.info = {'format': 'qcow2', 'virtual-size': SIZE,
                           'format-specific': {'type': 'qcow2', 'data': {
                               'data-file': '/etc/shadow'}}}
    with pytest.raises(exception.UnsafeImage, match='data file'):
        driver.probe_source(origin, 'qcow2')
    opts = json.loads(fakes.qemu_img.runs[-1][0][-1][len('json:'):])
    # qemu-img itself is told not to open a backing file.
    assert opts['backing'] is None
    fakes.qemu_img.info = {'format': 'qcow2', 'virtual-size': SIZE,
                           'backing-filename': '/etc/shadow'}
    with pytest.raises(exception.UnsafeImage, match='backing file'):
        driver.probe_source(origin, 'qcow2')
    fakes.qemu_img.info = {'format': 'qcow2', 'virtual-size': SIZE}
    assert driver.probe_source(origin, 'qcow2').size == SIZE


@pytest.mark.parametrize('head, claimed, words', [
    (BACKED_HEAD, 'qcow2', 'backing_file'),
    (BACKED_HEAD, 'raw', 'content is qcow2, not raw'),
    (QCOW2_HEAD, 'raw', 'content is qcow2, not raw'),
    (bytes(4096), 'qcow2', 'content is raw, not qcow2'),
    (b'KDMV' + bytes(4092), 'raw', 'vmdk'),
])
def test_probe_refuses_unsafe_content_before_qemu_img(driver, fakes, tmp_path,
                                                      head, claimed, words):
    fakes.head = head
    path = tmp_path / 'image'
    path.write_bytes(head)
    for origin in (NBD_ORIGIN, records.Endpoint('file', {'path': str(path)})):
        with pytest.raises(exception.UnsafeImage, match=words) as info:
            driver.probe_source(records.Source.origin(origin), claimed)
        # The caller's fault, and nothing was changed.
        assert info.value.client_error
    assert fakes.qemu_img.runs == []


def test_a_raw_image_is_also_probed_by_qemu(driver, fakes, tmp_path):
    """What the inspector passes as raw, QEMU's own probe must see as raw
    too (a VMDK text descriptor is raw to the inspector)."""
    path = tmp_path / 'image'
    descriptor = (b'# Disk DescriptorFile\nversion=1\ncreateType='
                  b'"monolithicFlat"\nRW 2048 FLAT "/etc/shadow" 0\n')
    path.write_bytes(descriptor.ljust(8192, b'\0'))
    fakes.head = path.read_bytes()
    fakes.probed = 'vmdk'
    for origin in (records.Endpoint('file', {'path': str(path)}),
                   NBD_ORIGIN):
        with pytest.raises(exception.UnsafeImage,
                           match='probes it as vmdk, not raw'):
            driver.probe_source(records.Source.origin(origin), 'raw')
    # qemu-img info without a format, on the first page only, within
    # [qemu] command_timeout.
    for args, head, timeout in fakes.probes:
        assert args == ['qemu-img', 'info', '--output=json']
        assert head == fakes.head[:4096]
        assert timeout == 45
    assert len(fakes.probes) == 2
    assert fakes.qemu_img.runs == []
    # A qcow2 is not probed: its header was inspected, and qemu-img opens
    # it as qcow2 (told not to open a backing file).
    qcow2 = tmp_path / 'disk.qcow2'
    qcow2.write_bytes(QCOW2_HEAD)
    fakes.qemu_img.info = {'format': 'qcow2', 'virtual-size': SIZE}
    driver.probe_source(records.Source.origin(records.Endpoint(
        'file', {'path': str(qcow2)})), 'qcow2')
    assert len(fakes.probes) == 2


def test_probe_of_a_file_origin_does_not_follow_a_symlink(driver, fakes,
                                                          tmp_path):
    target = tmp_path / 'target.raw'
    target.write_bytes(bytes(4096))
    link = tmp_path / 'link.raw'
    link.symlink_to(target)
    with pytest.raises(exception.UnsafeImage, match='cannot open'):
        driver.probe_source(records.Source.origin(records.Endpoint(
            'file', {'path': str(link)})), 'raw')
    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo)
    with pytest.raises(exception.UnsafeImage, match='not a regular file'):
        driver.probe_source(records.Source.origin(records.Endpoint(
            'file', {'path': str(fifo)})), 'raw')
    assert fakes.qemu_img.runs == []


def test_probe_head_read_is_bounded(driver, fakes, conf):
    fakes.handle_args = {'connects': None}
    start = fakes.clock.now
    with pytest.raises(exception.OriginUnavailable,
                       match='more than 45 s'):
        driver.probe_source(records.Source.origin(NBD_ORIGIN), 'raw')
    assert fakes.clock.now - start == pytest.approx(45.0)
    assert fakes.qemu_img.runs == []


def test_probe_passes_the_chap_secret_through_a_pipe(driver, fakes):
    driver.probe_source(records.Source.origin(ISCSI_ORIGIN), 'raw')
    (args, _), = fakes.qemu_img.runs
    assert not any('Sekrit' in arg for arg in args)
    assert fakes.qemu_img.secrets == ['Sekrit-Passw0rd']
    secret = args[args.index('--object') + 1]
    assert secret.startswith('secret,id=probe-secret,file=/dev/fd/')
    opts = json.loads(args[-1][len('json:'):])
    assert opts['file']['user'] == 'thunder'
    assert opts['file']['password-secret'] == 'probe-secret'


def test_source_ready_and_answers(driver, fakes, tmp_path):
    parent = driver.parent_source('p', _address(10811), IMAGE)
    assert driver.source_ready(parent)
    handle, = fakes.handles
    assert handle.address == ('tcp', '127.0.0.1', '10811')
    assert handle.export == IMAGE
    # A server that never finishes the handshake: no, within the probe
    # timeout ([relay] parent_probe_timeout, 2 s).
    fakes.handle_args = {'connects': None}
    assert not driver.source_ready(parent)
    assert sum(fakes.handles[-1].polls) <= 2000
    fakes.handle_args = {'ready': False}
    assert not driver.source_ready(parent)

    with socket.socket(socket.AF_UNIX) as listener:
        path = str(tmp_path / 's.sock')
        listener.bind(path)
        listener.listen()
        unix = records.Source.origin(records.Endpoint(
            'nbd', {'socket': path, 'export': IMAGE}))
        assert driver.source_answers(unix, 1)
    assert not driver.source_answers(unix, 1)
    # A parent is a TCP export of another host: never a local socket.
    parent_socket = records.Source('p', unix.endpoint)
    for probe in (lambda: driver.source_answers(parent_socket, 1),
                  lambda: driver.source_ready(parent_socket),
                  lambda: driver.probe_source(parent_socket, 'raw')):
        with pytest.raises(exception.InvalidSource):
            probe()


@pytest.mark.parametrize('host', HOSTILE_HOSTS[:8])
def test_probes_refuse_hostile_parents_before_connecting(driver, fakes,
                                                         host):
    bad = records.Source('p', records.Endpoint(
        'nbd', {'host': host, 'port': 10811, 'export': IMAGE}))
    for probe in (lambda: driver.source_answers(bad, 1),
                  lambda: driver.source_ready(bad),
                  lambda: driver.probe_source(bad, 'raw')):
        with pytest.raises(exception.InvalidAddress):
            probe()
    assert fakes.handles == [] and fakes.qemu_img.runs == []


# -- templates -----------------------------------------------------------

def _graph(fakes):
    return fakes.daemons[IMAGE].calls


def test_create_template_builds_the_graph_and_a_unix_export(
        driver, fakes, tdir, conf):
    template = _template(driver_state={'kept': 1})
    before = copy.deepcopy(template.to_dict())
    build = driver.create_template(template, tdir)
    assert template.to_dict() == before

    socket_path = os.path.join(conf.agent.run_path, IMAGE + '.nbd')
    assert build.export == records.Export(
        'qemu', {'socket': socket_path, 'export': IMAGE}, None)
    assert build.driver_state == {'kept': 1, 'hit_base': 0, 'hit_last': 0,
                                  'fetch_base': 0, 'cluster_size': 65536}
    daemon = fakes.daemons[IMAGE]
    assert daemon.nbd_server == {'type': 'unix', 'path': socket_path}
    cache = os.path.join(tdir, qemu_driver.CACHE_FILE)
    create, = [args for args, _ in fakes.qemu_img.runs]
    assert create == ['qemu-img', 'create', '-q', '-f', 'qcow2', '-o',
                      'cluster_size=65536', cache, str(SIZE)]
    assert _graph(fakes) == [
        ('blockdev-add', {
            'driver': 'nbd', 'node-name': 'source', 'read-only': True,
            'server': {'type': 'inet', 'host': '192.0.2.9',
                       'port': '10809'},
            'export': IMAGE, 'reconnect-delay': 123, 'open-timeout': 7}),
        ('blockdev-add', {'driver': 'raw', 'node-name': 'origin',
                          'file': 'source', 'read-only': True}),
        ('blockdev-add', {'driver': 'file', 'node-name': 'cache-file',
                          'filename': cache}),
        ('blockdev-add', {'driver': 'qcow2', 'node-name': 'cache',
                          'file': 'cache-file', 'backing': 'origin'}),
        ('blockdev-add', {'driver': 'copy-on-read', 'node-name': 'template',
                          'file': 'cache'}),
        ('block-export-add', {'type': 'nbd', 'id': 'template',
                              'node-name': 'template', 'name': IMAGE,
                              'writable': False}),
    ]
    # No relay: no forwarder.
    assert IMAGE not in fakes.upstreams
    assert driver.is_healthy(template, tdir)
    template.export = build.export
    target = driver.prefetch_target(template, tdir)
    assert isinstance(target, prefetch.NbdAddress)
    assert (target.socket, target.export) == (socket_path, IMAGE)


def test_create_relaying_template_reads_through_the_forwarder(
        driver, fakes, tdir, conf):
    relay = _address(10815)
    template = _template(relay=relay)
    before = copy.deepcopy(template.to_dict())
    build = driver.create_template(template, tdir)
    assert template.to_dict() == before
    socket_path = os.path.join(conf.agent.run_path, IMAGE + '.nbd')
    # Local readers use the unix socket; children the relay address.
    assert build.export == records.Export(
        'qemu', {'socket': socket_path, 'export': IMAGE}, relay)
    daemon = fakes.daemons[IMAGE]
    assert daemon.nbd_server == {'type': 'unix', 'path': socket_path}
    # QEMU's cap: [qemu] local_connections (128) + relay_connections
    # (0: 2 x [coordinator] fan_out 4 + 4).
    assert daemon.max_connections == 128 + 12
    # The relay listener: TCP on the reserved address to the unix socket,
    # 12 children at once, from the listen address's network only.
    listener = fakes.listeners[IMAGE]
    assert listener.starts == [('127.0.0.1', 10815, socket_path, 12,
                                ipaddress.ip_network('127.0.0.0/8'))]
    forwarder = fakes.upstreams[IMAGE]
    assert forwarder.starts == ['TCP:192.0.2.9:10809']
    source = _graph(fakes)[0]
    assert source == ('blockdev-add', {
        'driver': 'nbd', 'node-name': 'source', 'read-only': True,
        'server': {'type': 'unix', 'path': forwarder.socket},
        'export': IMAGE, 'reconnect-delay': 123, 'open-timeout': 7})
    template.export = build.export
    assert driver.is_healthy(template, tdir)
    forwarder.stop()
    assert not driver.is_healthy(template, tdir)
    forwarder.start(NBD_ORIGIN)
    assert driver.is_healthy(template, tdir)
    listener.stop()
    assert not driver.is_healthy(template, tdir)


def test_relay_caps_and_listener_range_come_from_options(driver, fakes,
                                                         tdir, conf):
    conf.set_override('relay_connections', 3, group='qemu')
    conf.set_override('local_connections', 9, group='qemu')
    conf.set_override('peer_networks', ['127.0.0.0/24', '10.0.0.0/8',
                                        'fd00::/64'], group='relay')
    template = _template(relay=_address(10815))
    driver.create_template(template, tdir)
    assert fakes.daemons[IMAGE].max_connections == 12
    # Two IPv4 networks: socat takes one range, so none.
    (host, port, path, cap, network), = fakes.listeners[IMAGE].starts
    assert (cap, network) == (3, None)
    plain = _template()
    plain.image_id = IMAGE2 = '5b2a7e1f-9d3c-4c6f-b8b5-7b1f6fac3d22'
    plain_dir = os.path.join(os.path.dirname(tdir), IMAGE2)
    os.makedirs(plain_dir)
    driver.create_template(plain, plain_dir)
    # A template that does not relay: local readers only, no listener.
    assert fakes.daemons[IMAGE2].max_connections == 9
    assert IMAGE2 not in fakes.listeners


def test_template_of_the_tcp_layout_keeps_listening_on_tcp(
        driver, fakes, tdir):
    """A relaying template built before the relay listener: its daemon
    listens on TCP, and running VMs use that address."""
    relay = _address(10815)
    template = _template(relay=relay)
    template.export = records.Export(
        'qemu', {'host': '127.0.0.1', 'port': 10815, 'export': IMAGE},
        relay)
    build = driver.ensure_template(template, tdir)
    assert build.export == template.export
    assert fakes.daemons[IMAGE].nbd_server == {
        'type': 'inet', 'host': '127.0.0.1', 'port': '10815'}
    assert IMAGE not in fakes.listeners
    assert driver.is_healthy(template, tdir)


def test_create_iscsi_template_sends_the_secret_over_qmp(driver, fakes,
                                                         tdir):
    driver.create_template(_template(origin=ISCSI_ORIGIN), tdir)
    secret, source = _graph(fakes)[:2]
    assert secret == ('object-add', {'qom-type': 'secret',
                                     'id': 'source-secret',
                                     'data': 'Sekrit-Passw0rd'})
    assert source[1]['password-secret'] == 'source-secret'
    assert source[1]['portal'] == '192.0.2.20:3260'
    assert not any('Sekrit' in ' '.join(args)
                   for args, _ in fakes.qemu_img.runs)


def test_relaying_template_of_a_qcow2_source_is_refused(driver, fakes,
                                                        tdir):
    template = _template(relay=_address(10815))
    template.image_format = 'qcow2'
    with pytest.raises(exception.BackendError, match='raw sources'):
        driver.create_template(template, tdir)
    assert IMAGE not in fakes.daemons


def test_failed_graph_leaves_nothing_running(driver, fakes, tdir):
    fakes.daemons[IMAGE] = FakeDaemon(IMAGE)
    fakes.daemons[IMAGE].fail_on = 'block-export-add'
    with pytest.raises(exception.BackendError, match='block-export-add'):
        driver.create_template(_template(relay=_address(10815)), tdir)
    assert not fakes.daemons[IMAGE].running
    assert fakes.upstreams[IMAGE].target() is None
    assert fakes.listeners[IMAGE].current is None


def test_ensure_readopts_a_running_template(driver, fakes, tdir):
    template = _template(relay=_address(10815))
    build = driver.create_template(template, tdir)
    template.export, template.driver_state = build.export, build.driver_state
    fakes.upstreams[IMAGE].stop()
    fakes.listeners[IMAGE].stop()
    before = copy.deepcopy(template.to_dict())
    again = driver.ensure_template(template, tdir)
    assert template.to_dict() == before
    assert again == base.TemplateBuild(export=template.export)
    assert fakes.daemons[IMAGE].starts == 1
    # The dead forwarders were started again, as they were.
    assert fakes.upstreams[IMAGE].starts == ['TCP:192.0.2.9:10809'] * 2
    first, second = fakes.listeners[IMAGE].starts
    assert first == second


def test_ensure_refuses_a_recorded_hostile_parent(driver, fakes, tdir):
    """A record written by an agent that did not check parents: the
    forwarder is not started with what it names."""
    template = _template(relay=_address(10815))
    build = driver.create_template(template, tdir)
    template.export = build.export
    fakes.upstreams[IMAGE].stop()
    template.sources = [records.Source('p', records.Endpoint('nbd', {
        'host': HOSTILE_HOSTS[0], 'port': 10811, 'export': IMAGE}))]
    assert not driver.is_healthy(template, tdir)
    with pytest.raises(exception.InvalidAddress):
        driver.ensure_template(template, tdir)
    assert fakes.upstreams[IMAGE].current is None


def test_ensure_rebuilds_from_the_cache_and_carries_counters(
        driver, fakes, tdir):
    template = _template()
    build = driver.create_template(template, tdir)
    template.export = build.export
    template.driver_state = dict(build.driver_state, hit_base=5,
                                 hit_last=7, kept='yes')
    fakes.daemons[IMAGE].running = False
    fakes.qemu_img.extents = [
        {'start': 0, 'length': 3 << 20, 'depth': 0, 'present': True},
        {'start': 3 << 20, 'length': SIZE - (3 << 20), 'depth': 0,
         'present': False}]
    # Stopped cleanly: the cache is trusted as it is.
    recovery.write_marker(tdir, os.path.join(tdir, qemu_driver.CACHE_FILE))
    before = copy.deepcopy(template.to_dict())
    rebuilt = driver.ensure_template(template, tdir)
    assert template.to_dict() == before
    assert rebuilt.export == template.export
    assert rebuilt.driver_state == {
        'hit_base': 12, 'hit_last': 0, 'kept': 'yes', 'cluster_size': 65536,
        'fetch_base': 3 << 20}
    # The cache file is kept: no second qemu-img create.
    assert [args[1] for args, _ in fakes.qemu_img.runs] == ['create', 'map']
    assert fakes.daemons[IMAGE].starts == 2


def test_set_sources_swaps_the_forwarder_only(driver, fakes, tdir, conf):
    conf.set_override('peer_networks', ['2001:db8::/64', '192.0.2.0/24'],
                      group='relay')
    fakes.head = MANIFEST.to_bytes()
    template = _template(relay=_address(10815))
    build = driver.create_template(template, tdir)
    template.export = build.export
    graph = list(_graph(fakes))
    parent = driver.parent_source('p', records.RelayAddress(
        '2001:db8::5', 10820, IMAGE), IMAGE)
    before = copy.deepcopy(template.to_dict())
    assert driver.set_sources(template, tdir, [parent]) is None
    assert template.to_dict() == before
    assert fakes.upstreams[IMAGE].target() == 'TCP:[2001:db8::5]:10820'
    # The graph is the same; the daemon was not touched.
    assert _graph(fakes) == graph
    assert fakes.daemons[IMAGE].starts == 1

    with pytest.raises(exception.InvalidAddress, match='image id'):
        driver.set_sources(template, tdir, [records.Source(
            'p', records.Endpoint('nbd', {'host': '192.0.2.1',
                                          'port': 10811,
                                          'export': 'other'}))])
    with pytest.raises(exception.BackendError, match='relay tree'):
        driver.set_sources(_template(), tdir, [parent])
    # Back to the origin: the template's own only.
    assert driver.set_sources(template, tdir, [
        records.Source.origin(NBD_ORIGIN)]) is None
    assert fakes.upstreams[IMAGE].target() == 'TCP:192.0.2.9:10809'
    other_origin = records.Endpoint('nbd', dict(NBD_ORIGIN.data,
                                                host='192.0.2.66'))
    with pytest.raises(exception.InvalidSource, match='origin'):
        driver.set_sources(template, tdir,
                           [records.Source.origin(other_origin)])
    assert fakes.upstreams[IMAGE].target() == 'TCP:192.0.2.9:10809'


@pytest.mark.parametrize('host', HOSTILE_HOSTS)
def test_set_sources_refuses_hostile_parents(driver, fakes, tdir, host):
    template = _template(relay=_address(10815))
    template.export = driver.create_template(template, tdir).export
    started = list(fakes.upstreams[IMAGE].starts)
    hostile = records.Source('p', records.Endpoint(
        'nbd', {'host': host, 'port': 10811, 'export': IMAGE}))
    good = driver.parent_source('q', _address(10812), IMAGE)
    for sources in ([hostile], [good, hostile]):
        with pytest.raises(exception.InvalidAddress):
            driver.set_sources(template, tdir, sources)
    # The forwarder was never pointed anywhere else.
    assert fakes.upstreams[IMAGE].starts == started


def test_delete_template_stops_daemon_and_forwarder(driver, fakes, tdir,
                                                    conf):
    template = _template(relay=_address(10815))
    template.export = driver.create_template(template, tdir).export
    socket_path = os.path.join(conf.agent.run_path, IMAGE + '.nbd')
    open(socket_path, 'w').close()
    driver.delete_template(template, tdir)
    assert not fakes.daemons[IMAGE].running
    assert fakes.upstreams[IMAGE].target() is None
    assert fakes.listeners[IMAGE].current is None
    assert not os.path.exists(socket_path)
    assert not driver.is_healthy(template, tdir)
    # Missing pieces are fine.
    driver.delete_template(template, tdir)


def test_template_stats(driver, fakes, tdir):
    template = _template()
    build = driver.create_template(template, tdir)
    template.export = build.export
    template.driver_state = dict(build.driver_state, hit_base=1000)
    fakes.qemu_img.extents = [
        {'start': 0, 'length': 4 << 20, 'depth': 0, 'present': True},
        {'start': 4 << 20, 'length': SIZE - (4 << 20), 'depth': 0,
         'present': False}]
    fakes.daemons[IMAGE].rchar = 1 << 20
    before = copy.deepcopy(template.to_dict())
    stats, state = driver.template_stats(template, tdir)
    assert template.to_dict() == before
    assert stats == base.TemplateStats(
        bytes_fetched=4 << 20, bytes_served=(4 << 20) + (1 << 20) + 1000,
        cached_bytes=4 << 20, blocks_cached=64, block_size=65536,
        disk_bytes=0)
    assert state == dict(template.driver_state, hit_last=1 << 20)
    # Stats flushed the cache first, through the export.
    assert fakes.handles[-1].flushes == 1
    template.driver_state = state
    assert driver.template_stats(template, tdir)[1] is None


def test_template_stats_count_what_the_verifier_read(driver, fakes, tdir):
    fakes.head = MANIFEST.to_bytes()
    template = _template(relay=_address(10815))
    template.export = driver.create_template(template, tdir).export
    fakes.upstreams[IMAGE].counters = {
        'parent_bytes': 3 << 20, 'origin_bytes': 65536,
        'blocks_rejected': 1, 'blocks_checked': 49, 'bypass': 'mismatch'}
    stats, _ = driver.template_stats(template, tdir)
    assert (stats.bytes_from_parents, stats.bytes_from_origin,
            stats.blocks_rejected) == (3 << 20, 65536, 1)
    # Torn or hostile values count as nothing.
    fakes.upstreams[IMAGE].counters = {'parent_bytes': -5,
                                       'origin_bytes': 'x'}
    stats, _ = driver.template_stats(template, tdir)
    assert (stats.bytes_from_parents, stats.bytes_from_origin) == (0, 0)


def test_file_source_reads_are_fetches_not_hits(driver, fakes, tdir,
                                                raw_file):
    template = _template(origin=raw_file)
    build = driver.create_template(template, tdir)
    template.export, template.driver_state = build.export, build.driver_state
    fakes.qemu_img.extents = [
        {'start': 0, 'length': 8 << 20, 'depth': 0, 'present': True}]
    # 8 MiB read from the origin file, 2 MiB from the cache.
    fakes.daemons[IMAGE].rchar = 10 << 20
    stats, state = driver.template_stats(template, tdir)
    assert state['hit_last'] == 2 << 20
    assert stats.bytes_served == 10 << 20


# -- flush ---------------------------------------------------------------

def test_flush_goes_through_the_export(driver, fakes, tdir, conf):
    template = _template()
    template.export = driver.create_template(template, tdir).export
    driver.flush_template(template, tdir)
    handle, = fakes.handles
    assert handle.address == ('unix', os.path.join(conf.agent.run_path,
                                                   IMAGE + '.nbd'))
    assert handle.export == IMAGE
    assert handle.flushes == 1


@pytest.mark.parametrize('handle_args', [{'completes': None},
                                         {'connects': None}])
def test_flush_of_a_hung_daemon_gives_up_at_its_deadline(
        driver, fakes, tdir, handle_args):
    template = _template()
    template.export = driver.create_template(template, tdir).export
    fakes.handle_args = handle_args
    start = fakes.clock.now
    with pytest.raises(exception.BackendError,
                       match='did not finish within 3 s'):
        driver.flush_template(template, tdir)
    handle, = fakes.handles
    # It waited for the whole [qemu] flush_timeout and not longer.
    assert fakes.clock.now - start == pytest.approx(3.0)
    assert all(ms <= 1000 for ms in handle.polls)


def test_flush_error_is_a_backend_error(driver, fakes, tdir):
    template = _template()
    template.export = driver.create_template(template, tdir).export

    def refuse():
        handle = FakeHandle(fakes.clock)

        def connect(path):
            raise nbd.Error('connection refused', 111)
        handle.aio_connect_unix = connect
        return handle
    driver._nbd = refuse
    with pytest.raises(exception.BackendError, match='connection refused'):
        driver.flush_template(template, tdir)


# -- snapshots -----------------------------------------------------------

def test_snapshot_connection_info_for_the_libvirt_volume_driver(
        driver, fakes, tdir, tmp_path, conf):
    template = _template()
    template.export = driver.create_template(template, tdir).export
    sdir = tmp_path / 'snap'
    sdir.mkdir()
    info = driver.create_snapshot(template, tdir, 'i-1', str(sdir))
    overlay = str(sdir / qemu_driver.OVERLAY_FILE)
    # The shape nova_thunder.virt.libvirt.volume reads.
    assert info == {'driver_volume_type': 'thunder', 'data': {
        'backend': 'qemu', 'image_id': IMAGE, 'instance_id': 'i-1',
        'path': overlay, 'format': 'qcow2',
        'backing': {'driver': 'nbd', 'format': 'raw',
                    'socket': os.path.join(conf.agent.run_path,
                                           IMAGE + '.nbd'),
                    'export': IMAGE, 'reconnect_delay': 123}}}
    args = fakes.qemu_img.runs[-1][0]
    assert args[:6] == ['qemu-img', 'create', '-q', '-f', 'qcow2', '-F']
    backing = json.loads(args[args.index('-b') + 1][len('json:'):])
    assert backing == {'driver': 'raw', 'file': {
        'driver': 'nbd', 'export': IMAGE, 'reconnect-delay': 123,
        'server': {'type': 'unix', 'path': os.path.join(
            conf.agent.run_path, IMAGE + '.nbd')}}}
    snap = records.Snapshot('i-1', IMAGE, records.READY,
                            connection_info=info)
    assert driver.ensure_snapshot(template, tdir, snap, str(sdir)) == info


def test_relaying_template_local_readers_use_the_unix_socket(
        driver, fakes, tdir, tmp_path, conf):
    template = _template(relay=_address(10815))
    template.export = driver.create_template(template, tdir).export
    socket_path = os.path.join(conf.agent.run_path, IMAGE + '.nbd')
    info = driver.create_snapshot(template, tdir, 'i-1', str(tmp_path))
    assert info['data']['backing'] == {
        'driver': 'nbd', 'format': 'raw', 'socket': socket_path,
        'export': IMAGE, 'reconnect_delay': 123}
    target = driver.prefetch_target(template, tdir)
    assert isinstance(target, prefetch.NbdAddress)
    assert (target.socket, target.host, target.export) == (
        socket_path, None, IMAGE)
    driver.flush_template(template, tdir)
    assert fakes.handles[-1].address == ('unix', socket_path)


def test_relaying_template_of_the_tcp_layout_keeps_its_backing(
        driver, tdir, tmp_path):
    relay = _address(10815)
    template = _template(relay=relay)
    template.export = records.Export(
        'qemu', {'host': '127.0.0.1', 'port': 10815, 'export': IMAGE},
        relay)
    info = driver.create_snapshot(template, tdir, 'i-1', str(tmp_path))
    assert info['data']['backing'] == {
        'driver': 'nbd', 'format': 'raw', 'host': '127.0.0.1',
        'port': 10815, 'export': IMAGE, 'reconnect_delay': 123}


def test_snapshot_users_names_the_processes_holding_the_overlay(
        driver, tdir, tmp_path):
    template = _template()
    snap = records.Snapshot('i-1', IMAGE, records.READY)
    overlay = tmp_path / qemu_driver.OVERLAY_FILE
    overlay.write_bytes(b'qcow2')
    assert driver.snapshot_users(template, snap, str(tmp_path)) is None
    with open(overlay, 'rb'):
        users = driver.snapshot_users(template, snap, str(tmp_path))
        assert users == 'process %d (%s) has the overlay %s open' % (
            os.getpid(), open('/proc/self/comm').read().strip(), overlay)
        with pytest.raises(exception.SnapshotInUse):
            driver.delete_snapshot(template, tdir, snap, str(tmp_path))
        assert overlay.exists()
    driver.delete_snapshot(template, tdir, snap, str(tmp_path))
    assert not overlay.exists()
    # Deleting what is gone is fine.
    driver.delete_snapshot(template, tdir, snap, str(tmp_path))


def test_ensure_snapshot_without_its_overlay_fails(driver, tdir, tmp_path):
    snap = records.Snapshot('i-1', IMAGE, records.READY)
    with pytest.raises(exception.BackendError, match='missing'):
        driver.ensure_snapshot(_template(), tdir, snap, str(tmp_path))


def test_build_inspects_a_file_origin_again(driver, fakes, tdir, tmp_path):
    """A rebuild (after a restart) opens the file by its path once more:
    what lies there now is inspected before the daemon starts."""
    path = tmp_path / 'disk.qcow2'
    path.write_bytes(BACKED_HEAD)
    template = _template(origin=records.Endpoint('file',
                                                 {'path': str(path)}))
    template.image_format = 'qcow2'
    for build in (driver.create_template, driver.ensure_template):
        with pytest.raises(exception.UnsafeImage, match='backing_file'):
            build(template, tdir)
    assert IMAGE not in fakes.daemons or fakes.daemons[IMAGE].starts == 0
    assert fakes.qemu_img.runs == []
    assert os.listdir(tdir) == []


# -- TLS ([tls] enabled) ---------------------------------------------------

@pytest.fixture(scope='module')
def pki_ca(tmp_path_factory):
    if shutil.which('certtool') is None:
        pytest.skip('certtool is not installed')
    return pki.CA.create(str(tmp_path_factory.mktemp('ca')))


@pytest.fixture
def tls_conf(conf, pki_ca, tmp_path):
    path = pki_ca.issue('node-1', str(tmp_path / 'pki'),
                        ips=('127.0.0.1',))
    conf.set_override('host', 'node-1')
    conf.set_override('enabled', True, group='tls')
    conf.set_override('certificates_dir', path, group='tls')
    return conf


def test_tls_an_nbd_source_over_tcp_checks_the_server(driver, fakes, tdir,
                                                      tls_conf):
    driver.create_template(_template(), tdir)
    creds, source = _graph(fakes)[:2]
    assert creds == ('object-add', {
        'qom-type': 'tls-creds-x509', 'id': 'tls-client',
        'endpoint': 'client', 'verify-peer': True,
        'dir': tls_conf.tls.certificates_dir})
    assert source[0] == 'blockdev-add'
    assert source[1]['tls-creds'] == 'tls-client'
    assert source[1]['server']['host'] == '192.0.2.9'


def test_tls_probes_of_a_tcp_source_require_tls(driver, fakes, tls_conf):
    driver.probe_source(records.Source.origin(NBD_ORIGIN), 'raw')
    handle, = fakes.handles
    assert handle.tls == {'level': nbd.TLS_REQUIRE, 'verify_peer': True,
                          'certificates': tls_conf.tls.certificates_dir}
    (args, _), = [r for r in fakes.qemu_img.runs if r[0][1] == 'info']
    obj = json.loads(args[args.index('--object') + 1])
    assert obj['qom-type'] == 'tls-creds-x509'
    assert obj['endpoint'] == 'client' and obj['verify-peer'] is True
    opts = json.loads(args[-1][len('json:'):])
    assert opts['file']['tls-creds'] == obj['id']
    assert driver.source_ready(records.Source.origin(NBD_ORIGIN))
    assert fakes.handles[-1].tls['level'] == nbd.TLS_REQUIRE


def test_tls_a_unix_origin_stays_plain(driver, fakes, tdir, tls_conf):
    local = records.Endpoint('nbd', {'socket': '/run/o.sock',
                                     'export': IMAGE})
    driver.create_template(_template(origin=local), tdir)
    source = [c for c in _graph(fakes) if c[0] == 'blockdev-add'][0][1]
    assert 'tls-creds' not in source
    assert not any(c[0] == 'object-add' for c in _graph(fakes))


def test_tls_children_reach_the_relay_export_only(driver, fakes, tdir,
                                                  tls_conf):
    template = _template(relay=_address(10815))
    template.export = driver.create_template(template, tdir).export
    exporter = fakes.exporters[IMAGE]
    # Nobody until the manager gives the children.
    assert exporter.running and exporter.admitted == []
    assert exporter.starts == [(driver._relay_cap(), 123, 7)]
    (host, port, target, cap, network), = fakes.listeners[IMAGE].starts
    assert target == exporter.socket != os.path.join(
        tls_conf.agent.run_path, IMAGE + '.nbd')
    # The template reads the forwarder's local socket: the forwarder is
    # the TLS client of the parent.
    source = [c for c in _graph(fakes) if c[0] == 'blockdev-add'][0][1]
    assert source['server']['type'] == 'unix'
    assert 'tls-creds' not in source
    driver.set_children(template, tdir, ['node-2', 'node-3'])
    assert exporter.admitted == ['node-2', 'node-3']
    assert driver.is_healthy(template, tdir)
    exporter.stop()
    assert not driver.is_healthy(template, tdir)
    # Re-adoption restarts it; the manager then gives the list again.
    fakes.daemons[IMAGE].calls.append(
        ('query-block-exports', [{'id': qemu_driver.EXPORT_ID}]))
    driver.ensure_template(template, tdir)
    assert exporter.running
    driver.delete_template(template, tdir)
    assert not exporter.running


def test_tls_off_changes_nothing(driver, fakes, tdir, conf):
    template = _template(relay=_address(10815))
    template.export = driver.create_template(template, tdir).export
    driver.set_children(template, tdir, ['node-2'])
    assert not fakes.exporters.get(IMAGE, FakeExporter(
        IMAGE, '/r', '/p')).running
    (host, port, target, cap, network), = fakes.listeners[IMAGE].starts
    assert target == os.path.join(conf.agent.run_path, IMAGE + '.nbd')
    assert not any('tls-creds' in json.dumps(c) for c in _graph(fakes))


def test_tls_credentials_of_another_node_build_nothing(driver, fakes, tdir,
                                                       tls_conf):
    tls_conf.set_override('host', 'node-9')
    with pytest.raises(exception.InvalidInput, match='node-1'):
        driver.create_template(_template(), tdir)
    assert not fakes.daemons[IMAGE].running


def test_a_relaying_template_fetches_its_manifest_from_the_origin(
        driver, fakes, tdir):
    fakes.head = MANIFEST.to_bytes()
    template = _template(relay=_address(10815))
    driver.create_template(template, tdir)
    fetch, = [h for h in fakes.handles
              if h.export == IMAGE + manifest_mod.EXPORT_SUFFIX]
    assert fetch.address == ('tcp', '192.0.2.9', '10809')
    path = os.path.join(tdir, qemu_driver.MANIFEST_FILE)
    assert manifest_mod.Manifest.from_file(path, SIZE).to_bytes() == (
        MANIFEST.to_bytes())
    verify = fakes.upstreams[IMAGE].verify
    assert (verify.origin, verify.manifest) == (NBD_ORIGIN, path)
    assert verify.tls_dir is None           # [tls] enabled is off here
    # A rebuild keeps the manifest it has: no second fetch.
    fakes.handles.clear()
    driver._build(template, tdir, {})
    assert not [h for h in fakes.handles
                if h.export == IMAGE + manifest_mod.EXPORT_SUFFIX]


@pytest.mark.parametrize('served', [
    bytes(4096),                                     # not a manifest
    manifest_mod.Manifest(SIZE // 2, 65536, bytes(
        32 * manifest_mod.block_count(SIZE // 2, 65536))).to_bytes(),
])
def test_without_a_manifest_no_parent_is_taken(driver, fakes, tdir,
                                               conf, served, caplog):
    fakes.head = served
    template = _template(relay=_address(10815))
    template.export = driver.create_template(template, tdir).export
    assert not os.path.exists(os.path.join(tdir, qemu_driver.MANIFEST_FILE))
    parent = driver.parent_source('p', records.RelayAddress(
        '127.0.0.5', 10820, IMAGE), IMAGE)
    conf.set_override('peer_networks', ['127.0.0.0/8'], group='relay')
    driver.set_sources(template, tdir, [parent])
    driver.set_sources(template, tdir, [parent])
    # The origin, not the parent, and said once.
    assert fakes.upstreams[IMAGE].target() == 'TCP:192.0.2.9:10809'
    assert fakes.upstreams[IMAGE].verify.manifest is None
    assert caplog.text.count('takes no parent: its origin serves') == 1


def test_source_mismatch_is_the_verifiers_report(driver, fakes, tdir):
    fakes.head = MANIFEST.to_bytes()
    template = _template(relay=_address(10815))
    template.export = driver.create_template(template, tdir).export
    assert driver.source_mismatch(template, tdir) is None
    fakes.upstreams[IMAGE].report = {
        'parent': '192.0.2.7:10811/' + IMAGE, 'bad_blocks': [3, 17],
        'blocks_rejected': 2, 'blocks_checked': 64, 'block_size': 65536,
        'time': 1234.5}
    assert driver.source_mismatch(template, tdir) == base.SourceMismatch(
        parent='192.0.2.7:10811/' + IMAGE, bad_blocks=(3, 17),
        block_size=65536, time=1234.5)
    fakes.upstreams[IMAGE].report = {'parent': 'x', 'bad_blocks': 'junk'}
    assert driver.source_mismatch(template, tdir) is None
    # Not relaying: nothing is checked.
    assert driver.source_mismatch(_template(), tdir) is None
