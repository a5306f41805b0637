"""The agent's side of the relay tree: its calls to the coordinator.

The coordinator assigns each template a parent (another node's template
export, or the origin) and tells it its children. This module makes the
calls and turns the answers, which come over RabbitMQ and are therefore
checked like any remote input, into :class:`Placement` values; the manager
decides what to do with them, and the driver turns a parent's address into
a source.

Every call has a deadline. A call that gets no answer marks the
coordinator as down until the next heartbeat gets one: while it is down,
new templates do not wait [relay] join_timeout each for a join that will
not be answered, they read from the origin at once (the next heartbeat
enters them in their trees).
"""

import dataclasses
import threading
import time

import oslo_messaging as messaging
from oslo_log import log as logging

from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent.coordinator import validation as coordinator_validation
from thunder_agent import exception
from thunder_agent import identity
from thunder_agent import records
from thunder_agent import rpc
from thunder_agent import validation

LOG = logging.getLogger(__name__)

MAX_CHILDREN = 1024


class CoordinatorUnavailable(Exception):
    """No answer from the coordinator (timeout, no server, broker down)."""


class CoordinatorRefused(CoordinatorUnavailable):
    """The coordinator refused this node's signature (its log says why:
    a certificate not of its CA or expired, a relay address not in the
    certificate's IP SANs, a clock beyond [coordinator] signature_skew).

    A kind of unavailability for the callers (the template reads from its
    origin), but the coordinator is not marked down: it answers.
    """


@dataclasses.dataclass(frozen=True)
class Placement:
    """A template's place in its tree, from one coordinator answer."""

    # The parent to read from: records.ORIGIN or a node id.
    parent: str
    # The parent's export; None for the origin, or when the coordinator
    # does not know it yet (right after its restart): then the template
    # keeps reading from the parent it has.
    address: records.RelayAddress = None
    children: tuple = ()
    # ((node id, host), ...) of the children the coordinator knows the
    # relay host of: where they connect from (initiator ACLs).
    child_hosts: tuple = ()

    @property
    def known(self):
        return self.parent == records.ORIGIN or self.address is not None


def placement(answer, node):
    """Check a coordinator *answer* (untrusted) and type it.

    Raises InvalidInput for anything malformed; *node* (this host) may not
    be its own parent.
    """
    if not isinstance(answer, dict):
        raise exception.InvalidInput(reason='coordinator answer is not a '
                                            'dict')
    parents = answer.get('parents') or []
    if not isinstance(parents, list):
        raise exception.InvalidInput(reason='answer parents is not a list')
    children = answer.get('children') or []
    if not isinstance(children, list) or len(children) > MAX_CHILDREN:
        raise exception.InvalidInput(reason='answer children is not a list '
                                            'of at most %d node ids'
                                            % MAX_CHILDREN)
    kids = tuple(sorted({coordinator_validation.node_id(c)
                         for c in children}))
    hosts = _child_hosts(answer.get('child_hosts') or {}, kids)
    first = parents[0] if parents else None
    if not isinstance(first, dict) or 'node' not in first:
        # No parent, or the origin (given as its connection info).
        return Placement(records.ORIGIN, None, kids, hosts)
    parent = coordinator_validation.node_id(first['node'])
    if parent == node:
        raise exception.InvalidInput(reason='coordinator names this node '
                                            'as its own parent')
    raw = first.get('address')
    address = None
    if raw is not None:
        address = records.RelayAddress.from_dict(
            coordinator_validation.address(raw))
    return Placement(parent, address, kids, hosts)


def _child_hosts(value, kids):
    """``((node, host), ...)`` of an answer's ``child_hosts``: only
    children of the same answer, each host an IP literal or host name as
    a relay address has it."""
    if not isinstance(value, dict) or len(value) > MAX_CHILDREN:
        raise exception.InvalidInput(reason='answer child_hosts is not a '
                                            'dict of at most %d entries'
                                            % MAX_CHILDREN)
    pairs = []
    for child, host in value.items():
        child = coordinator_validation.node_id(child)
        if child not in kids:
            raise exception.InvalidInput(reason='answer child_hosts names '
                                                '%r, not a child' % child)
        host = coordinator_validation.address(
            {'host': host, 'port': 1, 'export': ''})['host']
        pairs.append((child, host))
    return tuple(sorted(pairs))


def shared_origin(origin):
    """*origin* as the coordinator gets it: without its secrets (an
    iSCSI origin's CHAP password). The coordinator never opens an origin;
    it keeps the value, shows it in get_tree and hands it back in answers,
    which the agent ignores for the origin (it reads its own record's)."""
    return validation.describe_origin(origin.to_dict())


