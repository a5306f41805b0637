"""Relay trees for the simulator, built by the coordinator's policy plugin,
and their symmetry classes.

Hosts that sit in the same place of a tree (same link rates, same subtree
shape, parents in the same class) behave identically in a storm where all
start together: the simulator runs one representative per class, weighted
by how many hosts it stands for. That is exact, not an approximation, as
links are shared fairly among their transfers; it makes 10,000 hosts cost
about as much as a few dozen.
"""

import collections

from thunder_agent.coordinator import ORIGIN
from thunder_agent.coordinator import policies
from thunder_agent.coordinator.policies import base


class _View(base.TreeView):
    """A tree being filled by joins, as a policy sees it."""

    def __init__(self):
        self.order = []
        self.parent_of = {}
        self.kids = collections.defaultdict(list)
        self.depths = {ORIGIN: 0}

    def add(self, node, parent):
        self.order.append(node)
        self.parent_of[node] = parent
        self.kids[parent].append(node)
        self.depths[node] = self.depths[parent] + 1

    def nodes(self):
        return list(self.order)

    def parents(self, node):
        return [] if node == ORIGIN else [self.parent_of[node]]

    def children(self, node):
        return self.kids.get(node, [])

    def load(self, node):
        return len(self.kids.get(node, ()))

    def depth(self, node):
        return self.depths.get(node)

    def descendants(self, node):
        found, queue = set(), collections.deque([node])
        while queue:
            for child in self.kids.get(queue.popleft(), ()):
                found.add(child)
                queue.append(child)
        return found

    def can_serve(self, node):
        return True


def build(hosts, policy='kary', fan_out=2, origin_fan_out=1):
    """Join *hosts* nodes (h1..hH, in order) through the policy plugin.

    :returns: {host: parent} with :data:`ORIGIN` for the root.
    """
    chooser = policies.load(policy, fan_out, origin_fan_out)
    view = _View()
    for i in range(1, hosts + 1):
        node = 'h%d' % i
        parent = chooser.choose_parents(view, node)[0]
        view.add(node, parent)
    return dict(view.parent_of)


def depth(parent_of):
    """Hops from the origin to the deepest host."""
    depths = {ORIGIN: 0}

    def d(node):
        if node not in depths:
            depths[node] = d(parent_of[node]) + 1
        return depths[node]

    return max((d(n) for n in parent_of), default=0)


class Class:
    """Hosts that behave alike: one representative in the simulation."""

    def __init__(self, key, parent, per_parent, label=None):
        self.key = key
        self.parent = parent            # a Class, or None for the origin
        self.per_parent = per_parent    # hosts of this class under one
        self.children = []              # parent host
        self.label = label
        self.hosts = []

    @property
    def count(self):
        """Hosts in the whole tree this class stands for."""
        return len(self.hosts)

    @property
    def depth(self):
        return 0 if self.parent is None else self.parent.depth + 1

    def __repr__(self):
        return '<Class %s depth=%d count=%d per_parent=%d>' % (
            self.label, self.depth, self.count, self.per_parent)


def classes(parent_of, rates=None, lump=True):
    """Group hosts into symmetry classes.

    :param rates: optional {host: hashable} of per-host link properties;
        hosts with different ones never share a class.
    :param lump: False gives every host its own class (for checks).
    :returns: the origin's :class:`Class` (root of the class tree).
    """
    rates = rates or {}
    kids = collections.defaultdict(list)
    for node, parent in parent_of.items():
        kids[parent].append(node)
    # Bottom-up shape signatures, interned to small integers.
    shapes = {}
    signature = {}
    order = _postorder(kids)
    for node in order:
        child_shapes = tuple(sorted(collections.Counter(
            signature[c] for c in kids.get(node, ())).items()))
        key = (rates.get(node), child_shapes) if lump else node
        signature[node] = shapes.setdefault(key, len(shapes))
    root = Class(('origin',), None, 1, 'origin')
    by_key = {root.key: root}
    queue = collections.deque([(ORIGIN, root)])
    while queue:
        node, cls = queue.popleft()
        per_parent = collections.Counter(signature[c]
                                         for c in kids.get(node, ()))
        for child in kids.get(node, ()):
            key = (cls.key, signature[child])
            child_cls = by_key.get(key)
            if child_cls is None:
                child_cls = Class(key, cls, per_parent[signature[child]],
                                  label=child)
                by_key[key] = child_cls
                cls.children.append(child_cls)
            child_cls.hosts.append(child)
            queue.append((child, child_cls))
    return root


def _postorder(kids):
    order, stack = [], [(ORIGIN, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            if node != ORIGIN:
                order.append(node)
            continue
        stack.append((node, True))
        for child in kids.get(node, ()):
            stack.append((child, False))
    return order


def walk(root):
    """All classes below *root*, parents before children."""
    queue = collections.deque(root.children)
    while queue:
        cls = queue.popleft()
        yield cls
        queue.extend(cls.children)
