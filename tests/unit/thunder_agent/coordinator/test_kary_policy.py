"""The k-ary breadth-first policy on its own, over hand-built trees."""

import random

import pytest

from tests.unit.thunder_agent.coordinator import fixtures as fx
from thunder_agent.coordinator import manager
from thunder_agent.coordinator import ORIGIN
from thunder_agent.coordinator import policies
from thunder_agent.coordinator.policies import kary
from thunder_agent import exception


def build(edges, fan_out=2, clock=None):
    """A tree from (node, parents) pairs in join order."""
    clock = clock or fx.Clock()
    tree = manager.ImageTree(fx.IMAGE, fx.ORIGIN_INFO, clock)
    for node, parents in edges:
        tree.add(node, clock(), address=fx.address(node),
                 origin=fx.ORIGIN_INFO, parents=parents)
    return tree, kary.KaryBreadthFirst(fan_out)


def fill(tree, policy, names):
    for name in names:
        parents = policy.choose_parents(tree, name)
        tree.add(name, 0, address=fx.address(name), parents=parents)
    return {name: tree.parents(name) for name in names}


def test_loaded_through_stevedore():
    policy = policies.load('kary', 3)
    assert isinstance(policy, kary.KaryBreadthFirst)
    assert policy.fan_out == 3


def test_unknown_policy_is_a_typed_error():
    with pytest.raises(exception.TreePolicyNotFound) as info:
        policies.load('no-such-policy', 2)
    assert 'kary' in str(info.value)


@pytest.mark.parametrize('fan_out', [0, -1, True, 2.5, '2'])
def test_fan_out_must_be_a_positive_integer(fan_out):
    with pytest.raises(ValueError):
        kary.KaryBreadthFirst(fan_out)


def test_fill_order_is_breadth_first_in_join_order():
    tree, policy = build([], fan_out=2)
    names = ['n%d' % i for i in range(14)]
    parents = fill(tree, policy, names)
    assert parents == {
        'n0': [ORIGIN], 'n1': [ORIGIN],
        'n2': ['n0'], 'n3': ['n0'], 'n4': ['n1'], 'n5': ['n1'],
        'n6': ['n2'], 'n7': ['n2'], 'n8': ['n3'], 'n9': ['n3'],
        'n10': ['n4'], 'n11': ['n4'], 'n12': ['n5'], 'n13': ['n5'],
    }


def test_six_hosts_fan_out_two_give_three_levels():
    tree, policy = build([], fan_out=2)
    fill(tree, policy, ['h%d' % i for i in range(1, 7)])
    depths = sorted(tree.depth(n) for n in tree.nodes())
    assert depths == [1, 1, 2, 2, 2, 2]
    # Counting the origin as a level, as the issue does: depth 3.
    assert tree.height() + 1 == 3


@pytest.mark.parametrize('fan_out,hosts', [(1, 5), (3, 40), (4, 100)])
def test_fan_out_bounds_children_and_depth_grows_log_k(fan_out, hosts):
    tree, policy = build([], fan_out=fan_out)
    fill(tree, policy, ['n%d' % i for i in range(hosts)])
    assert len(tree.children(ORIGIN)) == min(fan_out, hosts)
    assert all(len(tree.children(n)) <= fan_out for n in tree.nodes())
    # Level sizes k, k^2, ... : the tree is as shallow as it can be.
    expected_height, capacity, level = 0, 0, 1
    while capacity < hosts:
        level *= fan_out
        capacity += level
        expected_height += 1
    assert tree.height() == expected_height


def test_a_full_level_is_filled_before_the_next():
    tree, policy = build([('a', [ORIGIN]), ('b', [ORIGIN]), ('c', ['a'])])
    # b has a free slot at depth 1 children level; a has one too.
    assert policy.choose_parents(tree, 'd') == ['a']
    tree.add('d', 0, address=fx.address('d'), parents=['a'])
    assert policy.choose_parents(tree, 'e') == ['b']


def test_nodes_that_cannot_serve_get_no_children():
    clock = fx.Clock()
    tree, policy = build([('a', [ORIGIN]), ('b', [ORIGIN]),
                          ('c', ['a'])], clock=clock)
    tree.quarantine['a'] = clock() + 5
    tree.quarantine['b'] = clock() + 5
    # a and b are skipped but their subtrees are searched.
    assert policy.choose_parents(tree, 'x') == ['c']
    clock.advance(6)
    assert policy.choose_parents(tree, 'x') == ['a']


def test_a_leaving_child_frees_its_slot():
    tree, policy = build([('a', [ORIGIN]), ('b', [ORIGIN])])
    assert policy.choose_parents(tree, 'x') == ['a']
    tree.members['b'].leaving = True
    assert tree.load(ORIGIN) == 1
    assert policy.choose_parents(tree, 'x') == [ORIGIN]


def test_unconfirmed_placeholders_get_no_children():
    tree, policy = build([('a', [ORIGIN])])
    tree.add('ghost', 0, parents=[ORIGIN], confirmed=False)
    tree.add('b', 0, address=fx.address('b'), parents=['ghost'])
    assert policy.choose_parents(tree, 'x') == ['a']


def test_origin_takes_one_more_when_everything_is_full():
    clock = fx.Clock()
    tree, policy = build([('a', [ORIGIN])], fan_out=1, clock=clock)
    tree.quarantine['a'] = clock() + 5
    assert tree.load(ORIGIN) == 1
    assert policy.choose_parents(tree, 'x') == [ORIGIN]


