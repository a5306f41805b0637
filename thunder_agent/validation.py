"""Validation of everything that reaches the agent from outside.

Each function returns the normalised value or raises a typed
:mod:`thunder_agent.exception` error, so a refused request changes nothing.
All but :func:`origin` look at the value alone. :func:`origin` also applies
the operator's allow-lists (:class:`OriginPolicy`, the ``[agent]``
options): it takes an ``lstat`` and an ``open(O_NOFOLLOW)`` of the one name
an origin may have, and never touches the network (no DNS, no connection).

Origins are what root reads, and they come from outside: from nova-compute
(which takes them from its own configuration, or from the image property
of a trusted image owner, see :mod:`nova_thunder.marking`) or from anything
that can publish on the agent's RabbitMQ topic. The agent reads only

* ``file``: exactly ``<dir>/<image id>`` for a dir of ``file_origin_dirs``
  (Glance's file store names its files so), a regular file and not a
  symlink, in a directory no other user may write to;
* ``nbd`` on a unix socket: a socket (not a symlink) directly in a dir of
  ``origin_socket_dirs``, never in or under ``run_path``, where the
  templates of other images (other tenants') are exported;
* ``nbd`` over TCP: an IP literal inside ``nbd_origin_networks``, on a port
  of ``nbd_origin_ports``. Host names are refused rather than resolved: a
  name would be checked against the networks at one resolution and
  connected to at another (qemu-img resolves again), and the agent would
  send DNS queries for tenants;
* ``iscsi``: Cinder's attachment, as nova-compute got it (no allow-list:
  the portal is Cinder's, see the operator's guide).

A refusal tells the caller only ``Origin of image X is not allowed on this
host`` (:class:`~thunder_agent.exception.OriginNotAllowed`), and an origin
that is allowed but missing ``... cannot be read on this host``
(:class:`~thunder_agent.exception.OriginUnreadable`): the message reaches
the instance fault the tenant reads. The reason is logged here and kept in
the error's ``detail`` attribute, which does not cross RPC.
"""

import dataclasses
import errno
import ipaddress
import os
import stat
import uuid

from oslo_log import log as logging
from oslo_utils import strutils

from thunder_agent import exception

LOG = logging.getLogger(__name__)

SUPPORTED_FORMATS = ('raw', 'qcow2')
ORIGIN_TYPES = ('file', 'nbd', 'iscsi')
NBD_PORT = 10809
_MAX_PORT = 65535
_MAX_EXPORT = 4096      # NBD's limit on export names, in bytes
_MAX_SOCKET = 107       # sun_path without its terminating NUL


def image_id(value):
    return _uuid(value, exception.InvalidImageId(image_id=value))


def instance_id(value):
    return _uuid(value, exception.InvalidInstanceId(instance_id=value))


def _uuid(value, error):
    # Only the canonical lower-case form: ids become file names.
    if not isinstance(value, str):
        raise error
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise error
    if str(parsed) != value:
        raise error
    return str(parsed)


