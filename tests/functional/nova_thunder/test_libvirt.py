"""The volume driver's disk XML in real libvirt, and a real boot from it.

The disk is a real thunder snapshot prepared by a real agent; the domain
XML is built with Nova's own libvirt config classes around the volume
driver's disk.
"""

import os
import time
import uuid

import libvirt
import pytest
from lxml import etree

from nova.virt.libvirt import config as vconfig
from nova.virt.libvirt import host as libvirt_host

from nova_thunder import agent as agent_client
from nova_thunder.virt.libvirt import volume
from tests.functional.nova_thunder import bootdisk
from tests.functional.nova_thunder import libvirtd
from tests.functional.nova_thunder.conftest import snapshots
from thunder_lab.emulation import reader

pytestmark = [pytest.mark.functional, pytest.mark.timeout(300)]

DISK_INFO = {'bus': 'virtio', 'dev': 'vda', 'type': 'disk'}


@pytest.fixture
def boot_image(thunder):
    # In the agent's store, named by its id, as Glance's file store does.
    image_id = str(uuid.uuid4())
    try:
        path = bootdisk.make(os.path.join(thunder.store, image_id))
    except bootdisk.ToolsMissing as e:
        pytest.skip(str(e))
    yield {'id': image_id, 'path': path, 'size': os.path.getsize(path)}
    os.unlink(path)


def prepare(boot_image, instance_uuid):
    """Ask the agent for a disk the way the block device classes do."""
    origin = {'driver_volume_type': 'file',
              'data': {'path': boot_image['path']}}
    return agent_client.get_client().prepare(
        boot_image['id'], origin, boot_image['size'], 'raw', instance_uuid,
        'image %s' % boot_image['id'])


def guest_xml(name, instance_uuid, disk, serial_log):
    guest = vconfig.LibvirtConfigGuest()
    guest.virt_type = 'qemu'
    guest.name = name
    guest.uuid = instance_uuid
    guest.memory = 64 * 1024
    guest.vcpus = 1
    guest.os_type = 'hvm'
    guest.os_mach_type = 'pc'
    guest.os_boot_dev = ['hd']
    guest.add_device(disk)
    serial = vconfig.LibvirtConfigGuestSerial()
    serial.type = 'file'
    serial.source_path = serial_log
    guest.add_device(serial)
    return guest.to_xml()


@pytest.fixture
def volume_driver(request):
    uri = getattr(request, 'param', 'test:///default')
    return volume.LibvirtThunderVolumeDriver(libvirt_host.Host(uri))


def test_disk_xml_defines_on_the_test_driver(thunder, boot_image,
                                             volume_driver, workdir):
    instance_uuid = str(uuid.uuid4())
    info = prepare(boot_image, instance_uuid)
    volume_driver.connect_volume(info, None)
    disk = volume_driver.get_config(info, DISK_INFO)
    conn = libvirt.open('test:///default')
    try:
        dom = conn.defineXML(guest_xml('thunder-' + instance_uuid[:8],
                                       instance_uuid, disk,
                                       os.path.join(workdir, 'console')))
        defined = etree.fromstring(dom.XMLDesc(0))
        dom.undefine()
    finally:
        conn.close()
    disks = defined.findall('devices/disk')
    assert len(disks) == 1
    parsed = disks[0]
    assert parsed.find('source').get('file') == info['data']['path']
    assert parsed.find('driver').get('type') == 'qcow2'
    backing = parsed.find('backingStore')
    assert backing.get('type') == 'network'
    assert backing.find('source').get('protocol') == 'nbd'
    assert backing.find('source').get('name') == boot_image['id']
    assert backing.find('source/host').get('socket') == \
        info['data']['backing']['socket']
    # Nova's parser reads the disk back as libvirt returns it.
    reparsed = vconfig.LibvirtConfigGuestDisk()
    reparsed.parse_dom(parsed)
    assert reparsed.source_path == info['data']['path']
    assert reparsed.backing_store.source_protocol == 'nbd'


def test_kernel_disk_xml_defines_on_the_test_driver(volume_driver):
    instance_uuid = str(uuid.uuid4())
    device = '/dev/mapper/thunder-snap-' + instance_uuid
    info = {'driver_volume_type': 'thunder',
            'data': {'backend': 'kernel', 'image_id': str(uuid.uuid4()),
                     'instance_id': instance_uuid, 'device_path': device}}
    disk = volume_driver.get_config(info, DISK_INFO)
    conn = libvirt.open('test:///default')
    try:
        dom = conn.defineXML(guest_xml('thunder-kernel',
                                       info['data']['instance_id'], disk,
                                       '/dev/null'))
        parsed = etree.fromstring(dom.XMLDesc(0)).find('devices/disk')
        dom.undefine()
    finally:
        conn.close()
    assert parsed.get('type') == 'block'
    assert parsed.find('source').get('dev') == device


@pytest.fixture
def private_libvirtd():
    daemon = libvirtd.PrivateLibvirtd()
    try:
        daemon.start()
    except libvirtd.LibvirtdUnavailable as e:
        pytest.skip('cannot run a private libvirtd here: %s' % e)
    yield daemon
    daemon.stop()


@pytest.mark.slow
def test_guest_boots_from_the_thunder_disk(thunder, boot_image, workdir,
                                           private_libvirtd):
    instance_uuid = str(uuid.uuid4())
    info = prepare(boot_image, instance_uuid)
    driver = volume.LibvirtThunderVolumeDriver(
        libvirt_host.Host(private_libvirtd.uri))
    driver.connect_volume(info, None)
    disk = driver.get_config(info, DISK_INFO)
    console = os.path.join(workdir, 'console.log')
    name = 'thunder-' + instance_uuid[:8]
    conn = libvirt.open(private_libvirtd.uri)
    try:
        dom = conn.createXML(guest_xml(name, instance_uuid, disk, console))
        text = ''
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if os.path.exists(console):
                with open(console, errors='replace') as f:
                    text = f.read()
                if ':WRITE-OK' in text or ':DISK-ERROR' in text:
                    break
            time.sleep(0.5)
        live = etree.fromstring(dom.XMLDesc(0)).find('devices/disk')
        dom.destroy()
    finally:
        conn.close()
    assert bootdisk.expected_console() in text, (
        text + private_libvirtd.qemu_log(name))
    # libvirt ran the guest on the overlay, its backing the NBD template.
    assert live.find('source').get('file') == info['data']['path']
    assert live.find('backingStore/source').get('protocol') == 'nbd'

    # The guest's write is in its snapshot, not in the template: a second
    # snapshot of the same image still reads the original sector.
    written = reader.read(info, bootdisk.WRITE_LBA * bootdisk.SECTOR,
                          bootdisk.SECTOR)
    assert written.startswith(bootdisk.WRITE_MARK)
    other = prepare(boot_image, str(uuid.uuid4()))
    assert reader.read(other, bootdisk.WRITE_LBA * bootdisk.SECTOR,
                       bootdisk.SECTOR) == b'\0' * bootdisk.SECTOR
    with open(boot_image['path'], 'rb') as f:
        f.seek(bootdisk.WRITE_LBA * bootdisk.SECTOR)
        assert f.read(bootdisk.SECTOR) == b'\0' * bootdisk.SECTOR
    assert instance_uuid in snapshots(thunder)
