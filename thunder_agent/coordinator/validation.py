"""Validation of everything that reaches the coordinator from outside.

Each function returns the normalised value or raises a typed
:mod:`thunder_agent.exception` error; none of them changes a tree, so a
refused request changes nothing.
"""

import ipaddress
import re

from thunder_agent.coordinator import ORIGIN
from thunder_agent import exception
from thunder_agent import validation as agent_validation

# Host names (RFC 1123, underscores tolerated as Nova does), IPv4 and IPv6
# literals. No '@', so ORIGIN can never be a node id.
_NODE_RE = re.compile(r'^[A-Za-z0-9_:]([A-Za-z0-9._:-]{0,253}[A-Za-z0-9_:])?$')
_LABEL_RE = re.compile(r'^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$')
_STATE_RE = re.compile(r'^[a-z][a-z0-9_-]{0,63}$')
_STAT_RE = re.compile(r'^[a-z][a-z0-9_]{0,63}$')
ADDRESS_KEYS = ('host', 'port', 'export')
HEARTBEAT_KEYS = ('address', 'parents', 'state', 'origin', 'stats')
MAX_PARENTS = 16
MAX_TEMPLATES = 10000
MAX_STATS = 64
_MAX_EXPORT = 4096  # NBD's limit on export names


def node_id(value):
    if not isinstance(value, str):
        raise exception.InvalidNodeId(node=value, reason='must be a string')
    if not _NODE_RE.match(value):
        raise exception.InvalidNodeId(
            node=value, reason='must be a host name or an IP address')
    return value


def parent_ref(value):
    """A parent as named in a heartbeat: a node id or ORIGIN."""
    if value == ORIGIN:
        return ORIGIN
    return node_id(value)


def image_id(value):
    return agent_validation.image_id(value)


def origin(value):
    # The coordinator never opens the origin: its form only (each agent
    # applies its own allow-lists).
    return agent_validation.origin_shape(value)


def address(value):
    """A relay export: ``{'host': ..., 'port': ..., 'export': ...}``."""
    if not isinstance(value, dict):
        raise exception.InvalidAddress(address=value, reason='must be a dict')
    unknown = sorted(set(value) - set(ADDRESS_KEYS), key=str)
    if unknown:
        raise exception.InvalidAddress(
            address=value, reason='unknown keys %s' % unknown)
    host = _host(value, value.get('host'))
    port = value.get('port')
    if isinstance(port, bool) or not isinstance(port, int) or not (
            0 < port <= 65535):
        raise exception.InvalidAddress(
            address=value, reason='port must be an integer in 1..65535')
    export = value.get('export', '')
    if (not isinstance(export, str) or len(export.encode()) > _MAX_EXPORT
            or '\0' in export):
        raise exception.InvalidAddress(
            address=value, reason='export must be a string of at most %d '
                                  'bytes' % _MAX_EXPORT)
    return {'host': host, 'port': port, 'export': export}


def _host(value, host):
    """*host* normalised: an IP literal in its compressed form, or a
    strict host name.

    An IPv6 scope id is refused: it names an interface of the host that
    sent it, meaningless to the children it is handed to, and free text
    (``fe80::1%eth0:x`` would reach an address grammar where ``:`` is a
    separator). IPv4-mapped IPv6 is refused too: the same node would have
    two spellings, and an agent's ``[relay] peer_networks`` of IPv4
    networks would not see it as IPv4.
    """
    def refuse(reason):
        raise exception.InvalidAddress(address=value, reason=reason)

    if not isinstance(host, str) or not host or len(host) > 253:
        refuse('host must be a host name or IP address')
    if '%' in host:
        refuse('IPv6 scope ids are not accepted')
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        if literal.version == 6 and literal.ipv4_mapped:
            refuse('give an IPv4-mapped address as IPv4')
        if literal.is_unspecified or literal.is_multicast:
            refuse('an unspecified or multicast address')
        return str(literal)
    if host.replace('.', '').isdigit() or not all(
            _LABEL_RE.match(label) for label in host.split('.')):
        refuse('host must be a host name or IP address')
    return host


def heartbeat(node, templates):
    """Check a heartbeat; return ``(node, {image_id: entry})``.

    An entry is ``{'address': address, 'origin': origin, 'parents':
    [refs], 'state': str, 'stats': {name: number}}``; address and origin
    are required.
    """
    node = node_id(node)
    if not isinstance(templates, dict):
        raise exception.InvalidHeartbeat(
            node=node, reason='templates must be a dict')
    if len(templates) > MAX_TEMPLATES:
        raise exception.InvalidHeartbeat(
            node=node, reason='more than %d templates' % MAX_TEMPLATES)
    result = {}
    for key, entry in templates.items():
        image = image_id(key)
        if not isinstance(entry, dict):
            raise exception.InvalidHeartbeat(
                node=node, reason='entry of %s must be a dict' % image)
        unknown = sorted(set(entry) - set(HEARTBEAT_KEYS), key=str)
        if unknown:
            raise exception.InvalidHeartbeat(
                node=node, reason='unknown keys %s in entry of %s'
                                  % (unknown, image))
        for required in ('address', 'origin'):
            if required not in entry:
                raise exception.InvalidHeartbeat(
                    node=node, reason='entry of %s has no %s'
                                      % (image, required))
        result[image] = {
            'address': address(entry['address']),
            'parents': _parents(node, image, entry.get('parents', [])),
            'state': _state(node, image, entry.get('state', 'ready')),
            'origin': origin(entry['origin']),
            'stats': _stats(node, image, entry.get('stats', {})),
        }
    return node, result


def _parents(node, image, value):
    if not isinstance(value, list) or len(value) > MAX_PARENTS:
        raise exception.InvalidHeartbeat(
            node=node, reason='parents of %s must be a list of at most %d '
                              'node ids' % (image, MAX_PARENTS))
    parents = []
    for ref in value:
        ref = parent_ref(ref)
        if ref == node:
            raise exception.InvalidHeartbeat(
                node=node, reason='node is its own parent for %s' % image)
        if ref not in parents:
            parents.append(ref)
    return parents


def _state(node, image, value):
    if not isinstance(value, str) or not _STATE_RE.match(value):
        raise exception.InvalidHeartbeat(
            node=node, reason='state of %s must be a short lower-case word'
                              % image)
    return value


def _stats(node, image, value):
    if not isinstance(value, dict) or len(value) > MAX_STATS:
        raise exception.InvalidHeartbeat(
            node=node, reason='stats of %s must be a dict' % image)
    for key, number in value.items():
        if (not isinstance(key, str) or not _STAT_RE.match(key)
                or isinstance(number, bool)
                or not isinstance(number, (int, float))):
            raise exception.InvalidHeartbeat(
                node=node, reason='stats of %s must map names to numbers'
                                  % image)
    return dict(value)
