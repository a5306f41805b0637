"""Kernel driver behaviour that needs no kernel.

The privileged layer is faked at its boundary
(:mod:`thunder_agent.privileged.kernel` and ``.tgt``): its semantic entry
points answer with the (exit code, stdout, stderr) the real helpers give,
from a small model of the devices and targets that exist. os-brick's
logins, the sysfs views of devices that do not exist here and the bcache
cache (whose sysfs interplay needs the kernel) are fakes too; the guest
tier runs all of it for real (tests/guest).
"""

import json
import logging
import os
import socket
import string

from os_brick import exception as brick_exception
from os_brick.initiator import connector as brick_connector
from oslo_config import cfg
import pytest

from thunder_agent import conf as agent_conf
from thunder_agent import drivers
from thunder_agent import exception
from thunder_agent import prefetch
from thunder_agent import records
from thunder_agent.drivers import base
from thunder_agent.drivers.kernel import cache as kcache
from thunder_agent.drivers.kernel import chap
from thunder_agent.drivers.kernel import dmtables
from thunder_agent.drivers.kernel import driver as kernel
from thunder_agent.drivers.kernel import iscsi
from thunder_agent.drivers.kernel import sysfs
from thunder_agent.privileged import kernel as priv
from thunder_agent.privileged import tgt as priv_tgt

IMAGE = '0f2b1a3c-5d4e-4f60-8a7b-9c8d7e6f5a4b'
SIZE = 32 << 20
ORIGIN_SECRET = 'Abcdefgh12345678'
ORIGIN = records.Endpoint('iscsi', {
    'target_portal': '10.99.1.1:3260',
    'target_iqn': 'iqn.2010-10.org.openstack.thunder:origin:img',
    'target_lun': 1, 'auth_method': 'CHAP',
    'auth_username': 'origin-img', 'auth_password': ORIGIN_SECRET})
HOST_IQN = ('iqn.2010-10.org.openstack.thunder:compute-7.example:'
            + IMAGE)
NO_DEVICE = (1, '', 'Device does not exist.\nCommand failed.\n')


# -- fakes at the boundaries ---------------------------------------------

