"""The one place where nova-thunder changes Nova at run time.

Nova has no plug-in point for block-device classes or libvirt volume
drivers, and its source is not edited. Instead, before nova-compute starts,
:func:`apply` makes three changes:

1. ``nova.virt.libvirt.driver.VOLUME_DRIVERS['thunder']`` names
   :class:`nova_thunder.virt.libvirt.volume.LibvirtThunderVolumeDriver`;
2. ``nova.virt.block_device.convert_volumes`` and ``convert_images`` are
   replaced by converters that give thunder-marked block devices the
   classes of :mod:`nova_thunder.block_device` and every other block device
   Nova's own class, exactly as before;
3. ``LibvirtDriver.cleanup`` is wrapped: after Nova destroyed an instance's
   local disks (``destroy_disks``), the instance's thunder snapshots are
   released. A hard reboot (``destroy_disks=False``) keeps them.

Each change relies on Nova internals. :func:`check` verifies all of them —
names, types, signatures and how the callers look the patched names up —
and :func:`apply` refuses, changing nothing, unless every one holds. The
Nova release must also be one this code was tested with, unless
``[thunder] allow_untested_nova`` says otherwise.
"""

import functools
import inspect

from oslo_log import log as logging

import nova.conf

from nova_thunder import conf as thunder_conf
from nova_thunder import exception

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

TESTED_NOVA_MAJORS = (34,)
VOLUME_DRIVER = ('nova_thunder.virt.libvirt.volume.'
                 'LibvirtThunderVolumeDriver')
DRIVER_VOLUME_TYPE = 'thunder'

_P = inspect.Parameter
_EMPTY = _P.empty

# (module, dotted attribute, expected parameters as (name, default)).
SIGNATURES = (
    ('nova.virt.block_device', 'DriverVolumeBlockDevice.attach',
     [('self', _EMPTY), ('context', _EMPTY), ('instance', _EMPTY),
      ('volume_api', _EMPTY), ('virt_driver', _EMPTY),
      ('do_driver_attach', False), ('kwargs', _EMPTY)]),
    ('nova.virt.block_device', 'DriverVolumeBlockDevice.detach',
     [('self', _EMPTY), ('context', _EMPTY), ('instance', _EMPTY),
      ('volume_api', _EMPTY), ('virt_driver', _EMPTY),
      ('attachment_id', None), ('destroy_bdm', False)]),
    ('nova.virt.block_device', 'DriverVolumeBlockDevice._do_detach',
     [('self', _EMPTY), ('context', _EMPTY), ('instance', _EMPTY),
      ('volume_api', _EMPTY), ('virt_driver', _EMPTY),
      ('attachment_id', None), ('destroy_bdm', False)]),
    ('nova.virt.block_device', 'DriverVolumeBlockDevice.driver_detach',
     [('self', _EMPTY), ('context', _EMPTY), ('instance', _EMPTY),
      ('volume_api', _EMPTY), ('virt_driver', _EMPTY)]),
    ('nova.virt.block_device',
     'DriverVolumeBlockDevice.refresh_connection_info',
     [('self', _EMPTY), ('context', _EMPTY), ('instance', _EMPTY),
      ('volume_api', _EMPTY), ('virt_driver', _EMPTY)]),
    ('nova.virt.block_device', 'DriverVolumeBlockDevice._get_volume',
     [('context', _EMPTY), ('volume_api', _EMPTY), ('volume_id', _EMPTY)]),
    ('nova.virt.block_device', 'DriverVolImageBlockDevice.attach',
     [('self', _EMPTY), ('context', _EMPTY), ('instance', _EMPTY),
      ('volume_api', _EMPTY), ('virt_driver', _EMPTY),
      ('wait_func', None)]),
    ('nova.virt.block_device', '_convert_block_devices',
     [('device_type', _EMPTY), ('block_device_mapping', _EMPTY)]),
    ('nova.virt.driver', 'block_device_info_get_mapping',
     [('block_device_info', _EMPTY)]),
    ('nova.virt.libvirt.driver', 'LibvirtDriver.cleanup',
     [('self', _EMPTY), ('context', _EMPTY), ('instance', _EMPTY),
      ('network_info', _EMPTY), ('block_device_info', None),
      ('destroy_disks', True), ('migrate_data', None),
      ('destroy_vifs', True), ('destroy_secrets', True)]),
    ('nova.virt.libvirt.driver', 'LibvirtDriver.attach_volume',
     [('self', _EMPTY), ('context', _EMPTY), ('connection_info', _EMPTY),
      ('instance', _EMPTY), ('mountpoint', _EMPTY), ('disk_bus', None),
      ('device_type', None), ('encryption', None)]),
    ('nova.virt.libvirt.volume.volume', 'LibvirtBaseVolumeDriver.__init__',
     [('self', _EMPTY), ('host', _EMPTY), ('is_block_dev', _EMPTY)]),
    ('nova.virt.libvirt.volume.volume',
     'LibvirtBaseVolumeDriver.get_config',
     [('self', _EMPTY), ('connection_info', _EMPTY), ('disk_info', _EMPTY)]),
    ('nova.virt.libvirt.volume.volume',
     'LibvirtBaseVolumeDriver.connect_volume',
     [('self', _EMPTY), ('connection_info', _EMPTY), ('instance', _EMPTY)]),
    ('nova.virt.libvirt.volume.volume',
     'LibvirtBaseVolumeDriver.disconnect_volume',
     [('self', _EMPTY), ('connection_info', _EMPTY), ('instance', _EMPTY),
      ('force', False)]),
    ('nova.virt.libvirt.host', 'Host.has_min_version',
     [('self', _EMPTY), ('lv_ver', None), ('hv_ver', None),
      ('hv_type', None)]),
    ('nova.image.glance', 'API.get',
     [('self', _EMPTY), ('context', _EMPTY), ('id_or_uri', _EMPTY),
      ('include_locations', False), ('show_deleted', True)]),
)

