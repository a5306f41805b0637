"""Thunder block devices against a real agent, over a real RabbitMQ.

Nova's own conversion picks the class; ``attach()``/``detach()`` run Nova's
code paths with Cinder and Glance answering recorded payloads (neither
service can run here), a tgt iSCSI target as the Cinder volume's storage,
and the block-device record's database save captured.
"""

import copy
import os
import uuid

from oslo_config import cfg
import oslo_messaging as messaging
import pytest
from oslo_serialization import jsonutils

from nova import exception as nova_exception
from nova import objects
from nova.virt import block_device as nova_bd

from nova_thunder import block_device
from nova_thunder import exception
from nova_thunder import marking
from tests.conftest import make_image
from tests.conftest import sha256_file
from tests.functional.nova_thunder.conftest import overlay_exists
from tests.functional.nova_thunder.conftest import snapshots
from tests.functional.nova_thunder.conftest import store
from tests.functional.nova_thunder.conftest import templates
from tests.unit.nova_thunder import payloads
from thunder_agent import origin as origin_mod
from thunder_agent import rpc as agent_rpc
from thunder_lab.emulation import reader

pytestmark = [pytest.mark.functional, pytest.mark.timeout(300)]

# os-brick connector properties of a devstack compute node.
CONNECTOR = {'platform': 'x86_64', 'os_type': 'linux', 'ip': '127.0.0.1',
             'host': 'compute1', 'multipath': False,
             'initiator': 'iqn.2004-10.com.ubuntu:01:7f4a1c9d2e3b',
             'do_local_attach': False, 'system uuid': None,
             'nvme_native_multipath': False}


class RecordedGlance:
    """nova.image.glance.API.get, answering from recorded image dicts."""
    images = {}

    @classmethod
    def get(cls, api, context, id_or_uri, include_locations=False,
            show_deleted=True):
        try:
            return copy.deepcopy(cls.images[id_or_uri])
        except KeyError:
            raise nova_exception.ImageNotFound(image_id=id_or_uri)


class RecordingCinder:
    """nova.volume.cinder.API for one volume on a tgt target."""

    def __init__(self, volume, target=None):
        self.volume = volume
        self.target = target
        self.calls = []
        self.fail_complete = False

    def get(self, context, volume_id, microversion=None):
        assert volume_id == self.volume['id']
        return copy.deepcopy(self.volume)

    def check_availability_zone(self, context, volume, instance=None):
        self.calls.append('check_availability_zone')

    def attachment_update(self, context, attachment_id, connector,
                          mountpoint=None):
        self.calls.append(('attachment_update', attachment_id,
                           connector['host'], mountpoint))
        return {'id': attachment_id,
                'connection_info': self.target.connection_info(
                    self.volume['id'], attachment_id)}

    def attachment_complete(self, context, attachment_id):
        self.calls.append(('attachment_complete', attachment_id))
        if self.fail_complete:
            raise nova_exception.CinderConnectionFailed(
                reason='recorded 503 from cinder-api')

    def attachment_delete(self, context, attachment_id):
        self.calls.append(('attachment_delete', attachment_id))


class RecordingVirtDriver:
    capabilities = {'supports_multiattach': True}

    def __init__(self):
        self.calls = []

    def get_volume_connector(self, instance):
        return dict(CONNECTOR)

    def instance_exists(self, instance):
        return True

    def attach_volume(self, context, connection_info, instance, mountpoint,
                      disk_bus=None, device_type=None, encryption=None):
        self.calls.append(('attach_volume', mountpoint,
                           connection_info['driver_volume_type']))

    def detach_volume(self, context, connection_info, instance, mountpoint,
                      encryption=None):
        self.calls.append(('detach_volume', mountpoint,
                           connection_info['driver_volume_type']))


@pytest.fixture
def saved(monkeypatch):
    """BlockDeviceMapping.save() (a database write) captured."""
    records = []
    monkeypatch.setattr(objects.BlockDeviceMapping, 'save',
                        lambda self: records.append(self.connection_info))
    return records


@pytest.fixture
def glance(monkeypatch, stored_image):
    """Glance answering the test image (a tenant's: its owner is not
    trusted), which the operator's [thunder] image_origin finds in the
    agent's store."""
    image = stored_image
    RecordedGlance.images = {image['id']: payloads.image(
        id=image['id'], size=image['size'], properties={})}
    monkeypatch.setattr(
        block_device.glance.API, 'get',
        lambda self, context, id_or_uri, include_locations=False,
        show_deleted=True: RecordedGlance.get(self, context, id_or_uri))
    return RecordedGlance.images


