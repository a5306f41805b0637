"""Nova's own conversion of BlockDeviceMapping objects, once wired."""

import pytest
from oslo_serialization import jsonutils

from nova import objects
from nova.virt import block_device as nova_bd
from nova.virt import driver as virt_driver

from nova_thunder import block_device
from nova_thunder import marking
from tests.unit.nova_thunder import payloads
from tests.unit.nova_thunder.test_marking import bdm
from tests.unit.nova_thunder.test_marking import cinder  # noqa: F401


def image_bdm(**fields):
    values = dict(source_type='image', image_id=payloads.IMAGE_ID,
                  volume_type='thunder', volume_size=1)
    values.update(fields)
    return bdm(**values)


def instance_with(*bdms):
    return objects.Instance(uuid=bdms[0].instance_uuid,
                            root_device_name='/dev/vda')


@pytest.mark.usefixtures('wired', 'cinder')
class TestWiredConversion:
    def test_marked_image_bdm(self):
        devices = nova_bd.convert_all_volumes(image_bdm())
        assert [type(d) for d in devices] == [
            block_device.ThunderImageBlockDevice]
        assert isinstance(devices[0], nova_bd.DriverVolImageBlockDevice)
        assert devices[0].image_id == payloads.IMAGE_ID

    def test_unmarked_image_bdm_is_novas(self):
        devices = nova_bd.convert_all_volumes(
            image_bdm(volume_type='lvmdriver-1'), image_bdm(volume_type=None))
        assert [type(d) for d in devices] == [
            nova_bd.DriverVolImageBlockDevice] * 2

    def test_marked_volume_bdm(self):
        device = nova_bd.convert_volume(
            bdm(volume_id=payloads.GOLDEN_VOLUME_ID,
                attachment_id=payloads.ATTACHMENT_ID))
        assert type(device) is block_device.ThunderVolumeBlockDevice
        assert device['attachment_id'] == payloads.ATTACHMENT_ID

    def test_unmarked_volume_bdm_is_novas(self):
        device = nova_bd.convert_volume(bdm(volume_id='plain'))
        assert type(device) is nova_bd.DriverVolumeBlockDevice

    def test_attached_disk_keeps_its_class(self, flags):
        info = {'driver_volume_type': 'thunder',
                'data': {'backend': 'qemu', 'instance_id': 'x'}}
        attached = bdm(volume_id='plain',
                       connection_info=jsonutils.dumps(info))
        flags(volume_types=[])
        device = nova_bd.convert_volume(attached)
        assert type(device) is block_device.ThunderVolumeBlockDevice
        assert device['connection_info'] == info

    def test_mixed_list_keeps_novas_order_and_rules(self):
        bdms = [
            bdm(volume_id='plain', boot_index=1, device_name='/dev/vdb'),
            image_bdm(),
            bdm(source_type='snapshot', snapshot_id='snap', boot_index=2,
                device_name='/dev/vdc'),
            bdm(source_type='blank', boot_index=-1, device_name='/dev/vdd'),
            image_bdm(no_device=True, device_name='/dev/vde'),
            bdm(source_type='image', destination_type='local',
                image_id=payloads.IMAGE_ID, boot_index=-1,
                device_name=None),
        ]
        devices = nova_bd.convert_all_volumes(*bdms)
        assert [type(d) for d in devices] == [
            nova_bd.DriverVolumeBlockDevice,
            nova_bd.DriverVolSnapshotBlockDevice,
            block_device.ThunderImageBlockDevice,
            nova_bd.DriverVolBlankBlockDevice]

    def test_virt_driver_block_device_info(self):
        marked, plain = image_bdm(), bdm(volume_id='plain', boot_index=1,
                                         device_name='/dev/vdb')
        info = virt_driver.get_block_device_info(instance_with(marked),
                                                 [marked, plain])
        mapping = virt_driver.block_device_info_get_mapping(info)
        assert sorted(type(d).__name__ for d in mapping) == [
            'DriverVolumeBlockDevice', 'ThunderImageBlockDevice']

    def test_nova_still_sees_block_device_mappings(self):
        assert nova_bd.is_block_device_mapping(image_bdm())
        assert nova_bd.is_implemented(image_bdm())


@pytest.mark.usefixtures('cinder')
def test_unwired_nova_is_untouched():
    devices = nova_bd.convert_all_volumes(
        image_bdm(), bdm(volume_id=payloads.GOLDEN_VOLUME_ID))
    assert {type(d) for d in devices} == {
        nova_bd.DriverVolumeBlockDevice, nova_bd.DriverVolImageBlockDevice}


def test_marking_is_not_consulted_for_other_sources(monkeypatch, wired):
    def fail(bdm):
        raise AssertionError('consulted for %s' % bdm.source_type)

    monkeypatch.setattr(marking, 'is_thunder_bdm', fail)
    devices = nova_bd.convert_all_volumes(
        bdm(source_type='snapshot', snapshot_id='s'),
        bdm(source_type='blank'))
    assert len(devices) == 2
