"""The local agent's disks, as nova-compute knows them, and nothing else.

connection_info comes back from the agent over the message bus, and
libvirt gives the guest whatever file, device or NBD export it names: a
forged answer to nova-compute's ``prepare`` (anything that can consume or
answer on the agent's topic) would give a guest ``/etc/shadow``, another
instance's overlay, another image's template or a host block device. So
nova-compute accepts only the agent's own layout, from the ``[thunder]
agent_*`` options (which must equal the agent's options they name):

* ``qemu``: the overlay ``<agent_state_path>/snapshots/<instance
  uuid>/overlay.qcow2`` (format qcow2), whose backing is the NBD export
  ``<image id>`` (format raw) of the template, on the socket
  ``<agent_run_path>/<image id>.nbd`` or, for a relaying template, on
  ``agent_relay_address`` at a port of ``agent_relay_port_min..max``;
* ``kernel``: ``/dev/mapper/<agent_device_prefix>-snap-<instance uuid>``
  (format raw), the name the kernel driver gives an instance's dm snapshot
  (:func:`thunder_agent.drivers.kernel.dmtables.snapshot_name`).

Ids are canonical UUIDs (the agent's own rule), so no path built from them
can leave its directory. :func:`check` runs before libvirt sees a disk:
when the agent answers a prepare (the block device then releases the
snapshot), and again each time the volume driver connects or describes it.
A refusal says "not a disk of this host's agent" and the nova-compute log
has what was wrong: the message becomes an instance fault the tenant
reads.
"""

import ipaddress
import os
import uuid

from oslo_log import log as logging

import nova.conf

from nova_thunder import exception

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

BACKENDS = ('qemu', 'kernel')
OVERLAY_FILE = 'overlay.qcow2'
MAPPER_DIR = '/dev/mapper/'
BACKING_KEYS = {'driver', 'format', 'export', 'socket', 'host', 'port',
                'reconnect_delay'}


class _Foreign(Exception):
    """The disk is not the agent's (the argument says why)."""


def overlay_path(instance_uuid):
    return os.path.join(CONF.thunder.agent_state_path, 'snapshots',
                        instance_uuid, OVERLAY_FILE)


def template_socket(image_id):
    return os.path.join(CONF.thunder.agent_run_path, image_id + '.nbd')


def snapshot_device(instance_uuid):
    return '%s%s-snap-%s' % (MAPPER_DIR, CONF.thunder.agent_device_prefix,
                             instance_uuid)


def check(connection_info, instance_uuid, image_id=None):
    """Refuse (InvalidThunderDisk) a thunder connection_info that is not
    the local agent's disk of *instance_uuid* (and of *image_id*, when
    given). Returns its ``data``."""
    if not isinstance(connection_info, dict) or not isinstance(
            connection_info.get('data'), dict):
        raise exception.InvalidThunderDisk(reason='no data')
    data = connection_info['data']
    backend = data.get('backend')
    if backend not in BACKENDS:
        raise exception.InvalidThunderDisk(
            reason='unknown backend %r' % (backend,))
    required = ('path', 'backing') if backend == 'qemu' else (
        'device_path',)
    for key in required:
        if not data.get(key):
            raise exception.InvalidThunderDisk(
                reason='%s backend disk without %s' % (backend, key))
    try:
        _check_ids(data, instance_uuid, image_id)
        if backend == 'qemu':
            _check_qemu(data)
        else:
            _check_kernel(data)
    except _Foreign as e:
        LOG.error('Refusing the thunder disk %(data)s of instance '
                  '%(instance)s: %(reason)s (are the [thunder] agent_* '
                  'options those of the local agent?)',
                  {'data': data, 'instance': instance_uuid, 'reason': e})
        raise exception.InvalidThunderDisk(
            reason='it is not a disk of the thunder agent of this host '
                   '(see the nova-compute log)') from None
    return data


def _canonical_uuid(value):
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _check_ids(data, instance_uuid, image_id):
    if not _canonical_uuid(instance_uuid):
        raise _Foreign('instance %r is no canonical UUID' % (instance_uuid,))
    if data.get('instance_id') != instance_uuid:
        raise _Foreign('it belongs to instance %r' % (data.get(
            'instance_id'),))
    if not _canonical_uuid(data.get('image_id')):
        raise _Foreign('image_id %r is no canonical UUID'
                       % (data.get('image_id'),))
    if image_id is not None and data['image_id'] != image_id:
        raise _Foreign('it is a disk of image %r, not %s'
                       % (data['image_id'], image_id))


def _check_qemu(data):
    instance_uuid, image_id = data['instance_id'], data['image_id']
    if data['path'] != overlay_path(instance_uuid):
        raise _Foreign('overlay %r is not %s' % (data['path'],
                                                 overlay_path(instance_uuid)))
    if data.get('format', 'qcow2') != 'qcow2':
        raise _Foreign('overlay format %r is not qcow2'
                       % (data.get('format'),))
    backing = data['backing']
    if not isinstance(backing, dict):
        raise _Foreign('backing %r is not a dict' % (backing,))
    unknown = sorted(set(backing) - BACKING_KEYS, key=str)
    if unknown:
        raise _Foreign('backing has unknown keys %s' % unknown)
    if backing.get('driver') != 'nbd':
        raise _Foreign('backing driver %r is not nbd'
                       % (backing.get('driver'),))
    if backing.get('format', 'raw') != 'raw':
        raise _Foreign('backing format %r is not raw'
                       % (backing.get('format'),))
    if backing.get('export') != image_id:
        raise _Foreign('backing export %r is not the image %s'
                       % (backing.get('export'), image_id))
    delay = backing.get('reconnect_delay')
    if delay is not None and (isinstance(delay, bool) or not isinstance(
            delay, int) or delay < 0):
        raise _Foreign('reconnect_delay %r is not a number of seconds'
                       % (delay,))
    if 'socket' in backing:
        if 'host' in backing or 'port' in backing:
            raise _Foreign('backing has both a socket and a host')
        if backing['socket'] != template_socket(image_id):
            raise _Foreign('backing socket %r is not %s'
                           % (backing['socket'], template_socket(image_id)))
        return
    _check_relay_export(backing.get('host'), backing.get('port'))


def _check_relay_export(host, port):
    expected = CONF.thunder.agent_relay_address
    if not _same_host(host, expected):
        raise _Foreign('backing host %r is not [thunder] agent_relay_address '
                       '%s' % (host, expected))
    low = CONF.thunder.agent_relay_port_min
    high = CONF.thunder.agent_relay_port_max
    if isinstance(port, bool) or not isinstance(port, int) or not (
            low <= port <= high):
        raise _Foreign('backing port %r is outside [thunder] '
                       'agent_relay_port_min..max %d-%d' % (port, low, high))


def _same_host(host, expected):
    if not isinstance(host, str) or not host:
        return False
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(expected)
    except ValueError:
        return host == expected


def _check_kernel(data):
    instance_uuid = data['instance_id']
    if data['device_path'] != snapshot_device(instance_uuid):
        raise _Foreign('device %r is not %s'
                       % (data['device_path'],
                          snapshot_device(instance_uuid)))
    if data.get('format', 'raw') != 'raw':
        raise _Foreign('format %r is not raw' % (data.get('format'),))