def signer(conf):
    """The :class:`identity.Signer` of this node's coordinator calls;
    None, loudly, with ``[tls] enabled = False``."""
    if not conf.tls.enabled:
        LOG.warning('[tls] enabled is False: coordinator calls are not '
                    'signed (a lab only; a coordinator with TLS refuses '
                    'them)')
        return None
    return identity.Signer.from_dir(conf.tls.certificates_dir)


class RelayMember:
    def __init__(self, conf, api=None, clock=time.monotonic):
        self.conf = conf
        self.node = conf.host
        self.api = api or coordinator_rpc.CoordinatorAPI(
            rpc.get_transport(conf), topic=conf.coordinator.topic,
            timeout=conf.coordinator.rpc_timeout, signer=signer(conf))
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since = None

    # -- coordinator health ----------------------------------------------
    @property
    def coordinator_down(self):
        with self._lock:
            return self._down_since is not None

    def _call(self, method, timeout, *args, **kwargs):
        try:
            answer = getattr(self.api, method)(*args, timeout=timeout,
                                               **kwargs)
        except messaging.RemoteError as e:
            # The coordinator answered: it is up, and says no.
            if e.exc_type != coordinator_rpc.CallRefused.__name__:
                raise
            LOG.error('The coordinator refused this node\'s %s: check the '
                      'certificate in [tls] certificates_dir (its CA, its '
                      'validity, its IP SANs) and the clock', method)
            raise CoordinatorRefused(method)
        except (messaging.MessagingTimeout,
                messaging.MessageDeliveryFailure,
                messaging.MessagingException) as e:
            with self._lock:
                if self._down_since is None:
                    self._down_since = self._clock()
                    LOG.warning('Coordinator on topic %s does not answer '
                                '(%s: %s); new templates read from their '
                                'origin until it does',
                                self.conf.coordinator.topic,
                                type(e).__name__, e)
            raise CoordinatorUnavailable('%s: %s' % (type(e).__name__, e))
        with self._lock:
            if self._down_since is not None:
                LOG.info('Coordinator answers again after %.1f s',
                         self._clock() - self._down_since)
                self._down_since = None
        return answer

    # -- calls -----------------------------------------------------------
    def join(self, image_id, address, origin):
        """Enter the tree of *image_id*; returns a :class:`Placement`.

        Raises CoordinatorUnavailable at once while the coordinator is
        known to be down, else after [relay] join_timeout.
        """
        if self.coordinator_down:
            raise CoordinatorUnavailable('coordinator known to be down')
        answer = self._call('join', self.conf.relay.join_timeout, image_id,
                            self.node, address.to_dict(),
                            shared_origin(origin))
        return placement(answer, self.node)

    def heartbeat(self, members):
        """Report *members* (``[(image_id, address, origin, parent,
        state)]``); returns ``{image_id: Placement}`` for the answers that
        are well formed (a malformed one is logged and skipped)."""
        report = {image_id: {'address': address.to_dict(),
                             'origin': shared_origin(origin),
                             'parents': [parent], 'state': state}
                  for image_id, address, origin, parent, state in members}
        answers = self._call('heartbeat', self.conf.coordinator.rpc_timeout,
                             self.node, report)
        if not isinstance(answers, dict):
            LOG.error('Coordinator heartbeat answer is not a dict; ignored')
            return {}
        placements = {}
        for image_id, answer in answers.items():
            if image_id not in report:
                continue
            try:
                placements[image_id] = placement(answer, self.node)
            except exception.InvalidInput as e:
                LOG.error('Ignoring the coordinator\'s answer for %s: %s',
                          image_id, e)
        return placements

    def placement_of(self, image_id):
        """This node's current :class:`Placement` in the tree of
        *image_id* (what the coordinator casts ``tree_changed`` about);
        NodeNotInTree when it has none."""
        answer = self._call('get_placement',
                            self.conf.coordinator.rpc_timeout, image_id,
                            self.node)
        return placement(answer, self.node)

    def report_failure(self, image_id, parent):
        answer = self._call('report_parent_failure',
                            self.conf.coordinator.rpc_timeout, image_id,
                            self.node, parent)
        return placement(answer, self.node)

    def leave(self, image_id):
        """Leave a tree; returns the children still reading from us."""
        try:
            answer = self._call('leave', self.conf.coordinator.rpc_timeout,
                                image_id, self.node)
        except (exception.ImageTreeNotFound, exception.NodeNotInTree):
            # The coordinator dropped us already (timeout, restart).
            return []
        pending = answer.get('pending_children', []) if isinstance(
            answer, dict) else []
        return [coordinator_validation.node_id(n) for n in pending
                ][:MAX_CHILDREN]
