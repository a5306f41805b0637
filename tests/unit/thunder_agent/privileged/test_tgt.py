"""The iSCSI context: the agent's tgt exports over tgtd's management
socket (a CHAP secret is never on a command line), discovery.

A fake tgtd on a unix socket here speaks tgt 1.0.85's management protocol
(struct tgtadm_req + parameter string; struct tgtadm_rsp + text) and
records every request.
"""

import hashlib
import os
import shutil
import socket
import struct

import pytest

from tests import socket_server
from thunder_agent import exception
from thunder_agent import privileged
from thunder_agent.privileged import tgt as priv

from tests.unit.thunder_agent.privileged.conftest import IMAGE

OTHER = '9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d'
IQN = 'iqn.2010-10.org.openstack.thunder:compute-7:' + IMAGE
SECRET = 'Abcdefgh12345678'
PORT = 11
REFUSED = exception.PrivilegedOperationNotAllowed
TPL = '/dev/mapper/tha-%s-tpl' % IMAGE


class FakeTgtd(socket_server.AcceptLoop):
    """tgtd's management side: targets, LUNs, accounts, ACLs."""

    def __init__(self, path):
        self.requests = []
        self.raw = b''
        self.targets = {}       # tid -> {'name', 'luns', 'accounts', 'acls'}
        self.accounts = {}      # user -> password
        self.sessions = {}      # tid -> count
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.serve_in_background()

    def close(self):
        self.sock.close()

    def handle(self, conn):
        with conn:
            header = self._recv(conn, priv.REQ.size)
            fields = priv.REQ.unpack(header)
            body = self._recv(conn, fields[3] - priv.REQ.size)
            self.raw += header + body
            mode, op, lld, _len, tid, _sid, lun = fields[:7]
            params = body.rstrip(b'\0').decode()
            self.requests.append((mode, op, lld.rstrip(b'\0').decode(),
                                  tid, lun, params))
            err, text = self._answer(mode, op, tid, lun, params)
            data = text.encode() + b'\0' if text else b''
            conn.sendall(struct.pack('=II', err, 8 + len(data)) + data)

    @staticmethod
    def _recv(conn, size):
        data = b''
        while len(data) < size:
            data += conn.recv(size - len(data))
        return data

    def _answer(self, mode, op, tid, lun, params):
        kv = dict(p.split('=', 1) for p in params.split(',') if '=' in p)
        if (mode, op) == (priv.MODE_SYSTEM, priv.OP_SHOW):
            return 0, 'System:\n    State: ready\n'
        if (mode, op) == (priv.MODE_TARGET, priv.OP_SHOW):
            return 0, self._show()
        if (mode, op) == (priv.MODE_ACCOUNT, priv.OP_SHOW):
            return 0, 'Account list:\n' + ''.join(
                '    %s\n' % u for u in self.accounts)
        if (mode, op) == (priv.MODE_TARGET, priv.OP_NEW):
            if tid in self.targets:
                return 9, ''
            self.targets[tid] = {'name': kv['targetname'], 'luns': {},
                                 'accounts': [], 'acls': []}
        elif (mode, op) == (priv.MODE_TARGET, priv.OP_DELETE):
            if self.sessions.get(tid):
                return priv.TGTADM_TARGET_ACTIVE, ''
            del self.targets[tid]
        elif (mode, op) == (priv.MODE_TARGET, priv.OP_BIND):
            self.targets[tid]['acls'].append(kv['initiator-address'])
        elif (mode, op) == (priv.MODE_DEVICE, priv.OP_NEW):
            self.targets[tid]['luns'][lun] = kv['path']
        elif (mode, op) == (priv.MODE_ACCOUNT, priv.OP_NEW):
            # tgtd's own parse: user up to the comma, then password=...
            user, _, rest = params[len('user='):].partition(',')
            self.accounts[user] = rest[len('password='):]
        elif (mode, op) == (priv.MODE_ACCOUNT, priv.OP_DELETE):
            del self.accounts[kv['user']]
        elif (mode, op) == (priv.MODE_ACCOUNT, priv.OP_BIND):
            self.targets[tid]['accounts'].append(kv['user'])
        return 0, ''

    def _show(self):
        lines = []
        for tid, t in sorted(self.targets.items()):
            lines += ['Target %d: %s' % (tid, t['name']),
                      '    System information:', '        Driver: iscsi',
                      '    I_T nexus information:']
            for n in range(self.sessions.get(tid, 0)):
                lines.append('        I_T nexus: %d' % (n + 1))
            lines += ['    LUN information:', '        LUN: 0',
                      '            Backing store path: None']
            for lun, path in sorted(t['luns'].items()):
                lines += ['        LUN: %d' % lun,
                          '            Backing store path: %s' % path]
            lines += ['    Account information:']
            lines += ['        %s' % a for a in t['accounts']]
            lines += ['    ACL information:']
            lines += ['        %s' % a for a in t['acls']]
        return '\n'.join(lines) + '\n'


