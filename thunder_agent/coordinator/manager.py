"""Per-image relay trees, kept as soft state.

Every tree lives in memory only. It is built from ``join`` calls and from
agent heartbeats, which list each template of a node with the parents it
currently reads from: after a coordinator restart the first round of
heartbeats rebuilds the trees as they are, and agents keep their parents
(no data-plane change, no I/O interruption).

Rules the manager keeps whatever a policy answers:

* a parent is the origin or a node of the same tree, never the node itself
  or one of its descendants (no cycles);
* a node that fails, leaves or stops sending heartbeats loses its children
  first: they get new parents right away and learn them from the answer to
  their next heartbeat;
* a leaving node stays in the tree until none of its children reports it
  as a parent any more, so it is never torn down under them.

Each public method validates all of its input before touching a tree.
"""

import collections
import itertools
import threading
import time

from oslo_log import log as logging

from thunder_agent.coordinator import ORIGIN
from thunder_agent.coordinator import policies
from thunder_agent.coordinator.policies import base
from thunder_agent.coordinator import validation as v
from thunder_agent import exception

LOG = logging.getLogger(__name__)


class Member:
    """One node in one image's tree."""

    def __init__(self, node, order, now, address=None, origin=None,
                 parents=(), confirmed=True):
        self.node = node
        self.order = order
        self.address = address
        self.origin = origin
        # Parents assigned by the coordinator...
        self.parents = list(parents)
        # ...and those the node last said it reads from.
        self.reported = list(parents)
        self.state = 'joining'
        self.stats = {}
        self.leaving = False
        # False for a node only known because a child named it as parent
        # (after a coordinator restart); it gets no children until it
        # reports itself.
        self.confirmed = confirmed
        self.created_at = now
        self.joined_at = now


class ImageTree(base.TreeView):
    def __init__(self, image_id, origin, clock, quarantine=None,
                 memberships=None, changes=None):
        self.image_id = image_id
        self.origin = origin
        self.members = {}
        # node -> end of its quarantine; owned by the manager so that it
        # outlives the tree.
        self.quarantine = {} if quarantine is None else quarantine
        self._children = collections.defaultdict(set)
        self._order = itertools.count()
        self._clock = clock
        # node -> image ids of the trees it confirmed itself in (a
        # placeholder a child named does not count against its quotas);
        # owned by the manager.
        self._memberships = (collections.defaultdict(set)
                             if memberships is None else memberships)
        # (node, image id) of nodes that got a new child since the manager
        # last looked; owned by the manager.
        self._changes = set() if changes is None else changes

    # -- changes (manager only) --

    def add(self, node, now, **kwargs):
        member = Member(node, next(self._order), now, **kwargs)
        self.members[node] = member
        if member.confirmed:
            self._memberships[node].add(self.image_id)
        for parent in member.parents:
            self._children[parent].add(node)
            self._changes.add((parent, self.image_id))
        return member

    def confirm(self, member):
        member.confirmed = True
        self._memberships[member.node].add(self.image_id)

    def set_parents(self, node, parents):
        member = self.members[node]
        for parent in member.parents:
            self._children[parent].discard(node)
        member.parents = list(parents)
        for parent in member.parents:
            if node not in self._children[parent]:
                self._children[parent].add(node)
                self._changes.add((parent, self.image_id))

    def detach(self, node):
        """Remove *node*; its children keep naming it until re-parented."""
        member = self.members.pop(node)
        images = self._memberships.get(node)
        if images is not None:
            images.discard(self.image_id)
            if not images:
                del self._memberships[node]
        for parent in member.parents:
            self._children[parent].discard(node)
        return member

    def forget_children(self, node):
        self._children.pop(node, None)

    # -- TreeView --

    def nodes(self):
        return list(self.members)

    def parents(self, node):
        if node == ORIGIN:
            return []
        return list(self.members[node].parents)

    def children(self, node):
        return sorted(self._children.get(node, ()),
                      key=lambda child: self.members[child].order)

    def load(self, node):
        return sum(1 for child in self._children.get(node, ())
                   if not self.members[child].leaving)

    def depth(self, node):
        return self._depth(node, set())

    def _depth(self, node, path):
        if node == ORIGIN:
            return 0
        member = self.members.get(node)
        if member is None or node in path:
            return None
        path.add(node)
        depths = [d for d in (self._depth(p, path) for p in member.parents)
                  if d is not None]
        path.discard(node)
        return 1 + min(depths) if depths else None

    def descendants(self, node):
        found = set()
        queue = collections.deque([node])
        while queue:
            for child in self._children.get(queue.popleft(), ()):
                if child not in found:
                    found.add(child)
                    queue.append(child)
        found.discard(node)
        return found

    def can_serve(self, node):
        if node == ORIGIN:
            return True
        member = self.members.get(node)
        return (member is not None and member.confirmed
                and not member.leaving and member.address is not None
                and self.quarantine.get(node, 0) <= self._clock())

    def height(self):
        depths = [self.depth(n) for n in self.members]
        return max([d for d in depths if d is not None], default=0)


