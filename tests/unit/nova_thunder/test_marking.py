import pytest
from oslo_serialization import jsonutils

from nova import exception as nova_exception
from nova import objects

from nova_thunder import exception
from nova_thunder import marking
from tests.unit.nova_thunder import payloads

INSTANCE = '5e3f2c1b-9a8d-4e7f-b6a5-4c3d2e1f0a9b'


def bdm(**fields):
    values = dict(instance_uuid=INSTANCE, source_type='volume',
                  destination_type='volume', boot_index=0,
                  device_name='/dev/vda', no_device=False,
                  connection_info=None, volume_id=None, image_id=None,
                  snapshot_id=None, volume_size=1, attachment_id=None,
                  delete_on_termination=False)
    values.update(fields)
    return objects.BlockDeviceMapping(**values)


class RecordedCinder:
    """nova.volume.cinder.API.get() answering a recorded volume."""

    def __init__(self, volumes):
        self.volumes = volumes
        self.calls = []

    def get(self, context, volume_id, microversion=None):
        self.calls.append(volume_id)
        try:
            return self.volumes[volume_id]
        except KeyError:
            raise nova_exception.VolumeNotFound(volume_id=volume_id)


@pytest.fixture
def cinder(monkeypatch):
    recorded = RecordedCinder({
        payloads.GOLDEN_VOLUME_ID: payloads.volume(),
        'plain': payloads.volume(id='plain', volume_type_id='lvmdriver-1'),
    })
    monkeypatch.setattr(marking, '_cinder', lambda: recorded)
    return recorded


class TestOriginURL:
    @pytest.mark.parametrize('url, expected', [
        ('nbd://origin.example.org:10810/img',
         {'host': 'origin.example.org', 'port': 10810, 'export': 'img'}),
        ('nbd://10.0.0.5/img', {'host': '10.0.0.5', 'port': 10809,
                                'export': 'img'}),
        ('nbd://[fd00::5]:10809/', {'host': 'fd00::5', 'port': 10809,
                                    'export': ''}),
        ('nbd+unix:///img?socket=/run/thunder-origin/img.sock',
         {'socket': '/run/thunder-origin/img.sock', 'export': 'img'}),
    ])
    def test_nbd(self, url, expected):
        assert marking.parse_origin_url(url) == {
            'driver_volume_type': 'nbd', 'data': expected}

    def test_file(self):
        assert marking.parse_origin_url(
            'file:///opt/stack/data/glance/images/a%20b') == {
            'driver_volume_type': 'file',
            'data': {'path': '/opt/stack/data/glance/images/a b'}}

    @pytest.mark.parametrize('url', [
        '', 'http://x/y', 'nbd:///img', 'nbd://h:99999/x',
        'nbd+unix:///img', 'nbd+unix://host/img?socket=/s',
        'nbd+unix:///img?socket=/a&socket=/b', 'file://remote/x', 'file://',
        None,
    ])
    def test_invalid(self, url):
        with pytest.raises(exception.InvalidOriginURL):
            marking.parse_origin_url(url)


OWNER = payloads.GLANCE_IMAGE['owner']
TENANT = '5b0c6f3e2d1a4b7c8e9f0a1b2c3d4e5f'


