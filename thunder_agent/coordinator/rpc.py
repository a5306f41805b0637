"""RPC between the agents and the coordinator (topic ``[coordinator]
topic``).

Version history:

* 1.0 - join, heartbeat, leave, report_parent_failure, get_tree,
  list_trees.
* 1.1 - answers carry the node's children (so that no agent needs
  get_tree); a 1.0 agent ignores the extra key.
* 1.2 - every call carries an ``envelope`` signed with the caller's key
  (:mod:`thunder_agent.identity`); answers carry ``child_hosts``;
  get_placement. With ``[tls] enabled`` a call without a good envelope is
  refused, so 1.1 agents must be upgraded with their certificates.

Shapes:

* a relay address is ``{'host': str, 'port': int, 'export': str}``: where
  a node's template is exported to its children;
* an origin is Cinder-style connection info, e.g. ``{'driver_volume_type':
  'nbd', 'data': {'host': ..., 'port': ..., 'export': ...}}``;
* an answer is ``{'parents': [parent, ...], 'depth': int or None,
  'children': [node id, ...], 'child_hosts': {node id: host}}`` where
  a parent is ``{'node': id,
  'address': address}`` or, for the root, the origin as the node gave it;
  depth counts hops from the origin. Right after a coordinator restart a
  parent may come with ``'address': None`` and depth None: it has not
  reported yet; keep reading from it as before;
* in heartbeats, parents are named by node id, the origin by
  :data:`thunder_agent.coordinator.ORIGIN`.

Errors come back as the typed exceptions of :mod:`thunder_agent.exception`;
a refused envelope (an unknown certificate, a node speaking for another or
from an address not its own, a replay) as a generic
:class:`CallRefused`, the reason in the coordinator's log only.

The coordinator casts ``tree_changed(image_id)`` to an agent (topic
``[agent] topic``, server = node id) when that node gets new children;
the agent then asks ``get_placement``. The cast is a hint: it carries no
tree, so a forged one costs one signed call.
"""

import threading
import time

import oslo_messaging as messaging
from oslo_log import log as logging

from thunder_agent.coordinator import validation as v
from thunder_agent import exception
from thunder_agent import identity

LOG = logging.getLogger(__name__)

# The default of [coordinator] topic.
TOPIC = 'thunder-coordinator'


class CallRefused(exception.ThunderException):
    msg_fmt = "The coordinator refused the call."
    client_error = True


class CoordinatorAPI:
    VERSION = '1.2'

    def __init__(self, transport, topic=TOPIC, timeout=30, signer=None):
        target = messaging.Target(topic=topic, version=self.VERSION)
        self.client = messaging.get_rpc_client(transport, target,
                                               timeout=timeout)
        # identity.Signer; None with [tls] enabled = False (lab only).
        self.signer = signer

    def _call(self, method, ctxt=None, timeout=None, **kwargs):
        if self.signer is not None:
            kwargs['envelope'] = self.signer.sign(method, kwargs)
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

    def get_placement(self, image_id, node, ctxt=None, timeout=None):
        """*node*'s place in the tree of *image_id*: an answer like
        join's, changing nothing (NodeNotInTree if it has none)."""
        return self._call('get_placement', ctxt, timeout, image_id=image_id,
                          node=node)

    def get_tree(self, image_id, ctxt=None, timeout=None):
        return self._call('get_tree', ctxt, timeout, image_id=image_id)

    def list_trees(self, ctxt=None, timeout=None):
        return self._call('list_trees', ctxt, timeout)


