"""Attaching template sources (the origin or parents' exports) with os-brick.

Each source is one iSCSI LUN logged in through os-brick's ISCSIConnector
in single-path mode; the driver assembles the paths of all sources into
its own dm-multipath map (see :mod:`thunder_agent.drivers.kernel.dmtables`).
multipathd is not involved: the parents are different targets and the
driver decides itself when a path is added or dropped (re-parenting).

Sources are :class:`thunder_agent.records.Endpoint` objects. An origin's
carries its CHAP secret (from Cinder or the operator); a relay parent's
does not: the driver derives it (:func:`chap.relay_secret`) and hands it
to :func:`check_source` for the login only.
"""

import os
import socket

from os_brick import exception as brick_exception
from os_brick.initiator import connector as brick_connector
# Registers the [os_brick] options (lock_path) in the global config.
from os_brick import opts as brick_opts  # noqa: F401
from oslo_config import cfg
from oslo_log import log as logging

from thunder_agent import exception
from thunder_agent.drivers.kernel import chap
from thunder_agent.drivers.kernel import sysfs
from thunder_agent.privileged import kernel as priv
from thunder_agent.privileged import tgt as priv_tgt

LOG = logging.getLogger(__name__)

_REQUIRED = ('target_portal', 'target_iqn')


def target_of(endpoint):
    """``(portal, iqn, lun)`` of an iSCSI endpoint, checked."""
    kind = getattr(endpoint, 'driver_volume_type', None)
    if kind != 'iscsi':
        # Never echo the endpoint: it may hold a secret.
        raise exception.InvalidSource(
            reason='the kernel driver reads iscsi endpoints, not %s'
                   % (repr(kind) if isinstance(kind, str)
                      else type(endpoint).__name__))
    data = endpoint.data
    if not isinstance(data, dict):
        raise exception.InvalidSource(reason='data must be a dict')
    for key in _REQUIRED:
        value = data.get(key)
        if not isinstance(value, str) or not value or any(
                c.isspace() for c in value):
            raise exception.InvalidSource(reason='%s %r is not valid'
                                                 % (key, value))
    try:
        priv_tgt.check_portal(data['target_portal'])
    except exception.PrivilegedOperationNotAllowed as e:
        raise exception.InvalidSource(reason=e.kwargs['reason'])
    lun = data.get('target_lun', 0)
    if isinstance(lun, bool) or not isinstance(lun, int) or lun < 0:
        raise exception.InvalidSource(reason='target_lun must be an '
                                             'integer >= 0')
    return data['target_portal'], data['target_iqn'], lun


def check_source(endpoint, secret=None):
    """Validate an iSCSI endpoint; return its os-brick connection
    properties (which hold the CHAP secret: never log or keep them).

    *secret* is the CHAP secret when the endpoint carries none (a relay
    parent's). Changes nothing; raises InvalidSource.
    """
    portal, iqn, lun = target_of(endpoint)
    user, secret = chap.check_credentials(endpoint.data, secret)
    return {'target_portal': portal, 'target_iqn': iqn, 'target_lun': lun,
            'auth_method': 'CHAP', 'auth_username': user,
            'auth_password': secret, 'target_discovered': False}


def logout_properties(endpoint):
    """What os-brick needs to log out of *endpoint* (no credentials)."""
    portal, iqn, lun = target_of(endpoint)
    return {'target_portal': portal, 'target_iqn': iqn, 'target_lun': lun,
            'target_discovered': False}


def same_source(a, b):
    """True when two endpoints name the same LUN."""
    return target_of(a) == target_of(b)


def split_portal(portal):
    """``(host, port)`` of ``host:port`` or ``[v6]:port``."""
    host, _, port = portal.rpartition(':')
    return host.strip('[]'), int(port)


def portal_answers(portal, timeout):
    """True when *portal* accepts a TCP connection within *timeout* s."""
    try:
        with socket.create_connection(split_portal(portal), timeout=timeout):
            return True
    except OSError:
        return False