class TestImageOrigin:
    def test_config_pattern(self, flags):
        flags(image_origin='file:///srv/images/{image_id}')
        origin, size, fmt = marking.image_origin(
            payloads.image(properties={}))
        assert origin == {'driver_volume_type': 'file', 'data': {
            'path': '/srv/images/' + payloads.IMAGE_ID}}
        assert (size, fmt) == (117440512, 'raw')

    def test_property_of_a_trusted_owner(self, flags):
        flags(trusted_image_owners=['0123', OWNER])
        origin, size, fmt = marking.image_origin(payloads.image())
        assert origin == {'driver_volume_type': 'nbd', 'data': {
            'host': '192.168.122.10', 'port': 10809,
            'export': payloads.IMAGE_ID}}
        assert (size, fmt) == (117440512, 'raw')
        # It wins over the operator's default.
        flags(image_origin='file:///srv/images/{image_id}')
        origin, _, _ = marking.image_origin(payloads.image())
        assert origin['driver_volume_type'] == 'nbd'

    @pytest.mark.parametrize('prop', [
        # The management network's services, another tenant's template
        # socket, Glance's whole store, a host file.
        'nbd://10.20.0.7:22/x',
        'nbd+unix:///x?socket=/run/thunder-agent/%s.nbd' % payloads.IMAGE_ID,
        'file:///var/lib/glance/images/0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d',
        'file:///etc/shadow',
    ])
    def test_property_of_any_other_owner_is_ignored(self, flags, caplog,
                                                    prop):
        flags(image_origin='file:///srv/images/{image_id}',
              trusted_image_owners=[OWNER])
        image = payloads.image(owner=TENANT,
                               properties={'thunder_origin': prop})
        origin, _, _ = marking.image_origin(image)
        # The operator's origin of this very image, not the tenant's.
        assert origin == {'driver_volume_type': 'file', 'data': {
            'path': '/srv/images/' + payloads.IMAGE_ID}}
        assert 'Ignoring the image property thunder_origin' in caplog.text
        assert TENANT in caplog.text

    def test_no_owner_is_trusted_by_default(self, flags):
        image = payloads.image()
        assert not marking.trusted_owner(image['owner'])
        with pytest.raises(exception.ThunderImageUnsupported) as e:
            marking.image_origin(image)
        # Nothing of the property in the fault the tenant reads.
        message = e.value.format_message()
        assert 'no origin is configured' in message
        assert '192.168' not in message

    def test_every_owner_with_glance_property_protections(self, flags):
        flags(trusted_image_owners=['*'])
        origin, _, _ = marking.image_origin(payloads.image(owner=TENANT))
        assert origin['data']['host'] == '192.168.122.10'
        # An image without an owner is nobody's.
        with pytest.raises(exception.ThunderImageUnsupported):
            marking.image_origin(payloads.image(owner=None))

    def test_per_store_origins(self, flags):
        flags(image_origin='nbd://10.0.5.9/{image_id}',
              store_image_origins={
                  'fast': 'file:///srv/fast/{image_id}',
                  'ceph': 'nbd://10.0.5.1:10809/{image_id}'})
        for stores, host_or_path in (
                ('fast', '/srv/fast/' + payloads.IMAGE_ID),
                ('cheap,ceph', '10.0.5.1'), ('ceph,fast', '10.0.5.1'),
                ('cheap', '10.0.5.9'), (None, '10.0.5.9')):
            origin, _, _ = marking.image_origin(
                payloads.image(properties={}, stores=stores))
            assert host_or_path in origin['data'].values(), stores

    def test_store_option_parses_urls(self):
        from oslo_config import types
        parsed = types.Dict()('fast:file:///srv/fast/{image_id},'
                              'ceph:nbd://10.0.5.1:10809/{image_id}')
        assert parsed == {'fast': 'file:///srv/fast/{image_id}',
                          'ceph': 'nbd://10.0.5.1:10809/{image_id}'}

    def test_qcow2_with_virtual_size(self, flags):
        flags(image_origin='file:///srv/images/{image_id}')
        _, size, fmt = marking.image_origin(
            payloads.image(disk_format='qcow2', virtual_size=1 << 30))
        assert (size, fmt) == (1 << 30, 'qcow2')

    @pytest.mark.parametrize('changes, words', [
        ({'disk_format': 'vmdk'}, "disk_format 'vmdk'"),
        ({'disk_format': 'qcow2'}, 'virtual size is unknown'),
        ({'status': 'queued'}, "status is 'queued'"),
        ({'size': 1000}, 'multiple of 512'),
        ({'size': 0}, 'virtual size is unknown'),
        ({'properties': {}}, 'no origin'),
        ({'properties': {'thunder_origin': 'ftp://x/y'}}, "scheme 'ftp'"),
    ])
    def test_refused(self, changes, words, flags):
        flags(trusted_image_owners=[OWNER])
        with pytest.raises(nova_exception.Invalid) as e:
            marking.image_origin(payloads.image(**changes))
        assert words in e.value.format_message()


