"""What belongs to the agent, as the privileged helpers check it.

Every block and iSCSI entry point takes the agent's *scope*,
``{'state_path', 'device_prefix', 'iqn_prefix'}`` (:func:`of`), and admits
it only inside the helper's own configuration (:func:`admit`): the
config files the helper was started with (sudo's default passes the
agent's, ``helper_command`` names them) or, for a forked helper, the
parent's. ``state_path`` must be the configured ``[agent] state_path`` or
lie under it, ``device_prefix`` must start with the configured ``[kernel]
device_prefix`` and ``iqn_prefix`` must equal ``[kernel] iqn_prefix``. A
caller may narrow its scope (the guest tests run several agents in one
kernel under one state root, ``th`` admitting ``tha`` and ``thb``) but
never widen it: an agent that lost its mind still only reaches its own
files, devices and targets.

Within a scope, things are the agent's when:

* a file lies under the real ``state_path`` with no symbolic link on the
  way (the path as given is the path the kernel resolves);
* a device-mapper name is ``<device_prefix>-<uuid>-{src,bk,dmc,tpl}`` or
  ``<device_prefix>-snap-<uuid>`` (a canonical lower-case UUID);
* a device is ``/dev/loopN`` backed by one of its files, ``/dev/dm-N`` or
  ``/dev/mapper/<name>`` of one of its names, ``/dev/bcacheN`` over one
  of its ``-bk`` devices, or (as a source only) ``/dev/sdX`` of an iSCSI
  session; each is looked up in sysfs, so it exists;
* an IQN is ``<iqn_prefix>:<host>:<uuid>``.

Values that look like options (``-x``), carry a NUL or a newline, or are
not strings are refused before any of this.
"""

import collections
import os
import re
import uuid

from oslo_config import cfg

from thunder_agent import conf as agent_conf
from thunder_agent import exception

# Tests point these at a fake tree.
SYSFS = '/sys'
DEV = '/dev'

ROLES = ('src', 'bk', 'dmc', 'tpl')
# DM_NAME_LEN - 1, and tgt's longest target name (ISCSI_NAME_LEN - 1).
MAX_DM_NAME = 127
MAX_IQN = 223
_UUID = r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
_PREFIX = re.compile(r'^[a-z][a-z0-9-]{0,31}$')
_IQN_PREFIX = re.compile(r'^iqn\.\d{4}-\d{2}\.[a-z0-9.-]+$')
_LOOP = re.compile(r'^/dev/(loop\d+)$')
_DM = re.compile(r'^/dev/(dm-\d+)$')
_MAPPER = re.compile(r'^/dev/mapper/([a-z0-9-]+)$')
_BCACHE = re.compile(r'^/dev/(bcache\d+)$')
_SCSI_DISK = re.compile(r'^/dev/(sd[a-z]{1,4})$')

Scope = collections.namedtuple(
    'Scope', 'state_path real_root device_prefix iqn_prefix')


def refuse(reason):
    raise exception.PrivilegedOperationNotAllowed(reason=reason)


def of(conf):
    """The scope of the agent configured by *conf* (unprivileged side)."""
    return {'state_path': conf.agent.state_path,
            'device_prefix': conf.kernel.device_prefix,
            'iqn_prefix': conf.kernel.iqn_prefix}


def text(value, what, pattern=None):
    """*value* as a plain string: no NUL, no line break, not an option."""
    if not isinstance(value, str) or not value:
        refuse('%s must be a non-empty string' % what)
    if any(c in value for c in '\0\n\r') or value.startswith('-'):
        refuse('%s %r is not a plain value' % (what, value))
    if pattern is not None and not re.match(pattern, value):
        refuse('%s %r is not valid' % (what, value))
    return value


def integer(value, what, low, high):
    if isinstance(value, bool) or not isinstance(value, int) \
            or not low <= value <= high:
        refuse('%s must be an integer in %d..%d' % (what, low, high))
    return value


def uuid_text(value, what='id'):
    """A canonical lower-case UUID (image and instance ids)."""
    text(value, what)
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        canonical = None
    if canonical != value:
        refuse('%s %r is not a canonical UUID' % (what, value))
    return value


def _configured():
    conf = cfg.CONF
    agent_conf.register_opts(conf)
    return (conf.agent.state_path, conf.kernel.device_prefix,
            conf.kernel.iqn_prefix)


def admit(scope):
    """Check *scope* against the helper's configuration; a :class:`Scope`."""
    if not isinstance(scope, dict) or set(scope) != {
            'state_path', 'device_prefix', 'iqn_prefix'}:
        refuse('a scope is {state_path, device_prefix, iqn_prefix}')
    state_path = text(scope['state_path'], 'state_path')
    prefix = text(scope['device_prefix'], 'device_prefix',
                  _PREFIX.pattern)
    iqn_prefix = text(scope['iqn_prefix'], 'iqn_prefix',
                      _IQN_PREFIX.pattern)
    if not os.path.isabs(state_path) or \
            os.path.normpath(state_path) != state_path or state_path == '/':
        refuse('state_path %r must be a normalised absolute path below /'
               % state_path)
    conf_state, conf_prefix, conf_iqn = _configured()
    real_root = os.path.realpath(state_path)
    conf_real = os.path.realpath(conf_state)
    if real_root != conf_real and not real_root.startswith(conf_real + '/'):
        refuse('state_path %s is outside the configured %s'
               % (state_path, conf_state))
    if not prefix.startswith(conf_prefix):
        refuse('device prefix %s is not the configured %s'
               % (prefix, conf_prefix))
    if iqn_prefix != conf_iqn:
        refuse('IQN prefix %s is not the configured %s'
               % (iqn_prefix, conf_iqn))
    return Scope(state_path, real_root, prefix, iqn_prefix)