def image_bdm(instance, image_id, **fields):
    values = dict(instance_uuid=instance.uuid, source_type='image',
                  destination_type='volume', image_id=image_id,
                  volume_type='thunder', volume_size=1, boot_index=0,
                  device_name='/dev/vda', no_device=False,
                  connection_info=None, volume_id=None, snapshot_id=None,
                  attachment_id=None, delete_on_termination=True,
                  disk_bus='virtio', device_type='disk')
    values.update(fields)
    return objects.BlockDeviceMapping(**values)


def volume_bdm(instance, volume_id, attachment_id):
    return image_bdm(instance, None, source_type='volume',
                     volume_id=volume_id, volume_type=None,
                     attachment_id=attachment_id,
                     delete_on_termination=False)


@pytest.mark.usefixtures('wired')
class TestImageOrigin:
    @pytest.fixture(autouse=True)
    def _finalizers(self, request):
        self.addfinalizer = request.addfinalizer

    def test_attach_read_detach(self, thunder, glance, image, instance,
                                context, saved):
        device = nova_bd.convert_volume(image_bdm(instance, image['id']))
        assert type(device) is block_device.ThunderImageBlockDevice
        virt = RecordingVirtDriver()

        device.attach(context, instance, None, virt)

        info = device['connection_info']
        assert info['driver_volume_type'] == 'thunder'
        assert info['data']['backend'] == 'qemu'
        assert info['data']['instance_id'] == instance.uuid
        assert info['data']['image_id'] == image['id']
        assert info['thunder_agent_host'] == thunder.host
        assert overlay_exists(info)
        # Stored in the block device record (Nova's update_db + save).
        assert jsonutils.loads(saved[-1]) == info
        # The VM's view of its disk is the image, byte for byte.
        assert reader.checksum(info) == (image['sha256'], image['size'])
        assert snapshots(thunder)[instance.uuid]['image_id'] == image['id']
        assert templates(thunder)[image['id']]['origin'] == {
            'driver_volume_type': 'file',
            'data': {'path': os.path.join(thunder.store, image['id'])}}
        assert virt.calls == []

        device.detach(context, instance, None, virt)

        assert virt.calls == [('detach_volume', '/dev/vda', 'thunder')]
        assert instance.uuid not in snapshots(thunder)
        assert not overlay_exists(info)
        # The template stays for the next VMs until garbage-collected.
        assert image['id'] in templates(thunder)

    def test_nbd_origin_server(self, thunder, glance, image, flags,
                               instance, context, saved, workdir):
        # A thunder-origin where the agent takes origin sockets from.
        socket = os.path.join(thunder.sockets, image['id'][:8] + '.sock')
        origin = origin_mod.OriginServer(
            image['path'], 'raw', image['id'],
            {'type': 'unix', 'path': socket},
            os.path.join(workdir, 'origin-run')).start()
        # Stopped here, not by a finalizer: those run after workdir (and
        # the daemon's pid file in it) is gone, and the daemon would leak.
        try:
            flags(image_origin='nbd+unix:///{image_id}?socket=' + socket)
            device = nova_bd.convert_volume(image_bdm(instance, image['id']))
            device.attach(context, instance, None, RecordingVirtDriver())
            info = device['connection_info']
            assert reader.checksum(info) == (image['sha256'], image['size'])
            assert templates(thunder)[image['id']]['origin'] == {
                'driver_volume_type': 'nbd',
                'data': {'socket': socket, 'export': image['id']}}
            block_device.release_disks(instance, {'block_device_mapping': [
                device]})
            assert instance.uuid not in snapshots(thunder)
        finally:
            origin.stop()

    def test_hot_attach_goes_through_the_virt_driver(
            self, thunder, glance, image, instance, context, saved):
        device = nova_bd.convert_volume(image_bdm(
            instance, image['id'], boot_index=None, device_name='/dev/vdb'))
        virt = RecordingVirtDriver()
        device.attach(context, instance, None, virt, do_driver_attach=True)
        assert virt.calls == [('attach_volume', '/dev/vdb', 'thunder')]
        device.detach(context, instance, None, virt)
        assert instance.uuid not in snapshots(thunder)