class FakeKernel:
    """The privileged entry points (block and iSCSI contexts) as they
    answer, over a model of what exists; tables are built as the helper
    builds them (dmtables)."""

    def __init__(self):
        self.calls = []
        self.dm = {}            # name -> {'table', 'open'}
        self.loops = {}         # /dev/loopN -> backing file
        self.targets = {}       # iqn -> {'tid', 'luns', 'accounts', 'acls'}
        self.accounts = {}      # user -> password
        self.sessions = {}      # iqn -> logged-in initiators
        self.discovery = {}     # portal -> (code, out, err)
        self.scopes = []

    def install(self, monkeypatch):
        for name in ('attach_loop', 'detach_loop', 'dm_info',
                     'dm_open_count', 'dm_status', 'remove_dm_device',
                     'create_source_map', 'reload_source_map',
                     'create_bcache_backing', 'create_dm_cache',
                     'create_template_map', 'create_snapshot_map',
                     'make_bcache', 'write_sysfs', 'load_kernel_modules'):
            monkeypatch.setattr(priv, name, getattr(self, name))
        for name in ('tgt_check', 'tgt_targets', 'tgt_export',
                     'tgt_unexport', 'iscsi_discover'):
            monkeypatch.setattr(priv_tgt, name, getattr(self, name))
        monkeypatch.setattr(sysfs, 'loop_backing_files',
                            lambda: dict(self.loops))
        return self

    def tools(self):
        return [c[0] for c in self.calls]

    def _scope(self, scope):
        assert scope == {'state_path': scope['state_path'],
                         'device_prefix': scope['device_prefix'],
                         'iqn_prefix': 'iqn.2010-10.org.openstack.thunder'}
        self.scopes.append(scope)
        return scope['device_prefix']

    # device-mapper
    def _create(self, scope, role, ident, table):
        name = dmtables.device_name(self._scope(scope), role, ident) \
            if role != 'snap' else dmtables.snapshot_name(
                scope['device_prefix'], ident)
        self.calls.append(('dmsetup', 'create', name))
        if name in self.dm:
            return 1, '', 'device-mapper: create ioctl failed: ' \
                          'Device or resource busy\n'
        self.dm[name] = {'table': table, 'open': 0}
        return 0, '', ''

    @staticmethod
    def _mapper(scope, role, image_id):
        return '/dev/mapper/' + dmtables.device_name(
            scope['device_prefix'], role, image_id)

    def create_source_map(self, scope, image_id, length, disks):
        return self._create(scope, 'src', image_id, dmtables.multipath(
            length, [sysfs.dev_numbers(d) for d in disks]))

    def reload_source_map(self, scope, image_id, length, disks):
        name = dmtables.device_name(self._scope(scope), 'src', image_id)
        self.calls.append(('dmsetup', 'reload', name))
        if name not in self.dm:
            return NO_DEVICE
        self.dm[name]['table'] = dmtables.multipath(
            length, [sysfs.dev_numbers(d) for d in disks])
        return 0, '', ''

    def create_bcache_backing(self, scope, image_id, superblock, length):
        return self._create(scope, 'bk', image_id, dmtables.bcache_backing(
            superblock, self._mapper(scope, 'src', image_id), length))

    def create_dm_cache(self, scope, image_id, length, metadata, cache,
                        block_sectors, mode):
        return self._create(scope, 'dmc', image_id, dmtables.cache(
            length, metadata, cache, self._mapper(scope, 'src', image_id),
            block_sectors, mode=mode))

    def create_template_map(self, scope, image_id, length, cached):
        return self._create(scope, 'tpl', image_id,
                            dmtables.linear([(cached, 0, length)]))

    def create_snapshot_map(self, scope, instance_id, image_id, length, cow,
                            chunk_sectors):
        return self._create(scope, 'snap', instance_id, dmtables.snapshot(
            length, self._mapper(scope, 'tpl', image_id), cow,
            chunk_sectors=chunk_sectors))

    def dm_info(self, scope, name):
        self._scope(scope)
        self.calls.append(('dmsetup', 'info', name))
        if name not in self.dm:
            return NO_DEVICE
        return 0, 'Name:              %s\nState:             ACTIVE\n' \
            % name, ''

    def dm_open_count(self, scope, name):
        self.calls.append(('dmsetup', 'info', '-o', 'open', name))
        if name not in self.dm:
            return NO_DEVICE
        return 0, '%4d\n' % self.dm[name]['open'], ''

    def dm_status(self, scope, name):
        self.calls.append(('dmsetup', 'status', name))
        return (0, '', '') if name in self.dm else NO_DEVICE

    def remove_dm_device(self, scope, name):
        self._scope(scope)
        self.calls.append(('dmsetup', 'remove', name))
        if name not in self.dm:
            return NO_DEVICE
        del self.dm[name]
        return 0, '', ''

    # loop devices
    def attach_loop(self, scope, path, read_only=False):
        assert path.startswith(self._scope(scope) and scope['state_path'])
        self.calls.append(('losetup', 'attach', path, read_only))
        device = '/dev/loop%d' % len(self.loops)
        self.loops[device] = path
        return 0, device, ''

    def detach_loop(self, scope, device):
        self._scope(scope)
        self.calls.append(('losetup', '--detach', device))
        self.loops.pop(device, None)
        return 0, '', ''

    def make_bcache(self, scope, image_id, cache_device, bucket_size):
        self.calls.append(('make-bcache', image_id, cache_device,
                           bucket_size))
        return 0, '', ''

    def write_sysfs(self, scope, path, value):
        self.calls.append(('sysfs', path, value))
        return 0, '', ''

    def load_kernel_modules(self, names):
        self.calls.append(('modprobe',) + tuple(names))
        return 0, '', ''

    def iscsi_discover(self, portal, timeout):
        self.calls.append(('iscsiadm', portal, timeout))
        return self.discovery.get(
            portal, (21, '', 'iscsiadm: No portals found\n'))

    # tgt
    def tgt_check(self, control_port):
        self.calls.append(('tgt', 'check', control_port))
        return 0, 'System:\n    State: ready\n', ''

    def tgt_targets(self, scope, control_port):
        self._scope(scope)
        self.calls.append(('tgt', 'targets', control_port))
        return 0, {iqn: dict(t, sessions=len(self.sessions.get(iqn, ())))
                   for iqn, t in self.targets.items()}, ''

    def tgt_export(self, scope, control_port, image_id, iqn, secret):
        prefix = self._scope(scope)
        self.calls.append(('tgt', 'export', iqn, image_id))
        target = self.targets.get(iqn)
        if target is None:
            tid = max((t['tid'] for t in self.targets.values()),
                      default=0) + 1
            target = self.targets[iqn] = {'tid': tid, 'luns': {},
                                          'accounts': [], 'acls': []}
        target['luns'][1] = '/dev/mapper/' + dmtables.device_name(
            prefix, 'tpl', image_id)
        user = 'thunder-' + image_id
        if user not in target['accounts']:
            self.accounts[user] = secret
            target['accounts'].append(user)
        if not target['acls']:
            target['acls'].append('ALL')
        return 0, target['tid'], ''

    def tgt_unexport(self, scope, control_port, image_id, iqn):
        self._scope(scope)
        self.calls.append(('tgt', 'unexport', iqn, image_id))
        if self.sessions.get(iqn):
            return 19, '', 'this target is still active'
        self.targets.pop(iqn, None)
        self.accounts.pop('thunder-' + image_id, None)
        return 0, '', ''


