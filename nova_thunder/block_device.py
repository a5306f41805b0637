"""Thunder block devices, in Nova's ``nova.virt.block_device`` family.

Two classes, one per kind of origin, both returning connection_info with
``driver_volume_type='thunder'`` that the local agent built:

* :class:`ThunderVolumeBlockDevice` (``source_type=volume``): the Cinder
  volume is the origin. The Cinder attachment is kept as usual (Cinder knows
  who uses its volume); its iSCSI connection becomes the template's origin.
* :class:`ThunderImageBlockDevice` (``source_type=image``,
  ``destination_type=volume``): the Glance image is the origin and no
  Cinder volume exists.

The agent's answer is used only if it is the local agent's disk of that
instance and image (:mod:`nova_thunder.layout`); anything else is
released and refused before libvirt sees it.

The writable snapshot is the instance's disk on this host. It is released
when the block device is detached, and when Nova destroys the instance's
local disks (see :func:`release_disks`, called by the wiring from the libvirt
driver's ``cleanup``); a hard reboot keeps it.

:func:`convert_volumes` and :func:`convert_images` replace Nova's
converters of the same names (see :mod:`nova_thunder.wiring`): marked block
devices get these classes, every other one Nova's own.
"""

from os_brick.initiator import utils as brick_utils
from oslo_log import log as logging
from oslo_utils import excutils

import nova.conf
from nova import exception as nova_exception
from nova.image import glance
from nova.virt import block_device as nova_block_device
from nova.virt import driver as virt_driver_mod

from nova_thunder import agent
from nova_thunder import exception
from nova_thunder import layout
from nova_thunder import marking

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

# Top-level connection_info key naming the agent that holds the snapshot.
AGENT_HOST_KEY = 'thunder_agent_host'


class _ThunderDevice:
    """What both thunder block devices share."""

    def _source(self):
        raise NotImplementedError()

    def _prepare(self, instance, image_id, origin, size, image_format):
        if not CONF.thunder.enabled:
            raise exception.ThunderDisabled(source=self._source(),
                                            host=CONF.host)
        client = agent.get_client()
        connection_info = client.prepare(image_id, origin, size,
                                         image_format, instance.uuid,
                                         self._source())
        try:
            _check_disk(connection_info, instance, image_id)
        except Exception:
            with excutils.save_and_reraise_exception():
                self._release(instance, connection_info)
        connection_info[AGENT_HOST_KEY] = agent.agent_host()
        return connection_info

    def _release(self, instance, connection_info=None):
        connection_info = connection_info or self['connection_info'] or {}
        agent.get_client().release(instance.uuid,
                                   connection_info.get(AGENT_HOST_KEY))

    def _release_quietly(self, instance, connection_info=None):
        try:
            self._release(instance, connection_info)
        except Exception:
            LOG.exception('Could not release the thunder snapshot',
                          instance=instance)

    def refresh_connection_info(self, context, instance, volume_api,
                                virt_driver):
        # Nova would replace connection_info with Cinder's (the origin's);
        # the disk is the agent's snapshot, whose description is stable
        # across agent and data-plane restarts.
        LOG.debug('Keeping the thunder connection_info of %s',
                  self._source(), instance=instance)


def _check_disk(connection_info, instance, image_id):
    """Refuse an answer to prepare that is not the local agent's disk of
    *instance* and *image_id* (see :mod:`nova_thunder.layout`); the caller
    releases the snapshot."""
    if not marking.is_thunder_connection(connection_info):
        raise exception.InvalidThunderDisk(
            reason='driver_volume_type is %r' % (
                (connection_info or {}).get('driver_volume_type'),))
    data = connection_info.get('data') or {}
    if data.get('backend') != CONF.thunder.backend:
        raise exception.ThunderBackendMismatch(
            host=agent.agent_host(), actual=data.get('backend'),
            expected=CONF.thunder.backend)
    layout.check(connection_info, instance.uuid, image_id)


