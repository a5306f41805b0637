import os

import pytest
from lxml import etree

from nova import exception as nova_exception
from nova.virt.libvirt import host as libvirt_host

from nova_thunder import exception
from nova_thunder import layout
from nova_thunder.virt.libvirt import volume

INSTANCE = '5e3f2c1b-9a8d-4e7f-b6a5-4c3d2e1f0a9b'
IMAGE = '3a1f6d0e-8c2b-4b5e-a7a4-6a0f5e9b2c11'
DISK_INFO = {'bus': 'virtio', 'dev': 'vda', 'type': 'disk'}


def qemu_info(path='/var/lib/thunder-agent/snapshots/%s/overlay.qcow2'
              % INSTANCE, **backing):
    return {'driver_volume_type': 'thunder',
            'serial': 'golden-volume',
            'data': {'backend': 'qemu', 'image_id': IMAGE,
                     'instance_id': INSTANCE, 'path': path,
                     'format': 'qcow2',
                     'backing': dict({'driver': 'nbd',
                                      'socket': '/run/thunder-agent/%s.nbd'
                                                % IMAGE,
                                      'export': IMAGE, 'format': 'raw'},
                                     **backing)}}


SNAPSHOT_DEVICE = '/dev/mapper/thunder-snap-' + INSTANCE


def kernel_info(device_path=SNAPSHOT_DEVICE):
    return {'driver_volume_type': 'thunder',
            'data': {'backend': 'kernel', 'image_id': IMAGE,
                     'instance_id': INSTANCE, 'device_path': device_path}}


class Instance:
    uuid = INSTANCE


@pytest.fixture(scope='module')
def driver():
    # A real libvirt connection (libvirt's test driver): the volume driver
    # asks it for versions and secrets.
    return volume.LibvirtThunderVolumeDriver(
        libvirt_host.Host('test:///default'))


def xml(conf):
    return etree.fromstring(conf.to_xml())


def test_qemu_disk_xml(driver):
    disk = xml(driver.get_config(qemu_info(), DISK_INFO))
    assert disk.get('type') == 'file' and disk.get('device') == 'disk'
    assert disk.find('driver').get('type') == 'qcow2'
    assert disk.find('driver').get('name') == 'qemu'
    assert disk.find('source').get('file') == qemu_info()['data']['path']
    backing = disk.find('backingStore')
    assert backing.get('type') == 'network'
    assert backing.find('format').get('type') == 'raw'
    source = backing.find('source')
    assert (source.get('protocol'), source.get('name')) == ('nbd', IMAGE)
    host = source.find('host')
    assert host.get('transport') == 'unix'
    assert host.get('socket') == '/run/thunder-agent/%s.nbd' % IMAGE
    assert disk.find('target').attrib == {'dev': 'vda', 'bus': 'virtio'}
    assert disk.findtext('serial') == 'golden-volume'
    # <backingStore> follows <source>, where libvirt documents it.
    tags = [child.tag for child in disk]
    assert tags.index('backingStore') == tags.index('source') + 1


def test_qemu_tcp_backing(driver, flags):
    # A relaying template's export, on the agent's relay address.
    flags(agent_relay_address='10.0.0.7')
    info = qemu_info()
    info['data']['backing'] = {'driver': 'nbd', 'host': '10.0.0.7',
                               'port': 10811, 'export': IMAGE,
                               'format': 'raw'}
    host = xml(driver.get_config(info, DISK_INFO)).find(
        'backingStore/source/host')
    assert host.attrib == {'name': '10.0.0.7', 'port': '10811'}


def test_reconnect_delay_needs_a_libvirt_that_knows_it(driver, monkeypatch):
    info = qemu_info(reconnect_delay=300)
    old = xml(driver.get_config(info, DISK_INFO))
    assert old.find('backingStore/source/reconnect') is None
    monkeypatch.setattr(driver.host, 'has_min_version',
                        lambda lv_ver=None, hv_ver=None, hv_type=None:
                        lv_ver == volume.MIN_LIBVIRT_NBD_RECONNECT)
    new = xml(driver.get_config(info, DISK_INFO))
    assert new.find('backingStore/source/reconnect').get('delay') == '300'