class FakeConnector:
    """os-brick's logins: one SCSI disk per LUN."""

    def __init__(self, refuse=()):
        self.logins = []
        self.logouts = []
        self.refuse = refuse

    def connect(self, props):
        self.logins.append(dict(props))
        if props['target_iqn'] in self.refuse:
            raise exception.SourceUnavailable(
                target=props['target_iqn'], portal=props['target_portal'],
                reason='iscsiadm: Login failed (authorization failure)')
        return {'path': '/dev/sd' + 'abcdefgh'[len(self.logins) - 1],
                'scsi_wwn': None}

    def disconnect(self, endpoint, force=False):
        self.logouts.append(endpoint.data['target_iqn'])


class FakeCache:
    kind = 'bcache'

    def __init__(self):
        self.created = self.destroyed = 0

    def create(self, source, length):
        self.created += 1
        return '/dev/bcache0'

    def assemble(self, source, length):
        return '/dev/bcache0'

    def destroy(self):
        self.destroyed += 1

    def stats(self):
        return {'cached_bytes': 3 << 20, 'blocks_cached': 48,
                'block_size': 65536, 'disk_bytes': 4 << 20}

    def disk_bytes(self):
        return 4 << 20


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / 'relay.key'
    path.write_bytes(os.urandom(48))
    path.chmod(0o600)
    return path


@pytest.fixture
def conf(tmp_path, key_file):
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    conf.set_override('host', 'Compute-7.EXAMPLE')
    conf.set_override('state_path', str(tmp_path / 'state'), group='agent')
    conf.set_override('run_path', str(tmp_path / 'run'), group='agent')
    conf.set_override('export_address', '192.0.2.7', group='kernel')
    conf.set_override('tgt_control_port', 11, group='kernel')
    conf.set_override('relay_key_file', str(key_file), group='kernel')
    conf.set_override('enabled', True, group='relay')
    return conf


@pytest.fixture
def fake(monkeypatch):
    return FakeKernel().install(monkeypatch)


@pytest.fixture
def fake_devices(monkeypatch):
    """sysfs views of the SCSI disks and caches that exist in the fake."""
    cache = FakeCache()
    monkeypatch.setattr(kcache, 'make', lambda *a, **k: cache)
    monkeypatch.setattr(sysfs, 'size_bytes', lambda path: SIZE)
    monkeypatch.setattr(sysfs, 'dev_numbers',
                        lambda path: '8:%d' % (16 * 'abcdefgh'.index(
                            path[-1])) if path.startswith('/dev/sd')
                        else '254:0')
    monkeypatch.setattr(sysfs, 'holders', lambda path: [])
    monkeypatch.setattr(sysfs, 'iscsi_session_dir', lambda path: None)
    monkeypatch.setattr(sysfs, 'read_bytes', lambda path: 5 << 20)
    return cache


def _driver(conf, connector=None):
    driver = kernel.KernelDriver(conf)
    driver._connector = connector or FakeConnector()
    return driver


def _template(sources=(), export=None):
    return records.Template(image_id=IMAGE, origin=ORIGIN, size=SIZE,
                            image_format='raw', driver='kernel',
                            sources=list(sources), export=export)


def _tdir(tmp_path, name='template'):
    # Under [agent] state_path, as the manager's store lays them out: the
    # helper attaches no file elsewhere.
    path = tmp_path / 'state' / name
    path.mkdir(parents=True)
    return str(path)


def _relaying(driver):
    return records.Export('kernel', {},
                          relay=driver.relay_address(IMAGE, []))


# -- loading and names ----------------------------------------------------

def test_entry_point_loads_the_kernel_driver(conf):
    driver = drivers.load('kernel', conf)
    assert isinstance(driver, kernel.KernelDriver)
    assert isinstance(driver, base.Driver)
    assert driver.name == 'kernel'
    assert driver.ready_poll_interval == 0.5


def test_relay_address_and_parent_source(conf):
    driver = kernel.KernelDriver(conf)
    assert driver.relay_address(IMAGE, [records.RelayAddress(
        '192.0.2.7', 3260, 'iqn.x:other')]) == records.RelayAddress(
        '192.0.2.7', 3260, HOST_IQN)
    source = driver.parent_source('compute-7', records.RelayAddress(
        '192.0.2.7', 3260, HOST_IQN), IMAGE)
    assert source == records.Source('compute-7', records.Endpoint(
        'iscsi', {'target_portal': '192.0.2.7:3260',
                  'target_iqn': HOST_IQN, 'target_lun': 1,
                  'auth_method': 'CHAP',
                  'auth_username': 'thunder-' + IMAGE}))
    assert 'auth_password' not in source.endpoint.data
    v6 = driver.parent_source('n', records.RelayAddress(
        '2001:db8::7', 3261, HOST_IQN), IMAGE)
    assert v6.endpoint.data['target_portal'] == '[2001:db8::7]:3261'