@pytest.mark.usefixtures('wired')
class TestVolumeOrigin:
    @pytest.fixture(autouse=True)
    def _monkeypatch(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def _cinder(self, iscsi_volume, **changes):
        volume = payloads.volume(id=iscsi_volume['id'], size=1, **changes)
        cinder = RecordingCinder(volume, iscsi_volume['target'])
        # Nova's conversion looks the volume's type up in Cinder too.
        self.monkeypatch.setattr(marking, '_cinder', lambda: cinder)
        return cinder

    def test_attach_read_detach_over_iscsi(self, thunder, iscsi_volume,
                                           image, instance, context, saved):
        cinder = self._cinder(iscsi_volume)
        device = nova_bd.convert_volume(
            volume_bdm(instance, iscsi_volume['id'], 'attachment-1'))
        assert type(device) is block_device.ThunderVolumeBlockDevice
        virt = RecordingVirtDriver()

        device.attach(context, instance, cinder, virt)

        info = device['connection_info']
        assert info['driver_volume_type'] == 'thunder'
        assert info['serial'] == iscsi_volume['id']
        assert 'multiattach' not in info
        assert cinder.calls == [
            'check_availability_zone',
            ('attachment_update', 'attachment-1', 'compute1', '/dev/vda'),
            ('attachment_complete', 'attachment-1')]
        # The template reads the volume over iSCSI, with CHAP.
        origin = templates(thunder)[iscsi_volume['id']]['origin']
        assert origin['driver_volume_type'] == 'iscsi'
        assert origin['data']['target_portal'] == \
            iscsi_volume['target'].portal
        assert origin['data']['auth_method'] == 'CHAP'
        assert 'attachment_id' not in origin['data']
        assert reader.checksum(info, image['size']) == (
            image['sha256'], image['size'])
        assert reader.read(info, (1 << 30) - 4096, 4096) == b'\0' * 4096

        device.detach(context, instance, cinder, virt)

        assert cinder.calls[-1] == ('attachment_delete', 'attachment-1')
        assert virt.calls == [('detach_volume', '/dev/vda', 'thunder')]
        assert instance.uuid not in snapshots(thunder)

    def test_many_instances_share_one_template(self, thunder, iscsi_volume,
                                               context, saved):
        cinder = self._cinder(iscsi_volume)
        infos = []
        for n in range(3):
            inst = objects.Instance(uuid='00000000-0000-4000-8000-00000000000'
                                    + str(n), host=thunder.host,
                                    availability_zone='nova')
            device = nova_bd.convert_volume(volume_bdm(
                inst, iscsi_volume['id'], 'attachment-%d' % n))
            device.attach(context, inst, cinder, RecordingVirtDriver())
            infos.append(device['connection_info'])
        assert list(templates(thunder)) == [iscsi_volume['id']]
        assert len(snapshots(thunder)) == 3
        assert len({info['data']['path'] for info in infos}) == 3

    def test_complete_failure_releases_the_snapshot(
            self, thunder, iscsi_volume, instance, context, saved):
        cinder = self._cinder(iscsi_volume)
        cinder.fail_complete = True
        device = nova_bd.convert_volume(
            volume_bdm(instance, iscsi_volume['id'], 'attachment-1'))
        with pytest.raises(nova_exception.CinderConnectionFailed):
            device.attach(context, instance, cinder, RecordingVirtDriver())
        assert cinder.calls[-1] == ('attachment_delete', 'attachment-1')
        assert instance.uuid not in snapshots(thunder)

    def test_volume_of_another_type_is_refused(
            self, thunder, iscsi_volume, instance, context, saved):
        cinder = self._cinder(iscsi_volume, volume_type_id='lvmdriver-1')
        device = block_device.ThunderVolumeBlockDevice(
            volume_bdm(instance, iscsi_volume['id'], 'attachment-1'))
        with pytest.raises(exception.ThunderVolumeUnsupported) as e:
            device.attach(context, instance, cinder, RecordingVirtDriver())
        assert "volume type 'lvmdriver-1'" in e.value.format_message()
        assert cinder.calls == ['check_availability_zone']
        assert snapshots(thunder) == {} and templates(thunder) == {}


@pytest.mark.usefixtures('wired')
class TestBadInput:
    """Bad image or volume data: a clear error, and nothing left behind."""

    def _attach(self, instance, context, image_id):
        device = nova_bd.convert_volume(image_bdm(instance, image_id))
        device.attach(context, instance, None, RecordingVirtDriver())
        return device

    def _nothing_left(self, agent, instance):
        assert instance.uuid not in snapshots(agent)
        assert templates(agent) == {}

    @pytest.mark.parametrize('changes, error, words', [
        ({'disk_format': 'vmdk'}, exception.ThunderImageUnsupported,
         "disk_format 'vmdk' is not one of raw, qcow2"),
        ({'size': 64 << 20}, exception.ThunderDiskFailed,
         'larger than the origin'),
        # A trusted owner's property, which the agent does not allow: the
        # fault names nothing but the image.
        ({'properties': {'thunder_origin': 'file:///etc/passwd'}},
         exception.ThunderDiskFailed, 'is not allowed on this host.'),
        ({'properties': {'thunder_origin': 'nbd+unix:///x?socket=/nope'}},
         exception.ThunderDiskFailed, 'is not allowed on this host.'),
        ({'properties': {'thunder_origin': 'nbd://127.0.0.1:22/x'}},
         exception.ThunderDiskFailed, 'is not allowed on this host.'),
    ])
    def test_refused(self, thunder, glance, image, instance, context, saved,
                     flags, changes, error, words):
        flags(trusted_image_owners=[payloads.GLANCE_IMAGE['owner']])
        glance[image['id']].update(changes)
        with pytest.raises(error) as e:
            self._attach(instance, context, image['id'])
        message = e.value.format_message()
        assert words in message, message
        for detail in ('/etc/passwd', '/nope', ':22', 'qemu-img'):
            assert detail not in message, message
        self._nothing_left(thunder, instance)
        assert [jsonutils.loads(s) for s in saved] in ([], [{}])

    def test_unknown_image(self, thunder, glance, instance, context, saved):
        with pytest.raises(nova_exception.ImageNotFound):
            self._attach(instance, context, payloads.IMAGE_ID)
        self._nothing_left(thunder, instance)

    def test_disabled_host_refuses(self, thunder, glance, image, instance,
                                   context, saved, flags):
        flags(enabled=False)
        with pytest.raises(exception.ThunderDisabled):
            self._attach(instance, context, image['id'])
        self._nothing_left(thunder, instance)

    def test_backend_mismatch_is_released(self, thunder, glance, image,
                                          instance, context, saved, flags):
        flags(backend='kernel')
        with pytest.raises(exception.ThunderBackendMismatch) as e:
            self._attach(instance, context, image['id'])
        assert 'returned a qemu disk' in e.value.format_message()
        assert instance.uuid not in snapshots(thunder)
        assert [jsonutils.loads(s) for s in saved] in ([], [{}])

    def test_second_thunder_disk_of_one_instance(self, thunder, glance,
                                                 image, instance, context,
                                                 saved):
        first = self._attach(instance, context, image['id'])
        with pytest.raises(exception.ThunderDiskFailed) as e:
            self._attach(instance, context, image['id'])
        assert 'already exists' in e.value.format_message()
        # The first disk is untouched.
        assert snapshots(thunder)[instance.uuid]
        assert overlay_exists(first['connection_info'])

    def test_agent_down_is_a_clear_error(self, thunder, glance, image,
                                         instance, context, saved, flags):
        flags(agent_host='no-such-agent', timeout=3)
        with pytest.raises(exception.ThunderAgentUnavailable) as e:
            self._attach(instance, context, image['id'])
        assert 'no-such-agent did not answer within 3 seconds' in \
            e.value.format_message()


def test_release_is_idempotent(thunder, glance, image, instance, context,
                               saved, wired):
    device = nova_bd.convert_volume(image_bdm(instance, image['id']))
    device.attach(context, instance, None, RecordingVirtDriver())
    info = {'block_device_mapping': [device]}
    assert block_device.release_disks(instance, info) == 1
    assert not os.path.exists(device['connection_info']['data']['path'])
    # Again (a delete retried after a failure): nothing to do, no error.
    assert block_device.release_disks(instance, info) == 1
    assert instance.uuid not in snapshots(thunder)


class RogueAgent:
    """Something on the agent's topic answering nova-compute's prepare
    with a disk of its choosing (issue 10, item 5)."""

    target = messaging.Target(version='1.1')

    def __init__(self, answer):
        self.answer = answer
        self.deleted = []

    def prepare(self, ctxt, image_id, origin, size, image_format,
                instance_id):
        info = copy.deepcopy(self.answer)
        info['data'].update(image_id=image_id, instance_id=instance_id)
        return info

    def delete_snapshot(self, ctxt, instance_id):
        self.deleted.append(instance_id)


@pytest.fixture
def rogue(rabbit, flags):
    started = []

    def start(answer):
        host = 'rogue-%s' % uuid.uuid4().hex[:8]
        transport = agent_rpc.get_transport(cfg.CONF, rabbit.transport_url)
        endpoint = RogueAgent(answer)
        server = messaging.get_rpc_server(
            transport, messaging.Target(
                exchange=marking.CONF.thunder.control_exchange,
                topic=marking.CONF.thunder.topic, server=host),
            [endpoint], executor='threading')
        server.start()
        started.append((server, transport))
        flags(agent_host=host)
        return endpoint

    yield start
    for server, transport in started:
        server.stop()
        server.wait()
        transport.cleanup()


@pytest.mark.usefixtures('wired')
class TestTrust:
    """Origins are the operator's; disks are the agent's."""

    def test_untrusted_owners_property_is_ignored(
            self, thunder, glance, image, instance, context, saved):
        # A tenant's image whose property names another tenant's image
        # file in the same store.
        victim = str(uuid.uuid4())
        victim_path = store(thunder, image['path'], victim)
        attacker = str(uuid.uuid4())
        own = make_image(os.path.join(thunder.store, attacker),
                         image['size'], seed=b'attacker')
        try:
            glance[attacker] = payloads.image(
                id=attacker, size=image['size'],
                owner='5b0c6f3e2d1a4b7c8e9f0a1b2c3d4e5f',
                properties={'thunder_origin': 'file://' + victim_path})
            device = nova_bd.convert_volume(image_bdm(instance, attacker))
            device.attach(context, instance, None, RecordingVirtDriver())
            info = device['connection_info']
            # The disk is the attacker's own image, not the victim's.
            assert reader.checksum(info) == (sha256_file(own),
                                             image['size'])
            assert reader.checksum(info)[0] != image['sha256']
            assert templates(thunder)[attacker]['origin'] == {
                'driver_volume_type': 'file', 'data': {'path': own}}
        finally:
            os.unlink(victim_path)
            os.unlink(own)

    def test_trusted_owners_property_names_the_origin(
            self, thunder, glance, image, instance, context, saved, flags):
        flags(trusted_image_owners=[payloads.GLANCE_IMAGE['owner']],
              image_origin=None)
        glance[image['id']]['properties'] = {
            'thunder_origin': 'file://%s/{image_id}' % thunder.store}
        device = nova_bd.convert_volume(image_bdm(instance, image['id']))
        device.attach(context, instance, None, RecordingVirtDriver())
        assert reader.checksum(device['connection_info']) == (
            image['sha256'], image['size'])
        # Without the trust, the same image has no origin at all.
        flags(trusted_image_owners=[])
        other = objects.Instance(uuid=str(uuid.uuid4()), host=instance.host,
                                 availability_zone='nova')
        with pytest.raises(exception.ThunderImageUnsupported) as e:
            nova_bd.convert_volume(image_bdm(other, image['id'])).attach(
                context, other, None, RecordingVirtDriver())
        assert 'no origin is configured' in e.value.format_message()

    @pytest.mark.parametrize('forge', ['host file', 'other overlay',
                                       'other template', 'host device'])
    def test_forged_answer_is_refused_and_released(
            self, thunder, glance, image, instance, context, saved, rogue,
            flags, forge):
        # A real disk of another instance and image on the real agent.
        other = str(uuid.uuid4())
        real = thunder.client.prepare(
            image['id'], {'driver_volume_type': 'file', 'data': {
                'path': os.path.join(thunder.store, image['id'])}},
            image['size'], 'raw', other)
        answer = copy.deepcopy(real)
        data = answer['data']
        if forge == 'host file':
            data.update(path='/etc/shadow', format='raw')
        elif forge == 'other template':
            # This instance's overlay path, but its backing the template
            # of another image than the one asked for below.
            data['path'] = real['data']['path'].replace(other, instance.uuid)
        elif forge == 'host device':
            flags(backend='kernel')
            answer['data'] = {'backend': 'kernel', 'format': 'raw',
                              'device_path': '/dev/sda'}
        rogue_agent = rogue(answer)
        virt = RecordingVirtDriver()
        asked = str(uuid.uuid4()) if forge == 'other template' else (
            image['id'])
        if asked != image['id']:
            glance[asked] = dict(glance[image['id']], id=asked)
        device = nova_bd.convert_volume(image_bdm(instance, asked))
        with pytest.raises(exception.InvalidThunderDisk) as e:
            device.attach(context, instance, None, virt)
        message = e.value.format_message()
        assert 'not a disk of the thunder agent of this host' in message
        for detail in ('/etc/shadow', '/dev/sda', other):
            assert detail not in message
        # libvirt never saw it, Nova stored nothing, and the snapshot the
        # "agent" claims to have made is released.
        assert virt.calls == []
        assert [jsonutils.loads(s) for s in saved] in ([], [{}])
        assert rogue_agent.deleted == [instance.uuid]
        # The real agent's disks are untouched.
        assert overlay_exists(real)