class CoordinatorEndpoint:
    """Server side: checks who calls, then the manager validates.

    With a *verifier* (:class:`thunder_agent.identity.Verifier`) every
    call must carry a good envelope, a node speaks only for itself (the
    certificate's common name is the ``node`` argument) and only from its
    own addresses (a relay host it registers is an IP address of its
    certificate). A refusal is logged with its reason, answered with
    :class:`CallRefused`, and reaches no tree. Without a verifier
    (``[tls] enabled = False``) every caller is believed.
    """

    target = messaging.Target(version=CoordinatorAPI.VERSION)

    def __init__(self, manager, verifier=None):
        self.manager = manager
        self.verifier = verifier

    def _check(self, method, envelope, args, node=None, addresses=None):
        """Refuse the call unless *envelope* is good for it. *addresses*
        (called once the envelope is good, so that a stranger learns
        nothing of what is wrong with its arguments) returns the relay
        addresses the call registers."""
        if self.verifier is None:
            return
        try:
            caller = self.verifier.verify(method, args, envelope)
            if node is not None and caller.node != node:
                raise identity.Refused(
                    method=method, reason='certificate of %r speaks for '
                                          '%r' % (caller.node, node))
            for address in addresses() if addresses else ():
                # Normalised as the manager stores it (raises
                # InvalidAddress, which the manager would raise too).
                host = v.address(address)['host']
                if not caller.owns(host):
                    raise identity.Refused(
                        method=method, reason='%r registers host %r, not '
                                              'an IP address of its '
                                              'certificate' % (caller.node,
                                                               host))
        except identity.Refused as e:
            LOG.warning('%s', e)
            raise CallRefused()

    def join(self, ctxt, image_id, node, address, origin, envelope=None):
        self._check('join', envelope, dict(image_id=image_id, node=node,
                                           address=address, origin=origin),
                    node, lambda: [address])
        return self.manager.join(image_id, node, address, origin)

    def heartbeat(self, ctxt, node, templates, envelope=None):
        def addresses():
            return [entry['address']
                    for entry in v.heartbeat(node, templates)[1].values()]
        self._check('heartbeat', envelope,
                    dict(node=node, templates=templates), node, addresses)
        return self.manager.heartbeat(node, templates)

    def leave(self, ctxt, image_id, node, envelope=None):
        self._check('leave', envelope, dict(image_id=image_id, node=node),
                    node)
        return self.manager.leave(image_id, node)

    def report_parent_failure(self, ctxt, image_id, node, parent,
                              envelope=None):
        self._check('report_parent_failure', envelope,
                    dict(image_id=image_id, node=node, parent=parent), node)
        return self.manager.report_parent_failure(image_id, node, parent)

    def get_placement(self, ctxt, image_id, node, envelope=None):
        self._check('get_placement', envelope,
                    dict(image_id=image_id, node=node), node)
        return self.manager.get_placement(image_id, node)

    def get_tree(self, ctxt, image_id, envelope=None):
        self._check('get_tree', envelope, dict(image_id=image_id))
        return self.manager.get_tree(image_id)

    def list_trees(self, ctxt, envelope=None):
        self._check('list_trees', envelope, {})
        return self.manager.list_trees()


def get_server(transport, manager, topic, host, verifier=None):
    target = messaging.Target(topic=topic, server=host)
    # No executor argument: oslo.messaging picks threading unless eventlet
    # monkey-patched the process.
    return messaging.get_rpc_server(transport, target,
                                    [CoordinatorEndpoint(manager, verifier)])


class AgentNotifier:
    """Casts ``tree_changed(image_id)`` to the agents of nodes that got
    new children, at most once per (node, image) per *min_interval*.

    A change within the interval of the last cast is not dropped: it is
    cast by :meth:`flush` (the service calls it periodically) once the
    interval is over, so a node whose children change 100 times in a
    second is told ~5 times, the last time after the last change.
    """

    def __init__(self, transport, topic, min_interval=0.2,
                 clock=time.monotonic):
        self._client = messaging.get_rpc_client(
            transport, messaging.Target(topic=topic))
        self.min_interval = min_interval
        self._clock = clock
        self._last = {}
        self._pending = set()
        self._lock = threading.Lock()

    def __call__(self, changed):
        now = self._clock()
        due = []
        with self._lock:
            for key in changed:
                if now - self._last.get(key, -self.min_interval) >= (
                        self.min_interval):
                    self._last[key] = now
                    due.append(key)
                else:
                    self._pending.add(key)
        self._cast(due)

    def flush(self):
        now = self._clock()
        with self._lock:
            due = sorted(key for key in self._pending
                         if now - self._last[key] >= self.min_interval)
            for key in due:
                self._pending.discard(key)
                self._last[key] = now
            # Forget old entries: memory stays O(recent changes).
            for key, when in list(self._last.items()):
                if now - when > 10 * self.min_interval and (
                        key not in self._pending):
                    del self._last[key]
        self._cast(due)

    def _cast(self, keys):
        for node, image_id in keys:
            try:
                self._client.prepare(server=node).cast(
                    {}, 'tree_changed', image_id=image_id)
            except messaging.MessagingException as e:
                LOG.warning('Could not tell %s of its new children in the '
                            'tree of %s: %s', node, image_id, e)
