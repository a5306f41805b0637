"""Validation of everything that reaches the agent from outside.

Each function returns the normalised value or raises a typed
:mod:`thunder_agent.exception` error; none of them touches disk or the data
plane, so a refused request changes nothing.
"""

import os
import uuid

from thunder_agent import exception

SUPPORTED_FORMATS = ('raw', 'qcow2')
ORIGIN_TYPES = ('file', 'nbd', 'iscsi')
_MAX_PORT = 65535


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


def path_within(path, allowed_dirs):
    """Resolve *path* and check it lies inside one of *allowed_dirs*."""
    if not isinstance(path, str) or not path or '\0' in path:
        raise exception.InvalidOrigin(reason='path must be a non-empty string')
    if not os.path.isabs(path):
        raise exception.InvalidOrigin(reason='path %r is not absolute' % path)
    real = os.path.realpath(path)
    for directory in allowed_dirs:
        root = os.path.realpath(directory)
        if os.path.commonpath([root, real]) == root:
            return real
    raise exception.PathNotAllowed(path=path, allowed=list(allowed_dirs))


def origin(value, allowed_file_dirs=()):
    """Normalise an origin given as Cinder-style connection info.

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
        path = path_within(data.get('path'), allowed_file_dirs)
        return {'driver_volume_type': 'file', 'data': {'path': path}}
    if kind == 'nbd':
        return {'driver_volume_type': 'nbd', 'data': nbd_address(data)}
    return {'driver_volume_type': 'iscsi', 'data': _iscsi(data)}


def nbd_address(data):
    """Check an NBD server address: TCP host/port or a unix socket."""
    export = data.get('export', '')
    if not isinstance(export, str) or len(export) > 4096:
        raise exception.InvalidOrigin(reason='export must be a string')
    if 'socket' in data:
        sock = data['socket']
        if not isinstance(sock, str) or not os.path.isabs(sock):
            raise exception.InvalidOrigin(
                reason='socket must be an absolute path')
        if len(sock.encode()) > 107:
            raise exception.InvalidOrigin(reason='socket path too long')
        return {'socket': sock, 'export': export}
    host = data.get('host')
    port = data.get('port')
    if not isinstance(host, str) or not host or any(
            c.isspace() or c in '/?#@' for c in host):
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
    """An origin (connection info dict) fit for a message: every value
    whose key names a secret is replaced by ``***``."""
    if not isinstance(value, dict):
        return repr(value)
    data = value.get('data')
    if isinstance(data, dict):
        data = {k: ('***' if any(w in str(k).lower() for w in _SECRET_KEYS)
                    else v) for k, v in data.items()}
    return {'driver_volume_type': value.get('driver_volume_type'),
            'data': data}
