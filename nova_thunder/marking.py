"""How a block device is recognised as thunder, and where its origin is.

The mark is a Cinder volume type listed in ``[thunder] volume_types``
(created with the extra spec ``thunder:enabled='<is> True'``):

* ``source_type=volume``: the volume's type. The volume (a "golden",
  multi-attach, preferably read-only volume) is the origin; the agent reads
  it over the iSCSI connection Cinder gives this host.
* ``source_type=image, destination_type=volume, volume_type=<type>``: the
  Glance image is the origin; no Cinder volume is created. Where the agent
  reads it is the operator's choice: ``[thunder] store_image_origins`` for
  the image's Glance store, else ``[thunder] image_origin``. The image
  property ``thunder_origin`` names the origin only for an image owned by a
  project of ``[thunder] trusted_image_owners``: any tenant may set
  properties on its images, the agent reads origins as root, and Nova
  copies properties into the snapshots tenants make. Another owner's
  property is ignored (logged), not refused, for that last reason: the
  snapshot of a server booted from a trusted image carries the property
  naming the *parent's* origin, and reading it would boot the wrong data.

Nova only ever passes the volume type's *name* (and Cinder shows custom
extra specs to administrators only), so the name is what nova-compute
matches. A block device that already carries a thunder connection_info is
thunder whatever the configuration says now, so existing disks keep
working.

Everything here reads the dicts Nova builds from python-cinderclient and
python-glanceclient answers (``nova.volume.cinder``, ``nova.image.glance``).
"""

import threading
import time
import urllib.parse

from oslo_context import context as common_context
from oslo_log import log as logging
from oslo_serialization import jsonutils
from oslo_utils import units

import nova.conf
from nova import context as nova_context

from nova_thunder import exception

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

DRIVER_VOLUME_TYPE = 'thunder'
EXTRA_SPEC = 'thunder:enabled'
ORIGIN_PROPERTY = 'thunder_origin'
IMAGE_FORMATS = ('raw', 'qcow2')
NBD_DEFAULT_PORT = 10809

# os-brick iSCSI properties that identify the origin LUN. Anything else in a
# Cinder connection_info (attachment ids, access mode, QoS, discard) varies
# between attachments of the same volume, while the agent keys one template
# on one origin.
ISCSI_ORIGIN_KEYS = (
    'target_portal', 'target_iqn', 'target_lun',
    'target_portals', 'target_iqns', 'target_luns',
    'auth_method', 'auth_username', 'auth_password',
    'discovery_auth_method', 'discovery_auth_username',
    'discovery_auth_password', 'volume_id',
)

# How long a looked-up volume type is trusted (seconds). Only volumes not
# yet attached on this host are looked up, i.e. during spawn and attach.
_VOLUME_TYPE_TTL = 60


def is_thunder_volume_type(name):
    return bool(name) and name in CONF.thunder.volume_types


def is_thunder_connection(connection_info):
    return (isinstance(connection_info, dict) and
            connection_info.get('driver_volume_type') == DRIVER_VOLUME_TYPE)


def _stored_connection_info(bdm):
    raw = bdm.connection_info if 'connection_info' in bdm else None
    if not raw:
        return None
    try:
        return jsonutils.loads(raw)
    except (TypeError, ValueError):
        return None


def is_thunder_bdm(bdm):
    """Decide, from a BlockDeviceMapping object, whether thunder handles it.

    Called while Nova converts block devices, where no request context is
    passed: a BDM that is attached already is judged by its stored
    connection_info, an image-to-volume BDM by its ``volume_type``, and only
    a not yet attached ``source_type=volume`` BDM needs its volume's type
    from Cinder.
    """
    if bdm.destination_type != 'volume':
        return False
    connection_info = _stored_connection_info(bdm)
    if connection_info:
        return is_thunder_connection(connection_info)
    if bdm.source_type == 'image':
        volume_type = bdm.volume_type if 'volume_type' in bdm else None
        return is_thunder_volume_type(volume_type)
    if bdm.source_type == 'volume' and bdm.volume_id:
        if not CONF.thunder.volume_types:
            return False
        return is_thunder_volume_type(_volume_types.get(bdm.volume_id))
    return False


