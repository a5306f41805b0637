"""Relay trees from the policy plugin, and their symmetry classes."""

import collections

from thunder_agent.coordinator import ORIGIN
from thunder_lab.sim import tree


def test_build_uses_the_policy_plugin_breadth_first():
    parents = tree.build(6, 'kary', fan_out=2, origin_fan_out=1)
    assert parents == {'h1': ORIGIN, 'h2': 'h1', 'h3': 'h1', 'h4': 'h2',
                       'h5': 'h2', 'h6': 'h3'}
    assert tree.depth(parents) == 3
    star = tree.build(5, 'kary', fan_out=2, origin_fan_out=5)
    assert set(star.values()) == {ORIGIN}
    assert tree.depth(star) == 1


def test_every_host_is_in_exactly_one_class():
    for hosts, fan_out in ((1, 2), (6, 2), (37, 3), (500, 4)):
        parents = tree.build(hosts, fan_out=fan_out)
        root = tree.classes(parents)
        members = [h for c in tree.walk(root) for h in c.hosts]
        assert sorted(members) == sorted(parents)
        assert len(members) == len(set(members))


def test_classes_are_symmetric():
    parents = tree.build(200, fan_out=3)
    kids = collections.defaultdict(list)
    for node, parent in parents.items():
        kids[parent].append(node)
    root = tree.classes(parents)
    class_of = {h: c for c in tree.walk(root) for h in c.hosts}
    for cls in tree.walk(root):
        # Same depth, parents of one class, per_parent of them under each.
        assert {_depth(parents, h) for h in cls.hosts} == {cls.depth}
        parent_classes = {class_of.get(parents[h]) for h in cls.hosts}
        assert parent_classes == {None if cls.parent.parent is None
                                  else cls.parent}
        for parent in {parents[h] for h in cls.hosts}:
            under = [k for k in kids[parent] if class_of[k] is cls]
            assert len(under) == cls.per_parent


def test_a_complete_tree_has_one_class_per_level():
    # 1 + 2 + 4 + 8 = 15: complete binary tree below one root child.
    parents = tree.build(15, fan_out=2, origin_fan_out=1)
    root = tree.classes(parents)
    counts = [(c.depth, c.count, c.per_parent) for c in tree.walk(root)]
    assert counts == [(1, 1, 1), (2, 2, 2), (3, 4, 2), (4, 8, 2)]


def test_without_lumping_every_host_is_its_own_class():
    parents = tree.build(15, fan_out=2)
    root = tree.classes(parents, lump=False)
    assert all(c.count == 1 and c.per_parent == 1 for c in tree.walk(root))
    assert len(list(tree.walk(root))) == 15


def test_different_link_rates_split_classes():
    parents = tree.build(7, fan_out=2)
    same = len(list(tree.walk(tree.classes(parents))))
    rates = {'h7': 'slow'}
    split = len(list(tree.walk(tree.classes(parents, rates=rates))))
    assert split > same


def _depth(parents, host):
    d = 0
    while host != ORIGIN:
        host = parents[host]
        d += 1
    return d