def test_private_writable_disk_whatever_cinder_said(driver):
    info = qemu_info()
    info['multiattach'] = True
    info['data']['access_mode'] = 'ro'
    disk = xml(driver.get_config(info, DISK_INFO))
    assert disk.find('shareable') is None
    assert disk.find('readonly') is None


def test_kernel_disk_xml(driver):
    disk = xml(driver.get_config(kernel_info(), DISK_INFO))
    assert disk.get('type') == 'block'
    assert disk.find('source').get('dev') == SNAPSHOT_DEVICE
    assert disk.find('driver').get('type') == 'raw'
    assert disk.find('backingStore') is None


FOREIGN = 'it is not a disk of the thunder agent of this host'


@pytest.mark.parametrize('info, words', [
    ({'driver_volume_type': 'thunder'}, 'no data'),
    ({'driver_volume_type': 'thunder', 'data': {'backend': 'zfs'}},
     "unknown backend 'zfs'"),
    ({'driver_volume_type': 'thunder', 'data': {'backend': 'qemu'}},
     'without path'),
    ({'driver_volume_type': 'thunder', 'data': {'backend': 'kernel'}},
     'without device_path'),
    (qemu_info(driver='file'), FOREIGN),
    (qemu_info(socket=None), FOREIGN),
    # Forged: a host file as the guest's disk, a host disk.
    (qemu_info('/etc/shadow'), FOREIGN),
    (kernel_info('/dev/sda'), FOREIGN),
])
def test_invalid_connection_info(driver, info, words):
    for call in (lambda: driver.get_config(info, DISK_INFO),
                 lambda: driver.connect_volume(info, Instance())):
        with pytest.raises(exception.InvalidThunderDisk) as e:
            call()
        assert words in e.value.format_message()


def test_connect_refuses_another_instances_disk(driver):
    other = qemu_info('/var/lib/thunder-agent/snapshots/%s/overlay.qcow2'
                      % IMAGE)
    other['data']['instance_id'] = IMAGE
    # Consistent in itself, but not the disk of the instance connecting.
    with pytest.raises(exception.InvalidThunderDisk) as e:
        driver.connect_volume(other, Instance())
    assert FOREIGN in e.value.format_message()


def test_connect_checks_the_overlay(driver, tmp_path, flags):
    flags(agent_state_path=str(tmp_path))
    overlay = tmp_path / 'snapshots' / INSTANCE / 'overlay.qcow2'
    info = qemu_info(str(overlay))
    with pytest.raises(nova_exception.DiskNotFound):
        driver.connect_volume(info, Instance())
    overlay.parent.mkdir(parents=True)
    os.symlink('/etc/passwd', overlay)
    with pytest.raises(exception.InvalidThunderDisk) as e:
        driver.connect_volume(info, Instance())
    assert 'not a regular file' in e.value.format_message()
    overlay.unlink()
    overlay.write_bytes(b'QFI\xfb')
    driver.connect_volume(info, Instance())
    # Disconnecting leaves the snapshot alone.
    driver.disconnect_volume(info, Instance(), force=True)
    assert overlay.exists()


def test_connect_checks_the_block_device(driver, tmp_path, monkeypatch):
    # /dev/mapper names are udev's symlinks to /dev/dm-N; here, to what
    # there is.
    monkeypatch.setattr(layout, 'MAPPER_DIR', str(tmp_path) + '/')
    device = tmp_path / ('thunder-snap-' + INSTANCE)
    info = kernel_info(str(device))
    with pytest.raises(nova_exception.DiskNotFound):
        driver.connect_volume(info, Instance())
    os.symlink(os.devnull, device)
    with pytest.raises(exception.InvalidThunderDisk) as e:
        driver.connect_volume(info, Instance())
    assert 'not a block device' in e.value.format_message()
    block = next((os.path.join('/dev', n) for n in sorted(os.listdir('/dev'))
                  if n.startswith('loop') and n[4:].isdigit()), None)
    if block is None:
        pytest.skip('no /dev/loopN block device to connect')
    device.unlink()
    os.symlink(block, device)
    driver.connect_volume(info, Instance())