def test_check_origin_and_can_relay(conf):
    driver = kernel.KernelDriver(conf)
    driver.check_origin(ORIGIN)
    assert driver.can_relay(IMAGE, ORIGIN)
    nbd = records.Endpoint('nbd', {'host': 'h', 'port': 1, 'export': ''})
    assert not driver.can_relay(IMAGE, nbd)
    with pytest.raises(exception.InvalidOrigin):
        driver.check_origin(nbd)
    data = dict(ORIGIN.data, auth_method='None')
    with pytest.raises(exception.InvalidOrigin) as info:
        driver.check_origin(records.Endpoint('iscsi', data))
    assert ORIGIN_SECRET not in str(info.value)


# -- relay secrets ---------------------------------------------------------

def test_relay_secret_is_deterministic_per_key_and_iqn():
    key, other_key = b'k' * 32, b'K' * 32
    first = chap.relay_secret(key, HOST_IQN)
    assert chap.relay_secret(key, HOST_IQN) == first
    assert chap.relay_secret(bytes(key), HOST_IQN) == first
    # Another IQN (another host or image) or key: another secret.
    iqns = ['%s:host-%d:%s' % ('iqn.2010-10.org.openstack.thunder', n,
                               IMAGE) for n in range(200)]
    assert len({chap.relay_secret(key, iqn) for iqn in iqns}) == 200
    assert chap.relay_secret(other_key, HOST_IQN) != first


def test_relay_secrets_obey_the_chap_rules():
    alphabet = set(string.ascii_letters + string.digits)
    seen = set()
    for n in range(500):
        secret = chap.relay_secret(os.urandom(32), 'iqn.2010-10.x:%d' % n)
        assert len(secret) == chap.SECRET_LENGTH == 16
        assert set(secret) <= alphabet
        seen |= set(secret)
        assert chap.check_credentials(
            {'auth_method': 'CHAP', 'auth_username': 'u',
             'auth_password': secret}) == ('u', secret)
    # Every character of the alphabet turns up (8000 draws of 62).
    assert seen == alphabet


def test_relay_secret_refuses_a_short_key():
    with pytest.raises(exception.BackendError):
        chap.relay_secret(b'x' * 31, HOST_IQN)


# -- start -----------------------------------------------------------------

@pytest.mark.parametrize('key', [None, 'missing', b'', b'k' * 31])
def test_start_refuses_a_missing_or_short_relay_key(conf, fake, tmp_path,
                                                    key):
    if key is None:
        conf.clear_override('relay_key_file', group='kernel')
    elif key == 'missing':
        conf.set_override('relay_key_file', str(tmp_path / 'nope'),
                          group='kernel')
    else:
        (tmp_path / 'short.key').write_bytes(key)
        conf.set_override('relay_key_file', str(tmp_path / 'short.key'),
                          group='kernel')
    with pytest.raises(exception.BackendError) as info:
        kernel.KernelDriver(conf).start()
    assert '[kernel] relay_key_file' in str(info.value)
    if key:
        assert 'k' * 31 not in str(info.value)
    # Refused before anything ran.
    assert fake.calls == []


def test_start_with_relay_needs_an_export_address(conf, fake):
    conf.clear_override('export_address', group='kernel')
    with pytest.raises(exception.BackendError) as info:
        kernel.KernelDriver(conf).start()
    assert 'export_address' in str(info.value)


def test_start(conf, fake, key_file, caplog):
    caplog.set_level(logging.DEBUG)
    driver = kernel.KernelDriver(conf)
    driver.start()
    assert driver._relay_key == key_file.read_bytes()
    assert fake.tools() == ['modprobe', 'tgt']
    # Without relay: no key, no address and no tgtd needed.
    conf.set_override('enabled', False, group='relay')
    conf.clear_override('relay_key_file', group='kernel')
    conf.clear_override('export_address', group='kernel')
    fake.calls = []
    kernel.KernelDriver(conf).start()
    assert fake.tools() == ['modprobe']
    assert 'relay_key_file' not in caplog.text


def test_start_warns_about_a_key_others_can_read(conf, fake, key_file,
                                                 caplog):
    key_file.chmod(0o644)
    kernel.KernelDriver(conf).start()
    assert 'accessible to other users' in caplog.text


# -- templates -------------------------------------------------------------

