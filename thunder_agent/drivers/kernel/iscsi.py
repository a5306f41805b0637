"""Attaching template sources (the origin or parents' exports) with os-brick.

Each source is one iSCSI LUN logged in through os-brick's ISCSIConnector
in single-path mode; the backend assembles the paths of all sources into
its own dm-multipath map (see :mod:`thunder_agent.drivers.kernel.dmtables`).
multipathd is not involved: the parents are different targets and the
backend decides itself when a path is added or dropped (re-parenting).
"""

import logging
import os

from os_brick import exception as brick_exception
from os_brick.initiator import connector as brick_connector
# Registers the [os_brick] options (lock_path) in the global config.
from os_brick import opts as brick_opts  # noqa: F401
from oslo_config import cfg

from thunder_agent import exception
from thunder_agent.drivers.kernel import chap
from thunder_agent.drivers.kernel import sysfs
from thunder_agent import privileged

LOG = logging.getLogger(__name__)

_REQUIRED = ('target_portal', 'target_iqn')


def check_source(source):
    """Validate an iSCSI source; return its os-brick connection properties.

    Changes nothing; raises InvalidSource.
    """
    if not isinstance(source, dict):
        raise exception.InvalidSource(reason='a source must be a dict')
    if source.get('driver_volume_type') != 'iscsi':
        raise exception.InvalidSource(
            reason='the kernel backend reads iscsi sources, not %r'
                   % (source.get('driver_volume_type'),))
    data = source.get('data')
    if not isinstance(data, dict):
        raise exception.InvalidSource(reason='data must be a dict')
    for key in _REQUIRED:
        value = data.get(key)
        if not isinstance(value, str) or not value or any(
                c.isspace() for c in value):
            raise exception.InvalidSource(reason='%s %r is not valid'
                                                 % (key, value))
    lun = data.get('target_lun', 0)
    if isinstance(lun, bool) or not isinstance(lun, int) or lun < 0:
        raise exception.InvalidSource(reason='target_lun must be an '
                                             'integer >= 0')
    chap.check_credentials(data)
    return {'target_portal': data['target_portal'],
            'target_iqn': data['target_iqn'], 'target_lun': lun,
            'auth_method': 'CHAP', 'auth_username': data['auth_username'],
            'auth_password': data['auth_password'],
            'target_discovered': False}


def same_source(a, b):
    """True when two sources name the same LUN."""
    da, db = a['data'], b['data']
    return (da['target_portal'], da['target_iqn'],
            da.get('target_lun', 0)) == (db['target_portal'],
                                         db['target_iqn'],
                                         db.get('target_lun', 0))


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
    def __init__(self, device_scan_attempts=3, recovery_timeout=5):
        self.recovery_timeout = recovery_timeout
        self.connector = brick_connector.InitiatorConnector.factory(
            'ISCSI', None, use_multipath=False,
            device_scan_attempts=device_scan_attempts)

    def connect(self, source):
        """Log in to *source*; return os-brick's device info
        (``{'path': '/dev/sdX', 'scsi_wwn': ...}``).

        Raises SourceUnavailable (unreachable, CHAP refused, no LUN).
        """
        props = check_source(source)
        try:
            info = self.connector.connect_volume(props)
        except brick_exception.BrickException as e:
            raise exception.SourceUnavailable(
                target=props['target_iqn'], portal=props['target_portal'],
                reason=str(e))
        if not info or not info.get('path'):
            raise exception.SourceUnavailable(
                target=props['target_iqn'], portal=props['target_portal'],
                reason='no device appeared')
        self._shorten_recovery(info['path'])
        LOG.info('Attached source %s at %s as %s', props['target_iqn'],
                 props['target_portal'], info['path'])
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
        code, _out, err = privileged.write_sysfs(
            os.path.join(session, 'recovery_tmo'), self.recovery_timeout)
        if code:
            LOG.warning('Cannot set recovery_tmo of %s: %s', session, err)

    def disconnect(self, source, force=False):
        """Log out of *source* and remove its SCSI device.

        *force* tolerates a dead target (flush errors, logout failures).
        """
        props = check_source(source)
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
