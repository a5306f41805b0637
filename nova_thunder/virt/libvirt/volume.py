"""Libvirt volume driver for ``driver_volume_type='thunder'``.

The agent has built the disk before libvirt sees it; this driver checks it is
there and describes it to libvirt:

* ``qemu`` backend: a qcow2 overlay file whose backing is the template's
  read-only NBD export on a unix socket. The backing is spelled out as a
  ``<backingStore>`` so libvirt does not have to probe the chain (the qcow2
  header records the same backing as a ``json:`` filename for tools).
* ``kernel`` backend: a block device (device-mapper snapshot).

Only the local agent's own disks are described (:mod:`nova_thunder.layout`:
the overlay, backing and device paths the agent uses for that instance);
anything else in a connection_info is refused before libvirt sees it.

Connecting and disconnecting never create or delete anything: the snapshot
lives until the block device is detached or the instance's disks are
destroyed (see :mod:`nova_thunder.block_device`).
"""

import os
import stat

from lxml import etree
from oslo_log import log as logging

import nova.conf
from nova import exception as nova_exception
from nova.virt.libvirt import config as vconfig
from nova.virt.libvirt.volume import volume as libvirt_volume

from nova_thunder import exception
from nova_thunder import layout

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

# libvirt learnt <reconnect delay> for NBD disk sources in 9.2.0; older
# versions drop the element.
MIN_LIBVIRT_NBD_RECONNECT = (9, 2, 0)


class ThunderGuestDisk(vconfig.LibvirtConfigGuestDisk):
    """A guest disk that can carry an explicit NBD ``<backingStore>``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.backing_format = None
        self.backing_export = None
        self.backing_socket = None
        self.backing_host = None
        self.backing_port = None
        self.backing_reconnect_delay = None

    @classmethod
    def from_disk(cls, disk):
        new = cls()
        for name, value in vars(disk).items():
            if name != 'root_name':
                setattr(new, name, value)
        return new

    def format_dom(self):
        dev = super().format_dom()
        if self.backing_export is None:
            return dev
        backing = etree.Element('backingStore', type='network')
        backing.append(etree.Element('format', type=self.backing_format))
        source = etree.Element('source', protocol='nbd',
                               name=self.backing_export)
        if self.backing_socket:
            source.append(etree.Element('host', transport='unix',
                                        socket=self.backing_socket))
        else:
            source.append(etree.Element('host', name=self.backing_host,
                                        port=str(self.backing_port)))
        if self.backing_reconnect_delay is not None:
            source.append(etree.Element(
                'reconnect', delay=str(self.backing_reconnect_delay)))
        backing.append(source)
        # libvirt reads <backingStore> right after <source>.
        source_el = dev.find('source')
        if source_el is not None:
            source_el.addnext(backing)
        else:
            dev.append(backing)
        return dev


def _data(connection_info):
    data = connection_info.get('data')
    if not isinstance(data, dict):
        raise exception.InvalidThunderDisk(reason='no data')
    return data


def _checked(connection_info, instance=None):
    """The data of the local agent's disk, or InvalidThunderDisk. Without
    *instance* (get_config), the instance the disk names."""
    data = _data(connection_info)
    instance_uuid = instance.uuid if instance is not None else data.get(
        'instance_id')
    return layout.check(connection_info, instance_uuid)


class LibvirtThunderVolumeDriver(libvirt_volume.LibvirtBaseVolumeDriver):
    """Disks prepared by the thunder agent, for either backend."""

    def __init__(self, host):
        # The qemu backend's disk is a file, the kernel backend's a block
        # device; Nova only uses this flag for config drives.
        super().__init__(host, is_block_dev=False)

    def connect_volume(self, connection_info, instance):
        data = _checked(connection_info, instance)
        backend = data['backend']
        if backend == 'qemu':
            try:
                mode = os.lstat(data['path']).st_mode
            except FileNotFoundError:
                raise nova_exception.DiskNotFound(location=data['path'])
            if not stat.S_ISREG(mode):
                # The agent writes a regular file; a symlink there is not
                # its doing.
                raise exception.InvalidThunderDisk(
                    reason='the overlay is not a regular file')
            socket = data['backing'].get('socket')
            if socket and not os.path.exists(socket):
                # The template's daemon is down; the agent restarts it and
                # QEMU's NBD client reconnects, so only warn.
                LOG.warning('Thunder template socket %s is missing', socket,
                            instance=instance)
        else:
            try:
                # /dev/mapper names are udev's symlinks to /dev/dm-N.
                mode = os.stat(data['device_path']).st_mode
            except FileNotFoundError:
                raise nova_exception.DiskNotFound(
                    location=data['device_path'])
            if not stat.S_ISBLK(mode):
                raise exception.InvalidThunderDisk(
                    reason='%s is not a block device' % data['device_path'])
        LOG.debug('Thunder disk of image %s is ready (%s backend)',
                  data.get('image_id'), backend, instance=instance)

    def disconnect_volume(self, connection_info, instance, force=False):
        # Nothing to tear down per connection; see the module docstring.
        LOG.debug('Disconnected thunder disk of image %s',
                  _data(connection_info).get('image_id'), instance=instance)

    def get_config(self, connection_info, disk_info):
        data = _checked(connection_info)
        conf = ThunderGuestDisk.from_disk(
            super().get_config(connection_info, disk_info))
        # The snapshot is private to this instance and writable, whatever
        # Cinder said about the origin volume.
        conf.readonly = False
        conf.shareable = False
        if data['backend'] == 'qemu':
            backing = data['backing']
            conf.source_type = 'file'
            conf.source_path = data['path']
            conf.driver_format = 'qcow2'
            conf.backing_format = 'raw'
            conf.backing_export = backing['export']
            conf.backing_socket = backing.get('socket')
            conf.backing_host = backing.get('host')
            conf.backing_port = backing.get('port')
            delay = backing.get('reconnect_delay')
            if delay is not None and self.host.has_min_version(
                    lv_ver=MIN_LIBVIRT_NBD_RECONNECT):
                conf.backing_reconnect_delay = delay
        else:
            conf.source_type = 'block'
            conf.source_path = data['device_path']
            conf.driver_format = 'raw'
        return conf