def test_a_template_that_does_not_relay_gets_no_tgt_export(
        conf, fake, fake_devices, tmp_path):
    driver = _driver(conf)
    template = _template()
    before = template.to_dict()
    tdir = _tdir(tmp_path)
    build = driver.create_template(template, tdir)
    tpl = '/dev/mapper/thunder-%s-tpl' % IMAGE
    assert build == base.TemplateBuild(export=records.Export(
        'kernel', {'device_path': tpl}, relay=None))
    assert 'tgt' not in fake.tools()
    assert fake.targets == {}
    assert sorted(fake.dm) == ['thunder-%s-%s' % (IMAGE, r)
                               for r in ('src', 'tpl')]
    assert fake.dm['thunder-%s-tpl' % IMAGE]['table'] == \
        '0 65536 linear /dev/bcache0 0'
    # One login, to the origin with its own credentials.
    assert [p['auth_password'] for p in driver.connector.logins] == [
        ORIGIN_SECRET]
    assert template.to_dict() == before
    layout = os.path.join(tdir, kernel.LAYOUT_FILE)
    assert os.stat(layout).st_mode & 0o777 == 0o600
    assert json.load(open(layout))['export'] is None
    assert driver.is_healthy(template, tdir)
    # Local readers use the device; the prefetcher reads it directly.
    target = driver.prefetch_target(template, tdir)
    assert isinstance(target, prefetch.BlockDevice) and str(target) == tpl
    assert target.max_read == kernel.PREFETCH_READ == 256 * 1024

    driver.delete_template(template, tdir)
    assert 'tgt' not in fake.tools()
    assert fake.dm == {} and fake.loops == {}
    assert fake_devices.destroyed == 1
    assert driver.connector.logouts == [ORIGIN.data['target_iqn']]


def test_a_relaying_template_is_exported_with_the_derived_secret_only(
        conf, fake, fake_devices, tmp_path, key_file, caplog):
    caplog.set_level(logging.DEBUG)
    parent = _driver(conf)
    template = _template(export=_relaying(parent))
    tdir = _tdir(tmp_path)
    build = parent.create_template(template, tdir)
    secret = chap.relay_secret(key_file.read_bytes(), HOST_IQN)
    assert build.export == records.Export(
        'kernel', {'device_path': '/dev/mapper/thunder-%s-tpl' % IMAGE},
        relay=records.RelayAddress('192.0.2.7', 3260, HOST_IQN))
    assert fake.targets[HOST_IQN]['luns'] == {
        1: '/dev/mapper/thunder-%s-tpl' % IMAGE}
    assert fake.targets[HOST_IQN]['accounts'] == ['thunder-' + IMAGE]
    assert fake.accounts == {'thunder-' + IMAGE: secret}
    assert parent.is_healthy(template, tdir)

    # A child of another host, with the same relay key, logs in with it.
    child_conf = agent_conf.register_opts(cfg.ConfigOpts())
    child_conf([])
    for group, key, value in (
            (None, 'host', 'compute-8'),
            ('kernel', 'relay_key_file', str(key_file)),
            ('kernel', 'device_prefix', 'child'),
            ('kernel', 'export_address', '192.0.2.8'),
            ('relay', 'enabled', True)):
        child_conf.set_override(key, value, group=group)
    child = _driver(child_conf)
    source = child.parent_source('compute-7', build.export.relay, IMAGE)
    child_template = _template(sources=[source])
    child_tdir = _tdir(tmp_path, 'child')
    child_build = child.create_template(child_template, child_tdir)
    assert child_build.export.relay is None
    login = child.connector.logins[-1]
    assert (login['target_portal'], login['target_iqn'],
            login['auth_username'], login['auth_password']) == (
        '192.0.2.7:3260', HOST_IQN, 'thunder-' + IMAGE, secret)

    # The secret is in no record, export, layout, status or log.
    stats, state = parent.template_stats(template, tdir)
    for text in (json.dumps(build.export.to_dict()),
                 json.dumps(template.to_dict()),
                 json.dumps(child_template.to_dict()),
                 json.dumps(source.to_dict()),
                 open(os.path.join(tdir, kernel.LAYOUT_FILE)).read(),
                 open(os.path.join(child_tdir, kernel.LAYOUT_FILE)).read(),
                 json.dumps(stats.to_dict()), caplog.text):
        assert secret not in text
    assert state is None

    child.delete_template(child_template, child_tdir)
    # A child logged in: the parent refuses to go.
    fake.sessions[HOST_IQN] = ['iqn.1993-08.org.debian:01:child']
    with pytest.raises(exception.TemplateInUse) as info:
        parent.delete_template(template, tdir)
    assert '1 child session' in str(info.value)
    fake.sessions.clear()
    parent.delete_template(template, tdir)
    assert fake.targets == {} and fake.accounts == {}
    assert fake.dm == {}