@pytest.fixture
def tgtd(tmp_path, monkeypatch):
    path = str(tmp_path / 'socket')
    monkeypatch.setattr(priv, 'TGT_IPC_NAMESPACE', path)
    fake = FakeTgtd('%s.%d' % (path, PORT))
    yield fake
    fake.close()


@pytest.fixture
def template(sysfs):
    sysfs.dm(3, 'tha-%s-tpl' % IMAGE)


def test_entry_points_run_in_the_iscsi_context():
    assert privileged.iscsi.pypath == 'thunder_agent.privileged.iscsi'
    for name in ('tgt_check', 'tgt_targets', 'tgt_export', 'tgt_unexport',
                 'iscsi_discover'):
        assert privileged.iscsi.is_entrypoint(getattr(priv, name)), name


def test_the_request_layout_is_tgtadms():
    # struct tgtadm_req of tgt 1.0.85 on x86-64.
    assert priv.REQ.size == 120
    packed = priv.REQ.pack(7, 0, b'iscsi', 130, -1, 0, 2 ** 64 - 1, 0, 0, 0,
                           0, 0, 0)
    assert packed[72:76] == struct.pack('=I', 130)
    assert packed[76:80] == b'\xff\xff\xff\xff'
    assert packed[88:96] == b'\xff' * 8


def test_export_sends_what_tgtadm_would_and_runs_nothing(
        scope, tgtd, template, commands):
    assert priv.tgt_export(scope, PORT, IMAGE, IQN, SECRET) == (0, 1, '')
    user = 'thunder-' + IMAGE
    serial = hashlib.sha1(IQN.encode()).hexdigest()[:16]
    assert [r for r in tgtd.requests if r[1] != priv.OP_SHOW] == [
        (priv.MODE_TARGET, priv.OP_NEW, 'iscsi', 1, priv.NO_LUN,
         'targetname=' + IQN),
        (priv.MODE_DEVICE, priv.OP_NEW, 'iscsi', 1, 1,
         'path=%s,bsoflags=direct' % TPL),
        (priv.MODE_DEVICE, priv.OP_UPDATE, 'iscsi', 1, 1,
         'targetOps readonly=1,scsi_id=thunder-%s,scsi_sn=%s,'
         % (serial, serial)),
        (priv.MODE_ACCOUNT, priv.OP_NEW, 'iscsi', -1, priv.NO_LUN,
         'user=%s,password=%s' % (user, SECRET)),
        (priv.MODE_ACCOUNT, priv.OP_BIND, 'iscsi', 1, priv.NO_LUN,
         'user=' + user),
        (priv.MODE_TARGET, priv.OP_BIND, 'iscsi', 1, priv.NO_LUN,
         'initiator-address=ALL')]
    assert tgtd.accounts == {user: SECRET}
    # The secret went over the socket only: no command ran at all.
    assert commands.argv == []
    assert SECRET.encode() in tgtd.raw
    # Idempotent.
    assert priv.tgt_export(scope, PORT, IMAGE, IQN, SECRET) == (0, 1, '')
    assert len(tgtd.targets) == 1
    code, targets, err = priv.tgt_targets(scope, PORT)
    assert (code, err) == (0, '')
    assert targets == {IQN: {'tid': 1, 'sessions': 0,
                             'luns': {0: None, 1: TPL},
                             'accounts': [user], 'acls': ['ALL']}}


