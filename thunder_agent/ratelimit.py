"""Rate limiting of relay traffic leaving a node (tc HTB via pyroute2).

Operators cap how much bandwidth a node spends serving its children so
that tenants are not starved. Only packets whose source port is a relay
port (the node's template exports) are shaped, in one HTB class; all other
traffic (tenants, RPC, the node's own fetches) passes unshaped. The limit
replaces the interface's root qdisc; :func:`clear` restores the kernel
default. IPv4 and IPv6 (without extension headers) are matched.

The tc changes run in the privsep daemon
(:mod:`thunder_agent.privileged.network`); reading the state back needs no
privilege.
"""

import re

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from thunder_agent import exception
from thunder_agent.privileged import network as priv_network

_IFNAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.:-]{0,14}$')
# HTB keeps rates in 32-bit bytes per second.
MAX_RATE_BPS = 8 * (2 ** 32 - 1)
MIN_RATE_BPS = 8000
MAX_PORTS = 64


def limit(interface, rate_bps, ports):
    """Cap traffic leaving *interface* from any of *ports* at *rate_bps*
    bits per second (all relay ports share the cap)."""
    interface = _interface(interface)
    if (isinstance(rate_bps, bool) or not isinstance(rate_bps, int)
            or not MIN_RATE_BPS <= rate_bps <= MAX_RATE_BPS):
        raise exception.InvalidInput(
            reason='relay rate must be an integer number of bits per second '
                   'between %d and %d' % (MIN_RATE_BPS, MAX_RATE_BPS))
    if not isinstance(ports, (list, tuple, set)) or not (
            0 < len(ports) <= MAX_PORTS):
        raise exception.InvalidInput(
            reason='relay ports must be a list of 1 to %d ports' % MAX_PORTS)
    for port in ports:
        if isinstance(port, bool) or not isinstance(port, int) or not (
                0 < port <= 65535):
            raise exception.InvalidInput(
                reason='relay port %r is not in 1..65535' % (port,))
    _checked(priv_network.set_relay_rate_limit, interface, rate_bps // 8,
             sorted(set(ports)))


def clear(interface):
    """Remove the relay rate limit of *interface* (no-op if none)."""
    _checked(priv_network.clear_relay_rate_limit, _interface(interface))


def status(interface):
    """``{'rate_bps': int, 'sent_bytes': int}`` of the relay class of
    *interface*, or None when no relay limit is set."""
    interface = _interface(interface)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            raise exception.InvalidInput(
                reason='no interface %s' % interface)
        for tc_class in ipr.get_classes(index=found[0]):
            if (tc_class.get('TCA_KIND') == 'htb'
                    and tc_class['handle'] == priv_network.RELAY_CLASS):
                params = tc_class.get('TCA_OPTIONS').get('TCA_HTB_PARMS')
                stats = tc_class.get('TCA_STATS') or {}
                return {'rate_bps': params['rate'] * 8,
                        'sent_bytes': stats.get('bytes', 0)}
    return None


def _interface(value):
    if not isinstance(value, str) or not _IFNAME_RE.match(value):
        raise exception.InvalidInput(
            reason='interface name %r is not valid' % (value,))
    return value


def _checked(func, *args):
    try:
        func(*args)
    except ValueError as e:
        raise exception.InvalidInput(reason=str(e))
    except (OSError, NetlinkError) as e:
        raise exception.NetworkSetupError(reason=str(e))