def size(value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise exception.InvalidSize(size=value, reason='must be an integer')
    if value <= 0:
        raise exception.InvalidSize(size=value, reason='must be positive')
    if value % 512:
        raise exception.InvalidSize(
            size=value, reason='must be a multiple of 512 bytes')
    return value


def image_format(value):
    if value not in SUPPORTED_FORMATS:
        raise exception.UnsupportedFormat(
            image_format=value, supported=', '.join(SUPPORTED_FORMATS))
    return value


# -- origins -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OriginPolicy:
    """Where this agent may read origins from (see the module docstring).

    The defaults allow nothing but iSCSI. Directories are kept normalised
    (no trailing slash, no ``..``); relative ones are dropped.
    """

    file_dirs: tuple = ()
    socket_dirs: tuple = ()
    networks: tuple = ()            # ipaddress networks
    ports: tuple = (NBD_PORT, NBD_PORT)     # first, last (inclusive)
    run_path: str = None

    @classmethod
    def from_conf(cls, conf):
        agent = conf.agent
        ports = agent.nbd_origin_ports
        return cls(file_dirs=_directories(agent.file_origin_dirs),
                   socket_dirs=_directories(agent.origin_socket_dirs),
                   networks=tuple(agent.nbd_origin_networks),
                   ports=(min(ports), max(ports)),
                   run_path=agent.run_path)


def _directories(values):
    dirs = []
    for value in values or ():
        if not value or not os.path.isabs(value):
            LOG.warning('Ignoring origin directory %r: not an absolute path',
                        value)
            continue
        dirs.append(os.path.normpath(value))
    return tuple(dirs)


class _Refused(Exception):
    """The origin is outside the policy (the argument says why)."""


class _Unreadable(Exception):
    """The origin is allowed but not there (the argument says why)."""


def origin_shape(value):
    """Normalise an origin given as Cinder-style connection info, by its
    form only: no allow-list, no file system. For the coordinator, which
    never opens an origin; the agent uses :func:`origin`.

    ``{'driver_volume_type': 'file', 'data': {'path': ...}}``,
    ``{'driver_volume_type': 'nbd', 'data': {'host': ..., 'port': ...,
    'export': ...}}`` or ``{... 'data': {'socket': ..., 'export': ...}}``,
    ``{'driver_volume_type': 'iscsi', 'data': {os-brick properties}}``.
    """
    if not isinstance(value, dict):
        raise exception.InvalidOrigin(reason='must be a dict')
    kind = value.get('driver_volume_type')
    data = value.get('data')
    if kind not in ORIGIN_TYPES:
        raise exception.InvalidOrigin(
            reason='driver_volume_type %r is not one of %s'
                   % (kind, ', '.join(ORIGIN_TYPES)))
    if not isinstance(data, dict):
        raise exception.InvalidOrigin(reason='data must be a dict')
    if kind == 'file':
        return {'driver_volume_type': 'file',
                'data': {'path': _absolute_path(data.get('path'))}}
    if kind == 'nbd':
        return {'driver_volume_type': 'nbd', 'data': nbd_address(data)}
    return {'driver_volume_type': 'iscsi', 'data': _iscsi(data)}


def origin(value, for_image, policy):
    """The origin the agent may read for image *for_image* under *policy*.

    Returns the normalised origin (an IPv6 host in its compressed form).
    Raises InvalidOrigin for a malformed one, OriginNotAllowed for one
    outside the policy and OriginUnreadable for an allowed file or socket
    that is not there; the last two say nothing but the image id.
    """
    for_image = image_id(for_image)
    value = origin_shape(value)
    kind, data = value['driver_volume_type'], value['data']
    try:
        if kind == 'file':
            data = _allowed_file(data['path'], for_image, policy)
        elif kind == 'nbd' and 'socket' in data:
            data = _allowed_socket(data, policy)
        elif kind == 'nbd':
            data = _allowed_tcp(data, policy)
        refusal = None
    except (_Refused, _Unreadable) as e:
        refusal = e
    if refusal is not None:
        # Raised outside the except block: the traceback a caller gets
        # over RPC must not carry the reason as a chained exception.
        if isinstance(refusal, _Refused):
            what, error = 'refused', exception.OriginNotAllowed(
                image_id=for_image)
        else:
            what, error = 'cannot be read', exception.OriginUnreadable(
                image_id=for_image)
        LOG.warning('Origin of image %(image)s %(what)s: %(reason)s',
                    {'image': for_image, 'what': what, 'reason': refusal})
        error.detail = str(refusal)
        raise error
    return {'driver_volume_type': kind, 'data': data}


def _absolute_path(path):
    if not isinstance(path, str) or not path or '\0' in path:
        raise exception.InvalidOrigin(reason='path must be a non-empty string')
    if not os.path.isabs(path):
        raise exception.InvalidOrigin(reason='path %r is not absolute' % path)
    return path


def _private_directory(directory, what):
    """Refuse a directory every user may write to: anyone could put a file
    or socket there under the name an image will be read from."""
    try:
        mode = os.stat(directory).st_mode
    except OSError as e:
        raise _Unreadable('%s %s: %s' % (what, directory, e.strerror))
    if not stat.S_ISDIR(mode):
        raise _Unreadable('%s %s is not a directory' % (what, directory))
    if mode & stat.S_IWOTH:
        raise _Refused('%s %s is writable by every user' % (what, directory))


def _allowed_file(path, for_image, policy):
    if not policy.file_dirs:
        raise _Refused('file origins are not enabled ([agent] '
                       'file_origin_dirs is empty); asked for %s' % path)
    directory = next((d for d in policy.file_dirs
                      if path == os.path.join(d, for_image)), None)
    if directory is None:
        raise _Refused('%s is not <dir>/%s for a dir of [agent] '
                       'file_origin_dirs %s'
                       % (path, for_image, list(policy.file_dirs)))
    _private_directory(directory, 'file origin directory')
    try:
        before = os.lstat(path)
    except OSError as e:
        raise _Unreadable('%s: %s' % (path, e.strerror))
    # Not opened at all unless regular: opening a device or FIFO can act.
    _regular(path, before.st_mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _Refused('%s became a symlink' % path)
        raise _Unreadable('%s: %s' % (path, e.strerror))
    try:
        opened = os.fstat(fd)
    finally:
        os.close(fd)
    _regular(path, opened.st_mode)
    if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
        raise _Refused('%s was replaced while it was checked' % path)
    return {'path': path}


def _regular(path, mode):
    if stat.S_ISLNK(mode):
        raise _Refused('%s is a symlink' % path)
    if not stat.S_ISREG(mode):
        raise _Refused('%s is not a regular file' % path)


def _allowed_socket(data, policy):
    sock = data['socket']
    if not policy.socket_dirs:
        raise _Refused('socket origins are not enabled ([agent] '
                       'origin_socket_dirs is empty); asked for %s' % sock)
    if os.path.normpath(sock) != sock:
        raise _Refused('%s is not a normalised path' % sock)
    directory = os.path.dirname(sock)
    if directory not in policy.socket_dirs:
        raise _Refused('%s is not directly in a dir of [agent] '
                       'origin_socket_dirs %s'
                       % (sock, list(policy.socket_dirs)))
    if policy.run_path:
        run = os.path.realpath(policy.run_path)
        real = os.path.realpath(directory)
        if os.path.commonpath([run, real]) == run:
            raise _Refused('%s is in this agent\'s run_path %s, where the '
                           'templates of other images are exported'
                           % (sock, policy.run_path))
    _private_directory(directory, 'origin socket directory')
    try:
        mode = os.lstat(sock).st_mode
    except OSError as e:
        raise _Unreadable('%s: %s' % (sock, e.strerror))
    if stat.S_ISLNK(mode):
        raise _Refused('%s is a symlink' % sock)
    if not stat.S_ISSOCK(mode):
        raise _Refused('%s is not a socket' % sock)
    return {'socket': sock, 'export': data['export']}


def _allowed_tcp(data, policy):
    host, port = data['host'], data['port']
    where = '%s port %d' % (host, port)
    if not policy.networks:
        raise _Refused('TCP NBD origins are not enabled ([agent] '
                       'nbd_origin_networks is empty); asked for %s' % where)
    if '%' in host:
        raise _Refused('%s: IPv6 scope ids are not accepted' % where)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise _Refused('%s: %r is not an IP address (host names are not '
                       'resolved)' % (where, host))
    if address.version == 6 and address.ipv4_mapped:
        raise _Refused('%s: an IPv4-mapped address; give the IPv4 address'
                       % where)
    if address.is_unspecified or address.is_multicast:
        raise _Refused('%s: an unspecified or multicast address' % where)
    if not any(address in network for network in policy.networks):
        raise _Refused('%s is outside [agent] nbd_origin_networks %s'
                       % (where, [str(n) for n in policy.networks]))
    first, last = policy.ports
    if not first <= port <= last:
        raise _Refused('%s: the port is outside [agent] nbd_origin_ports '
                       '%d-%d' % (where, first, last))
    return {'host': str(address), 'port': port, 'export': data['export']}


def nbd_address(data):
    """Check the form of an NBD server address: TCP host and port, or a
    unix socket (no allow-list, see :func:`origin`)."""
    export = data.get('export', '')
    if (not isinstance(export, str) or '\0' in export
            or len(export.encode()) > _MAX_EXPORT):
        raise exception.InvalidOrigin(
            reason='export must be a string of at most %d bytes'
                   % _MAX_EXPORT)
    if 'socket' in data:
        sock = data['socket']
        if (not isinstance(sock, str) or '\0' in sock
                or not os.path.isabs(sock)):
            raise exception.InvalidOrigin(
                reason='socket must be an absolute path')
        if len(sock.encode()) > _MAX_SOCKET:
            raise exception.InvalidOrigin(reason='socket path too long')
        return {'socket': sock, 'export': export}
    host = data.get('host')
    port = data.get('port')
    if not isinstance(host, str) or not host or any(
            c.isspace() or c in '/?#@\0' for c in host):
        raise exception.InvalidOrigin(reason='host %r is not valid' % (host,))
    if isinstance(port, bool) or not isinstance(port, int) or not (
            0 < port <= _MAX_PORT):
        raise exception.InvalidOrigin(reason='port %r is not valid' % (port,))
    return {'host': host, 'port': port, 'export': export}


def _iscsi(data):
    for key in ('target_portal', 'target_iqn'):
        if not isinstance(data.get(key), str) or not data[key]:
            raise exception.InvalidOrigin(reason='iscsi origin needs %s' % key)
    lun = data.get('target_lun', 0)
    if isinstance(lun, bool) or not isinstance(lun, int) or lun < 0:
        raise exception.InvalidOrigin(reason='target_lun must be >= 0')
    return dict(data, target_lun=lun)


_SECRET_KEYS = ('password', 'secret', 'key', 'token')


def describe_origin(value):
    """An origin (connection info dict) fit for a message, a status or the
    coordinator: oslo.utils' ``mask_dict_password`` (the keys os-brick and
    Nova mask, at any depth: ``auth_password``,
    ``discovery_auth_password``, ...), and besides every value whose key
    names a secret is replaced by ``***``."""
    if not isinstance(value, dict):
        return repr(value)
    data = value.get('data')
    if isinstance(data, dict):
        data = strutils.mask_dict_password(data)
        data = {k: ('***' if any(w in str(k).lower() for w in _SECRET_KEYS)
                    else v) for k, v in data.items()}
    return {'driver_volume_type': value.get('driver_volume_type'),
            'data': data}
