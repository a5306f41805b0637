"""The qemu driver with fakes at the process boundary: a storage daemon
that records its QMP calls, a forwarder that records its target, a
qemu-img runner answering from a table, libnbd handles on a fake clock."""

import copy
import json
import os
import socket
import subprocess

import nbd
import pytest

from oslo_config import cfg

from thunder_agent import conf as agent_conf
from thunder_agent import drivers
from thunder_agent.drivers import base
from thunder_agent.drivers.qemu import driver as qemu_driver
from thunder_agent.drivers.qemu import upstream
from thunder_agent import exception
from thunder_agent import prefetch
from thunder_agent import records

IMAGE = '3a1f6d0e-8c2b-4b5e-a7a4-6a0f5e9b2c11'
SIZE = 64 << 20
NBD_ORIGIN = records.Endpoint('nbd', {'host': '192.0.2.9', 'port': 10809,
                                      'export': IMAGE})
FILE_ORIGIN = records.Endpoint('file', {'path': '/srv/images/disk.raw'})
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

    def start(self, nbd_server=None, extra_args=()):
        self.running = True
        self.starts += 1
        self.nbd_server = nbd_server
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

    def stop(self):
        self.current = None

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
        self.polls = []
        self.flushes = 0

    def set_export_name(self, name):
        self.export = name

    def aio_connect_unix(self, path):
        self.address = ('unix', path)

    def aio_connect_tcp(self, host, port):
        self.address = ('tcp', host, port)

    def aio_is_connecting(self):
        return self.connects is None or len(self.polls) < self.connects

    def aio_is_ready(self):
        return self.ready and not self.aio_is_connecting()

    def get_size(self):
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

    def aio_command_completed(self, cookie):
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
    return conf


class Fakes:
    def __init__(self):
        self.daemons = {}
        self.upstreams = {}
        self.qemu_img = FakeQemuImg()
        self.clock = Clock()
        self.handles = []
        self.handle_args = {}

    def daemon(self, name, run_path, executable, start_timeout):
        return self.daemons.setdefault(name, FakeDaemon(name))

    def upstream(self, image_id, run_path):
        return self.upstreams.setdefault(image_id,
                                         FakeUpstream(image_id, run_path))

    def nbd(self):
        handle = FakeHandle(self.clock, **self.handle_args)
        self.handles.append(handle)
        return handle


@pytest.fixture
def fakes():
    return Fakes()


@pytest.fixture
def driver(conf, fakes):
    drv = qemu_driver.QemuDriver(
        conf, daemon_factory=fakes.daemon, upstream_factory=fakes.upstream,
        runner=fakes.qemu_img, nbd_factory=fakes.nbd, clock=fakes.clock)
    drv.start()
    return drv


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


def test_parent_source_reads_the_parent_export_of_the_image(driver):
    source = driver.parent_source(
        'node-7', records.RelayAddress('198.51.100.7', 10812, IMAGE), IMAGE)
    assert source == records.Source('node-7', records.Endpoint(
        'nbd', {'host': '198.51.100.7', 'port': 10812, 'export': IMAGE}))
    assert not source.is_origin


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


def test_probe_source(driver, fakes):
    info = driver.probe_source(records.Source.origin(NBD_ORIGIN), 'raw')
    assert info == base.OriginInfo(size=SIZE, image_format='raw')
    (args, timeout), = fakes.qemu_img.runs
    assert timeout == 45
    assert args[:4] == ['qemu-img', 'info', '--output=json', '-U']
    assert json.loads(args[-1][len('json:'):]) == {
        'driver': 'raw', 'file': {
            'driver': 'nbd', 'server': {'type': 'inet', 'host': '192.0.2.9',
                                        'port': '10809'},
            'export': IMAGE, 'read-only': True}}

    fakes.qemu_img.info = {'format': 'qcow2', 'virtual-size': SIZE}
    with pytest.raises(exception.OriginUnavailable, match='not raw'):
        driver.probe_source(records.Source.origin(NBD_ORIGIN), 'raw')
    fakes.qemu_img.info['backing-filename'] = '/etc/shadow'
    with pytest.raises(exception.OriginUnavailable, match='backing'):
        driver.probe_source(records.Source.origin(FILE_ORIGIN), 'qcow2')
    opts = json.loads(fakes.qemu_img.runs[-1][0][-1][len('json:'):])
    # qemu-img itself is told not to open it.
    assert opts['backing'] is None


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
        unix = records.Source('p', records.Endpoint(
            'nbd', {'socket': path, 'export': IMAGE}))
        assert driver.source_answers(unix, 1)
    assert not driver.source_answers(unix, 1)


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
    assert build.export == records.Export(
        'qemu', {'host': '127.0.0.1', 'port': 10815, 'export': IMAGE},
        relay)
    # The daemon listens on the reserved address (TCP, for children).
    assert fakes.daemons[IMAGE].nbd_server == {
        'type': 'inet', 'host': '127.0.0.1', 'port': '10815'}
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


def test_ensure_readopts_a_running_template(driver, fakes, tdir):
    template = _template(relay=_address(10815))
    build = driver.create_template(template, tdir)
    template.export, template.driver_state = build.export, build.driver_state
    fakes.upstreams[IMAGE].stop()
    before = copy.deepcopy(template.to_dict())
    again = driver.ensure_template(template, tdir)
    assert template.to_dict() == before
    assert again == base.TemplateBuild(export=template.export)
    assert fakes.daemons[IMAGE].starts == 1
    # The dead forwarder was started again, at the same source.
    assert fakes.upstreams[IMAGE].starts == ['TCP:192.0.2.9:10809'] * 2


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


def test_set_sources_swaps_the_forwarder_only(driver, fakes, tdir):
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

    with pytest.raises(exception.BackendError, match='named'):
        driver.set_sources(template, tdir, [records.Source(
            'p', records.Endpoint('nbd', {'host': '192.0.2.1', 'port': 1,
                                          'export': 'other'}))])
    with pytest.raises(exception.BackendError, match='relay tree'):
        driver.set_sources(_template(), tdir, [parent])


def test_delete_template_stops_daemon_and_forwarder(driver, fakes, tdir,
                                                    conf):
    template = _template(relay=_address(10815))
    template.export = driver.create_template(template, tdir).export
    socket_path = os.path.join(conf.agent.run_path, IMAGE + '.nbd')
    open(socket_path, 'w').close()
    driver.delete_template(template, tdir)
    assert not fakes.daemons[IMAGE].running
    assert fakes.upstreams[IMAGE].target() is None
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


def test_file_source_reads_are_fetches_not_hits(driver, fakes, tdir):
    template = _template(origin=FILE_ORIGIN)
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


def test_relaying_template_snapshot_backs_on_the_tcp_export(
        driver, tdir, tmp_path):
    template = _template(relay=_address(10815))
    template.export = driver.create_template(template, tdir).export
    info = driver.create_snapshot(template, tdir, 'i-1', str(tmp_path))
    assert info['data']['backing'] == {
        'driver': 'nbd', 'format': 'raw', 'host': '127.0.0.1',
        'port': 10815, 'export': IMAGE, 'reconnect_delay': 123}
    target = driver.prefetch_target(template, tdir)
    assert isinstance(target, prefetch.NbdAddress)
    assert (target.host, target.port, target.export) == (
        '127.0.0.1', 10815, IMAGE)


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
