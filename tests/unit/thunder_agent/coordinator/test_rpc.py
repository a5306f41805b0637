"""Client and endpoint over oslo.messaging's in-process fake driver."""

import threading
import time
import uuid

import oslo_messaging as messaging
import pytest

from tests.unit.thunder_agent.coordinator import fixtures as fx
from thunder_agent.coordinator import ORIGIN
from oslo_config import cfg
from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent import exception
from thunder_agent import rpc


@pytest.fixture(scope='module')
def server():
    # The global config: oslo.messaging registers some of its options
    # (tracing) there only.
    transport = rpc.get_transport(cfg.CONF, 'fake:/')
    topic = 'coordinator-%s' % uuid.uuid4().hex[:8]
    server = coordinator_rpc.get_server(transport, fx.make_manager(), topic,
                                        'coordinator-host')
    server.start()
    yield transport, topic, server.dispatcher.endpoints[0]
    # Stopping polls for a second: once per module, not per test.
    server.stop()
    server.wait()
    transport.cleanup()


@pytest.fixture
def api(server):
    transport, topic, endpoint = server
    endpoint.manager = fx.make_manager(fan_out=2)
    return coordinator_rpc.CoordinatorAPI(transport, topic=topic, timeout=10)


def test_round_trip_of_every_call(api):
    for i in range(1, 4):
        answer = api.join(fx.IMAGE, 'h%d' % i, fx.address('h%d' % i),
                          fx.ORIGIN_INFO)
    assert answer == {'parents': [{'node': 'h1',
                                   'address': fx.address('h1')}],
                      'depth': 2, 'children': [], 'child_hosts': {}}
    beat = api.heartbeat('h3', {fx.IMAGE: fx.entry('h3', ['h1'])})
    assert beat == {fx.IMAGE: answer}
    assert api.list_trees() == {fx.IMAGE: {'nodes': 3, 'height': 2}}
    assert api.get_tree(fx.IMAGE)['nodes']['h3']['parents'] == ['h1']
    assert api.report_parent_failure(fx.IMAGE, 'h3', 'h1') == {
        'parents': [fx.ORIGIN_INFO], 'depth': 1, 'children': [],
        'child_hosts': {}}
    assert api.leave(fx.IMAGE, 'h2') == {'pending_children': []}
    assert sorted(api.get_tree(fx.IMAGE)['nodes']) == ['h3']


@pytest.mark.parametrize('call,kwargs,error', [
    ('join', dict(image_id='nope', node='h1', address=fx.address('h1'),
                  origin=fx.ORIGIN_INFO), exception.InvalidImageId),
    ('join', dict(image_id=fx.IMAGE, node='h 1', address=fx.address('h1'),
                  origin=fx.ORIGIN_INFO), exception.InvalidNodeId),
    ('join', dict(image_id=fx.IMAGE, node='h1', address={'port': 1},
                  origin=fx.ORIGIN_INFO), exception.InvalidAddress),
    ('heartbeat', dict(node='h1', templates={fx.IMAGE: {'state': 'x'}}),
     exception.InvalidHeartbeat),
    ('heartbeat', dict(node='h1', templates={
        fx.IMAGE: fx.entry('h1', ['@elsewhere'])}), exception.InvalidNodeId),
    ('leave', dict(image_id=fx.IMAGE, node='h1'),
     exception.ImageTreeNotFound),
    ('report_parent_failure', dict(image_id=fx.IMAGE, node='h1',
                                   parent=ORIGIN),
     exception.ImageTreeNotFound),
    ('get_tree', dict(image_id=str(uuid.uuid4())),
     exception.ImageTreeNotFound),
])
def test_errors_arrive_typed(api, call, kwargs, error):
    with pytest.raises(error) as info:
        getattr(api, call)(**kwargs)
    assert info.value.message
    assert api.list_trees() == {}


def test_unknown_node_in_existing_tree(api):
    api.join(fx.IMAGE, 'h1', fx.address('h1'), fx.ORIGIN_INFO)
    with pytest.raises(exception.NodeNotInTree) as info:
        api.leave(fx.IMAGE, 'h2')
    assert 'h2' in str(info.value)
    assert sorted(api.get_tree(fx.IMAGE)['nodes']) == ['h1']


class _Agent:
    def __init__(self):
        self.told = []
        self.event = threading.Event()

    def tree_changed(self, ctxt, image_id):
        self.told.append(image_id)
        self.event.set()


def test_agent_notifier_casts_at_most_every_interval_and_flushes():
    transport = rpc.get_transport(cfg.CONF, 'fake:/')
    topic = 'agent-%s' % uuid.uuid4().hex[:8]
    agent = _Agent()
    server = messaging.get_rpc_server(
        transport, messaging.Target(topic=topic, server='h1'), [agent])
    server.start()
    clock = fx.Clock()
    try:
        notify = coordinator_rpc.AgentNotifier(transport, topic, 0.2, clock)
        for _ in range(10):
            notify([('h1', fx.IMAGE)])
        assert agent.event.wait(10)
        # Once within the interval; the rest is held back, not lost.
        agent.event.clear()
        notify.flush()
        time.sleep(0.2)
        assert agent.told == [fx.IMAGE]
        clock.advance(0.2)
        notify.flush()
        assert agent.event.wait(10)
        assert agent.told == [fx.IMAGE, fx.IMAGE]
        # Nothing pending: a flush later casts nothing.
        clock.advance(1)
        notify.flush()
        time.sleep(0.2)
        assert agent.told == [fx.IMAGE, fx.IMAGE]
    finally:
        server.stop()
        server.wait()
        transport.cleanup()