class TestVolumeOrigin:
    def test_recorded_lvm_connection(self):
        origin = marking.volume_origin(
            payloads.GOLDEN_VOLUME_ID, payloads.iscsi_connection_info())
        data = payloads.CINDER_ISCSI_CONNECTION_INFO['data']
        # Identity and credentials only: per-attachment keys would make the
        # second attachment on a host look like another origin.
        assert origin == {'driver_volume_type': 'iscsi', 'data': {
            'target_portal': data['target_portal'],
            'target_iqn': data['target_iqn'], 'target_lun': 1,
            'auth_method': 'CHAP', 'auth_username': data['auth_username'],
            'auth_password': data['auth_password'],
            'volume_id': payloads.GOLDEN_VOLUME_ID}}

    def test_same_origin_for_every_attachment(self):
        one = marking.volume_origin(payloads.GOLDEN_VOLUME_ID,
                                    payloads.iscsi_connection_info())
        two = marking.volume_origin(payloads.GOLDEN_VOLUME_ID,
                                    payloads.iscsi_connection_info(
                                        attachment_id='other',
                                        access_mode='ro',
                                        target_lun='1'))
        assert one == two

    @pytest.mark.parametrize('info, words', [
        ({'driver_volume_type': 'rbd', 'data': {'name': 'volumes/x'}},
         "connection type is 'rbd'"),
        (payloads.iscsi_connection_info(encrypted=True), 'encrypted'),
        (payloads.iscsi_connection_info(target_portal=''),
         'no target_portal'),
        (payloads.iscsi_connection_info(target_lun='x'), 'not a number'),
        (None, 'no connection_info'),
    ])
    def test_refused(self, info, words):
        with pytest.raises(exception.ThunderVolumeUnsupported) as e:
            marking.volume_origin(payloads.GOLDEN_VOLUME_ID, info)
        assert words in e.value.format_message()

    def test_check_volume(self, flags):
        assert marking.check_volume(payloads.volume())
        with pytest.raises(exception.ThunderVolumeUnsupported) as e:
            marking.check_volume(payloads.volume(volume_type_id='lvm'))
        assert "volume type 'lvm'" in e.value.format_message()
        flags(volume_types=['gold', 'thunder'])
        assert marking.check_volume(payloads.volume())

    def test_size_in_bytes(self):
        assert marking.volume_size_bytes(payloads.volume(size=3)) == 3 << 30


class TestIsThunderBDM:
    def test_image_to_volume_with_thunder_type(self):
        assert marking.is_thunder_bdm(bdm(
            source_type='image', image_id=payloads.IMAGE_ID,
            volume_type='thunder'))

    def test_image_to_volume_with_other_type(self, flags):
        assert not marking.is_thunder_bdm(bdm(
            source_type='image', image_id=payloads.IMAGE_ID,
            volume_type='lvmdriver-1'))
        assert not marking.is_thunder_bdm(bdm(
            source_type='image', image_id=payloads.IMAGE_ID))
        flags(volume_types=['lvmdriver-1'])
        assert marking.is_thunder_bdm(bdm(
            source_type='image', image_id=payloads.IMAGE_ID,
            volume_type='lvmdriver-1'))

    def test_local_image_never(self):
        assert not marking.is_thunder_bdm(bdm(
            source_type='image', destination_type='local',
            image_id=payloads.IMAGE_ID, volume_type='thunder'))

    def test_volume_of_thunder_type(self, cinder):
        assert marking.is_thunder_bdm(bdm(
            volume_id=payloads.GOLDEN_VOLUME_ID))
        assert not marking.is_thunder_bdm(bdm(volume_id='plain'))
        # Looked up once each, then remembered.
        assert marking.is_thunder_bdm(bdm(
            volume_id=payloads.GOLDEN_VOLUME_ID))
        assert cinder.calls == [payloads.GOLDEN_VOLUME_ID, 'plain']

    def test_attached_bdms_need_no_lookup(self, cinder, flags):
        thunder = bdm(volume_id=payloads.GOLDEN_VOLUME_ID,
                      connection_info=jsonutils.dumps(
                          {'driver_volume_type': 'thunder', 'data': {}}))
        iscsi = bdm(volume_id=payloads.GOLDEN_VOLUME_ID,
                    connection_info=jsonutils.dumps(
                        payloads.iscsi_connection_info()))
        assert marking.is_thunder_bdm(thunder)
        assert not marking.is_thunder_bdm(iscsi)
        # An existing thunder disk stays thunder whatever the marking says.
        flags(volume_types=[])
        assert marking.is_thunder_bdm(thunder)
        assert cinder.calls == []

    def test_no_types_no_lookup(self, cinder, flags):
        flags(volume_types=[])
        assert not marking.is_thunder_bdm(bdm(
            volume_id=payloads.GOLDEN_VOLUME_ID))
        assert cinder.calls == []

    def test_lookup_error_propagates(self, cinder):
        with pytest.raises(nova_exception.VolumeNotFound):
            marking.is_thunder_bdm(bdm(volume_id='missing'))

    def test_snapshot_and_blank_never(self, cinder):
        assert not marking.is_thunder_bdm(bdm(
            source_type='snapshot', snapshot_id='s', volume_type='thunder'))
        assert not marking.is_thunder_bdm(bdm(
            source_type='blank', volume_type='thunder'))
        assert cinder.calls == []