def target_listed(portal, iqn, timeout):
    """True when *portal* lists *iqn* to a SendTargets discovery (tgt
    lists a target once its LUN, account and ACL are in place)."""
    code, out, err = priv_tgt.iscsi_discover(portal, timeout)
    if code != 0:
        LOG.debug('Discovery at %s: exit code %s: %s', portal, code,
                  err.strip())
        return False
    # "10.99.2.1:3260,1 iqn...." per target.
    return any(line.split()[1:2] == [iqn] for line in out.splitlines())


def setup_lock_path(run_path):
    """os-brick serialises logins with file locks in [os_brick] lock_path
    of the global configuration; default it under the agent's run path."""
    if cfg.CONF.os_brick.lock_path:
        return
    path = cfg.CONF.oslo_concurrency.lock_path
    if not path:
        path = os.path.join(run_path, 'os-brick-locks')
        os.makedirs(path, mode=0o700, exist_ok=True)
    cfg.CONF.set_default('lock_path', path, group='os_brick')


class SourceConnector:
    def __init__(self, device_scan_attempts=3, recovery_timeout=5,
                 scope=None):
        self.recovery_timeout = recovery_timeout
        self.scope = scope
        self.connector = brick_connector.InitiatorConnector.factory(
            'ISCSI', None, use_multipath=False,
            device_scan_attempts=device_scan_attempts)

    def connect(self, props):
        """Log in with os-brick properties from :func:`check_source`;
        return os-brick's device info (``{'path': '/dev/sdX',
        'scsi_wwn': ...}``).

        Raises SourceUnavailable (unreachable, CHAP refused, no LUN).
        """
        iqn, portal = props['target_iqn'], props['target_portal']
        try:
            info = self.connector.connect_volume(props)
        except brick_exception.BrickException as e:
            raise exception.SourceUnavailable(
                target=iqn, portal=portal,
                reason=_without(str(e), props['auth_password']))
        if not info or not info.get('path'):
            raise exception.SourceUnavailable(
                target=iqn, portal=portal, reason='no device appeared')
        self._shorten_recovery(info['path'])
        LOG.info('Attached source %s at %s as %s', iqn, portal,
                 info['path'])
        return {'path': info['path'], 'scsi_wwn': info.get('scsi_wwn')}

    def _shorten_recovery(self, device):
        # A session whose target vanished holds I/O for recovery_tmo
        # (120 s by default) before failing it. Failing it quickly lets
        # dm-multipath take over: it queues the I/O (queue_if_no_path)
        # until the template is re-parented, and a re-parent's suspend
        # does not wait minutes for the dead path.
        session = sysfs.iscsi_session_dir(device)
        if session is None:
            return
        code, _out, err = priv.write_sysfs(
            self.scope, os.path.join(session, 'recovery_tmo'),
            self.recovery_timeout)
        if code:
            LOG.warning('Cannot set recovery_tmo of %s: %s', session, err)

    def disconnect(self, endpoint, force=False):
        """Log out of *endpoint* and remove its SCSI device.

        *force* tolerates a dead target (flush errors, logout failures).
        """
        props = logout_properties(endpoint)
        try:
            # No device path: os-brick then skips flushing the SCSI device.
            # Sources are read-only, there is nothing to flush, and a flush
            # of a dead parent's device only fails after minutes of retries.
            self.connector.disconnect_volume(props, None, force=force,
                                             ignore_errors=force)
        except brick_exception.BrickException as e:
            raise exception.BackendError(
                reason='detaching %s at %s failed: %s'
                       % (props['target_iqn'], props['target_portal'], e))
        LOG.info('Detached source %s at %s', props['target_iqn'],
                 props['target_portal'])


def _without(text, secret):
    """*text* with *secret* blotted out (os-brick masks passwords in its
    logs; its exception texts may still quote a command line)."""
    return text.replace(secret, '***') if secret else text