def test_a_wrong_key_fails_the_login_without_leaking_a_secret(
        conf, fake, fake_devices, tmp_path):
    driver = _driver(conf, FakeConnector(refuse=[HOST_IQN]))
    source = driver.parent_source('compute-7', records.RelayAddress(
        '192.0.2.7', 3260, HOST_IQN), IMAGE)
    tdir = _tdir(tmp_path)
    with pytest.raises(exception.SourceUnavailable) as info:
        driver.create_template(_template(sources=[source]), tdir)
    assert driver.connector.logins[0]['auth_password'] not in \
        str(info.value)
    assert os.listdir(tdir) == [] and fake.dm == {}


def test_os_brick_errors_lose_the_secret(monkeypatch):
    secret = 'Derived123456789'

    class Brick:
        def connect_volume(self, props):
            raise brick_exception.BrickException(
                'iscsiadm -m node --op update -n node.session.auth.password'
                ' -v %s failed' % props['auth_password'])

    monkeypatch.setattr(brick_connector.InitiatorConnector, 'factory',
                        lambda *a, **k: Brick())
    props = iscsi.check_source(records.Endpoint('iscsi', {
        'target_portal': '192.0.2.7:3260', 'target_iqn': HOST_IQN,
        'auth_method': 'CHAP', 'auth_username': 'u'}), secret)
    with pytest.raises(exception.SourceUnavailable) as info:
        iscsi.SourceConnector().connect(props)
    assert secret not in str(info.value)
    assert '-v *** failed' in str(info.value)


def test_logging_in_to_a_parent_needs_the_relay_key(conf, fake,
                                                    fake_devices,
                                                    tmp_path):
    conf.set_override('enabled', False, group='relay')
    conf.clear_override('relay_key_file', group='kernel')
    driver = _driver(conf)
    source = driver.parent_source('compute-7', records.RelayAddress(
        '192.0.2.7', 3260, HOST_IQN), IMAGE)
    tdir = _tdir(tmp_path)
    with pytest.raises(exception.BackendError) as info:
        driver.create_template(_template(sources=[source]), tdir)
    assert '[kernel] relay_key_file' in str(info.value)
    assert driver.connector.logins == [] and fake.calls == []


def test_without_relay_an_export_gets_a_random_secret_kept_locally(
        conf, fake, fake_devices, tmp_path):
    conf.set_override('enabled', False, group='relay')
    conf.clear_override('relay_key_file', group='kernel')
    driver = _driver(conf)
    template = _template(export=_relaying(driver))
    tdir = _tdir(tmp_path)
    driver.create_template(template, tdir)
    layout = json.load(open(os.path.join(tdir, kernel.LAYOUT_FILE)))
    secret = layout['export']['secret']
    assert layout['export']['credentials'] == 'random'
    assert fake.accounts == {'thunder-' + IMAGE: secret}
    assert len(secret) == 16 and secret.isalnum()
    # Restored after a restart with the same secret.
    fake.targets.clear()
    fake.accounts.clear()
    assert not driver.is_healthy(template, tdir)
    build = driver.ensure_template(template, tdir)
    assert build.export.relay == template.export.relay
    assert fake.accounts == {'thunder-' + IMAGE: secret}


def test_set_sources_moves_the_paths_and_returns_no_state(
        conf, fake, fake_devices, tmp_path):
    driver = _driver(conf)
    template = _template()
    tdir = _tdir(tmp_path)
    driver.create_template(template, tdir)
    src = 'thunder-%s-src' % IMAGE
    assert fake.dm[src]['table'].endswith('1 8:0 1')
    parent = driver.parent_source('compute-9', records.RelayAddress(
        '192.0.2.9', 3260, 'iqn.2010-10.org.openstack.thunder:c9:'
        + IMAGE), IMAGE)
    assert driver.set_sources(template, tdir, [parent]) is None
    assert template.sources == []
    assert fake.dm[src]['table'].endswith('1 8:16 1')
    assert [c[1] for c in fake.calls if c[0] == 'dmsetup'][-1] == 'reload'
    assert driver.connector.logouts == [ORIGIN.data['target_iqn']]
    saved = json.load(open(os.path.join(tdir, kernel.LAYOUT_FILE)))
    assert [records.Source.from_dict(e['source'])
            for e in saved['sources']] == [parent]


def _bad(**changes):
    data = dict(ORIGIN.data)
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return records.Source.origin(records.Endpoint('iscsi', data))


@pytest.mark.parametrize('sources', [
    [_bad(auth_method=None)], [_bad(auth_password='short')],
    [records.Source.origin(ORIGIN), records.Source.origin(
        records.Endpoint('nbd', {}))],
    [_bad(target_lun=-1)], ['iqn.x'], [ORIGIN],
])
def test_bad_sources_are_refused_before_anything_is_touched(
        conf, fake, tmp_path, sources):
    driver = _driver(conf)
    tdir = _tdir(tmp_path)
    with pytest.raises(exception.InvalidSource):
        driver.create_template(_template(sources), tdir)
    assert os.listdir(tdir) == []
    assert fake.calls == [] and driver.connector.logins == []