# (module, function, names its code must use): global names looked up at
# call time, and the Cinder calls Nova's own attach makes, which the thunder
# classes make the same way.
GLOBAL_LOOKUPS = (
    ('nova.virt.block_device', 'DriverVolumeBlockDevice._volume_attach',
     ('attachment_update', 'attachment_complete', 'attachment_delete',
      'attach_volume')),
    ('nova.virt.block_device', 'DriverVolumeBlockDevice._do_attach',
     ('get_volume_connector',)),
    ('nova.virt.block_device', 'convert_all_volumes',
     ('convert_volumes', 'convert_images')),
    ('nova.virt.libvirt.driver', 'LibvirtDriver._get_volume_driver',
     ('VOLUME_DRIVERS',)),
    ('nova.virt.libvirt.driver', 'LibvirtDriver.destroy', ('cleanup',)),
    ('nova.virt.driver', 'get_block_device_info', ('convert_all_volumes',)),
)

_originals = {}


def _import(module):
    return __import__(module, fromlist=['_'])


def _resolve(module, dotted):
    obj = _import(module)
    for part in dotted.split('.'):
        obj = getattr(obj, part)
    return obj


def _nova_version():
    from nova import version
    return version.version_info.release_string()


def _check_version(problems, allow_untested_nova):
    if allow_untested_nova is None:
        allow_untested_nova = CONF.thunder.allow_untested_nova
    version = _nova_version()
    try:
        major = int(version.split('.')[0])
    except ValueError:
        major = None
    if major not in TESTED_NOVA_MAJORS and not allow_untested_nova:
        problems.append(
            'Nova %s is not a tested release (tested: %s); set [thunder] '
            'allow_untested_nova = true to try it anyway'
            % (version, ', '.join('%d.x' % m for m in TESTED_NOVA_MAJORS)))


def _check_signatures(problems):
    for module, dotted, expected in SIGNATURES:
        try:
            func = _resolve(module, dotted)
        except (ImportError, AttributeError) as e:
            problems.append('%s.%s is missing (%s)' % (module, dotted, e))
            continue
        # Look through Nova's decorators (update_db, translate_*).
        func = inspect.unwrap(func)
        try:
            params = inspect.signature(func).parameters.values()
        except (TypeError, ValueError) as e:
            problems.append('%s.%s has no signature (%s)'
                            % (module, dotted, e))
            continue
        actual = [(p.name, p.default) for p in params]
        if actual != expected:
            problems.append('%s.%s(%s) changed; expected (%s)' % (
                module, dotted, _fmt(actual), _fmt(expected)))


def _fmt(params):
    return ', '.join(name if default is _EMPTY else '%s=%r' % (name, default)
                     for name, default in params)


def _check_lookups(problems):
    for module, dotted, names in GLOBAL_LOOKUPS:
        try:
            func = inspect.unwrap(_resolve(module, dotted))
            code_names = func.__code__.co_names
        except (ImportError, AttributeError) as e:
            problems.append('%s.%s is missing (%s)' % (module, dotted, e))
            continue
        for name in names:
            if name not in code_names:
                problems.append('%s.%s no longer looks up %s'
                                % (module, dotted, name))


