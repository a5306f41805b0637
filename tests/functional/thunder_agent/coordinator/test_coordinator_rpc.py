"""A real thunder-coordinator over a real RabbitMQ broker."""

import subprocess
import sys
import time
import uuid

import pytest

from thunder_agent.coordinator import ORIGIN
from thunder_agent import exception
from thunder_lab.emulation import coordinator as coordinator_mod

pytestmark = pytest.mark.functional

HOSTS = ['host-%d' % i for i in range(1, 7)]
# Each test works on its own image: they share one coordinator process.
IMAGE = None
ORIGIN_INFO = None


@pytest.fixture(autouse=True)
def image():
    global IMAGE, ORIGIN_INFO
    IMAGE = str(uuid.uuid4())
    ORIGIN_INFO = {'driver_volume_type': 'nbd',
                   'data': {'host': '198.18.0.1', 'port': 10809,
                            'export': IMAGE}}


def address(node):
    return {'host': node, 'port': 10809, 'export': IMAGE}


def entry(node, parents):
    return {'address': address(node), 'origin': ORIGIN_INFO,
            'parents': parents, 'state': 'ready'}


def refs(tree):
    """{node: parents} as an agent would report them."""
    return {node: info['parents'] for node, info in tree['nodes'].items()}


@pytest.fixture(scope='module')
def coordinator(rabbit, tmp_path_factory):
    process = coordinator_mod.CoordinatorProcess(
        rabbit.transport_url, str(tmp_path_factory.mktemp('coordinator')),
        topic='coordinator-%s' % uuid.uuid4().hex[:8],
        # Unsigned calls, host names as relay hosts: the tree logic only
        # (test_coordinator_identity.py runs it with TLS).
        options={'coordinator': {'fan_out': 2, 'origin_fan_out': 2,
                                 'heartbeat_interval': 1,
                                 'node_timeout': 3},
                 'tls': {'enabled': 'false'}})
    yield process.start()
    process.stop()


def test_join_heartbeat_leave_over_rabbitmq(coordinator):
    api = coordinator.client
    answers = [api.join(IMAGE, h, address(h), ORIGIN_INFO) for h in HOSTS]
    assert [a['depth'] for a in answers] == [1, 1, 2, 2, 2, 2]
    assert answers[0]['parents'] == [ORIGIN_INFO]
    assert answers[5]['parents'] == [{'node': 'host-2',
                                      'address': address('host-2')}]
    tree = api.get_tree(IMAGE)
    assert tree['levels'] == 3
    assert tree['origin_children'] == ['host-1', 'host-2']

    beat = api.heartbeat('host-3', {IMAGE: entry('host-3', ['host-1'])})
    assert beat == {IMAGE: answers[2]}

    assert api.leave(IMAGE, 'host-1') == {
        'pending_children': ['host-3', 'host-4']}
    moved = api.heartbeat('host-3', {IMAGE: entry('host-3', ['host-1'])})
    assert moved[IMAGE]['parents'] == [ORIGIN_INFO]
    api.heartbeat('host-3', {IMAGE: entry('host-3', [ORIGIN])})
    api.heartbeat('host-4', {IMAGE: entry('host-4', ['host-3'])})
    assert 'host-1' not in api.get_tree(IMAGE)['nodes']


def test_typed_errors_over_rabbitmq_change_nothing(coordinator):
    api = coordinator.client
    api.join(IMAGE, 'host-1', address('host-1'), ORIGIN_INFO)
    before = api.get_tree(IMAGE)
    with pytest.raises(exception.InvalidAddress):
        api.join(IMAGE, 'host-2', {'host': 'host-2', 'port': 99999,
                                   'export': ''}, ORIGIN_INFO)
    with pytest.raises(exception.InvalidHeartbeat):
        api.heartbeat('host-1', {IMAGE: {'parents': [ORIGIN]}})
    with pytest.raises(exception.NodeNotInTree):
        api.report_parent_failure(IMAGE, 'host-9', 'host-1')
    with pytest.raises(exception.InvalidImageId):
        api.leave('../etc', 'host-1')
    after = api.get_tree(IMAGE)
    before['nodes']['host-1'].pop('last_seen_age')
    after['nodes']['host-1'].pop('last_seen_age')
    assert after == before


def test_restart_rebuilds_trees_from_heartbeats(coordinator):
    api = coordinator.client
    for h in HOSTS:
        api.join(IMAGE, h, address(h), ORIGIN_INFO)
    reported = refs(api.get_tree(IMAGE))

    coordinator.kill()
    coordinator.start()
    assert api.list_trees() == {}
    # Children report before their parents; every agent keeps its parents.
    for node in reversed(HOSTS):
        answer = api.heartbeat(node, {IMAGE: entry(node, reported[node])})
        got = [p.get('node', ORIGIN) for p in answer[IMAGE]['parents']]
        assert got == reported[node]
    assert refs(api.get_tree(IMAGE)) == reported
    # The rebuilt tree keeps filling breadth-first.
    assert api.join(IMAGE, 'host-7', address('host-7'),
                    ORIGIN_INFO)['depth'] == 3


def test_silent_node_times_out(coordinator):
    api = coordinator.client
    for h in HOSTS:
        api.join(IMAGE, h, address(h), ORIGIN_INFO)
    reported = refs(api.get_tree(IMAGE))
    # Everybody but host-2 keeps sending heartbeats every second.
    deadline = time.monotonic() + 15
    while 'host-2' in api.get_tree(IMAGE)['nodes']:
        assert time.monotonic() < deadline, 'host-2 never timed out'
        for node in HOSTS:
            if node != 'host-2':
                api.heartbeat(node, {IMAGE: entry(node, reported[node])})
        time.sleep(1)
    answer = api.heartbeat('host-5', {IMAGE: entry('host-5', ['host-2'])})
    assert answer[IMAGE]['parents'] == [ORIGIN_INFO]
    answer = api.heartbeat('host-6', {IMAGE: entry('host-6', ['host-2'])})
    assert answer[IMAGE]['parents'][0]['node'] == 'host-5'


def test_unknown_policy_fails_at_start(tmp_path):
    conf = tmp_path / 'bad.conf'
    conf.write_text('[coordinator]\npolicy = no-such-policy\n')
    result = subprocess.run(
        [sys.executable, '-m', 'thunder_agent.cmd.coordinator',
         '--config-file', str(conf)], capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 1
    assert "Unknown tree policy 'no-such-policy'; installed: kary" in (
        result.stdout + result.stderr)


def test_an_unreadable_ca_fails_at_start(tmp_path):
    conf = tmp_path / 'no-ca.conf'
    conf.write_text('[tls]\ncertificates_dir = %s\n' % (tmp_path / 'none'))
    result = subprocess.run(
        [sys.executable, '-m', 'thunder_agent.cmd.coordinator',
         '--config-file', str(conf)], capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 1
    assert 'Cannot read the CA of signed calls' in (
        result.stdout + result.stderr)