@pytest.mark.parametrize('sources', [[], [_bad(auth_method='None')],
                                     [records.Source.origin(ORIGIN),
                                      _bad(target_iqn='')]])
def test_set_sources_refuses_bad_sources_before_anything(conf, fake,
                                                         tmp_path,
                                                         sources):
    driver = _driver(conf)
    tdir = _tdir(tmp_path)
    with pytest.raises(exception.InvalidSource):
        driver.set_sources(_template(), tdir, sources)
    assert os.listdir(tdir) == [] and fake.calls == []


def test_probe_source(conf, fake, fake_devices):
    driver = _driver(conf)
    origin = records.Source.origin(ORIGIN)
    with pytest.raises(exception.OriginUnavailable):
        driver.probe_source(origin, 'qcow2')
    with pytest.raises(exception.InvalidSource):
        driver.probe_source(records.Source.origin(records.Endpoint(
            'file', {'path': '/tmp/x'})), 'raw')
    assert driver.connector.logins == []
    assert driver.probe_source(origin, 'raw') == base.OriginInfo(SIZE,
                                                                 'raw')
    # Nothing else uses the LUN: logged out again.
    assert driver.connector.logouts == [ORIGIN.data['target_iqn']]


def test_ensure_template_without_layout_is_a_clear_error(conf, tmp_path):
    with pytest.raises(exception.BackendError) as info:
        kernel.KernelDriver(conf).ensure_template(_template(),
                                                  str(tmp_path))
    assert 'no kernel layout' in str(info.value)


def test_teardown_of_a_half_built_template_tolerates_missing_pieces(
        conf, fake, monkeypatch, tmp_path):
    # Nothing of it exists any more, and it never wrote its layout; the
    # real cache class finds no cache either.
    driver = _driver(conf)
    template = _template(export=_relaying(driver))
    driver.delete_template(template, str(tmp_path / 'gone'))
    assert [(c[0], c[1], c[-1]) for c in fake.calls
            if c[0] == 'dmsetup'] == [
        ('dmsetup', 'info', 'thunder-%s-tpl' % IMAGE),
        ('dmsetup', 'remove', 'thunder-%s-tpl' % IMAGE),
        ('dmsetup', 'remove', 'thunder-%s-bk' % IMAGE),
        ('dmsetup', 'remove', 'thunder-%s-src' % IMAGE)]
    # The export it may have had was looked for under the reserved name.
    assert 'tgt' in fake.tools()
    assert driver.connector.logouts == []


def test_first_layouts_are_read(conf, fake, fake_devices, tmp_path):
    tdir = _tdir(tmp_path)
    with open(os.path.join(tdir, kernel.LAYOUT_FILE), 'w') as f:
        json.dump({'cache_type': 'bcache', 'secret': 'Old1234567890abc',
                   'sources': [{'source': ORIGIN.to_dict(),
                                'device': {'path': '/dev/sda'}}]}, f)
    driver = _driver(conf)
    layout = driver._load_layout(_template(), tdir)
    assert layout['sources'] == [{'source': records.Source.origin(ORIGIN),
                                  'device': {'path': '/dev/sda'}}]
    assert layout['export'] == {'iqn': HOST_IQN, 'credentials': 'random',
                                'secret': 'Old1234567890abc'}


def test_template_stats(conf, fake, fake_devices, tmp_path):
    driver = _driver(conf)
    template = _template()
    tdir = _tdir(tmp_path)
    driver.create_template(template, tdir)
    stats, state = driver.template_stats(template, tdir)
    assert state is None
    assert stats == base.TemplateStats(
        bytes_fetched=0, bytes_served=0, cached_bytes=3 << 20,
        blocks_cached=48, block_size=65536, disk_bytes=4 << 20)
    assert driver.disk_usage(template, tdir) == 4 << 20


def test_cache_capacity_is_the_layouts_files_at_full_size(
        conf, fake, fake_devices, tmp_path):
    driver = _driver(conf)
    template = _template()
    # Not created yet: the configured cache, 1 GiB floor, bcache's 1 MiB.
    assert driver.cache_capacity(template, str(tmp_path / 'none')) == \
        (1024 + 1) << 20
    conf.set_override('cache_min_size_mb', 16, group='kernel')
    assert driver.cache_capacity(template, str(tmp_path / 'none')) == \
        (64 + 1) << 20
    conf.set_override('cache_type', 'dm-cache', group='kernel')
    # 1024 blocks of 64 KiB: 4 MiB + 16 KiB of metadata, in whole MiB.
    assert driver.cache_capacity(template, str(tmp_path / 'none')) == \
        (64 + 5) << 20
    # A template keeps the cache type its layout records.
    tdir = _tdir(tmp_path)
    conf.set_override('cache_type', 'bcache', group='kernel')
    driver = _driver(conf)
    driver.create_template(template, tdir)
    conf.set_override('cache_type', 'dm-cache', group='kernel')
    assert kernel.KernelDriver(conf).cache_capacity(template, tdir) == \
        (64 + 1) << 20


