"""The agent's side of the relay tree: membership, parents, repair.

The coordinator assigns each template a parent (another node's template
export, or the origin). This module turns answers into sources for the
backend, reports every template in heartbeats, probes the current parent
and reports it when it stops answering, so that the coordinator moves the
template (and the parent's other children) elsewhere.
"""

import logging
import socket

from thunder_agent.coordinator import ORIGIN
from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent import exception
from thunder_agent import rpc

LOG = logging.getLogger(__name__)


class RelayMember:
    def __init__(self, conf):
        self.conf = conf
        self.node = conf.host
        self.api = coordinator_rpc.CoordinatorAPI(
            rpc.get_transport(conf), topic=conf.coordinator.topic,
            timeout=conf.coordinator.rpc_timeout)

    # -- shapes ----------------------------------------------------------
    @staticmethod
    def takes_part(template_origin, image_id):
        """Only NBD origins relay; refuse ones children could not use."""
        if template_origin['driver_volume_type'] != 'nbd':
            return False
        if template_origin['data'].get('export') != image_id:
            raise exception.InvalidOrigin(
                reason='in a relay tree the origin must export the image '
                       'under its id %s (it exports %r)'
                       % (image_id, template_origin['data'].get('export')))
        return True

    @staticmethod
    def parent_of(answer, origin):
        """(parent id, source dict) from a coordinator answer, or None
        when the answer names a parent whose address is not known yet."""
        parents = answer.get('parents') or []
        if not parents:
            return ORIGIN, origin
        first = parents[0]
        if 'node' not in first:
            return ORIGIN, origin
        if not first.get('address'):
            return None
        return first['node'], {'driver_volume_type': 'nbd',
                               'data': dict(first['address'])}

    def address(self, template):
        return {'host': template.export['host'],
                'port': template.export['port'],
                'export': template.image_id}

    # -- calls -----------------------------------------------------------
    def join(self, template):
        answer = self.api.join(template.image_id, self.node,
                               self.address(template), template.origin)
        parent = self.parent_of(answer, template.origin)
        if parent is None:
            return ORIGIN, template.origin
        return parent

    def heartbeat(self, templates):
        report = {t.image_id: {'address': self.address(t),
                               'origin': t.origin,
                               'parents': [t.relay.get('parent', ORIGIN)],
                               'state': 'ready'}
                  for t in templates}
        return self.api.heartbeat(self.node, report)

    def report_failure(self, template):
        return self.api.report_parent_failure(
            template.image_id, self.node, template.relay['parent'])

    def leave(self, image_id):
        return self.api.leave(image_id, self.node).get('pending_children',
                                                       [])

    def children(self, image_id):
        tree = self.api.get_tree(image_id)
        return list(tree['nodes'].get(self.node, {}).get('children', []))

    def probe(self, source):
        """True when the source accepts connections."""
        data = source['data']
        timeout = self.conf.relay.parent_probe_timeout
        try:
            if 'socket' in data:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(timeout)
                    s.connect(data['socket'])
            else:
                with socket.create_connection(
                        (data['host'], data['port']), timeout=timeout):
                    pass
            return True
        except OSError:
            return False
