"""RPC plumbing on oslo.messaging's fake driver: typed errors come back."""

import time
import uuid

from oslo_config import cfg
import oslo_messaging as messaging
import pytest

from thunder_agent import exception
from thunder_agent import rpc
from thunder_agent.rpc import api
from thunder_agent.rpc import server


class RecordingManager:
    def __init__(self):
        self.calls = []

    def prepare(self, *args):
        self.calls.append(('prepare', args))
        return {'driver_volume_type': 'thunder', 'data': {'args': args}}

    def delete_snapshot(self, instance_id):
        raise exception.SnapshotNotFound(instance_id=instance_id)

    def get_status(self):
        return {'host': 'h'}

    def refresh_placement(self, image_id):
        self.calls.append(('refresh_placement', (image_id,)))


@pytest.fixture
def client():
    transport = rpc.get_transport(cfg.CONF, 'fake:/')
    manager = RecordingManager()
    srv = server.get_server(transport, manager, 'thunder-agent', 'node-1')
    srv.start()
    yield api.AgentAPI(transport, topic='thunder-agent', timeout=10), manager
    srv.stop()
    srv.wait()


def test_call_reaches_the_manager(client):
    agent, manager = client
    image, instance = str(uuid.uuid4()), str(uuid.uuid4())
    result = agent.prepare('node-1', image, {'driver_volume_type': 'nbd'},
                           4096, 'raw', instance)
    assert result['driver_volume_type'] == 'thunder'
    assert manager.calls == [('prepare', (image, {'driver_volume_type':
                                                  'nbd'}, 4096, 'raw',
                                          instance))]


def test_typed_errors_cross_rpc(client):
    agent, _ = client
    instance = str(uuid.uuid4())
    with pytest.raises(exception.SnapshotNotFound) as e:
        agent.delete_snapshot('node-1', instance)
    assert instance in str(e.value)
    assert e.value.kwargs == {'instance_id': instance}


def test_unknown_host_times_out(client):
    agent, _ = client
    with pytest.raises(messaging.MessagingTimeout):
        agent.get_status('no-such-node', timeout=1)


def test_tree_changed_is_a_cast_that_reaches_the_manager(client):
    agent, manager = client
    image = str(uuid.uuid4())
    assert agent.tree_changed('node-1', image) is None
    deadline = time.monotonic() + 10
    while not manager.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager.calls == [('refresh_placement', (image,))]
