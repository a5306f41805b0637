"""The agent's tgt exports, spoken to tgtd over its management socket, and
SendTargets discovery; in the :data:`iscsi` context.

tgtadm takes a CHAP password only as ``--password SECRET``, where every
local user reads it in ``/proc/PID/cmdline``, and has no option to read it
from a file. So tgtadm is not run at all: this module sends tgtd the
requests tgtadm would send, over the same unix socket
(``/var/run/tgtd/socket.<control port>``, root's, and tgtd accepts only
peers of its own uid and gid). A request is ``struct tgtadm_req`` (120
bytes) followed by its parameters as one NUL-terminated string
(``user=U,password=P`` for a new account); the answer is ``struct
tgtadm_rsp`` (error number, total length) and, for ``show``, the text
tgtadm prints. Layout and parameter strings as in tgt 1.0.85 (Debian 12)
``usr/tgtadm.h``, ``usr/tgtadm.c`` and ``usr/mgmt.c``; unchanged up to
1.0.97. The secret is only ever in this process's memory and on that
socket: not in an argument vector, a log line, an error or a result.

Entry points are semantic: export or unexport the template of one image
(target ``<iqn_prefix>:<host>:<image>``, LUN 1 backed by
``/dev/mapper/<device_prefix>-<image>-tpl``, account
``thunder-<image>``), list the agent's own targets, check tgtd answers.
"""

import hashlib
import ipaddress
import re
import socket
import struct
from oslo_privsep import capabilities as caps

from thunder_agent.privileged import iscsi
from thunder_agent.privileged import kernel
from thunder_agent.privileged import scope as sc

# Tests point this at a directory of their own.
TGT_IPC_NAMESPACE = '/var/run/tgtd/socket'
TIMEOUT = 30
# Measured in the guest: with no capability, open-iscsi 2.1.8's
# SendTargets discovery fails (exit 12, "iSCSI driver tcp is not loaded").
ISCSIADM_CAPABILITIES = (caps.CAP_SYS_ADMIN,)
MAX_DISCOVERY_TIMEOUT = 60
# LUN 0 of a tgt target is its controller; the template is LUN 1.
LUN = 1
ACCOUNT_PREFIX = 'thunder-'

# usr/tgtadm.h
MODE_SYSTEM, MODE_TARGET, MODE_DEVICE = 0, 1, 2
MODE_ACCOUNT = 7
OP_NEW, OP_DELETE, OP_SHOW, OP_BIND = 0, 1, 2, 3
OP_UPDATE = 5
TYPE_DISK = 0
NO_LUN = 2 ** 64 - 1
ALL_TARGETS = -1
# mode, op, lld[64], len, tid, sid, lun, cid, host_no, device_type,
# ac_dir, pack, force: no padding on x86-64 (sid lands on offset 80).
REQ = struct.Struct('=ii64sIiQQIIIIII')
RSP = struct.Struct('=II')
# usr/tgtadm_error.h, in order.
ERRORS = (
    'success', 'unknown error', 'out of memory', "can't find the driver",
    "can't find the target", "can't find the logical unit",
    "can't find the session", "can't find the connection",
    "can't find the binding", 'this target already exists',
    'this logical unit number already exists',
    'this binding already exists',
    'this access control rule already exists',
    'this access control rule does not exist',
    'this account already exists', "can't find the account",
    'too many accounts', 'invalid request',
    'this target already has an outgoing account',
    'this target is still active', 'this logical unit is still active',
    'this driver is busy', "this operation isn't supported",
    'unknown parameter', 'this device has Prevent Removal set')
TGTADM_TARGET_ACTIVE = 19
# CHAP secrets of exports (derived or random: 16 letters and digits);
# no comma, which ends the user name in tgtd's parser.
_SECRET = re.compile(r'^[A-Za-z0-9._:@+/=-]{12,255}$')
_TARGET_LINE = re.compile(r'^Target (\d+): (\S+)$')
_HOSTNAME = re.compile(r'^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62}'
                       r'[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}'
                       r'[A-Za-z0-9])?)*$')