# -- snapshots -------------------------------------------------------------

def test_snapshot_users_and_deletion(conf, fake, fake_devices, tmp_path):
    driver = _driver(conf)
    template = _template()
    tdir = _tdir(tmp_path)
    driver.create_template(template, tdir)
    instance = '5b1f3c2a-0d4e-4f60-8a7b-9c8d7e6f5a4b'
    sdir = _tdir(tmp_path, 'snapshot')
    info = driver.create_snapshot(template, tdir, instance, sdir)
    name = 'thunder-snap-' + instance
    assert info == {'driver_volume_type': 'thunder',
                    'data': {'backend': 'kernel',
                             'device_path': '/dev/mapper/' + name,
                             'format': 'raw', 'image_id': IMAGE,
                             'instance_id': instance}}
    assert fake.dm[name]['table'] == (
        '0 65536 snapshot /dev/mapper/thunder-%s-tpl /dev/loop0 P 8'
        % IMAGE)
    snapshot = records.Snapshot(instance, IMAGE, state=records.READY,
                                connection_info=info)
    assert driver.snapshot_users(template, snapshot, sdir) is None
    fake.dm[name]['open'] = 2
    assert driver.snapshot_users(template, snapshot, sdir) == \
        'device /dev/mapper/%s is open 2 time(s)' % name
    with pytest.raises(exception.SnapshotInUse):
        driver.delete_snapshot(template, tdir, snapshot, sdir)
    assert name in fake.dm
    fake.dm[name]['open'] = 0
    driver.delete_snapshot(template, tdir, snapshot, sdir)
    assert name not in fake.dm and fake.loops == {}
    assert driver.snapshot_users(template, snapshot, sdir) is None


# -- probing parents -------------------------------------------------------

@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    sock.listen(8)
    yield '127.0.0.1:%d' % sock.getsockname()[1]
    sock.close()


def test_source_answers_and_source_ready(conf, fake, listener):
    driver = kernel.KernelDriver(conf)
    host, port = iscsi.split_portal(listener)
    source = driver.parent_source('compute-7', records.RelayAddress(
        host, port, HOST_IQN), IMAGE)
    assert driver.source_answers(source, 2)
    # The portal answers but lists nothing yet (tgtd up, the template
    # still building): iscsiadm's answer then.
    assert not driver.source_ready(source)
    # Recorded from iscsiadm 2.1.8 against tgt 1.0.85.
    fake.discovery[listener] = (0, '%s,1 iqn.2010-10.x:other\n' % listener,
                                '')
    assert not driver.source_ready(source)
    fake.discovery[listener] = (0, '%s,1 iqn.2010-10.x:other\n%s,1 %s\n'
                                % (listener, listener, HOST_IQN), '')
    assert driver.source_ready(source)
    assert fake.calls[-1] == ('iscsiadm', listener, 2)

    closed = socket.socket()
    closed.bind(('127.0.0.1', 0))
    port = closed.getsockname()[1]
    closed.close()
    gone = driver.parent_source('compute-7', records.RelayAddress(
        '127.0.0.1', port, HOST_IQN), IMAGE)
    fake.calls = []
    assert not driver.source_answers(gone, 2)
    # A portal that refuses connections is not asked to discover.
    assert not driver.source_ready(gone)
    assert fake.calls == []


def test_a_failed_build_leaves_nothing_running(conf, fake, fake_devices,
                                               tmp_path, monkeypatch):
    driver = _driver(conf)
    template = _template(export=_relaying(driver))
    tdir = _tdir(tmp_path)

    def no_template_device(*args):
        fake.calls.append(('dmsetup', 'create', 'tpl'))
        return 1, '', 'device-mapper: reload ioctl failed: ' \
                      'Invalid argument\nCommand failed.\n'

    monkeypatch.setattr(priv, 'create_template_map', no_template_device)
    with pytest.raises(exception.BackendError) as info:
        driver.create_template(template, tdir)
    assert 'Invalid argument' in str(info.value)
    assert fake.dm == {} and fake.targets == {} and fake.loops == {}
    assert fake_devices.destroyed == 1
    assert driver.connector.logouts == [ORIGIN.data['target_iqn']]
    layout = json.load(open(os.path.join(tdir, kernel.LAYOUT_FILE)))
    assert (layout['sources'], layout['export']) == ([], None)
