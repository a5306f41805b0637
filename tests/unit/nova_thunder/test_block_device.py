"""A thunder block device uses only the local agent's own disk."""

import copy

import pytest

from nova import objects

from nova_thunder import agent
from nova_thunder import block_device
from nova_thunder import exception
from tests.unit.nova_thunder import payloads
from tests.unit.nova_thunder.test_layout import INSTANCE
from tests.unit.nova_thunder.test_layout import OTHER_IMAGE
from tests.unit.nova_thunder.test_layout import OTHER_INSTANCE
from tests.unit.nova_thunder.test_layout import kernel_info
from tests.unit.nova_thunder.test_layout import qemu_info
from tests.unit.nova_thunder.test_marking import bdm

IMAGE = payloads.IMAGE_ID


class FakeClient:
    """nova_thunder.agent.AgentClient answering *answer* to prepare."""

    def __init__(self, answer):
        self.answer = answer
        self.released = []

    def prepare(self, image_id, origin, size, image_format, instance_uuid,
                source):
        return copy.deepcopy(self.answer)

    def release(self, instance_uuid, host=None):
        self.released.append(instance_uuid)
        return True


@pytest.fixture
def device():
    return block_device.ThunderImageBlockDevice(bdm(
        source_type='image', image_id=IMAGE, volume_type='thunder',
        instance_uuid=INSTANCE))


@pytest.fixture
def instance():
    return objects.Instance(uuid=INSTANCE, host='compute1')


def _prepare(device, instance, monkeypatch, answer):
    client = FakeClient(answer)
    monkeypatch.setattr(agent, 'get_client', lambda: client)
    origin = {'driver_volume_type': 'file', 'data': {'path': '/x'}}
    try:
        return client, device._prepare(instance, IMAGE, origin, 1 << 20,
                                       'raw')
    except exception.ThunderError as e:
        return client, e


def test_the_agents_disk_is_used(device, instance, monkeypatch):
    client, info = _prepare(device, instance, monkeypatch,
                            qemu_info(image_id=IMAGE))
    assert info['data']['path'].endswith(INSTANCE + '/overlay.qcow2')
    assert info['thunder_agent_host'] == agent.agent_host()
    assert client.released == []


@pytest.mark.parametrize('answer', [
    qemu_info(image_id=IMAGE, path='/etc/shadow'),
    qemu_info(image_id=IMAGE, backing={
        'socket': '/run/thunder-agent/%s.nbd' % payloads.GOLDEN_VOLUME_ID,
        'export': payloads.GOLDEN_VOLUME_ID}),
    # A disk, consistent in itself, of another image than the one asked.
    qemu_info(image_id=OTHER_IMAGE, backing={
        'socket': '/run/thunder-agent/%s.nbd' % OTHER_IMAGE,
        'export': OTHER_IMAGE}),
    qemu_info(image_id=IMAGE, instance_id=OTHER_INSTANCE),
])
def test_a_forged_answer_is_refused_and_released(device, instance,
                                                 monkeypatch, answer):
    client, error = _prepare(device, instance, monkeypatch, answer)
    assert isinstance(error, exception.InvalidThunderDisk)
    assert '/etc' not in error.format_message()
    # The snapshot the agent may have made for the instance is released.
    assert client.released == [INSTANCE]


def test_a_kernel_disk_on_a_qemu_host_is_refused(device, instance,
                                                 monkeypatch):
    client, error = _prepare(device, instance, monkeypatch,
                             kernel_info(image_id=IMAGE))
    assert isinstance(error, exception.ThunderBackendMismatch)
    assert client.released == [INSTANCE]