class CoordinatorManager:
    """The trees, and the rules above.

    Quotas bound what one node can make the coordinator hold: a node is
    in at most *max_trees_per_node* trees, a heartbeat is taken for at
    most *max_templates_per_heartbeat* templates, and there are at most
    *max_trees* trees. What is beyond a quota is refused (and logged)
    alone: the rest of the heartbeat is taken, and the trees a node is
    already in always count first, so a full node keeps its places.

    *notify*, if given, is called outside the lock with ``[(node,
    image_id)]`` of the nodes that got new children (a join, a
    re-parenting, an adoption): the service tells their agents.
    """

    def __init__(self, policy, heartbeat_interval=10, node_timeout=35,
                 failure_quarantine=30, clock=time.monotonic,
                 max_trees_per_node=256, max_templates_per_heartbeat=1024,
                 max_trees=10000, notify=None):
        self.policy = policy
        self.heartbeat_interval = heartbeat_interval
        self.node_timeout = node_timeout
        self.failure_quarantine = failure_quarantine
        self.max_trees_per_node = max_trees_per_node
        self.max_templates_per_heartbeat = max_templates_per_heartbeat
        self.max_trees = max_trees
        self.notify = notify
        self._clock = clock
        self._memberships = collections.defaultdict(set)
        self._changes = set()
        # (image_id, reporter, parent) -> end of the window in which that
        # reporter's next report about that parent is not counted.
        self._reports = {}
        self._trees = {}
        self._last_seen = {}
        self._last_expiry = None
        # (image_id, node) of nodes waiting for their children to move.
        self._leaving = set()
        self._quarantine = collections.defaultdict(dict)
        self._lock = threading.Lock()

    @classmethod
    def from_conf(cls, conf, clock=time.monotonic):
        group = conf.coordinator
        return cls(policies.load(group.policy, group.fan_out,
                                 group.origin_fan_out),
                   heartbeat_interval=group.heartbeat_interval,
                   node_timeout=group.node_timeout,
                   failure_quarantine=group.failure_quarantine, clock=clock,
                   max_trees_per_node=group.max_trees_per_node,
                   max_templates_per_heartbeat=(
                       group.max_templates_per_heartbeat),
                   max_trees=group.max_trees)

    # -- RPC operations --

    def join(self, image_id, node, address, origin):
        """Place *node* in the tree of *image_id*; return its parents.

        Idempotent: a node already in the tree keeps its place (an agent
        restarting or retrying a call whose answer was lost).
        """
        image_id = v.image_id(image_id)
        node = v.node_id(node)
        address = v.address(address)
        origin = v.origin(origin)
        with self._lock:
            now = self._clock()
            self._last_seen[node] = now
            self._maybe_expire(now)
            refusal = self._over_quota(image_id, node)
            if refusal:
                LOG.warning('Refused join of %s to the tree of %s: %s',
                            node, image_id, refusal)
                raise exception.InvalidInput(reason=refusal)
            tree = self._tree(image_id, origin)
            member = tree.members.get(node)
            if member is None:
                parents = self._checked(
                    tree, node, self.policy.choose_parents(tree, node))
                member = tree.add(node, now, address=address, origin=origin,
                                  parents=parents)
                LOG.info('Node %s joined the tree of %s under %s',
                         node, image_id, parents)
            else:
                member.address = address
                member.origin = origin
                member.leaving = False
                self._leaving.discard((image_id, node))
                tree.confirm(member)
                member.joined_at = now
                if not member.parents:
                    self._replace_parents(tree, member, [], [])
                member.reported = list(member.parents)
            answer = self._answer(tree, member)
            changed = self._take_changes()
        self._notify(changed)
        return answer

    def heartbeat(self, node, templates):
        """Record what *node* holds; return ``{image_id: answer}``.

        *templates* maps every image the node holds a template of (or is
        preparing one) to ``{'address', 'origin', 'parents', 'state',
        'stats'}``. Images the node no longer lists leave their trees.
        """
        node, entries = v.heartbeat(node, templates)
        with self._lock:
            now = self._clock()
            self._last_seen[node] = now
            self._maybe_expire(now)
            answers = {}
            for image_id, entry in self._within_quotas(node,
                                                       entries).items():
                tree = self._tree(image_id, entry['origin'])
                member = tree.members.get(node)
                if member is None or not member.confirmed:
                    member = self._adopt(tree, node, entry, now)
                member.address = entry['address']
                member.origin = entry['origin']
                member.state = entry['state']
                member.stats = entry['stats']
                member.reported = entry['parents']
                answers[image_id] = self._answer(tree, member)
            for image_id, tree in list(self._trees.items()):
                member = tree.members.get(node)
                # A heartbeat may have been composed before a join it
                # crossed on the wire: recent joins are spared.
                if (member is not None and member.confirmed
                        and image_id not in entries
                        and now - member.joined_at >= self.heartbeat_interval):
                    LOG.info('Node %s no longer holds %s', node, image_id)
                    self._remove(tree, node, now)
            self._finish_leaving(now)
            changed = self._take_changes()
        self._notify(changed)
        return answers

    def leave(self, image_id, node):
        """Take *node* out of the tree of *image_id*.

        Its children get new parents at once. Returns ``{'pending_children':
        [...]}``: the children still reading from the node; the node must
        keep serving until a later ``leave`` returns an empty list.
        """
        image_id = v.image_id(image_id)
        node = v.node_id(node)
        with self._lock:
            now = self._clock()
            tree, member = self._member(image_id, node)
            if not member.leaving:
                member.leaving = True
                self._leaving.add((image_id, node))
                self._reparent_children(tree, node, member.parents)
            pending = self._pending_children(tree, node)
            if not pending:
                self._remove(tree, node, now)
                LOG.info('Node %s left the tree of %s', node, image_id)
            changed = self._take_changes()
        self._notify(changed)
        return {'pending_children': pending}

    def report_parent_failure(self, image_id, node, parent):
        """*node* cannot read from *parent*: return its new parents.

        The parent is taken out of the tree (all its children move) and gets
        no children for ``failure_quarantine`` seconds; if it is alive, its
        next heartbeat brings it back. A report counts only from a current
        child of that parent in that tree, and one per (reporter, parent)
        per ``failure_quarantine`` (at least one heartbeat interval): a
        report about a parent the node does not have, about the origin, or
        repeated within that window changes nothing.
        """
        image_id = v.image_id(image_id)
        node = v.node_id(node)
        parent = v.parent_ref(parent)
        with self._lock:
            now = self._clock()
            tree, member = self._member(image_id, node)
            key = (image_id, node, parent)
            if parent == ORIGIN or parent not in member.parents:
                LOG.warning('Ignored report of %s about %s in the tree of '
                            '%s: not its parent', node, parent, image_id)
            elif self._reports.get(key, 0) > now:
                LOG.warning('Ignored report of %s about %s in the tree of '
                            '%s: it reported it less than %s s ago', node,
                            parent, image_id, self._report_window())
            else:
                LOG.warning('Node %s reports parent %s of %s failed',
                            node, parent, image_id)
                self._reports[key] = now + self._report_window()
                self._remove(tree, parent, now, failed=True)
            answer = self._answer(tree, member)
            changed = self._take_changes()
        self._notify(changed)
        return answer

    def get_placement(self, image_id, node):
        """The answer a join of *node* would get, changing nothing."""
        image_id = v.image_id(image_id)
        node = v.node_id(node)
        with self._lock:
            tree, member = self._member(image_id, node)
            return self._answer(tree, member)

    def get_tree(self, image_id):
        image_id = v.image_id(image_id)
        with self._lock:
            tree = self._trees.get(image_id)
            if tree is None:
                raise exception.ImageTreeNotFound(image_id=image_id)
            return self._describe(tree)

    def list_trees(self):
        with self._lock:
            return {image_id: {'nodes': len(tree.members),
                               'height': tree.height()}
                    for image_id, tree in self._trees.items()}

    def expire(self):
        """Drop nodes whose heartbeats stopped (called periodically)."""
        with self._lock:
            self._expire(self._clock())
            changed = self._take_changes()
        self._notify(changed)

    # -- quotas and notifications --

    def _report_window(self):
        return max(self.failure_quarantine, self.heartbeat_interval)

    def _over_quota(self, image_id, node):
        """Why *node* may not enter the tree of *image_id*, or None."""
        mine = self._memberships.get(node, ())
        if image_id in mine:
            return None
        if len(mine) >= self.max_trees_per_node:
            return ('node %s is in %d trees already (max_trees_per_node)'
                    % (node, len(mine)))
        if image_id not in self._trees and len(self._trees) >= self.max_trees:
            return 'there are %d trees already (max_trees)' % len(
                self._trees)
        return None

    def _within_quotas(self, node, entries):
        """The heartbeat *entries* within the quotas: the node's trees
        first (so that it keeps them), then the others in order."""
        mine = self._memberships.get(node, ())
        ordered = sorted(entries, key=lambda image: image not in mine)
        taken = {}
        refused = []
        for image_id in ordered:
            if len(taken) >= self.max_templates_per_heartbeat:
                refused.append((image_id, 'more than %d templates in one '
                                'heartbeat (max_templates_per_heartbeat)'
                                % self.max_templates_per_heartbeat))
                continue
            # The quotas change as trees are entered: ask each time.
            refusal = self._over_quota(image_id, node)
            if refusal:
                refused.append((image_id, refusal))
                continue
            taken[image_id] = entries[image_id]
            if image_id not in self._trees:
                # Reserve its place in the count until it is made.
                self._tree(image_id, entries[image_id]['origin'])
            self._memberships[node].add(image_id)
        if refused:
            LOG.warning('Heartbeat of %s: %d templates refused (first: %s: '
                        '%s)', node, len(refused), refused[0][0],
                        refused[0][1])
        return taken

    def _take_changes(self):
        changed = []
        for node, image_id in sorted(self._changes):
            tree = self._trees.get(image_id)
            # A node that left since is nobody's parent any more.
            if node != ORIGIN and tree is not None and node in tree.members:
                changed.append((node, image_id))
        self._changes.clear()
        return changed

    def _notify(self, changed):
        if changed and self.notify is not None:
            try:
                self.notify(changed)
            except Exception:
                # A hint only: the agents learn it at their next heartbeat.
                LOG.exception('Could not tell nodes of their new children')

    # -- internals (lock held) --

    def _tree(self, image_id, origin):
        tree = self._trees.get(image_id)
        if tree is None:
            tree = self._trees[image_id] = ImageTree(
                image_id, origin, self._clock, self._quarantine[image_id],
                self._memberships, self._changes)
        return tree

    def _member(self, image_id, node):
        tree = self._trees.get(image_id)
        if tree is None:
            raise exception.ImageTreeNotFound(image_id=image_id)
        member = tree.members.get(node)
        if member is None:
            raise exception.NodeNotInTree(node=node, image_id=image_id)
        return tree, member

    def _adopt(self, tree, node, entry, now):
        """Take a node in as it reports itself (coordinator restart, node
        dropped after a timeout, or a placeholder confirming itself)."""
        member = tree.members.get(node)
        below = tree.descendants(node) if member is not None else set()
        parents = []
        for parent in entry['parents']:
            if parent == ORIGIN:
                parents.append(parent)
            elif (parent in below or tree.quarantine.get(parent, 0) > now
                  or (parent in tree.members
                      and tree.members[parent].leaving)):
                # Would close a cycle, failed recently, or is on its way
                # out: the node gets a new parent instead.
                continue
            else:
                if parent not in tree.members:
                    # Not heard from yet: hold its place so that children
                    # reporting before their parent keep that parent.
                    tree.add(parent, now, confirmed=False)
                parents.append(parent)
        if member is None:
            member = tree.add(node, now, address=entry['address'],
                              origin=entry['origin'], parents=parents)
            if not parents:
                self._replace_parents(tree, member, [], [])
        else:
            tree.confirm(member)
            member.joined_at = now
            member.address = entry['address']
            if parents:
                tree.set_parents(node, parents)
            else:
                self._replace_parents(tree, member, [], [])
        LOG.info('Adopted node %s in the tree of %s under %s',
                 node, tree.image_id, member.parents)
        return member

    def _remove(self, tree, node, now, failed=False):
        member = tree.detach(node)
        self._leaving.discard((tree.image_id, node))
        if failed and self.failure_quarantine:
            tree.quarantine[node] = now + self.failure_quarantine
        self._reparent_children(tree, node, member.parents)
        tree.forget_children(node)
        if not tree.members:
            del self._trees[tree.image_id]

    def _reparent_children(self, tree, node, grandparents):
        for child in tree.children(node):
            member = tree.members[child]
            remaining = [p for p in member.parents if p != node]
            if remaining:
                tree.set_parents(child, remaining)
            else:
                self._replace_parents(tree, member, [node], grandparents)
            LOG.info('Node %s of %s moves from %s to %s', child,
                     tree.image_id, node, member.parents)

    def _replace_parents(self, tree, member, lost, grandparents):
        chosen = self.policy.choose_new_parents(tree, member.node, lost,
                                                grandparents)
        tree.set_parents(member.node,
                         self._checked(tree, member.node, chosen, lost))

    def _checked(self, tree, node, parents, lost=()):
        """Keep only parents that respect the tree rules."""
        below = tree.descendants(node) if node in tree.members else set()
        good = []
        for parent in parents if isinstance(parents, list) else []:
            if parent in good:
                continue
            if parent == ORIGIN or (
                    parent != node and parent not in below
                    and parent not in lost and tree.can_serve(parent)):
                good.append(parent)
            else:
                LOG.error('Policy %s chose invalid parent %r for %s',
                          type(self.policy).__name__, parent, node)
        return good or [ORIGIN]

    def _pending_children(self, tree, node):
        return [m.node for m in tree.members.values()
                if m.node != node and node in m.reported]

    def _finish_leaving(self, now):
        for image_id, node in sorted(self._leaving):
            tree = self._trees.get(image_id)
            if tree is None or node not in tree.members:
                self._leaving.discard((image_id, node))
            elif not self._pending_children(tree, node):
                self._remove(tree, node, now)
                LOG.info('Node %s left the tree of %s', node, image_id)

    def _maybe_expire(self, now):
        # Calls expire at most once a second: a full pass visits every
        # member of every tree. The service also expires periodically.
        if self._last_expiry is None or now - self._last_expiry >= 1:
            self._expire(now)

    def _expire(self, now):
        self._last_expiry = now
        dead = {node for node, seen in self._last_seen.items()
                if now - seen > self.node_timeout}
        for tree in list(self._trees.values()):
            expired = [m for m in tree.members.values()
                       if m.node in dead or (
                           not m.confirmed
                           and now - m.created_at > self.node_timeout)]
            # Mark them all first so that no orphan moves under a node that
            # is about to go too.
            for member in expired:
                member.leaving = True
                member.confirmed = False
            for member in expired:
                LOG.warning('Node %s timed out in the tree of %s',
                            member.node, tree.image_id)
                self._remove(tree, member.node, now)
        for node in dead:
            del self._last_seen[node]
        for key, until in list(self._reports.items()):
            if until <= now:
                del self._reports[key]
        for image_id, quarantine in list(self._quarantine.items()):
            for node, until in list(quarantine.items()):
                if until <= now:
                    del quarantine[node]
            if not quarantine and image_id not in self._trees:
                del self._quarantine[image_id]

    def _answer(self, tree, member):
        parents = []
        for parent in member.parents:
            if parent == ORIGIN:
                parents.append(member.origin or tree.origin)
            else:
                parents.append({'node': parent,
                                'address': tree.members[parent].address})
        # The node's own neighbourhood only: no agent ever needs a whole
        # tree, and this costs O(children), whatever the tree's size.
        children = tree.children(member.node)
        # Where the children connect from (the kernel backend's initiator
        # ACL); a child not heard from since a restart has no address yet.
        child_hosts = {child: tree.members[child].address['host']
                       for child in children
                       if tree.members[child].address is not None}
        return {'parents': parents, 'depth': tree.depth(member.node),
                'children': children, 'child_hosts': child_hosts}

    def _describe(self, tree):
        now = self._clock()
        nodes = {}
        for node, member in tree.members.items():
            seen = self._last_seen.get(node)
            nodes[node] = {
                'parents': list(member.parents),
                'reported_parents': list(member.reported),
                'children': tree.children(node),
                'depth': tree.depth(node),
                'address': member.address,
                'state': member.state,
                'stats': dict(member.stats),
                'leaving': member.leaving,
                'confirmed': member.confirmed,
                'quarantined': tree.quarantine.get(node, 0) > now,
                'last_seen_age': None if seen is None else now - seen,
            }
        height = tree.height()
        return {'image_id': tree.image_id, 'origin': tree.origin,
                'origin_children': tree.children(ORIGIN), 'nodes': nodes,
                'height': height, 'levels': height + 1}
