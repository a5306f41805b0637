"""iSCSI exports with tgt: one target per template, CHAP on every target.

The backend drives a running tgtd through ``tgtadm`` on its management
port; it does not start tgtd itself (a system service, or one per network
namespace in the guest tests).
"""

import hashlib
import re

from thunder_agent import exception
from thunder_agent.drivers.kernel import check
from thunder_agent.privileged import kernel as priv

# LUN 0 of a tgt target is its controller; the template is LUN 1.
LUN = 1
_TARGET_LINE = re.compile(r'^Target (\d+): (\S+)$')


def parse_targets(text):
    """Targets from ``tgtadm --op show --mode target``.

    Returns ``{iqn: {'tid', 'sessions', 'luns': {lun: backing path},
    'accounts', 'acls'}}``.
    """
    targets = {}
    current = None
    section = None
    lun = None
    for raw in text.splitlines():
        line = raw.strip()
        match = _TARGET_LINE.match(raw)
        if match:
            current = {'tid': int(match.group(1)), 'sessions': 0,
                       'luns': {}, 'accounts': [], 'acls': []}
            targets[match.group(2)] = current
            section = None
            continue
        if current is None or not line:
            continue
        if line.endswith('information:'):
            section = line[:-len(' information:')]
            continue
        if section == 'I_T nexus' and line.startswith('I_T nexus:'):
            current['sessions'] += 1
        elif section == 'LUN' and line.startswith('LUN:'):
            lun = int(line.split(':', 1)[1])
            current['luns'][lun] = None
        elif section == 'LUN' and line.startswith('Backing store path:'):
            path = line.split(':', 1)[1].strip()
            current['luns'][lun] = None if path == 'None' else path
        elif section == 'Account':
            current['accounts'].append(line.split()[0])
        elif section == 'ACL':
            current['acls'].append(line)
    return targets


class Tgt:
    def __init__(self, control_port):
        self.control_port = control_port

    def _adm(self, what, *args, ok_codes=(0,)):
        return check(priv.tgtadm(
            ['-C', str(self.control_port), '--lld', 'iscsi'] + list(args)),
            'tgtadm %s' % what, ok_codes=ok_codes)

    def check_running(self):
        code, _out, err = priv.tgtadm(
            ['-C', str(self.control_port), '--op', 'show', '--mode', 'sys'])
        if code != 0:
            raise exception.BackendError(
                reason='tgtd is not reachable on control port %s: %s'
                       % (self.control_port, err.strip()))

    def targets(self):
        return parse_targets(self._adm('show', '--op', 'show', '--mode',
                                       'target'))

    def accounts(self):
        out = self._adm('show accounts', '--op', 'show', '--mode', 'account')
        # "Account list:" then one user name per line.
        return [line.strip() for line in out.splitlines()[1:]
                if line.strip()]

    def find(self, iqn):
        return self.targets().get(iqn)

    def sessions(self, iqn):
        target = self.find(iqn)
        return target['sessions'] if target else 0

    def export(self, iqn, device, username, secret):
        """Export *device* read-only as LUN 1 of *iqn*, CHAP-protected.

        Idempotent: an existing target of that name is re-used.
        """
        target = self.find(iqn)
        if target is None:
            tids = [t['tid'] for t in self.targets().values()]
            tid = max(tids, default=0) + 1
            self._adm('new target', '--op', 'new', '--mode', 'target',
                      '--tid', str(tid), '--targetname', iqn)
            target = {'tid': tid, 'luns': {}, 'accounts': [], 'acls': []}
        tid = str(target['tid'])
        if target['luns'].get(LUN) is None:
            # O_DIRECT: the template's page cache would only duplicate
            # the local cache below it.
            self._adm('new lun', '--op', 'new', '--mode', 'logicalunit',
                      '--tid', tid, '--lun', str(LUN),
                      '--backing-store', device, '--bsoflags', 'direct')
            # Write-protected: children can never change a template. A
            # serial of its own per export: tgt's default (derived from
            # tid and LUN) repeats on every host and would let a host's
            # multipathd merge unrelated LUNs into one map.
            serial = hashlib.sha1(iqn.encode()).hexdigest()[:16]
            self._adm('update lun', '--op', 'update', '--mode',
                      'logicalunit', '--tid', tid, '--lun', str(LUN),
                      '--params', 'readonly=1,scsi_id=thunder-%s,scsi_sn=%s'
                      % (serial, serial))
        if username not in target['accounts']:
            if username in self.accounts():
                self._adm('delete account', '--op', 'delete', '--mode',
                          'account', '--user', username)
            self._adm('new account', '--op', 'new', '--mode', 'account',
                      '--user', username, '--password', secret)
            self._adm('bind account', '--op', 'bind', '--mode', 'account',
                      '--tid', tid, '--user', username)
        if not target['acls']:
            # Who may log in is decided by CHAP, not by address.
            self._adm('bind acl', '--op', 'bind', '--mode', 'target',
                      '--tid', tid, '--initiator-address', 'ALL')
        return target['tid']

    def unexport(self, iqn, username=None):
        """Remove the target (refused while initiators are logged in)."""
        target = self.find(iqn)
        if target is not None:
            if target['sessions']:
                raise exception.BackendError(
                    reason='target %s still has %d session(s)'
                           % (iqn, target['sessions']))
            self._adm('delete target', '--op', 'delete', '--mode', 'target',
                      '--tid', str(target['tid']))
        if username and username in self.accounts():
            self._adm('delete account', '--op', 'delete', '--mode',
                      'account', '--user', username)
