"""RPC between the agents and the coordinator (topic ``[coordinator]
topic``).

Version history:

* 1.0 - join, heartbeat, leave, report_parent_failure, get_tree,
  list_trees.
* 1.1 - answers carry the node's children (so that no agent needs
  get_tree); a 1.0 agent ignores the extra key.

Shapes:

* a relay address is ``{'host': str, 'port': int, 'export': str}``: where
  a node's template is exported to its children;
* an origin is Cinder-style connection info, e.g. ``{'driver_volume_type':
  'nbd', 'data': {'host': ..., 'port': ..., 'export': ...}}``;
* an answer is ``{'parents': [parent, ...], 'depth': int or None,
  'children': [node id, ...]}`` where a parent is ``{'node': id,
  'address': address}`` or, for the root, the origin as the node gave it;
  depth counts hops from the origin. Right after a coordinator restart a
  parent may come with ``'address': None`` and depth None: it has not
  reported yet; keep reading from it as before;
* in heartbeats, parents are named by node id, the origin by
  :data:`thunder_agent.coordinator.ORIGIN`.

Errors come back as the typed exceptions of :mod:`thunder_agent.exception`.
"""

import oslo_messaging as messaging

# The default of [coordinator] topic.
TOPIC = 'thunder-coordinator'


class CoordinatorAPI:
    VERSION = '1.1'

    def __init__(self, transport, topic=TOPIC, timeout=30):
        target = messaging.Target(topic=topic, version=self.VERSION)
        self.client = messaging.get_rpc_client(transport, target,
                                               timeout=timeout)

    def _call(self, method, ctxt=None, timeout=None, **kwargs):
        cctxt = self.client.prepare(timeout=timeout)
        return cctxt.call(ctxt or {}, method, **kwargs)

    def join(self, image_id, node, address, origin, ctxt=None,
             timeout=None):
        """Enter the tree of *image_id*; returns an answer (see above)."""
        return self._call('join', ctxt, timeout, image_id=image_id,
                          node=node, address=address, origin=origin)

    def heartbeat(self, node, templates, ctxt=None, timeout=None):
        """Report every template of *node*.

        *templates* is ``{image_id: {'address': address, 'origin': origin,
        'parents': [node id or ORIGIN], 'state': str, 'stats': {name:
        number}}}`` (state and stats optional). Returns ``{image_id:
        answer}``: the parents each template should read from now.
        """
        return self._call('heartbeat', ctxt, timeout, node=node,
                          templates=templates)

    def leave(self, image_id, node, ctxt=None, timeout=None):
        """Leave a tree; returns ``{'pending_children': [node ids]}``.

        The template must keep serving while the list is not empty; call
        again (it is idempotent) until it is.
        """
        return self._call('leave', ctxt, timeout, image_id=image_id,
                          node=node)

    def report_parent_failure(self, image_id, node, parent, ctxt=None,
                              timeout=None):
        """*node* cannot read from *parent*; returns the new answer."""
        return self._call('report_parent_failure', ctxt, timeout,
                          image_id=image_id, node=node, parent=parent)

    def get_tree(self, image_id, ctxt=None, timeout=None):
        return self._call('get_tree', ctxt, timeout, image_id=image_id)

    def list_trees(self, ctxt=None, timeout=None):
        return self._call('list_trees', ctxt, timeout)


class CoordinatorEndpoint:
    """Server side: a thin layer over the manager, which validates."""

    target = messaging.Target(version=CoordinatorAPI.VERSION)

    def __init__(self, manager):
        self.manager = manager

    def join(self, ctxt, image_id, node, address, origin):
        return self.manager.join(image_id, node, address, origin)

    def heartbeat(self, ctxt, node, templates):
        return self.manager.heartbeat(node, templates)

    def leave(self, ctxt, image_id, node):
        return self.manager.leave(image_id, node)

    def report_parent_failure(self, ctxt, image_id, node, parent):
        return self.manager.report_parent_failure(image_id, node, parent)

    def get_tree(self, ctxt, image_id):
        return self.manager.get_tree(image_id)

    def list_trees(self, ctxt):
        return self.manager.list_trees()


def get_server(transport, manager, topic, host):
    target = messaging.Target(topic=topic, server=host)
    # No executor argument: oslo.messaging picks threading unless eventlet
    # monkey-patched the process.
    return messaging.get_rpc_server(transport, target,
                                    [CoordinatorEndpoint(manager)])
