"""A private iSCSI target (Debian's tgt, user space) on a loopback port.

Stands in for the storage node of a Cinder LVM backend: one LUN backed by a
file, with CHAP, reachable at 127.0.0.1:PORT. No kernel SCSI or iSCSI is
needed on either side (QEMU's initiator is libiscsi).
"""

import os
import shutil
import signal
import subprocess
import time

from thunder_lab.emulation import netutil


class TargetUnavailable(RuntimeError):
    pass


class IscsiTarget:
    def __init__(self, backing_file, iqn, user='thunder', password='s3cret'):
        self.backing_file = backing_file
        self.iqn = iqn
        self.user = user
        self.password = password
        self.proc = None

    @property
    def portal(self):
        return '127.0.0.1:%d' % self.port

    def _adm(self, *args):
        proc = subprocess.run(['tgtadm', '-C', str(self.control),
                               '--lld', 'iscsi'] + list(args),
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise TargetUnavailable('tgtadm %s: %s' % (
                ' '.join(args), proc.stderr.strip()))

    def start(self):
        if not (shutil.which('tgtd') and shutil.which('tgtadm')):
            raise TargetUnavailable('tgtd/tgtadm not installed (Debian '
                                    'package tgt)')
        if os.geteuid() != 0:
            raise TargetUnavailable('tgtd needs root')
        self.port = netutil.free_port()
        # tgtd's management socket is /var/run/tgtd/socket.<control>, with
        # <control> at most 32767.
        self.control = 20000 + self.port % 10000
        while os.path.exists('/var/run/tgtd/socket.%d' % self.control):
            self.control += 1
        self.log = open(self.backing_file + '.tgtd.log', 'wb')
        self.proc = subprocess.Popen(
            ['tgtd', '-f', '--iscsi', 'portal=%s' % self.portal,
             '-C', str(self.control)],
            stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._configure()
        except Exception:
            self.stop()
            raise
        return self

    def _configure(self):
        if not netutil.wait_for_port('127.0.0.1', self.port, 20, self.proc):
            raise TargetUnavailable('tgtd did not listen on %s'
                                    % self.portal)
        deadline = time.monotonic() + 10
        while True:
            try:
                self._adm('--op', 'new', '--mode', 'target', '--tid', '1',
                          '-T', self.iqn)
                break
            except TargetUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._adm('--op', 'new', '--mode', 'logicalunit', '--tid', '1',
                  '--lun', '1', '-b', self.backing_file)
        self._adm('--op', 'new', '--mode', 'account', '--user', self.user,
                  '--password', self.password)
        self._adm('--op', 'bind', '--mode', 'account', '--tid', '1',
                  '--user', self.user)
        self._adm('--op', 'bind', '--mode', 'target', '--tid', '1',
                  '-I', 'ALL')

    def connection_info(self, volume_id, attachment_id):
        """What Cinder's LVM driver answers for an attachment (tgt helper)."""
        return {'driver_volume_type': 'iscsi',
                'data': {'target_discovered': False,
                         'target_portal': self.portal,
                         'target_iqn': self.iqn, 'target_lun': 1,
                         'volume_id': volume_id, 'auth_method': 'CHAP',
                         'auth_username': self.user,
                         'auth_password': self.password,
                         'encrypted': False, 'qos_specs': None,
                         'access_mode': 'rw', 'cacheable': False,
                         'discard': False, 'attachment_id': attachment_id}}

    def stop(self):
        if self.proc is not None:
            # tgtd ignores SIGTERM and keeps no state worth a clean stop.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
            self.proc = None
            self.log.close()
            for suffix in ('', '.lock'):
                try:
                    os.unlink('/var/run/tgtd/socket.%d%s'
                              % (self.control, suffix))
                except OSError:
                    pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
