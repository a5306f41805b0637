"""Every operation of the project that needs root, through oslo.privsep.

The agent runs unprivileged; the functions below run in the privsep daemon
with only the capabilities listed in the context. Keep them small and
check their arguments: they are the whole privileged surface.
"""

import errno
import os
import re
import subprocess

from oslo_privsep import capabilities as caps
from oslo_privsep import priv_context
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from thunder_agent import exception

default = priv_context.PrivContext(
    'thunder_agent',
    cfg_section='thunder_agent_privileged',
    pypath=__name__ + '.default',
    capabilities=[caps.CAP_SYS_ADMIN, caps.CAP_NET_ADMIN,
                  caps.CAP_DAC_OVERRIDE, caps.CAP_DAC_READ_SEARCH,
                  caps.CAP_SYS_PTRACE, caps.CAP_KILL, caps.CAP_CHOWN,
                  caps.CAP_FOWNER, caps.CAP_MKNOD],
)


# -- relay rate limiting (see thunder_agent.ratelimit) --

RELAY_QDISC = 0x10000           # 1:
RELAY_CLASS = 0x10001           # 1:1
# A class that does not exist: HTB sends unclassified packets straight
# through, so only relay traffic is shaped.
RELAY_DEFAULT_CLASS = 0xffff
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD


@default.entrypoint
def set_relay_rate_limit(ifname, rate_bytes, ports):
    """Shape TCP/UDP packets with a source port in *ports* leaving
    *ifname* to *rate_bytes* per second; replaces the root qdisc."""
    with IPRoute() as ipr:
        index = _link_index(ipr, ifname)
        _delete_root_qdisc(ipr, index)
        ipr.tc('add', 'htb', index=index, handle=RELAY_QDISC,
               default=RELAY_DEFAULT_CLASS)
        ipr.tc('add-class', 'htb', index=index, handle=RELAY_CLASS,
               parent=RELAY_QDISC, rate=rate_bytes, ceil=rate_bytes)
        for port in ports:
            # The source port is the first half of the word right after
            # the IP header (IPv4 without options, IPv6 without extension
            # headers: what relay traffic is).
            key = '0x%04x0000/0xffff0000' % port
            ipr.tc('add-filter', 'u32', index=index, parent=RELAY_QDISC,
                   protocol=_ETH_P_IP, prio=1, target=RELAY_CLASS,
                   keys=[key + '+20'])
            ipr.tc('add-filter', 'u32', index=index, parent=RELAY_QDISC,
                   protocol=_ETH_P_IPV6, prio=2, target=RELAY_CLASS,
                   keys=[key + '+40'])


@default.entrypoint
def clear_relay_rate_limit(ifname):
    """Remove the root qdisc of *ifname* (back to the kernel default)."""
    with IPRoute() as ipr:
        _delete_root_qdisc(ipr, _link_index(ipr, ifname))


def _link_index(ipr, ifname):
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise ValueError('no interface %s' % ifname)
    return found[0]


def _delete_root_qdisc(ipr, index):
    try:
        ipr.tc('del', index=index, handle=0, parent=0xffffffff)
    except NetlinkError as e:
        # Nothing to delete: the interface has its default qdisc.
        if e.code not in (errno.ENOENT, errno.EINVAL):
            raise


# -- kernel backend (see thunder_agent.drivers.kernel) --
#
# Each entry point runs one fixed binary; callers get (exit code, stdout,
# stderr) back and turn failures into typed errors themselves, because a
# ProcessExecutionError loses its exit code crossing the privsep channel.

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