class TgtError(Exception):
    """tgtd refused a request (``code``: its error number)."""

    def __init__(self, code, text):
        super().__init__(code, text)
        self.code = code
        self.text = text


def _request(port, mode, op, tid=ALL_TARGETS, lun=NO_LUN, params=None,
             lld=b'iscsi'):
    """Send one request to tgtd on control port *port*; its answer text.

    Raises TgtError when tgtd refuses it, OSError when it cannot be
    reached. *params* may hold a secret: it is never part of an error.
    """
    body = params.encode() + b'\0' if params else b''
    header = REQ.pack(mode, op, lld, REQ.size + len(body), tid, 0, lun, 0,
                      0, TYPE_DISK, 0, 0, 0)
    path = '%s.%d' % (TGT_IPC_NAMESPACE, port)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(header + body)
        answer = _receive(sock, RSP.size)
        if len(answer) != RSP.size:
            raise TgtError(-1, 'tgtd closed the connection')
        err, length = RSP.unpack(answer)
        if err:
            raise TgtError(err, ERRORS[err] if err < len(ERRORS)
                           else 'tgtadm error %d' % err)
        text = _receive(sock, length - RSP.size)
    return text.rstrip(b'\0').decode('utf-8', 'replace')


def _receive(sock, size):
    data = b''
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _port(value):
    return sc.integer(value, 'control port', 0, 65535)


def _result(call, *args, **kwargs):
    """``(0, answer, '')`` or ``(error number, '', text)``."""
    try:
        return 0, call(*args, **kwargs), ''
    except TgtError as e:
        return e.code, '', e.text
    except OSError as e:
        return e.errno or -1, '', "can't reach tgtd: %s" % e.strerror


def parse_targets(text):
    """Targets from tgtd's ``show`` of mode target (tgtadm ``--op show
    --mode target``).

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


def parse_accounts(text):
    # "Account list:" then one user name per line.
    return [line.strip() for line in text.splitlines()[1:] if line.strip()]


def _all_targets(port):
    return parse_targets(_request(port, MODE_TARGET, OP_SHOW))


def _accounts(port):
    return parse_accounts(_request(port, MODE_ACCOUNT, OP_SHOW))


@iscsi.entrypoint
def tgt_check(control_port):
    """tgtd's system state (tgtadm ``--op show --mode sys``)."""
    return _result(_request, _port(control_port), MODE_SYSTEM, OP_SHOW,
                   lld=b'')


@iscsi.entrypoint
def tgt_targets(scope, control_port):
    """``(0, {iqn: target}, '')`` of the agent's own targets only (names
    under its IQN prefix); others' names, LUNs and ACLs stay with tgtd."""
    scope = sc.admit(scope)
    code, targets, err = _result(_all_targets, _port(control_port))
    if code:
        return code, {}, err
    return 0, {iqn: t for iqn, t in targets.items()
               if sc.own_iqn(scope, iqn)}, ''


@iscsi.entrypoint
def tgt_export(scope, control_port, image_id, iqn, secret):
    """Export the template of *image_id* read-only as LUN 1 of *iqn*,
    CHAP-protected with *secret*; ``(0, tid, '')`` or ``(error, None,
    text)``. Idempotent: an existing target of that name is completed.

    O_DIRECT (``bsoflags=direct``): the template's page cache would only
    duplicate the local cache below it. Write-protected: children can
    never change a template. A serial of its own per export: tgt's
    default (derived from tid and LUN) repeats on every host and would let
    a host's multipathd merge unrelated LUNs into one map. Who may log in
    is decided by CHAP, not by address (ACL ``ALL``).
    """
    scope = sc.admit(scope)
    port = _port(control_port)
    image_id = sc.uuid_text(image_id, 'image id')
    iqn = sc.iqn(scope, iqn, image_id)
    if not isinstance(secret, str) or not _SECRET.match(secret):
        # Never echo a secret.
        sc.refuse('a CHAP secret must be 12 to 255 plain characters')
    device = '/dev/mapper/' + sc.dm_name(scope, 'tpl', image_id)
    sc.own_dm(scope, device, roles=('tpl',))
    user = ACCOUNT_PREFIX + image_id
    try:
        return 0, _export(port, iqn, device, user, secret), ''
    except TgtError as e:
        return e.code, None, e.text
    except OSError as e:
        return e.errno or -1, None, "can't reach tgtd: %s" % e.strerror