def test_a_changed_secret_replaces_the_account(scope, tgtd, template):
    user = 'thunder-' + IMAGE
    tgtd.accounts[user] = 'Old1234567890abc'
    priv.tgt_export(scope, PORT, IMAGE, IQN, SECRET)
    assert tgtd.accounts == {user: SECRET}


def test_targets_lists_only_the_agents(scope, tgtd):
    tgtd.targets[4] = {'name': 'iqn.2010-10.org.openstack:volume-1',
                       'luns': {1: '/dev/cinder/volume-1'},
                       'accounts': ['cinder'], 'acls': ['10.0.0.0/8']}
    tgtd.targets[5] = {'name': IQN, 'luns': {}, 'accounts': [], 'acls': []}
    assert list(priv.tgt_targets(scope, PORT)[1]) == [IQN]


@pytest.mark.parametrize('image_id,iqn,secret', [
    (IMAGE, 'iqn.2010-10.org.openstack:volume-1', SECRET),
    (IMAGE, 'iqn.2010-10.org.openstack.thunder:compute-7:' + OTHER, SECRET),
    (IMAGE, IQN + '\n', SECRET), (IMAGE, '-' + IQN, SECRET),
    (IMAGE, 'iqn.2010-10.org.openstack.thunder:a,b:' + IMAGE, SECRET),
    (IMAGE, 'iqn.2010-10.org.openstack.thunder:' + IMAGE, SECRET),
    (OTHER, 'iqn.2010-10.org.openstack.thunder:compute-7:' + OTHER, SECRET),
    ('img1', 'iqn.2010-10.org.openstack.thunder:compute-7:img1', SECRET),
    (IMAGE, IQN, 'short'), (IMAGE, IQN, SECRET + ',user=root'),
    (IMAGE, IQN, SECRET + '\0'), (IMAGE, IQN, None),
])
def test_export_refuses_what_is_not_the_agents(scope, tgtd, template,
                                               image_id, iqn, secret):
    with pytest.raises(REFUSED) as info:
        priv.tgt_export(scope, PORT, image_id, iqn, secret)
    assert SECRET not in str(info.value)
    assert tgtd.requests == []


def test_export_needs_the_template_device(scope, tgtd, sysfs):
    with pytest.raises(REFUSED):
        priv.tgt_export(scope, PORT, IMAGE, IQN, SECRET)
    sysfs.dm(3, 'cinder--volumes-volume--1')
    with pytest.raises(REFUSED):
        priv.tgt_export(scope, PORT, IMAGE, IQN, SECRET)
    assert tgtd.requests == []


def test_tgtd_errors_never_carry_the_secret(scope, tgtd, template,
                                            monkeypatch):
    real = tgtd._answer

    def refuse_accounts(mode, op, tid, lun, params):
        if (mode, op) == (priv.MODE_ACCOUNT, priv.OP_NEW):
            return 16, ''
        return real(mode, op, tid, lun, params)

    monkeypatch.setattr(tgtd, '_answer', refuse_accounts)
    code, tid, err = priv.tgt_export(scope, PORT, IMAGE, IQN, SECRET)
    assert (code, tid, err) == (16, None, 'too many accounts')


