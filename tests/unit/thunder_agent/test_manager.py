"""AgentManager on the fake driver: states, locking, failures, recovery.

Every test drives the real manager, store and relay member; only the data
plane (FakeDriver) and the coordinator's RPC client are fakes.
"""

import errno
import json
import os
import threading
import time
import uuid

from oslo_config import cfg
import pytest

from tests.unit.thunder_agent import fakes
from thunder_agent import conf as agent_conf
from thunder_agent import exception
from thunder_agent.drivers import base
from thunder_agent import manager as manager_mod
from thunder_agent import records
from thunder_agent import relay as relay_mod


def new_id():
    return str(uuid.uuid4())


@pytest.fixture
def conf(tmp_path):
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    conf.set_override('host', 'node-a')
    conf.set_override('state_path', str(tmp_path / 'state'), group='agent')
    conf.set_override('background_workers', 8, group='agent')
    conf.set_override('prepare_timeout', 30, group='agent')
    # The fakes' origin server (fakes.ORIGIN), on any port.
    conf.set_override('nbd_origin_networks', ['192.0.2.0/24'],
                      group='agent')
    conf.set_override('nbd_origin_ports', '1-65535', group='agent')
    conf.set_override('parent_ready_timeout', 0.3, group='relay')
    return conf


# The state file system of a Harness unless a test gives its own: room
# for every test's templates, whatever the disk under tmp_path holds.
ROOMY = 1 << 40


class Harness:
    def __init__(self, conf, relay=False, fs_total=ROOMY):
        self.conf = conf
        self.driver = fakes.FakeDriver(conf)
        self.fs = fakes.FakeFilesystem(self.driver, fs_total)
        self.api = None
        member = None
        if relay:
            conf.set_override('enabled', True, group='relay')
            self.api = fakes.FakeCoordinatorAPI()
            member = relay_mod.RelayMember(conf, api=self.api)
        self.manager = manager_mod.AgentManager(conf, driver=self.driver,
                                                relay=member)
        self.manager._statvfs = self.fs
        self.driver.manager = self.manager
        self.manager.start()

    def prepare(self, image_id=None, instance_id=None):
        image_id = image_id or new_id()
        return self.manager.prepare(image_id, fakes.origin_for(image_id),
                                    fakes.SIZE, 'raw',
                                    instance_id or new_id())

    def restart(self):
        self.manager.stop()
        again = Harness.__new__(Harness)
        again.conf = self.conf
        again.driver = self.driver
        again.api = self.api
        again.fs = self.fs
        again.manager = manager_mod.AgentManager(
            self.conf, driver=self.driver, relay=self.manager.relay)
        again.manager._statvfs = self.fs
        self.driver.manager = again.manager
        again.manager.start()
        return again

    def drain(self):
        """Wait for the background workers' queued jobs."""
        done = threading.Event()
        self.manager._workers.submit(done.set)
        for _ in range(8):
            self.manager._workers.submit(time.sleep, 0)
        assert done.wait(10)
        deadline = time.monotonic() + 10
        while any(e.in_flight for e in self.manager.templates.values()):
            assert time.monotonic() < deadline, 'background jobs hang'
            time.sleep(0.01)


def record_on_disk(conf, kind, name):
    path = os.path.join(conf.agent.state_path, kind, name, 'record.json')
    with open(path) as f:
        return json.load(f)


def run_threads(n, target):
    results, errors = [None] * n, [None] * n

    def one(i):
        try:
            results[i] = target(i)
        except Exception as e:
            errors[i] = e
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


# -- building ---------------------------------------------------------------

def test_prepare_builds_a_ready_template_and_a_snapshot(conf):
    h = Harness(conf)
    image_id, instance_id = new_id(), new_id()
    info = h.prepare(image_id, instance_id)
    assert info['data'] == {'backend': 'fake', 'instance_id': instance_id,
                            'image_id': image_id}
    saved = record_on_disk(conf, 'templates', image_id)
    assert saved['state'] == 'ready'
    assert saved['driver_state'] == {'generation': 1}
    assert saved['export']['local'] == {'fake': image_id}
    assert record_on_disk(conf, 'snapshots', instance_id)['state'] == 'ready'
    mode = os.stat(os.path.join(conf.agent.state_path, 'templates',
                                image_id, 'record.json')).st_mode
    assert mode & 0o077 == 0


def test_prepares_of_different_images_build_in_parallel(conf):
    h = Harness(conf)
    gate = h.driver.gates['create_template'] = threading.Event()
    ids = [new_id() for _ in range(20)]
    waiter = threading.Thread(target=lambda: (
        _wait_for(lambda: h.driver.in_flight['create_template'] == 20),
        gate.set()))
    waiter.start()
    results, errors = run_threads(20, lambda i: h.prepare(ids[i]))
    waiter.join()
    assert errors == [None] * 20
    # All 20 builds were inside the driver at the same time.
    assert h.driver.max_in_flight['create_template'] == 20
    assert sorted(r['data']['image_id'] for r in results) == sorted(ids)