def _orphan(tree, failed):
    """Detach *failed* as the manager does; return its children."""
    grandparents = tree.parents(failed)
    children = tree.children(failed)
    tree.detach(failed)
    return children, grandparents


def test_reparent_to_grandparent_first_then_sibling():
    # origin: a, b; a: c, d; b: e, f; c: g
    tree, policy = build([('a', [ORIGIN]), ('b', [ORIGIN]), ('c', ['a']),
                          ('d', ['a']), ('e', ['b']), ('f', ['b']),
                          ('g', ['c'])])
    children, grandparents = _orphan(tree, 'a')
    assert children == ['c', 'd'] and grandparents == [ORIGIN]
    first = policy.choose_new_parents(tree, 'c', ['a'], grandparents)
    assert first == [ORIGIN]      # the grandparent, freed slot
    tree.set_parents('c', first)
    second = policy.choose_new_parents(tree, 'd', ['a'], grandparents)
    assert second == ['c']        # the former sibling, now at depth 1
    tree.set_parents('d', second)
    assert tree.depth('d') == 2 and tree.depth('g') == 2


def test_reparent_to_grandparent_node():
    # origin: a; a: b, c; b: d  -- b fails: d goes under a (its grandparent)
    tree, policy = build([('a', [ORIGIN]), ('b', ['a']), ('c', ['a']),
                          ('d', ['b'])], fan_out=2)
    children, grandparents = _orphan(tree, 'b')
    assert policy.choose_new_parents(tree, 'd', ['b'], grandparents) == ['a']


def test_reparent_skips_a_full_grandparent():
    # origin: a, b; a: c, d; c: e -- c fails; a still has d and the origin
    # is full, so e goes to the shallowest free node: b.
    tree, policy = build([('a', [ORIGIN]), ('b', [ORIGIN]), ('c', ['a']),
                          ('d', ['a']), ('x', ['a']), ('e', ['c'])])
    children, grandparents = _orphan(tree, 'c')
    assert policy.choose_new_parents(tree, 'e', ['c'], grandparents) == ['b']


def test_reparent_never_below_own_subtree():
    # A chain under a; a's subtree has the only free slots.
    tree, policy = build([('a', [ORIGIN]), ('b', ['a']), ('c', ['b']),
                          ('d', ['c'])], fan_out=1)
    children, grandparents = _orphan(tree, 'a')
    # Every free slot is in b's subtree: the origin takes b.
    assert policy.choose_new_parents(tree, 'b', ['a'], grandparents) == [
        ORIGIN]
    assert tree.descendants('b') == {'c', 'd'}


def test_reparent_never_back_to_the_lost_parent():
    tree, policy = build([('a', [ORIGIN]), ('b', ['a'])], fan_out=2)
    tree.members['a'].leaving = False   # still serving, still present
    result = policy.choose_new_parents(tree, 'b', ['a'], [ORIGIN])
    assert result == [ORIGIN]


def _assert_acyclic(mgr):
    tree = mgr.get_tree(fx.IMAGE) if mgr.list_trees() else {'nodes': {}}
    nodes = tree['nodes']
    for node in nodes:
        seen, stack = set(), [node]
        while stack:
            current = stack.pop()
            for parent in nodes.get(current, {}).get('parents', []):
                assert parent != node, 'cycle through %s' % node
                if parent != ORIGIN and parent not in seen:
                    assert parent in nodes, 'dangling parent %s' % parent
                    seen.add(parent)
                    stack.append(parent)
        assert node not in nodes[node]['parents']


def test_no_cycles_under_random_churn():
    """Joins, failures, leaves, timeouts and restarts in random order."""
    rng = random.Random(20240603)
    clock = fx.Clock()
    mgr = fx.make_manager(fan_out=2, clock=clock)
    names = ['n%d' % i for i in range(25)]
    for step in range(1500):
        tree = mgr.get_tree(fx.IMAGE)['nodes'] if mgr.list_trees() else {}
        op = rng.random()
        node = rng.choice(names)
        if op < 0.35:
            fx.join(mgr, node)
        elif op < 0.55 and tree:
            member = rng.choice(sorted(tree))
            parent = rng.choice(tree[member]['parents'] or [ORIGIN])
            mgr.report_parent_failure(fx.IMAGE, member, parent)
        elif op < 0.65 and tree:
            mgr.leave(fx.IMAGE, rng.choice(sorted(tree)))
        elif op < 0.9:
            # A heartbeat claiming arbitrary parents, as stale or
            # inconsistent agents might.
            claimed = rng.sample(names + [ORIGIN], rng.randint(0, 2))
            claimed = [p for p in claimed if p != node]
            mgr.heartbeat(node, {fx.IMAGE: fx.entry(node, claimed)})
        else:
            clock.advance(rng.choice([0.5, 2, 6]))
            mgr.expire()
        _assert_acyclic(mgr)


def test_single_origin_child_makes_the_origin_send_once():
    tree = manager.ImageTree(fx.IMAGE, fx.ORIGIN_INFO, fx.Clock())
    policy = kary.KaryBreadthFirst(2, origin_fan_out=1)
    parents = fill(tree, policy, ['h%d' % i for i in range(1, 7)])
    assert parents == {'h1': [ORIGIN], 'h2': ['h1'], 'h3': ['h1'],
                       'h4': ['h2'], 'h5': ['h2'], 'h6': ['h3']}
    assert tree.height() == 3


def test_origin_fan_out_is_loaded_through_stevedore():
    policy = policies.load('kary', 3, 1)
    assert (policy.fan_out, policy.origin_fan_out) == (3, 1)
    assert policy.slots(ORIGIN) == 1 and policy.slots('h1') == 3