def _export(port, iqn, device, user, secret):
    targets = _all_targets(port)
    target = targets.get(iqn)
    if target is None:
        tid = max((t['tid'] for t in targets.values()), default=0) + 1
        _request(port, MODE_TARGET, OP_NEW, tid=tid,
                 params='targetname=' + iqn)
        target = {'tid': tid, 'luns': {}, 'accounts': [], 'acls': []}
    tid = target['tid']
    if target['luns'].get(LUN) is None:
        _request(port, MODE_DEVICE, OP_NEW, tid=tid, lun=LUN,
                 params='path=%s,bsoflags=direct' % device)
        serial = hashlib.sha1(iqn.encode()).hexdigest()[:16]
        # tgtadm sends --params as "targetOps <params>," (trailing comma).
        _request(port, MODE_DEVICE, OP_UPDATE, tid=tid, lun=LUN,
                 params='targetOps readonly=1,scsi_id=thunder-%s,'
                        'scsi_sn=%s,' % (serial, serial))
    if user not in target['accounts']:
        if user in _accounts(port):
            _request(port, MODE_ACCOUNT, OP_DELETE, params='user=' + user)
        _request(port, MODE_ACCOUNT, OP_NEW,
                 params='user=%s,password=%s' % (user, secret))
        _request(port, MODE_ACCOUNT, OP_BIND, tid=tid,
                 params='user=' + user)
    if not target['acls']:
        _request(port, MODE_TARGET, OP_BIND, tid=tid,
                 params='initiator-address=ALL')
    return tid


@iscsi.entrypoint
def tgt_unexport(scope, control_port, image_id, iqn):
    """Delete the target *iqn* of *image_id* (tgtd refuses while
    initiators are logged in: error 19, "still active") and its account.
    Absent pieces are fine."""
    scope = sc.admit(scope)
    port = _port(control_port)
    image_id = sc.uuid_text(image_id, 'image id')
    iqn = sc.iqn(scope, iqn, image_id)
    user = ACCOUNT_PREFIX + image_id

    def unexport():
        target = _all_targets(port).get(iqn)
        if target is not None:
            _request(port, MODE_TARGET, OP_DELETE, tid=target['tid'])
        if user in _accounts(port):
            _request(port, MODE_ACCOUNT, OP_DELETE, params='user=' + user)
        return ''

    return _result(unexport)


def check_portal(portal):
    """``host:port`` with an IPv4 address, a bracketed IPv6 address or a
    DNS name and a port 1..65535; returns it unchanged or refuses."""
    if not isinstance(portal, str):
        sc.refuse('a portal must be a string')
    host, sep, port = portal.rpartition(':')
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        sc.refuse('portal %r needs host:port' % (portal,))
    if host.startswith('[') and host.endswith(']'):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            sc.refuse('portal %r has no valid IPv6 address' % (portal,))
        return portal
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _HOSTNAME.match(host) or host.replace('.', '').isdigit():
            sc.refuse('portal %r has no valid host' % (portal,))
    return portal


@iscsi.entrypoint
def iscsi_discover(portal, timeout):
    """The targets *portal* lists to us (SendTargets discovery), as
    ``iscsiadm`` prints them (``portal,tpgt iqn`` per line).

    ``-o nonpersistent`` leaves iscsiadm's node database alone: this only
    asks whether a target is there, it never logs in. *timeout* (seconds,
    at most 60) bounds the whole exchange; iscsiadm is killed after it.
    """
    portal = check_portal(portal)
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not 0 < timeout <= MAX_DISCOVERY_TIMEOUT):
        sc.refuse('discovery timeout must be 0..%d s'
                  % MAX_DISCOVERY_TIMEOUT)
    return kernel.run(iscsi, ['iscsiadm', '-m', 'discovery', '-t',
                              'sendtargets', '-p', portal, '-o',
                              'nonpersistent'], timeout=timeout,
                      capabilities=ISCSIADM_CAPABILITIES)