def _wait_for(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, 'condition never met'
        time.sleep(0.005)


def test_prepares_of_one_image_share_one_build(conf):
    h = Harness(conf)
    gate = h.driver.gates['create_template'] = threading.Event()
    image_id = new_id()
    threading.Timer(0.2, gate.set).start()
    results, errors = run_threads(30, lambda i: h.prepare(image_id))
    assert errors == [None] * 30
    assert h.driver.calls['create_template'] == 1
    assert h.driver.calls['create_snapshot'] == 30
    # The 30 snapshots were created side by side (shared operations).
    assert len({r['data']['instance_id'] for r in results}) == 30
    status = h.manager.get_status()
    assert len(status['templates'][0]['snapshots']) == 30


def test_a_failed_build_fails_every_waiter_and_leaves_nothing(conf):
    h = Harness(conf)
    gate = h.driver.gates['create_template'] = threading.Event()
    h.driver.fail['create_template'] = exception.BackendError(
        reason='daemon would not start')
    image_id = new_id()
    threading.Timer(0.2, gate.set).start()
    _, errors = run_threads(5, lambda i: h.prepare(image_id))
    assert all(isinstance(e, exception.BackendError) for e in errors)
    assert all('daemon would not start' in str(e) for e in errors)
    assert h.driver.calls['create_template'] == 1
    assert h.driver.calls['delete_template'] == 1
    assert image_id not in h.manager.templates
    assert not os.path.exists(os.path.join(conf.agent.state_path,
                                           'templates', image_id))
    assert h.manager.snapshots == {}
    # The next request builds again.
    del h.driver.fail['create_template']
    h.prepare(image_id)
    assert h.driver.calls['create_template'] == 2


def test_bad_input_changes_nothing(conf):
    h = Harness(conf)
    with pytest.raises(exception.InvalidImageId):
        h.manager.prepare('../etc', fakes.ORIGIN, fakes.SIZE, 'raw', new_id())
    with pytest.raises(exception.InvalidOrigin):
        image_id = new_id()
        h.manager.prepare(image_id, {'driver_volume_type': 'iscsi', 'data': {
            'target_portal': 'x:1', 'target_iqn': 'iqn.x'}}, fakes.SIZE,
            'raw', new_id())
    with pytest.raises(exception.InvalidSize):
        image_id = new_id()
        h.manager.prepare(image_id, fakes.origin_for(image_id),
                          fakes.SIZE * 2, 'raw', new_id())
    assert h.driver.calls['create_template'] == 0
    assert h.manager.templates == {}
    assert os.listdir(os.path.join(conf.agent.state_path, 'templates')) == []


def test_mismatch_names_the_field_without_secrets(conf):
    h = Harness(conf)
    image_id = new_id()
    h.prepare(image_id)
    other = fakes.origin_for(image_id)
    other['data']['port'] = 10900
    other['data']['password'] = 'TopSecret0123456'
    with pytest.raises(exception.TemplateMismatch) as info:
        h.manager.prepare_template(image_id, other, fakes.SIZE, 'raw')
    assert 'origin' in str(info.value)
    assert 'TopSecret0123456' not in str(info.value)


def test_status_shows_the_origin_without_its_secret(conf):
    h = Harness(conf)
    # An iSCSI origin keeps its CHAP secret (the fake reads any origin).
    h.driver.check_origin = lambda origin: None
    image_id = new_id()
    origin = {'driver_volume_type': 'iscsi', 'data': {
        'target_portal': '192.0.2.1:3260', 'target_iqn': 'iqn.2010-10.x:y',
        'target_lun': 1, 'auth_method': 'CHAP', 'auth_username': 'u',
        'auth_password': 'TopSecret0123456'}}
    answer = h.manager.prepare_template(image_id, origin, fakes.SIZE, 'raw')
    status = h.manager.get_status()
    for text in (repr(answer), repr(status)):
        assert 'TopSecret0123456' not in text
    shown = status['templates'][0]['origin']['data']
    assert shown['target_portal'] == '192.0.2.1:3260'
    assert shown['auth_password'] == '***'
    # The record keeps it: the driver logs in with it.
    assert record_on_disk(conf, 'templates', image_id)['origin']['data'][
        'auth_password'] == 'TopSecret0123456'


# -- relay tree -------------------------------------------------------------

def test_dead_coordinator_costs_one_join_timeout_then_nothing(conf):
    conf.set_override('join_timeout', 1, group='relay')
    h = Harness(conf, relay=True)
    h.api.down = True
    first = h.prepare()
    assert first['data']['backend'] == 'fake'
    assert h.api.calls['join'] == 1
    for _ in range(3):
        h.prepare()
    # Known down: the next templates did not ask again.
    assert h.api.calls['join'] == 1
    for entry in h.manager.templates.values():
        assert entry.record.source.is_origin
    # A heartbeat that gets an answer clears it, and enters the tree.
    h.api.down = False
    h.manager.heartbeat()
    assert not h.manager.relay.coordinator_down
    assert h.api.calls['heartbeat'] == 1
    h.prepare()
    assert h.api.calls['join'] == 2


def test_template_reads_from_its_parent_once_it_serves(conf):
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.api.parents[image_id] = ('node-b', {'host': '192.0.2.20',
                                          'port': 10811,
                                          'export': image_id})
    h.api.children[image_id] = ['node-c']
    h.prepare(image_id)
    record = h.manager.templates[image_id].record
    assert record.source.node == 'node-b'
    assert record.source.endpoint.data['host'] == '192.0.2.20'
    assert record.relay.parent == 'node-b'
    assert record.relay.children == ['node-c']
    assert h.driver.templates[image_id][0].node == 'node-b'


def test_parent_that_does_not_serve_is_reported_and_origin_read(conf):
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.api.parents[image_id] = ('node-b', {'host': '192.0.2.20',
                                          'port': 10811,
                                          'export': image_id})
    h.driver.ready['node-b'] = False
    started = time.monotonic()
    h.prepare(image_id)
    # Bounded by [relay] parent_ready_timeout (0.3 s here).
    assert time.monotonic() - started < 5
    record = h.manager.templates[image_id].record
    assert record.source.is_origin
    assert h.driver.templates[image_id][0].is_origin
    h.drain()
    assert ('report_parent_failure', image_id, 'node-a', 'node-b') in \
        h.api.log


def test_parent_at_a_refused_address_is_reported_and_origin_read(conf):
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.api.parents[image_id] = ('node-b', {'host': '203.0.113.7',
                                          'port': 10811,
                                          'export': image_id})
    h.driver.refused_hosts.add('203.0.113.7')
    h.prepare(image_id)
    assert h.manager.templates[image_id].record.source.is_origin
    h.drain()
    assert ('report_parent_failure', image_id, 'node-a', 'node-b') in \
        h.api.log
    # The same parent in a heartbeat answer moves nothing either.
    h.api.parents[image_id] = ('node-b', {'host': '203.0.113.7',
                                          'port': 10811,
                                          'export': image_id})
    h.manager.heartbeat()
    h.drain()
    assert h.driver.calls['set_sources'] == 0


def test_heartbeat_answer_moves_the_template_and_sets_children(conf):
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.prepare(image_id)
    h.api.parents[image_id] = ('node-b', {'host': '192.0.2.20',
                                          'port': 10811,
                                          'export': image_id})
    h.api.children[image_id] = ['node-c', 'node-d']
    h.manager.heartbeat()
    h.drain()
    record = h.manager.templates[image_id].record
    assert record.relay.parent == 'node-b'
    assert record.relay.children == ['node-c', 'node-d']
    assert h.driver.calls['set_sources'] == 1
    assert record_on_disk(conf, 'templates', image_id)['relay'][
        'parent'] == 'node-b'
    # The same answer again changes nothing.
    h.manager.heartbeat()
    h.drain()
    assert h.driver.calls['set_sources'] == 1


def test_hostile_heartbeat_answers_are_ignored(conf):
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.prepare(image_id)
    for bad in ({'host': 'exec:/bin/sh', 'port': 1, 'export': image_id},
                {'host': '192.0.2.9', 'port': 'x', 'export': image_id},
                {'host': '192.0.2.9', 'port': 1, 'export': image_id,
                 'extra': 'y'}):
        h.api.parents[image_id] = ('node-b', bad)
        h.manager.heartbeat()
    h.api.parents[image_id] = ('node-a', {'host': '192.0.2.9', 'port': 1,
                                          'export': image_id})
    h.manager.heartbeat()
    h.drain()
    assert h.driver.calls['set_sources'] == 0
    assert h.manager.templates[image_id].record.source.is_origin


def test_failed_parent_probes_report_and_move(conf):
    conf.set_override('parent_failures', 2, group='relay')
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.api.parents[image_id] = ('node-b', {'host': '192.0.2.20',
                                          'port': 10811,
                                          'export': image_id})
    h.prepare(image_id)
    h.driver.answers['node-b'] = False
    h.api.after_failure[image_id] = ('node-c', {'host': '192.0.2.30',
                                                'port': 10812,
                                                'export': image_id})
    h.manager.probe_parents()
    h.drain()
    assert h.api.calls['report_parent_failure'] == 0
    h.manager.probe_parents()
    h.drain()
    assert h.api.calls['report_parent_failure'] == 1
    record = h.manager.templates[image_id].record
    assert record.relay.parent == 'node-c'
    assert record.relay.failures == 0


def test_a_parent_whose_bytes_were_rejected_is_reported_at_once(
        conf, caplog):
    conf.set_override('parent_failures', 3, group='relay')
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.api.parents[image_id] = ('node-b', {'host': '192.0.2.20',
                                          'port': 10811,
                                          'export': image_id})
    h.prepare(image_id)
    h.api.after_failure[image_id] = ('node-c', {'host': '192.0.2.30',
                                                'port': 10812,
                                                'export': image_id})
    # The parent answers probes; its bytes are wrong all the same.
    h.driver.mismatches[image_id] = base.SourceMismatch(
        parent='192.0.2.20:10811/' + image_id, bad_blocks=(3, 17),
        block_size=65536, time=1.0)
    h.manager.probe_parents()
    h.drain()
    # One probe round, not parent_failures: reported and moved.
    assert ('report_parent_failure', image_id, 'node-a', 'node-b') in \
        h.api.log
    record = h.manager.templates[image_id].record
    assert record.relay.parent == 'node-c'
    assert h.driver.templates[image_id][0].node == 'node-c'
    assert 'parent node-b (192.0.2.20:10811/%s) sent 2 block(s)' % (
        image_id) in caplog.text
    # The new parent's verifier has rejected nothing: no second report.
    del h.driver.mismatches[image_id]
    h.manager.probe_parents()
    h.drain()
    assert h.api.calls['report_parent_failure'] == 1


def test_failed_parent_without_coordinator_moves_to_origin(conf):
    conf.set_override('parent_failures', 1, group='relay')
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.api.parents[image_id] = ('node-b', {'host': '192.0.2.20',
                                          'port': 10811,
                                          'export': image_id})
    h.prepare(image_id)
    h.driver.answers['node-b'] = False
    h.api.down = True
    h.manager.probe_parents()
    h.drain()
    assert h.manager.templates[image_id].record.source.is_origin
    assert h.driver.templates[image_id][0].is_origin


def test_delete_asks_the_coordinator_first(conf):
    h = Harness(conf, relay=True)
    image_id = new_id()
    info = h.prepare(image_id)
    h.manager.delete_snapshot(info['data']['instance_id'])
    h.api.pending[image_id] = ['node-c']
    with pytest.raises(exception.TemplateInUse):
        h.manager.release_template(image_id)
    assert h.manager.templates[image_id].record.state == 'ready'
    assert h.driver.calls['delete_template'] == 0
    h.api.pending[image_id] = []
    h.manager.templates[image_id].record.relay.children = []
    h.manager.release_template(image_id)
    assert h.driver.calls['delete_template'] == 1


# -- deletion, GC, eviction -------------------------------------------------

def test_template_with_snapshots_is_kept(conf):
    h = Harness(conf)
    image_id = new_id()
    info = h.prepare(image_id)
    with pytest.raises(exception.TemplateInUse):
        h.manager.release_template(image_id)
    assert h.manager.collect_garbage(0) == []
    h.manager.delete_snapshot(info['data']['instance_id'])
    assert h.manager.collect_garbage(0) == [image_id]
    assert h.driver.templates == {}


def test_gc_skips_a_template_under_repair(conf):
    h = Harness(conf)
    image_id = new_id()
    info = h.prepare(image_id)
    h.manager.delete_snapshot(info['data']['instance_id'])
    gate = h.driver.gates['ensure_template'] = threading.Event()
    h.driver.healthy[image_id] = False
    conf.set_override('template_grace_period', 3600, group='agent')
    h.manager.housekeeping()
    _wait_for(lambda: h.driver.in_flight['ensure_template'] == 1)
    assert h.manager.collect_garbage(0) == []
    gate.set()
    h.drain()
    assert h.manager.collect_garbage(0) == [image_id]


def test_eviction_removes_least_recently_used_idle_templates(conf):
    conf.set_override('size_limit_mb', 3, group='cache')
    h = Harness(conf)
    old, recent, busy = new_id(), new_id(), new_id()
    for image_id in (old, recent):
        info = h.prepare(image_id)
        h.manager.delete_snapshot(info['data']['instance_id'])
        h.driver.usage[image_id] = 1 << 20
    h.prepare(busy)
    h.driver.usage[busy] = 1 << 20
    h.manager.templates[old].record.last_used_at -= 100
    h.prepare()
    assert old not in h.manager.templates
    assert recent in h.manager.templates and busy in h.manager.templates


def test_cache_full_when_nothing_is_idle(conf):
    conf.set_override('size_limit_mb', 1, group='cache')
    h = Harness(conf)
    image_id = new_id()
    h.prepare(image_id)
    h.driver.usage[image_id] = 2 << 20
    with pytest.raises(exception.CacheFull):
        h.prepare()


# -- snapshots --------------------------------------------------------------

def test_snapshot_in_use_is_not_deleted(conf):
    h = Harness(conf)
    info = h.prepare()
    instance_id = info['data']['instance_id']
    h.driver.users[instance_id] = 'qemu pid 4242 has it open'
    with pytest.raises(exception.SnapshotInUse) as error:
        h.manager.delete_snapshot(instance_id)
    assert '4242' in str(error.value)
    assert instance_id in h.driver.snapshot_layers
    assert record_on_disk(conf, 'snapshots', instance_id)['state'] == 'ready'
    del h.driver.users[instance_id]
    h.manager.delete_snapshot(instance_id)
    assert instance_id not in h.driver.snapshot_layers


def test_snapshot_waits_for_a_repair_of_its_template(conf):
    h = Harness(conf)
    image_id = new_id()
    h.prepare(image_id)
    gate = h.driver.gates['ensure_template'] = threading.Event()
    h.driver.healthy[image_id] = False
    h.manager.housekeeping()
    _wait_for(lambda: h.driver.in_flight['ensure_template'] == 1)
    created = []
    t = threading.Thread(target=lambda: created.append(
        h.manager.create_snapshot(image_id, new_id())))
    t.start()
    time.sleep(0.1)
    assert created == [] and h.driver.calls['create_snapshot'] == 1
    gate.set()
    t.join(10)
    assert len(created) == 1
    assert h.driver.log.index(('ensure_template', image_id)) < \
        len(h.driver.log) - 1


def test_same_instance_twice_is_refused(conf):
    h = Harness(conf)
    image_id, instance_id = new_id(), new_id()
    h.prepare(image_id, instance_id)
    with pytest.raises(exception.SnapshotExists):
        h.manager.create_snapshot(image_id, instance_id)
    assert h.driver.calls['create_snapshot'] == 1


# -- restart and recovery ---------------------------------------------------

def test_restart_restores_ready_templates_and_their_snapshots(conf):
    h = Harness(conf)
    image_id, instance_id = new_id(), new_id()
    h.prepare(image_id, instance_id)
    again = h.restart()
    again.drain()
    assert again.manager.templates[image_id].record.state == 'ready'
    assert again.driver.calls['ensure_template'] == 1
    assert again.driver.calls['ensure_snapshot'] == 1
    assert again.manager.templates[image_id].record.driver_state == {
        'generation': 2}
    assert again.manager.templates[image_id].snapshots == {instance_id}


def test_restart_undoes_unfinished_creates_and_deletes(conf):
    h = Harness(conf)
    creating, deleting, snap_creating = new_id(), new_id(), new_id()
    h.prepare(deleting)
    keep = h.prepare()
    store = h.manager.store
    store.save_template(records.Template(
        image_id=creating, origin=records.Endpoint.from_dict(
            fakes.origin_for(creating)), size=fakes.SIZE,
        image_format='raw', driver='fake'))
    record = h.manager.templates[deleting].record
    for instance_id in list(h.manager.templates[deleting].snapshots):
        h.manager.delete_snapshot(instance_id)
    record.state = 'deleting'
    store.save_template(record)
    store.save_snapshot(records.Snapshot(
        instance_id=snap_creating, image_id=keep['data']['image_id']))
    again = h.restart()
    again.drain()
    assert creating not in again.manager.templates
    assert deleting not in again.manager.templates
    assert snap_creating not in again.manager.snapshots
    assert keep['data']['instance_id'] in again.manager.snapshots
    assert sorted(os.listdir(os.path.join(conf.agent.state_path,
                                          'templates'))) == [
        keep['data']['image_id']]


def test_unreadable_records_go_to_lost_and_found_never_away(conf):
    h = Harness(conf)
    good = h.prepare()
    bad_image, bad_instance = new_id(), new_id()
    h.prepare(bad_image, bad_instance)
    h.manager.stop()
    state = conf.agent.state_path
    with open(os.path.join(state, 'templates', bad_image,
                           'record.json'), 'w') as f:
        f.write('{"image_id": "trunc')
    os.remove(os.path.join(state, 'snapshots', bad_instance, 'record.json'))
    with open(os.path.join(state, 'snapshots', bad_instance,
                           'overlay.qcow2'), 'wb') as f:
        f.write(b'the VM wrote this')
    again = h.restart()
    assert good['data']['instance_id'] in again.manager.snapshots
    assert bad_image not in again.manager.templates
    lost = sorted(os.listdir(os.path.join(state, 'lost+found')))
    assert [n.split('-')[0] for n in lost] == ['snapshot', 'template']
    kept = [n for n in lost if n.startswith('snapshot-')][0]
    with open(os.path.join(state, 'lost+found', kept,
                           'overlay.qcow2'), 'rb') as f:
        assert f.read() == b'the VM wrote this'
    with open(os.path.join(state, 'lost+found', kept, 'REASON')) as f:
        assert 'no record.json' in f.read()


def test_repair_on_a_dead_parent_falls_back_to_the_origin(conf):
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.api.parents[image_id] = ('node-b', {'host': '192.0.2.20',
                                          'port': 10811,
                                          'export': image_id})
    h.prepare(image_id)
    calls = []

    def ensure(template, template_dir):
        calls.append(template.source.node)
        if not template.source.is_origin:
            raise exception.SourceUnavailable(target='t', portal='p',
                                              reason='gone')
        return fakes.base.TemplateBuild(h.driver._export(template), None)
    h.driver.ensure_template = ensure
    h.driver.healthy[image_id] = False
    h.driver.answers['node-b'] = False
    h.manager.housekeeping()
    h.drain()
    assert calls == ['node-b', records.ORIGIN]
    assert h.manager.templates[image_id].record.source.is_origin
    assert ('report_parent_failure', image_id, 'node-a', 'node-b') in \
        h.api.log


def test_repair_failing_under_a_serving_parent_keeps_the_parent(conf):
    # This host's own export failed (its tgtd died): the parent still
    # answers, so the template neither moves to the origin nor reports
    # it, even when the parent is too slow to list its targets.
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.api.parents[image_id] = ('node-b', {'host': '192.0.2.20',
                                          'port': 10811,
                                          'export': image_id})
    h.prepare(image_id)
    h.driver.fail['ensure_template'] = exception.BackendError(
        reason='tgtd is not reachable')
    h.driver.ready['node-b'] = False
    h.driver.healthy[image_id] = False
    h.manager.housekeeping()
    h.drain()
    assert h.driver.calls['ensure_template'] == 1
    record = h.manager.templates[image_id].record
    assert record.source.node == 'node-b'
    assert record.relay.parent == 'node-b'
    assert 'report_parent_failure' not in h.api.calls
    # Once the export can be made again, the next round repairs it.
    del h.driver.fail['ensure_template']
    h.manager.housekeeping()
    h.drain()
    assert h.driver.calls['ensure_template'] == 2
    assert h.driver.templates[image_id][0].node == 'node-b'
    assert 'report_parent_failure' not in h.api.calls


# -- periodic work ----------------------------------------------------------

def test_flush_skips_busy_templates_and_runs_in_the_background(conf):
    h = Harness(conf)
    image_id = new_id()
    h.prepare(image_id)
    h.manager.flush()
    h.drain()
    assert h.driver.calls['flush_template'] == 1
    gate = h.driver.gates['flush_template'] = threading.Event()
    h.manager.flush()
    _wait_for(lambda: h.driver.in_flight['flush_template'] == 1)
    # A flush still running is not queued twice.
    h.manager.flush()
    gate.set()
    h.drain()
    assert h.driver.calls['flush_template'] == 2


def test_flush_of_a_template_an_exclusive_operation_waits_for_is_skipped(
        conf, caplog):
    # A re-parent waiting for the template: the flush queued just before
    # gives way quietly (no error, no traceback) and flushes next time.
    h = Harness(conf)
    image_id = new_id()
    h.prepare(image_id)
    entry = h.manager.templates[image_id]
    entry.exclusive_waiting = 1
    h.manager.flush()
    h.drain()
    assert h.driver.calls['flush_template'] == 0
    assert not [r for r in caplog.records if r.levelname == 'ERROR']
    entry.exclusive_waiting = 0
    h.manager.flush()
    h.drain()
    assert h.driver.calls['flush_template'] == 1


def test_status_reads_without_blocking_on_a_busy_template(conf):
    h = Harness(conf)
    image_id = new_id()
    h.prepare(image_id)
    gate = h.driver.gates['ensure_template'] = threading.Event()
    h.driver.healthy[image_id] = False
    h.manager.housekeeping()
    _wait_for(lambda: h.driver.in_flight['ensure_template'] == 1)
    started = time.monotonic()
    status = h.manager.get_status()
    assert time.monotonic() - started < 5
    assert status['templates'][0]['busy'] == 'repair'
    assert 'bytes_fetched' not in status['templates'][0]
    gate.set()
    h.drain()
    status = h.manager.get_status()
    assert status['templates'][0]['bytes_fetched'] == 7


# -- disk space -------------------------------------------------------------

MIB = 1 << 20


def _template_dirs(conf):
    return sorted(os.listdir(os.path.join(conf.agent.state_path,
                                          'templates')))


def _space(conf, reserve_mb=1, reserve_percent=0):
    conf.set_override('reserve_mb', reserve_mb, group='cache')
    conf.set_override('reserve_percent', reserve_percent, group='cache')


def test_template_that_would_not_fit_in_free_space_is_refused(conf):
    # 4 MiB of disk, 1 kept in reserve: room for three 1 MiB caches at
    # full size, though none has cached a byte yet (a VM's or a child's
    # reads, or NBD_CMD_CACHE, may fill each of them later).
    _space(conf)
    h = Harness(conf, relay=True, fs_total=4 * MIB)
    kept = [h.prepare()['data']['image_id'] for _ in range(3)]
    assert h.driver.usage == {}
    image_id = new_id()
    joins = h.api.calls['join']
    with pytest.raises(exception.InsufficientDiskSpace) as error:
        h.prepare(image_id)
    assert error.value.client_error
    assert isinstance(error.value, exception.CacheFull)
    assert error.value.message == (
        'No room for the template of image %s on this host: its cache may '
        'grow to 1 MiB and the other templates\' caches by 3 MiB more, but '
        '4 MiB of the state file system are free and 1 MiB of it is kept '
        'in reserve; no idle template is left to evict.' % image_id)
    # Nothing was created: no data plane, record, directory or tree place.
    assert h.driver.calls['create_template'] == 3
    assert image_id not in h.manager.templates
    assert _template_dirs(conf) == sorted(kept)
    assert h.api.calls['join'] == joins
    # Caches that fill take their space from the free space, and what
    # they may still grow by shrinks by as much: the answer is the same.
    for i in kept:
        h.driver.usage[i] = MIB // 2
    with pytest.raises(exception.InsufficientDiskSpace):
        h.prepare(image_id)
    # A template whose cache is full commits nothing more.
    for i in kept:
        h.driver.usage[i] = MIB
    h.fs.total = 5 * MIB
    h.prepare(image_id)


def test_reserve_is_the_larger_of_its_size_and_its_share(conf):
    _space(conf, reserve_mb=1, reserve_percent=25)
    h = Harness(conf, fs_total=8 * MIB)
    # 25 % of 8 MiB: 2 MiB kept, room for 6 caches of 1 MiB.
    for _ in range(6):
        h.prepare()
    with pytest.raises(exception.InsufficientDiskSpace) as error:
        h.prepare()
    assert '2 MiB of it is kept in reserve' in error.value.message


def test_size_limit_counts_what_caches_may_grow_to(conf):
    # Two templates that cached nothing yet commit 2 MiB of the 2 MiB
    # limit: a third would let the caches grow to 3 MiB.
    conf.set_override('size_limit_mb', 2, group='cache')
    h = Harness(conf)
    kept = [h.prepare()['data']['image_id'] for _ in range(2)]
    image_id = new_id()
    with pytest.raises(exception.CacheLimitExceeded) as error:
        h.prepare(image_id)
    assert error.value.client_error
    assert isinstance(error.value, exception.CacheFull)
    assert error.value.message == (
        'No room for the template of image %s on this host: its cache may '
        'grow to 1 MiB and the other templates\' caches to 2 MiB, over '
        '[cache] size_limit_mb (2 MiB); no idle template is left to '
        'evict.' % image_id)
    assert h.driver.calls['create_template'] == 2
    assert _template_dirs(conf) == sorted(kept)


def test_the_driver_says_what_a_cache_may_grow_to(conf):
    # A cache larger than the image (qcow2 metadata, a kernel cache file
    # twice the image): the driver's figure counts, not the image size.
    _space(conf)
    h = Harness(conf, fs_total=4 * MIB)
    first = new_id()
    h.driver.capacity[first] = 2 * MIB
    h.prepare(first)
    h.prepare()
    with pytest.raises(exception.InsufficientDiskSpace):
        h.prepare()


def test_a_cache_whose_capacity_is_unknown_counts_conservatively(
        conf, monkeypatch):
    h = Harness(conf)
    image_id = h.prepare()['data']['image_id']

    def unknown(template, template_dir):
        raise exception.BackendError(reason='no layout')
    monkeypatch.setattr(h.driver, 'cache_capacity', unknown)
    assert h.manager.get_status()['cache']['committed_bytes'] == (
        2 * fakes.SIZE + (1 << 30))
    assert image_id in h.manager.templates


def test_admission_evicts_idle_templates_least_recently_used_first(conf):
    _space(conf)
    h = Harness(conf, fs_total=4 * MIB)
    old, recent, busy = new_id(), new_id(), new_id()
    snaps = {}
    for image_id in (old, recent, busy):
        snaps[image_id] = h.prepare(image_id)['data']['instance_id']
    for image_id in (old, recent):
        h.manager.delete_snapshot(snaps[image_id])
    h.manager.templates[old].record.last_used_at -= 100
    # The grace period has not passed: admission collects them anyway,
    # the least recently used first, and only as many as it needs.
    new = h.prepare()['data']['image_id']
    assert set(h.manager.templates) == {recent, busy, new}
    newer = h.prepare()['data']['image_id']
    assert set(h.manager.templates) == {busy, new, newer}
    # Everything left is in use: refused, and nothing in use removed.
    with pytest.raises(exception.InsufficientDiskSpace):
        h.prepare()
    assert set(h.manager.templates) == {busy, new, newer}
    assert h.driver.snapshot_layers[snaps[busy]] == busy
    assert snaps[busy] in h.manager.snapshots


def test_concurrent_admissions_never_commit_more_than_the_disk(conf):
    # Eight prepares at once with room for three: each admission counts
    # the templates admitted before it, built or still being built, so
    # the disk is never promised twice, and exactly three get it.
    _space(conf)
    h = Harness(conf, fs_total=4 * MIB)
    gate = h.driver.gates['create_template'] = threading.Event()
    threading.Timer(0.5, gate.set).start()
    results, errors = run_threads(8, lambda i: h.prepare())
    ready = [r for r in results if r is not None]
    assert len(ready) == 3
    assert all(isinstance(e, exception.InsufficientDiskSpace)
               for e in errors if e is not None)
    assert len(h.manager.templates) == len(ready)
    assert h.driver.calls['create_template'] == len(ready)


def _full_disk(h, monkeypatch):
    """Every record write fails as it does on a full disk."""
    def enospc(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(h.manager.store, 'save_template', enospc)
    monkeypatch.setattr(h.manager.store, 'save_snapshot', enospc)


def test_status_housekeeping_and_stop_work_on_a_full_disk(conf, monkeypatch):
    h = Harness(conf)
    image_id = new_id()
    h.prepare(image_id)
    saved = record_on_disk(conf, 'templates', image_id)
    _full_disk(h, monkeypatch)
    status = h.manager.get_status()
    assert status['templates'][0]['state'] == 'ready'
    assert status['templates'][0]['bytes_fetched'] == 7
    # Housekeeping saves last_used_at lazily: it tries, keeps the change
    # and tries again next time.
    h.manager._touch(h.manager.templates[image_id])
    h.manager.housekeeping()
    assert h.manager.templates[image_id].dirty
    h.manager.stop()
    assert record_on_disk(conf, 'templates', image_id) == saved
    assert h.manager.templates[image_id].dirty
    monkeypatch.undo()
    h.manager.housekeeping()
    assert not h.manager.templates[image_id].dirty
    assert record_on_disk(conf, 'templates', image_id) != saved


def test_gc_frees_space_when_no_record_can_be_saved(conf, monkeypatch):
    # Deleting is what frees space: a DELETING record that cannot be
    # written does not stop it (a crash midway leaves a READY record,
    # which the next start restores from whatever is left).
    h = Harness(conf)
    idle, busy = new_id(), new_id()
    info = h.prepare(idle)
    h.manager.delete_snapshot(info['data']['instance_id'])
    h.prepare(busy)
    _full_disk(h, monkeypatch)
    assert h.manager.collect_garbage(0) == [idle]
    assert _template_dirs(conf) == [busy]


def test_build_whose_record_cannot_be_saved_leaves_nothing(conf, monkeypatch):
    h = Harness(conf)
    _full_disk(h, monkeypatch)
    image_id = new_id()
    with pytest.raises(exception.RecordNotSaved) as error:
        h.prepare(image_id)
    assert 'No space left on device' in error.value.message
    assert image_id not in h.manager.templates
    assert h.driver.templates == {}
    assert _template_dirs(conf) == []


def test_build_is_undone_when_its_ready_record_cannot_be_saved(
        conf, monkeypatch):
    # A template whose record still says CREATING would be removed at the
    # next start under a VM: Nova gets an error instead, and nothing stays.
    h = Harness(conf)
    store = h.manager.store
    real = store.save_template

    def fail_ready(template):
        if template.state == 'ready':
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(template)
    monkeypatch.setattr(store, 'save_template', fail_ready)
    image_id = new_id()
    with pytest.raises(exception.RecordNotSaved):
        h.prepare(image_id)
    assert h.driver.calls['create_template'] == 1
    assert h.driver.templates == {}
    assert image_id not in h.manager.templates
    assert _template_dirs(conf) == []


def test_snapshot_whose_record_cannot_be_saved_is_refused(conf, monkeypatch):
    h = Harness(conf)
    image_id = new_id()
    h.prepare(image_id)
    _full_disk(h, monkeypatch)
    instance_id = new_id()
    with pytest.raises(exception.RecordNotSaved):
        h.manager.create_snapshot(image_id, instance_id)
    assert instance_id not in h.manager.snapshots
    assert instance_id not in h.driver.snapshot_layers


def test_status_reports_the_space_of_the_state_file_system(conf):
    _space(conf, reserve_mb=1)
    h = Harness(conf, fs_total=8 * MIB)
    image_id = new_id()
    h.prepare(image_id)
    h.driver.usage[image_id] = MIB // 4
    cache = h.manager.get_status()['cache']
    assert cache['used_bytes'] == MIB // 4
    assert cache['committed_bytes'] == MIB
    assert cache['free_bytes'] == 8 * MIB - MIB // 4
    assert cache['reserve_bytes'] == MIB
    assert cache['uncached_bytes'] == MIB - MIB // 4


# -- deadlines ---------------------------------------------------------------

def test_a_hung_parent_probe_counts_as_a_failure_by_its_deadline(conf):
    conf.set_override('parent_probe_timeout', 1, group='relay')
    conf.set_override('parent_failures', 5, group='relay')
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.api.parents[image_id] = ('node-b', {'host': '192.0.2.20',
                                          'port': 10811,
                                          'export': image_id})
    h.prepare(image_id)
    gate = h.driver.gates['source_answers'] = threading.Event()
    try:
        started = time.monotonic()
        h.manager.probe_parents()
        took = time.monotonic() - started
        assert h.manager.templates[image_id].record.relay.failures == 1
        assert took < 1 + manager_mod.PROBE_MARGIN + 1
    finally:
        gate.set()


def test_status_answers_by_its_deadline_while_a_stats_call_hangs(
        conf, monkeypatch):
    monkeypatch.setattr(manager_mod, 'STATUS_WAIT', 0.5, raising=False)
    h = Harness(conf)
    slow, fast = new_id(), new_id()
    h.prepare(slow)
    h.prepare(fast)
    h.driver.template_stats = _slow_stats(h.driver, slow)
    gate = h.driver.gates['slow_stats'] = threading.Event()
    try:
        started = time.monotonic()
        status = h.manager.get_status()
        assert time.monotonic() - started < 3
        by_id = {t['image_id']: t for t in status['templates']}
        assert 'bytes_fetched' not in by_id[slow]
        assert by_id[slow]['error'] == (
            'its figures did not come within 0.5 s')
        assert by_id[fast]['bytes_fetched'] == 7
        # The hung call is not asked again while it runs.
        h.manager.get_status()
        assert h.driver.calls['slow_stats'] == 1
    finally:
        gate.set()


def _slow_stats(driver, image_id):
    real = driver.template_stats

    def stats(template, template_dir):
        if template.image_id == image_id:
            driver._enter('slow_stats', template)
        return real(template, template_dir)
    return stats


def test_stop_gives_up_on_a_hung_flush_by_its_deadline(conf, monkeypatch):
    monkeypatch.setattr(manager_mod, 'STOP_FLUSH_WAIT', 0.5,
                        raising=False)
    h = Harness(conf)
    image_ids = [new_id() for _ in range(3)]
    for image_id in image_ids:
        h.prepare(image_id)
    gate = h.driver.gates['flush_template'] = threading.Event()
    try:
        h.manager._touch(h.manager.templates[image_ids[0]])
        started = time.monotonic()
        h.manager.stop()
        assert time.monotonic() - started < 3
        # The flushes ran side by side, and records were saved after.
        assert h.driver.max_in_flight['flush_template'] == 3
        assert not h.manager.templates[image_ids[0]].dirty
    finally:
        gate.set()


# -- relay export admission (set_children) and tree_changed hints ----------

def test_children_reach_the_driver_from_join_heartbeat_and_restart(conf):
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.api.children[image_id] = ['node-c']
    h.prepare(image_id)
    h.drain()
    assert h.driver.admitted[image_id] == ['node-c']
    h.api.children[image_id] = ['node-c', 'node-d']
    h.manager.heartbeat()
    h.drain()
    assert h.driver.admitted[image_id] == ['node-c', 'node-d']
    calls = h.driver.calls['set_children']
    # The same answer again: nothing to change.
    h.manager.heartbeat()
    h.drain()
    assert h.driver.calls['set_children'] == calls
    # A restarted agent re-adopts the export and gives it the list again.
    h.driver.admitted.clear()
    h = h.restart()
    h.drain()
    assert h.driver.admitted[image_id] == ['node-c', 'node-d']


def test_a_child_the_coordinator_stops_listing_keeps_access_a_grace(conf):
    """A restarted coordinator answers with no children until their
    heartbeats reach it: the export keeps a dropped child for [coordinator]
    node_timeout, and a new one is admitted at once."""
    conf.set_override('node_timeout', 2, group='coordinator')
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.api.children[image_id] = ['node-c', 'node-d']
    h.prepare(image_id)
    h.drain()
    assert h.driver.admitted[image_id] == ['node-c', 'node-d']
    h.api.children[image_id] = ['node-e']
    h.manager.heartbeat()
    h.drain()
    assert h.driver.admitted[image_id] == ['node-c', 'node-d', 'node-e']
    time.sleep(2.1)
    h.manager.heartbeat()
    h.drain()
    assert h.driver.admitted[image_id] == ['node-e']


def test_a_tree_changed_hint_asks_the_coordinator_at_once(conf):
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.prepare(image_id)
    h.drain()
    h.api.children[image_id] = ['node-e']
    started = time.monotonic()
    h.manager.refresh_placement(image_id)
    _wait_for(lambda: h.driver.admitted.get(image_id) == ['node-e'])
    assert time.monotonic() - started < 0.5
    assert h.api.calls['get_placement'] == 1


def test_a_flood_of_hints_is_coalesced_and_rate_limited(conf):
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.prepare(image_id)
    h.drain()
    started = time.monotonic()
    for n in range(200):
        h.api.children[image_id] = ['node-%d' % n]
        h.manager.refresh_placement(image_id)
    _wait_for(lambda: h.driver.admitted.get(image_id) == ['node-199'])
    h.drain()
    elapsed = time.monotonic() - started
    # One call at once, then one per REFRESH_INTERVAL for what came
    # meanwhile; the last answer is applied.
    assert 1 <= h.api.calls['get_placement'] <= 2 + elapsed / (
        manager_mod.REFRESH_INTERVAL)
    assert h.api.calls['get_placement'] <= 3


def test_hints_about_unknown_images_cost_nothing(conf):
    h = Harness(conf, relay=True)
    h.manager.refresh_placement(new_id())
    with pytest.raises(exception.InvalidImageId):
        h.manager.refresh_placement('../../etc')
    h.drain()
    assert h.api.calls['get_placement'] == 0


def test_a_hint_changes_nothing_the_coordinator_does_not_say(conf):
    """Anyone may send the hint: the answer, not the hint, is applied."""
    h = Harness(conf, relay=True)
    image_id = new_id()
    h.api.children[image_id] = ['node-c']
    h.prepare(image_id)
    h.drain()
    calls = h.driver.calls['set_children']
    h.manager.refresh_placement(image_id)
    _wait_for(lambda: h.api.calls['get_placement'] == 1)
    h.drain()
    assert h.driver.calls['set_children'] == calls
    assert h.driver.admitted[image_id] == ['node-c']
    assert h.driver.calls['set_sources'] == 0
