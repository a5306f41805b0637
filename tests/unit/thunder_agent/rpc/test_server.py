"""The endpoint keeps an origin's detail out of what the caller gets.

Over oslo.messaging's fake driver, as nova-compute sees the agent: the
error class, its message and the remote traceback that comes with it.
"""

import logging
import uuid

from oslo_config import cfg
import pytest

from thunder_agent import exception
from thunder_agent import rpc
from thunder_agent.rpc import api
from thunder_agent.rpc import server

# What qemu-img said about an "origin" that is an SSH server on the
# management network (recorded on today's main).
PROBE_ERROR = (
    'qemu-img info failed: qemu-img: Could not open \'json:{"driver": '
    '"raw", "file": {"driver": "nbd", "server": {"type": "inet", "host": '
    '"10.20.0.7", "port": "22"}, "export": "", "read-only": true}}\': Bad '
    'initial magic received: 0x5353482d322e302d')
SECRET_WORDS = ('10.20.0.7', 'magic', '5353482d', 'qemu-img', 'json:',
                '/srv/glance/images')


class FailingManager:
    """Raises what the manager raises for a bad origin."""

    def __init__(self):
        self.error = None

    def prepare(self, image_id, origin, size, image_format, instance_id):
        raise self.error

    def prepare_template(self, image_id, origin, size, image_format):
        raise self.error


@pytest.fixture
def agent():
    transport = rpc.get_transport(cfg.CONF, 'fake:/')
    manager = FailingManager()
    srv = server.get_server(transport, manager, 'thunder-agent', 'node-1')
    srv.start()
    yield api.AgentAPI(transport, topic='thunder-agent', timeout=10), manager
    srv.stop()
    srv.wait()


def _call(client, method, image):
    origin = {'driver_volume_type': 'nbd',
              'data': {'host': '10.20.0.7', 'port': 22, 'export': ''}}
    if method == 'prepare':
        return client.prepare('node-1', image, origin, 512, 'raw',
                              str(uuid.uuid4()))
    return client.prepare_template('node-1', image, origin, 512, 'raw')


def _raise_probe_error(image):
    try:
        # As the qemu driver builds it: from a BackendError, with the
        # export (or node) as "image_id".
        try:
            raise exception.BackendError(reason=PROBE_ERROR)
        except exception.BackendError as e:
            raise exception.OriginUnavailable(
                image_id='@origin', reason=e.kwargs['reason'])
    except exception.OriginUnavailable as e:
        return e


@pytest.mark.parametrize('method', ['prepare', 'prepare_template'])
def test_probe_errors_reach_the_caller_without_detail(agent, method, caplog):
    client, manager = agent
    image = str(uuid.uuid4())
    manager.error = _raise_probe_error(image)
    caplog.set_level(logging.WARNING, logger='thunder_agent.rpc.server')
    with pytest.raises(exception.OriginUnavailable) as e:
        _call(client, method, image)
    assert isinstance(e.value, exception.OriginUnreadable)
    assert e.value.message == ('Origin of image %s cannot be read on this '
                               'host.' % image)
    assert e.value.kwargs == {'image_id': image}
    # str() holds the remote traceback too: everything the caller got.
    for word in SECRET_WORDS:
        assert word not in str(e.value), word
    # The operator has it all in the agent's log.
    assert PROBE_ERROR in caplog.text and image in caplog.text


def test_origin_mismatch_does_not_describe_the_origins(agent, caplog):
    client, manager = agent
    image = str(uuid.uuid4())
    manager.error = exception.TemplateMismatch(
        image_id=image, field='origin',
        existing={'driver_volume_type': 'file',
                  'data': {'path': '/srv/glance/images/' + image}},
        asked={'driver_volume_type': 'nbd', 'data': {'host': '10.20.0.7'}})
    caplog.set_level(logging.WARNING, logger='thunder_agent.rpc.server')
    with pytest.raises(exception.TemplateMismatch) as e:
        _call(client, 'prepare', image)
    assert e.value.message == ('A template for image %s already exists on '
                               'this host with a different origin.' % image)
    assert e.value.kwargs == {'image_id': image, 'field': 'origin'}
    for word in SECRET_WORDS:
        assert word not in str(e.value), word
    assert '/srv/glance/images/' + image in caplog.text


@pytest.mark.parametrize('error', [
    # Already generic.
    exception.OriginNotAllowed(image_id='i'),
    exception.OriginUnreadable(image_id='i'),
    # The image's own content: its owner is told why.
    exception.UnsafeImage(image_id='i', reason='it has a backing file'),
    # The caller's own values: kept as they are.
    exception.TemplateMismatch(image_id='i', field='size', existing=1024,
                               asked=512),
    exception.InvalidOrigin(reason="port 70000 is not valid"),
    exception.CacheFull(used=10, limit=5),
])
def test_other_errors_pass_unchanged(agent, error):
    client, manager = agent
    manager.error = error
    with pytest.raises(type(error)) as e:
        _call(client, 'prepare', str(uuid.uuid4()))
    assert e.value.message == error.message
    assert e.value.kwargs == error.kwargs