class ThunderVolumeBlockDevice(_ThunderDevice,
                               nova_block_device.DriverVolumeBlockDevice):
    """A thunder disk whose origin is a Cinder volume."""

    def _source(self):
        return 'volume %s' % self.volume_id

    @nova_block_device.update_db
    def attach(self, context, instance, volume_api, virt_driver,
               do_driver_attach=False, **kwargs):
        volume = self._get_volume(context, volume_api, self.volume_id)
        volume_api.check_availability_zone(context, volume,
                                           instance=instance)
        marking.check_volume(volume)
        if self.volume_size is None:
            self.volume_size = volume.get('size')
        with brick_utils.guard_connection(volume):
            self._attach_thunder(context.elevated(), instance, volume,
                                 volume_api, virt_driver, do_driver_attach)

    def _attach_thunder(self, context, instance, volume, volume_api,
                        virt_driver, do_driver_attach):
        volume_id = volume['id']
        attachment_id = self['attachment_id']
        if not attachment_id:
            raise exception.ThunderVolumeUnsupported(
                volume_id=volume_id,
                reason='it has no Cinder attachment (legacy attach flow)')
        # Cinder exports the volume to this host: that is the origin.
        connector = virt_driver.get_volume_connector(instance)
        origin_info = volume_api.attachment_update(
            context, attachment_id, connector,
            self['mount_device'])['connection_info']
        origin = marking.volume_origin(volume_id, origin_info)
        connection_info = self._prepare(
            instance, volume_id, origin, marking.volume_size_bytes(volume),
            'raw')
        connection_info['serial'] = volume_id

        if do_driver_attach:
            try:
                virt_driver.attach_volume(
                    context, connection_info, instance, self['mount_device'],
                    disk_bus=self['disk_bus'],
                    device_type=self['device_type'], encryption=None)
            except Exception:
                with excutils.save_and_reraise_exception():
                    LOG.exception('Driver failed to attach thunder disk of '
                                  'volume %s', volume_id, instance=instance)
                    self._release_quietly(instance, connection_info)
                    volume_api.attachment_delete(context, attachment_id)

        # Saved before the volume turns in-use, as Nova does: detach needs it.
        self['connection_info'] = connection_info
        self.save()
        try:
            volume_api.attachment_complete(context, attachment_id)
        except Exception:
            with excutils.save_and_reraise_exception():
                if do_driver_attach:
                    try:
                        virt_driver.detach_volume(
                            context, connection_info, instance,
                            self['mount_device'], encryption=None)
                    except Exception:
                        LOG.warning('Driver failed to detach the thunder '
                                    'disk of volume %s', volume_id,
                                    exc_info=True, instance=instance)
                self._release_quietly(instance, connection_info)
                volume_api.attachment_delete(context, attachment_id)

    def detach(self, context, instance, volume_api, virt_driver,
               attachment_id=None, destroy_bdm=False):
        volume = self._get_volume(context, volume_api, self.volume_id)
        with brick_utils.guard_connection(volume):
            self._do_detach(context, instance, volume_api, virt_driver,
                            attachment_id, destroy_bdm)
        if self['connection_info']:
            self._release(instance)


class ThunderImageBlockDevice(_ThunderDevice,
                              nova_block_device.DriverVolImageBlockDevice):
    """A thunder disk whose origin is a Glance image (no Cinder volume)."""

    def _source(self):
        return 'image %s' % self.image_id

    @nova_block_device.update_db
    def attach(self, context, instance, volume_api, virt_driver,
               wait_func=None, do_driver_attach=False, **kwargs):
        if self.volume_id:
            raise exception.ThunderImageUnsupported(
                image_id=self.image_id,
                reason='the block device already has volume %s'
                       % self.volume_id)
        image = glance.API().get(context, self.image_id)
        origin, size, image_format = marking.image_origin(image)
        connection_info = self._prepare(instance, self.image_id, origin,
                                        size, image_format)
        if do_driver_attach:
            try:
                virt_driver.attach_volume(
                    context, connection_info, instance, self['mount_device'],
                    disk_bus=self['disk_bus'],
                    device_type=self['device_type'], encryption=None)
            except Exception:
                with excutils.save_and_reraise_exception():
                    self._release_quietly(instance, connection_info)
        self['connection_info'] = connection_info

    def driver_detach(self, context, instance, volume_api, virt_driver):
        # Nova's version asks Cinder about encryption and rolls back the
        # volume's state; there is no volume here.
        try:
            virt_driver.detach_volume(context, self['connection_info'],
                                      instance, self['mount_device'],
                                      encryption=None)
        except nova_exception.DiskNotFound as err:
            LOG.warning('Ignoring DiskNotFound while detaching the thunder '
                        'disk of %s: %s', self._source(), err,
                        instance=instance)

    def detach(self, context, instance, volume_api, virt_driver,
               attachment_id=None, destroy_bdm=False):
        if not self['connection_info']:
            return
        if CONF.host == instance.host:
            self.driver_detach(context, instance, volume_api, virt_driver)
        self._release(instance)


def _convert(nova_class, thunder_class, block_device_mapping):
    devices = []
    for bdm in block_device_mapping:
        cls = thunder_class if _marked(nova_class, bdm) else nova_class
        # Nova's own loop keeps its rules for what is transformable.
        devices.extend(nova_block_device._convert_block_devices(cls, [bdm]))
    return devices


def _marked(nova_class, bdm):
    if bdm.no_device:
        return False
    if (bdm.source_type != nova_class._valid_source or
            bdm.destination_type != 'volume'):
        return False
    return marking.is_thunder_bdm(bdm)


def convert_volumes(block_device_mapping):
    return _convert(nova_block_device.DriverVolumeBlockDevice,
                    ThunderVolumeBlockDevice, block_device_mapping)


def convert_images(block_device_mapping):
    return _convert(nova_block_device.DriverVolImageBlockDevice,
                    ThunderImageBlockDevice, block_device_mapping)


def release_disks(instance, block_device_info):
    """Release every thunder snapshot of *instance* listed in
    *block_device_info*; errors are logged, never raised, so that deleting
    an instance cannot be blocked by an unreachable agent."""
    released = 0
    for device in virt_driver_mod.block_device_info_get_mapping(
            block_device_info):
        connection_info = device.get('connection_info')
        if not marking.is_thunder_connection(connection_info):
            continue
        try:
            agent.get_client().release(instance.uuid,
                                       connection_info.get(AGENT_HOST_KEY))
            released += 1
        except Exception:
            LOG.exception('Could not release the thunder snapshot; the '
                          'agent keeps it until deleted by hand',
                          instance=instance)
    return released
