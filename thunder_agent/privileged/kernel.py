"""Privileged operations of the kernel driver (see
:mod:`thunder_agent.drivers.kernel`).

Each entry point runs one fixed binary, or writes one of a few sysfs
attributes; callers get (exit code, stdout, stderr) back and turn failures
into typed errors themselves, because a ProcessExecutionError loses its
exit code crossing the privsep channel.
"""

import ipaddress
import os
import re
import subprocess

from thunder_agent import exception
from thunder_agent.privileged import default

KERNEL_MODULES = frozenset({
    'bcache', 'dm_cache', 'dm_cache_smq', 'dm_multipath', 'dm_snapshot',
    'iscsi_tcp', 'loop', 'sd_mod'})
_DMSETUP_COMMANDS = frozenset({
    'create', 'remove', 'load', 'suspend', 'resume', 'status', 'table',
    'info', 'ls', 'message'})
_TGTADM_MODES = frozenset({'target', 'logicalunit', 'account', 'conn',
                           'sys'})
# Writable sysfs attributes, matched against the resolved path.
_SYSFS_WRITABLE = (
    re.compile(r'^/sys/fs/bcache/(register|register_quiet)$'),
    re.compile(r'^/sys/fs/bcache/[0-9a-f-]{36}/'
               r'(stop|unregister|congested_read_threshold_us|'
               r'congested_write_threshold_us)$'),
    re.compile(r'^/sys/devices/virtual/block/dm-\d+/bcache/'
               r'(stop|sequential_cutoff|cache_mode)$'),
    re.compile(r'^/sys/devices/platform/host\d+/session\d+/iscsi_session/'
               r'session\d+/recovery_tmo$'),
)
# A DNS name (RFC 1123 labels); never starts with '-', so it cannot pass
# for an option.
_HOSTNAME = re.compile(r'^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62}'
                       r'[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}'
                       r'[A-Za-z0-9])?)*$')
MAX_DISCOVERY_TIMEOUT = 60


def _run(argv, stdin=None, timeout=120):
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return -1, '', '%s timed out after %ss' % (argv[0], timeout)
    except FileNotFoundError:
        return 127, '', '%s: command not found' % argv[0]
    return proc.returncode, proc.stdout, proc.stderr


def _refuse(reason):
    raise exception.PrivilegedOperationNotAllowed(reason=reason)


def _strings(args):
    if not isinstance(args, (list, tuple)) or not all(
            isinstance(a, str) and '\0' not in a for a in args):
        _refuse('arguments must be a list of strings')
    return list(args)


def check_portal(portal):
    """``host:port`` with an IPv4 address, a bracketed IPv6 address or a
    DNS name and a port 1..65535; returns it unchanged or refuses."""
    if not isinstance(portal, str):
        _refuse('a portal must be a string')
    host, sep, port = portal.rpartition(':')
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        _refuse('portal %r needs host:port' % (portal,))
    if host.startswith('[') and host.endswith(']'):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            _refuse('portal %r has no valid IPv6 address' % (portal,))
        return portal
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _HOSTNAME.match(host) or host.replace('.', '').isdigit():
            _refuse('portal %r has no valid host' % (portal,))
    return portal


@default.entrypoint
def load_kernel_modules(names):
    names = _strings(names)
    unknown = set(names) - KERNEL_MODULES
    if unknown:
        _refuse('kernel modules %s are not used here' % sorted(unknown))
    return _run(['modprobe', '-a'] + names)


@default.entrypoint
def dmsetup(args, stdin=None, timeout=120):
    args = _strings(args)
    if not args or args[0] not in _DMSETUP_COMMANDS:
        _refuse('dmsetup %s' % (args[:1],))
    return _run(['dmsetup'] + args, stdin=stdin, timeout=timeout)


@default.entrypoint
def tgtadm(args):
    args = _strings(args)
    modes = [b for a, b in zip(args, args[1:]) if a == '--mode']
    if len(modes) != 1 or modes[0] not in _TGTADM_MODES:
        _refuse('tgtadm needs one --mode of %s' % sorted(_TGTADM_MODES))
    return _run(['tgtadm'] + args)


@default.entrypoint
def losetup(args):
    return _run(['losetup'] + _strings(args))


@default.entrypoint
def make_bcache(args):
    return _run(['make-bcache'] + _strings(args))


@default.entrypoint
def blockdev_size(path):
    """Size in bytes of the block device *path* (opening it needs root)."""
    path = _strings([path])[0]
    if not path.startswith('/dev/'):
        _refuse('%s is not a device node' % path)
    return _run(['blockdev', '--getsize64', path])


@default.entrypoint
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
        _refuse('discovery timeout must be 0..%d s'
                % MAX_DISCOVERY_TIMEOUT)
    return _run(['iscsiadm', '-m', 'discovery', '-t', 'sendtargets',
                 '-p', portal, '-o', 'nonpersistent'], timeout=timeout)


@default.entrypoint
def write_sysfs(path, value):
    real = os.path.realpath(_strings([path])[0])
    if not any(p.match(real) for p in _SYSFS_WRITABLE):
        _refuse('writing %s' % real)
    try:
        with open(real, 'w') as f:
            f.write(str(value))
    except OSError as e:
        # bcache answers "already registered" with EINVAL/EBUSY; callers
        # decide from the resulting state.
        return e.errno, '', '%s: %s' % (real, e.strerror)
    return 0, '', ''
