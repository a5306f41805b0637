"""Privileged network operations: the relay rate limit (see
:mod:`thunder_agent.ratelimit`, which checks the arguments first), in the
:data:`net` context (CAP_NET_ADMIN only: tc over netlink)."""

import errno
import re

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from thunder_agent.privileged import net
from thunder_agent.privileged import scope as sc

RELAY_QDISC = 0x10000           # 1:
RELAY_CLASS = 0x10001           # 1:1
# A class that does not exist: HTB sends unclassified packets straight
# through, so only relay traffic is shaped.
RELAY_DEFAULT_CLASS = 0xffff
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
# An interface name (IFNAMSIZ - 1 characters), never an option.
_IFNAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.:-]{0,14}$')
# tc's rate field is 32 bits of bytes per second; the relay ports are
# the agent's listeners, a handful.
MAX_RATE = 2 ** 32 - 1
MAX_PORTS = 64


@net.entrypoint
def set_relay_rate_limit(ifname, rate_bytes, ports):
    """Shape TCP/UDP packets with a source port in *ports* leaving
    *ifname* to *rate_bytes* per second; replaces the root qdisc."""
    sc.text(ifname, 'interface', _IFNAME.pattern)
    sc.integer(rate_bytes, 'rate', 1, MAX_RATE)
    if not isinstance(ports, (list, tuple)) or not 0 < len(ports) \
            <= MAX_PORTS:
        sc.refuse('ports must be a list of 1 to %d ports' % MAX_PORTS)
    ports = [sc.integer(p, 'port', 1, 65535) for p in ports]
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


@net.entrypoint
def clear_relay_rate_limit(ifname):
    """Remove the root qdisc of *ifname* (back to the kernel default)."""
    sc.text(ifname, 'interface', _IFNAME.pattern)
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