class _VolumeTypeCache:
    """Volume id -> type name, from Cinder, briefly remembered."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries = {}

    def get(self, volume_id):
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(volume_id)
            if entry and now - entry[1] < _VOLUME_TYPE_TTL:
                return entry[0]
        volume = _cinder().get(_lookup_context(), volume_id)
        # Nova keeps Cinder's "volume_type" (the type name) under this key.
        name = volume.get('volume_type_id')
        with self._lock:
            self._entries[volume_id] = (name, now)
            if len(self._entries) > 4096:
                self._entries.clear()
        return name

    def forget(self, volume_id=None):
        with self._lock:
            if volume_id is None:
                self._entries.clear()
            else:
                self._entries.pop(volume_id, None)


_volume_types = _VolumeTypeCache()


def _cinder():
    from nova.volume import cinder
    return cinder.API()


def _lookup_context():
    # Nova hands the request context of an operation to the threads doing
    # it (for logging); conversion happens inside such an operation.
    current = common_context.get_current()
    if isinstance(current, nova_context.RequestContext):
        return current
    return nova_context.get_admin_context()


# -- volumes ---------------------------------------------------------------

def check_volume(volume):
    """Refuse a Cinder volume (Nova's dict) that cannot be an origin."""
    volume_id = volume.get('id')
    volume_type = volume.get('volume_type_id')
    if not is_thunder_volume_type(volume_type):
        raise exception.ThunderVolumeUnsupported(
            volume_id=volume_id,
            reason='its volume type %r is not one of [thunder] volume_types '
                   '%s' % (volume_type, CONF.thunder.volume_types))
    if not volume.get('size'):
        raise exception.ThunderVolumeUnsupported(
            volume_id=volume_id, reason='Cinder reports no size')
    return volume


def volume_size_bytes(volume):
    return int(volume['size']) * units.Gi


def volume_origin(volume_id, connection_info):
    """The agent origin for a Cinder attachment's connection_info."""
    if not isinstance(connection_info, dict):
        raise exception.ThunderVolumeUnsupported(
            volume_id=volume_id, reason='Cinder returned no connection_info')
    kind = connection_info.get('driver_volume_type')
    data = connection_info.get('data') or {}
    if kind != 'iscsi':
        raise exception.ThunderVolumeUnsupported(
            volume_id=volume_id,
            reason='its connection type is %r; thunder reads volume origins '
                   'over iSCSI' % kind)
    if data.get('encrypted'):
        raise exception.ThunderVolumeUnsupported(
            volume_id=volume_id,
            reason='encrypted volumes cannot be shared as templates')
    origin = {key: data[key] for key in ISCSI_ORIGIN_KEYS if key in data}
    if 'target_lun' in origin:
        try:
            origin['target_lun'] = int(origin['target_lun'])
        except (TypeError, ValueError):
            raise exception.ThunderVolumeUnsupported(
                volume_id=volume_id,
                reason='target_lun %r is not a number' % origin['target_lun'])
    for key in ('target_portal', 'target_iqn'):
        if not origin.get(key):
            raise exception.ThunderVolumeUnsupported(
                volume_id=volume_id,
                reason='its iSCSI connection has no %s' % key)
    return {'driver_volume_type': 'iscsi', 'data': origin}


# -- images ----------------------------------------------------------------

def image_origin(image):
    """(origin, size, image_format) of a Glance image (Nova's dict)."""
    image_id = image.get('id')
    properties = image.get('properties') or {}
    disk_format = image.get('disk_format')
    if disk_format not in IMAGE_FORMATS:
        raise exception.ThunderImageUnsupported(
            image_id=image_id,
            reason='disk_format %r is not one of %s'
                   % (disk_format, ', '.join(IMAGE_FORMATS)))
    if image.get('status', 'active') != 'active':
        raise exception.ThunderImageUnsupported(
            image_id=image_id, reason='status is %r' % image.get('status'))
    size = _image_size(image)
    pattern = _origin_pattern(image_id, image, properties)
    if not pattern:
        raise exception.ThunderImageUnsupported(
            image_id=image_id,
            reason='no origin is configured for it ([thunder] image_origin '
                   'or store_image_origins)')
    origin = parse_origin_url(pattern.replace('{image_id}', image_id))
    return origin, size, disk_format


def trusted_owner(owner):
    """True when images of project *owner* may name their origin."""
    trusted = CONF.thunder.trusted_image_owners
    return bool(owner) and ('*' in trusted or owner in trusted)


def _origin_pattern(image_id, image, properties):
    """The origin URL pattern of *image*: a trusted owner's property, the
    entry of the image's store, or the operator's default."""
    prop = properties.get(ORIGIN_PROPERTY)
    if prop:
        owner = image.get('owner')
        if trusted_owner(owner):
            return prop
        LOG.warning('Ignoring the image property %(prop)s of image '
                    '%(image)s: its owner %(owner)s is not in [thunder] '
                    'trusted_image_owners', {'prop': ORIGIN_PROPERTY,
                                             'image': image_id,
                                             'owner': owner})
    by_store = CONF.thunder.store_image_origins
    if by_store:
        # Glance's "stores" (multi-store only) is set by Glance, never by
        # users; Nova keeps it as a base attribute.
        stores = image.get('stores') or properties.get('stores') or ''
        for store in str(stores).split(','):
            if store.strip() in by_store:
                return by_store[store.strip()]
    return CONF.thunder.image_origin


def _image_size(image):
    image_id = image.get('id')
    # Nova drops Glance's virtual_size from its image dicts; a raw image's
    # size is its virtual size.
    size = image.get('virtual_size')
    if not size and image.get('disk_format') == 'raw':
        size = image.get('size')
    if not size:
        raise exception.ThunderImageUnsupported(
            image_id=image_id,
            reason='its virtual size is unknown to Nova (Glance reports '
                   'it for raw images only); upload it as raw')
    try:
        size = int(size)
    except (TypeError, ValueError):
        raise exception.ThunderImageUnsupported(
            image_id=image_id, reason='size %r is not a number' % (size,))
    if size <= 0 or size % 512:
        raise exception.ThunderImageUnsupported(
            image_id=image_id,
            reason='size %d is not a positive multiple of 512' % size)
    return size


def parse_origin_url(url):
    """Turn an origin URL into the agent's origin dict.

    ``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``
    (the NBD URI standard) and ``file:///PATH``.
    """
    if not isinstance(url, str) or not url:
        raise exception.InvalidOriginURL(url=url, reason='empty')
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port
    except ValueError as e:
        raise exception.InvalidOriginURL(url=url, reason=str(e))
    export = urllib.parse.unquote(parsed.path[1:]) if parsed.path else ''
    if parsed.scheme == 'nbd':
        if not parsed.hostname:
            raise exception.InvalidOriginURL(url=url, reason='no host')
        return {'driver_volume_type': 'nbd',
                'data': {'host': parsed.hostname,
                         'port': port or NBD_DEFAULT_PORT,
                         'export': export}}
    if parsed.scheme == 'nbd+unix':
        query = urllib.parse.parse_qs(parsed.query)
        sockets = query.get('socket')
        if parsed.netloc or not sockets or len(sockets) != 1:
            raise exception.InvalidOriginURL(
                url=url, reason='needs an empty host and one socket= '
                                'parameter')
        return {'driver_volume_type': 'nbd',
                'data': {'socket': sockets[0], 'export': export}}
    if parsed.scheme == 'file':
        if parsed.netloc not in ('', 'localhost') or not parsed.path:
            raise exception.InvalidOriginURL(
                url=url, reason='must be file:///ABSOLUTE/PATH')
        return {'driver_volume_type': 'file',
                'data': {'path': urllib.parse.unquote(parsed.path)}}
    raise exception.InvalidOriginURL(
        url=url, reason='scheme %r is not nbd, nbd+unix or file'
                        % parsed.scheme)