def _check_structures(problems):
    try:
        from nova.virt import block_device as bd
        from nova.virt.libvirt import config as vconfig
        from nova.virt.libvirt import driver as libvirt_driver
    except ImportError as e:
        problems.append('cannot import Nova modules: %s' % e)
        return
    for name, cls in (('convert_volumes', 'DriverVolumeBlockDevice'),
                      ('convert_images', 'DriverVolImageBlockDevice')):
        conv = _originals.get(('nova.virt.block_device', name),
                              getattr(bd, name, None))
        if not (isinstance(conv, functools.partial) and
                conv.func is getattr(bd, '_convert_block_devices', None) and
                conv.args == (getattr(bd, cls, None),)):
            problems.append('nova.virt.block_device.%s is no longer '
                            '_convert_block_devices bound to %s' % (name, cls))
    if getattr(bd.DriverVolumeBlockDevice, '_valid_source', None) != 'volume':
        problems.append('DriverVolumeBlockDevice no longer handles '
                        'source_type volume')
    if getattr(bd.DriverVolImageBlockDevice, '_valid_source', None) != 'image':
        problems.append('DriverVolImageBlockDevice no longer handles '
                        'source_type image')
    if not callable(getattr(bd, 'update_db', None)):
        problems.append('nova.virt.block_device.update_db is missing')
    drivers = getattr(libvirt_driver, 'VOLUME_DRIVERS', None)
    if not isinstance(drivers, dict):
        problems.append('nova.virt.libvirt.driver.VOLUME_DRIVERS is not a '
                        'dict')
    elif drivers.get(DRIVER_VOLUME_TYPE, VOLUME_DRIVER) != VOLUME_DRIVER:
        problems.append('VOLUME_DRIVERS[%r] is already %r' % (
            DRIVER_VOLUME_TYPE, drivers[DRIVER_VOLUME_TYPE]))
    disk = vconfig.LibvirtConfigGuestDisk()
    for attr in ('source_type', 'source_path', 'driver_format', 'readonly',
                 'shareable', 'serial'):
        if not hasattr(disk, attr):
            problems.append('LibvirtConfigGuestDisk has no %s' % attr)


def check(allow_untested_nova=None):
    """Every reason this Nova cannot be wired, as a list of sentences.

    *allow_untested_nova* defaults to ``[thunder] allow_untested_nova``.
    """
    thunder_conf.register_opts(CONF)
    problems = []
    _check_version(problems, allow_untested_nova)
    _check_signatures(problems)
    _check_lookups(problems)
    _check_structures(problems)
    return problems


def _release_after_cleanup(cleanup):
    @functools.wraps(cleanup)
    def wrapper(self, context, instance, network_info,
                block_device_info=None, destroy_disks=True,
                migrate_data=None, destroy_vifs=True, destroy_secrets=True):
        result = cleanup(self, context, instance, network_info,
                         block_device_info=block_device_info,
                         destroy_disks=destroy_disks,
                         migrate_data=migrate_data,
                         destroy_vifs=destroy_vifs,
                         destroy_secrets=destroy_secrets)
        if destroy_disks:
            from nova_thunder import block_device
            block_device.release_disks(instance, block_device_info)
        return result
    wrapper.__nova_thunder_wrapped__ = True
    return wrapper


def is_applied():
    return bool(_originals)


def apply(allow_untested_nova=None):
    """Check Nova, then wire nova-thunder in; raises NovaIncompatible."""
    # nova-compute-thunder's one place of option registration (idempotent).
    thunder_conf.register_opts(CONF)
    if is_applied():
        return
    problems = check(allow_untested_nova)
    if problems:
        raise exception.NovaIncompatible(version=_nova_version(),
                                         reason='; '.join(problems))
    from nova.virt import block_device as nova_bd
    from nova.virt.libvirt import driver as libvirt_driver

    from nova_thunder import block_device

    _originals[('nova.virt.block_device', 'convert_volumes')] = (
        nova_bd.convert_volumes)
    _originals[('nova.virt.block_device', 'convert_images')] = (
        nova_bd.convert_images)
    _originals[('nova.virt.libvirt.driver', 'LibvirtDriver.cleanup')] = (
        libvirt_driver.LibvirtDriver.cleanup)
    _originals[('nova.virt.libvirt.driver', 'VOLUME_DRIVERS')] = (
        libvirt_driver.VOLUME_DRIVERS.get(DRIVER_VOLUME_TYPE))

    libvirt_driver.VOLUME_DRIVERS[DRIVER_VOLUME_TYPE] = VOLUME_DRIVER
    nova_bd.convert_volumes = block_device.convert_volumes
    nova_bd.convert_images = block_device.convert_images
    libvirt_driver.LibvirtDriver.cleanup = _release_after_cleanup(
        libvirt_driver.LibvirtDriver.cleanup)
    LOG.info('nova-thunder wired into Nova %s: volume driver %r, '
             'thunder block devices for volume types %s',
             _nova_version(), DRIVER_VOLUME_TYPE, CONF.thunder.volume_types)


def restore():
    """Undo :func:`apply` (for tests and tools sharing a process)."""
    if not is_applied():
        return
    from nova.virt import block_device as nova_bd
    from nova.virt.libvirt import driver as libvirt_driver

    nova_bd.convert_volumes = _originals[
        ('nova.virt.block_device', 'convert_volumes')]
    nova_bd.convert_images = _originals[
        ('nova.virt.block_device', 'convert_images')]
    libvirt_driver.LibvirtDriver.cleanup = _originals[
        ('nova.virt.libvirt.driver', 'LibvirtDriver.cleanup')]
    previous = _originals[('nova.virt.libvirt.driver', 'VOLUME_DRIVERS')]
    if previous is None:
        libvirt_driver.VOLUME_DRIVERS.pop(DRIVER_VOLUME_TYPE, None)
    else:
        libvirt_driver.VOLUME_DRIVERS[DRIVER_VOLUME_TYPE] = previous
    _originals.clear()