def test_unexport(scope, tgtd, template):
    priv.tgt_export(scope, PORT, IMAGE, IQN, SECRET)
    tgtd.sessions[1] = 1
    assert priv.tgt_unexport(scope, PORT, IMAGE, IQN) == (
        19, '', 'this target is still active')
    tgtd.sessions.clear()
    assert priv.tgt_unexport(scope, PORT, IMAGE, IQN) == (0, '', '')
    assert tgtd.targets == {} and tgtd.accounts == {}
    # Nothing left: fine.
    assert priv.tgt_unexport(scope, PORT, IMAGE, IQN) == (0, '', '')
    for image_id, iqn in ((IMAGE, 'iqn.2010-10.org.openstack:volume-1'),
                          (OTHER, IQN)):
        with pytest.raises(REFUSED):
            priv.tgt_unexport(scope, PORT, image_id, iqn)


def test_an_absent_tgtd_is_an_answer(scope, tmp_path, monkeypatch):
    monkeypatch.setattr(priv, 'TGT_IPC_NAMESPACE', str(tmp_path / 'none'))
    code, out, err = priv.tgt_check(PORT)
    assert code and out == '' and "can't reach tgtd" in err
    assert priv.tgt_targets(scope, PORT)[0] != 0


@pytest.mark.parametrize('port', [-1, 65536, '11', True, None])
def test_control_ports_are_checked(scope, port):
    with pytest.raises(REFUSED):
        priv.tgt_check(port)


def test_check(in_process, tgtd):
    assert priv.tgt_check(PORT) == (0, 'System:\n    State: ready\n', '')
    assert tgtd.requests[0][:3] == (priv.MODE_SYSTEM, priv.OP_SHOW, '')


@pytest.mark.parametrize('call', [
    lambda: priv.iscsi_discover('--help:3260', 2),
    lambda: priv.iscsi_discover('10.0.0.1', 2),
    lambda: priv.iscsi_discover('10.0.0.1:0', 2),
    lambda: priv.iscsi_discover('10.0.0.1:3260 -o delete', 2),
    lambda: priv.iscsi_discover('[::1:3260', 2),
    lambda: priv.iscsi_discover('[not-v6]:3260', 2),
    lambda: priv.iscsi_discover('999.1.1.1:3260', 2),
    lambda: priv.iscsi_discover(['10.0.0.1:3260'], 2),
    lambda: priv.iscsi_discover('10.0.0.1:3260', 0),
    lambda: priv.iscsi_discover('10.0.0.1:3260', 61),
    lambda: priv.iscsi_discover('10.0.0.1:3260', True),
])
def test_discovery_refused_before_running_anything(in_process, commands,
                                                   call):
    with pytest.raises(REFUSED):
        call()
    assert commands.argv == []


@pytest.mark.parametrize('portal', ['10.99.2.1:3260', '[2001:db8::7]:3260',
                                    'storage-7.example.org:3261'])
def test_portals_accepted(portal):
    assert priv.check_portal(portal) == portal


def test_discovery(in_process, commands):
    priv.iscsi_discover('[2001:db8::7]:3260', 2)
    assert commands.argv == [['iscsiadm', '-m', 'discovery', '-t',
                              'sendtargets', '-p', '[2001:db8::7]:3260',
                              '-o', 'nonpersistent']]
    # With CAP_SYS_ADMIN only (the iscsi daemon itself keeps none).
    assert commands.bounding == ['-all,+sys_admin']


def test_missing_tools_report_instead_of_raising(in_process, monkeypatch,
                                                 tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    monkeypatch.setenv('PATH', str(bin_dir))
    code, out, err = priv.iscsi_discover('192.0.2.1:3260', 2)
    assert code == 127 and 'setpriv' in err
    if os.geteuid():
        # setpriv needs CAP_SETPCAP to shrink the bounding set.
        return
    # setpriv there, iscsiadm not.
    os.symlink(shutil.which('setpriv', path='/usr/bin:/bin'),
               str(bin_dir / 'setpriv'))
    code, out, err = priv.iscsi_discover('192.0.2.1:3260', 2)
    assert code == 127 and 'iscsiadm' in err


def test_socket_path_is_tgtadms():
    assert priv.TGT_IPC_NAMESPACE == '/var/run/tgtd/socket'
    assert os.path.isabs(priv.TGT_IPC_NAMESPACE)