# -- files -----------------------------------------------------------------

def own_file(scope, path):
    """The real path of *path*, a file name under ``state_path`` that the
    kernel resolves to itself (no symbolic link, no ``..``)."""
    text(path, 'path')
    if not path.startswith(scope.state_path + '/') or \
            os.path.normpath(path) != path:
        refuse('%s is not under %s' % (path, scope.state_path))
    real = scope.real_root + path[len(scope.state_path):]
    if os.path.realpath(path) != real:
        refuse('%s is or passes through a symbolic link' % path)
    return real


def under_root(scope, real_path):
    return real_path.startswith(scope.real_root + '/')


# -- names -------------------------------------------------------------------

def dm_name(scope, role, ident):
    """``<prefix>-<ident>-<role>`` or, for ``snap``, ``<prefix>-snap-<id>``."""
    uuid_text(ident, 'image id' if role != 'snap' else 'instance id')
    if role == 'snap':
        return '%s-snap-%s' % (scope.device_prefix, ident)
    if role not in ROLES:
        refuse('unknown device role %r' % (role,))
    return '%s-%s-%s' % (scope.device_prefix, ident, role)


def own_dm_name(scope, name):
    """*name* if it is one of the names :func:`dm_name` gives."""
    text(name, 'device name')
    pattern = r'^%s-(%s-(%s)|snap-%s)$' % (
        re.escape(scope.device_prefix), _UUID, '|'.join(ROLES), _UUID)
    if len(name) > MAX_DM_NAME or not re.match(pattern, name):
        refuse('%s is not a device of this agent' % name)
    return name


def iqn(scope, value, image_id):
    """*value* if it is ``<iqn_prefix>:<host>:<image_id>``."""
    text(value, 'IQN')
    pattern = r'^%s:[a-z0-9.-]+:%s$' % (
        re.escape(scope.iqn_prefix), re.escape(image_id))
    if len(value) > MAX_IQN or not re.match(pattern, value):
        refuse('%s is not an export of this agent for image %s'
               % (value, image_id))
    return value


def own_iqn(scope, value):
    """True for target names under the agent's prefix."""
    return value.startswith(scope.iqn_prefix + ':')


# -- block devices (looked up in sysfs) -------------------------------------

def _sys(*parts):
    return os.path.join(SYSFS, *parts)


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def dm_kernel_name(name):
    """``dm-N`` of the device-mapper device *name*, or None."""
    for kname in _listdir(_sys('block')):
        if kname.startswith('dm-') and \
                _read(_sys('block', kname, 'dm', 'name')) == name:
            return kname
    return None


def _listdir(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def dev_numbers(kname):
    """``major:minor`` of the block device *kname* (``sda``, ``dm-3``)."""
    value = _read(_sys('class', 'block', kname, 'dev'))
    if value is None or not re.match(r'^\d+:\d+$', value):
        refuse('no block device %s' % kname)
    return value


def loop_backing(kname):
    return _read(_sys('block', kname, 'loop', 'backing_file'))


def own_loop(scope, device):
    """*device* if it is ``/dev/loopN`` over a file under state_path."""
    match = _LOOP.match(text(device, 'device'))
    backing = loop_backing(match.group(1)) if match else None
    if not backing or not under_root(scope, backing):
        refuse('%s is not a loop device over a file of this agent'
               % device)
    return device


def own_dm(scope, device, roles=None):
    """*device* if it is ``/dev/dm-N`` or ``/dev/mapper/<name>`` of one of
    the agent's names (with a role in *roles*, when given); returns
    ``(device, dm name, kernel name)``."""
    text(device, 'device')
    name = kname = None
    match = _MAPPER.match(device)
    if match:
        name = match.group(1)
        kname = dm_kernel_name(name)
    match = _DM.match(device)
    if match and os.path.isdir(_sys('block', match.group(1), 'dm')):
        kname = match.group(1)
        name = _read(_sys('block', kname, 'dm', 'name'))
    if not name or not kname:
        refuse('%s is not a device-mapper device of this agent' % device)
    own_dm_name(scope, name)
    if roles is not None and not any(name.endswith('-' + r)
                                     for r in roles):
        refuse('%s is not a %s device' % (device, '/'.join(roles)))
    return device, name, kname


def own_bcache(scope, device):
    """*device* if it is ``/dev/bcacheN`` over one of the agent's ``-bk``
    devices."""
    match = _BCACHE.match(text(device, 'device'))
    slaves = _listdir(_sys('block', match.group(1), 'slaves')) \
        if match else []
    for slave in slaves:
        name = _read(_sys('block', slave, 'dm', 'name'))
        if name and name.endswith('-bk'):
            try:
                own_dm_name(scope, name)
            except exception.PrivilegedOperationNotAllowed:
                continue
            return device
    refuse('%s is not a bcache device over a device of this agent'
           % device)


def iscsi_disk(device):
    """``(device, kernel name)`` if *device* is ``/dev/sdX`` of an iSCSI
    session (what os-brick's logins give)."""
    match = _SCSI_DISK.match(text(device, 'device'))
    if match:
        real = os.path.realpath(_sys('class', 'block', match.group(1),
                                     'device'))
        if any(p.startswith('session') and p[7:].isdigit()
               for p in real.split('/')):
            return device, match.group(1)
    refuse('%s is not the disk of an iSCSI session' % device)
