"""The coordinator manager: trees as soft state, driven by a fake clock."""

import copy
import uuid

import pytest

from tests.unit.thunder_agent.coordinator import fixtures as fx
from thunder_agent.coordinator import ORIGIN
from thunder_agent import exception


@pytest.fixture
def clock():
    return fx.Clock()


@pytest.fixture
def mgr(clock):
    return fx.make_manager(fan_out=2, clock=clock)


def six(mgr):
    for i in range(1, 7):
        fx.join(mgr, 'h%d' % i)


def heartbeat_all(mgr, exclude=()):
    """Every node reports what the coordinator told it (a healthy agent)."""
    answers = {}
    for node, parents in fx.shape(mgr).items():
        if node in exclude:
            continue
        refs = [ORIGIN if p == 'origin' else p for p in parents]
        answers[node] = mgr.heartbeat(node, {fx.IMAGE: fx.entry(node, refs)})
    return answers


# -- join --

def test_join_answers_parents_with_addresses_and_depth(mgr):
    first = fx.join(mgr, 'h1')
    assert first == {'parents': [fx.ORIGIN_INFO], 'depth': 1,
                     'children': [], 'child_hosts': {}}
    fx.join(mgr, 'h2')
    third = fx.join(mgr, 'h3')
    assert third == {'parents': [{'node': 'h1',
                                  'address': fx.address('h1')}],
                     'depth': 2, 'children': [], 'child_hosts': {}}


def test_answers_carry_the_nodes_own_children_only(mgr):
    for name in ('h1', 'h2', 'h3', 'h4', 'h5'):
        fx.join(mgr, name)
    tree = mgr.get_tree(fx.IMAGE)['nodes']
    with_children = 0
    for name, node in tree.items():
        answer = mgr.heartbeat(name, {fx.IMAGE: fx.entry(
            name, node['parents'])})
        assert answer[fx.IMAGE]['children'] == node['children']
        with_children += bool(node['children'])
    assert with_children >= 2


def test_six_hosts_fan_out_two(mgr):
    six(mgr)
    assert fx.shape(mgr) == {
        'h1': ['origin'], 'h2': ['origin'], 'h3': ['h1'], 'h4': ['h1'],
        'h5': ['h2'], 'h6': ['h2']}
    tree = mgr.get_tree(fx.IMAGE)
    assert tree['height'] == 2 and tree['levels'] == 3
    assert tree['origin_children'] == ['h1', 'h2']
    assert tree['nodes']['h1']['children'] == ['h3', 'h4']


def test_join_is_idempotent(mgr):
    six(mgr)
    before = fx.shape(mgr)
    again = mgr.join(fx.IMAGE, 'h4', {'host': '198.18.0.44', 'port': 1,
                                      'export': 'x'}, fx.ORIGIN_INFO)
    assert fx.parent_ids(again) == ['h1']
    assert fx.shape(mgr) == before
    assert mgr.get_tree(fx.IMAGE)['nodes']['h4']['address'] == {
        'host': '198.18.0.44', 'port': 1, 'export': 'x'}


def test_each_node_reaches_the_origin_its_own_way(mgr):
    # Cinder gives every host its own connection info for the same volume.
    other = copy.deepcopy(fx.ORIGIN_INFO)
    other['data']['host'] = '198.18.0.2'
    fx.join(mgr, 'h1')
    answer = mgr.join(fx.IMAGE, 'h2', fx.address('h2'), other)
    assert answer['parents'] == [other]


def test_trees_are_per_image(mgr):
    other = str(uuid.uuid4())
    fx.join(mgr, 'h1')
    fx.join(mgr, 'h2', image=other)
    assert fx.shape(mgr) == {'h1': ['origin']}
    assert fx.shape(mgr, other) == {'h2': ['origin']}
    assert mgr.list_trees() == {fx.IMAGE: {'nodes': 1, 'height': 1},
                                other: {'nodes': 1, 'height': 1}}


BAD_JOINS = [
    ('image_id', 'not-a-uuid', exception.InvalidImageId),
    ('image_id', 'x' * 36, exception.InvalidImageId),
    ('image_id', None, exception.InvalidImageId),
    ('node', '', exception.InvalidNodeId),
    ('node', 'a b', exception.InvalidNodeId),
    ('node', ORIGIN, exception.InvalidNodeId),
    ('node', 'x' * 300, exception.InvalidNodeId),
    ('node', 7, exception.InvalidNodeId),
    ('address', None, exception.InvalidAddress),
    ('address', {'host': 'h', 'export': ''}, exception.InvalidAddress),
    ('address', {'host': 'h', 'port': 0, 'export': ''},
     exception.InvalidAddress),
    ('address', {'host': 'h', 'port': True, 'export': ''},
     exception.InvalidAddress),
    ('address', {'host': 'h', 'port': '10809', 'export': ''},
     exception.InvalidAddress),
    ('address', {'host': 'a/b', 'port': 1, 'export': ''},
     exception.InvalidAddress),
    ('address', {'host': '-bad-', 'port': 1, 'export': ''},
     exception.InvalidAddress),
    ('address', {'host': 'h', 'port': 1, 'export': 'e' * 5000},
     exception.InvalidAddress),
    ('address', {'host': 'h', 'port': 1, 'export': '', 'tls': 1},
     exception.InvalidAddress),
    ('origin', None, exception.InvalidOrigin),
    ('origin', {'driver_volume_type': 'rbd', 'data': {}},
     exception.InvalidOrigin),
    ('origin', {'driver_volume_type': 'nbd', 'data': {'host': 'h'}},
     exception.InvalidOrigin),
    ('origin', {'driver_volume_type': 'file', 'data': {'path': 'rel'}},
     exception.InvalidOrigin),
]


@pytest.mark.parametrize('field,value,error', BAD_JOINS)
def test_bad_join_is_refused_and_changes_nothing(mgr, field, value, error):
    six(mgr)
    before = mgr.get_tree(fx.IMAGE)
    args = {'image_id': fx.IMAGE, 'node': 'h7',
            'address': fx.address('h7'), 'origin': fx.ORIGIN_INFO}
    args[field] = value
    with pytest.raises(error):
        mgr.join(**args)
    assert mgr.get_tree(fx.IMAGE) == before
    assert list(mgr.list_trees()) == [fx.IMAGE]


def test_addresses_accept_ip_literals_and_names(mgr):
    for host in ('198.18.0.5', 'fd00::5', 'compute-5.example.test',
                 'compute_5'):
        mgr.join(fx.IMAGE, 'n-' + host.replace(':', '-').replace('.', '-'),
                 {'host': host, 'port': 10809, 'export': fx.IMAGE},
                 fx.ORIGIN_INFO)
    assert len(mgr.get_tree(fx.IMAGE)['nodes']) == 4


# -- heartbeat --

def test_heartbeat_returns_current_parents_and_records_state(mgr):
    six(mgr)
    answer = mgr.heartbeat('h5', {fx.IMAGE: dict(
        fx.entry('h5', ['h2'], state='ready'), stats={'bytes_served': 42})})
    assert answer == {fx.IMAGE: {'parents': [{'node': 'h2',
                                              'address': fx.address('h2')}],
                                 'depth': 2, 'children': [],
                                 'child_hosts': {}}}
    node = mgr.get_tree(fx.IMAGE)['nodes']['h5']
    assert node['state'] == 'ready'
    assert node['stats'] == {'bytes_served': 42}
    assert node['reported_parents'] == ['h2']
    assert node['last_seen_age'] == 0


def test_heartbeat_of_a_dropped_template_removes_it(mgr, clock):
    six(mgr)
    clock.advance(2)     # past the grace of a recent join
    mgr.heartbeat('h1', {})
    shape = fx.shape(mgr)
    assert 'h1' not in shape
    # h1's children moved: the grandparent (origin) first, then a sibling.
    assert shape['h3'] == ['origin'] and shape['h4'] == ['h3']


def test_heartbeat_spares_a_join_it_crossed(mgr):
    six(mgr)
    mgr.heartbeat('h1', {})   # composed before h1 joined
    assert 'h1' in fx.shape(mgr)


BAD_HEARTBEATS = [
    ('bad node', {}),
    ('h1', []),
    ('h1', {'not-a-uuid': fx.entry('h1', [])}),
    ('h1', {fx.IMAGE: 'ready'}),
    ('h1', {fx.IMAGE: {'origin': fx.ORIGIN_INFO}}),
    ('h1', {fx.IMAGE: {'address': fx.address('h1')}}),
    ('h1', {fx.IMAGE: dict(fx.entry('h1', []), colour='red')}),
    ('h1', {fx.IMAGE: dict(fx.entry('h1', []), address={'host': 'h'})}),
    ('h1', {fx.IMAGE: dict(fx.entry('h1', []), parents='h2')}),
    ('h1', {fx.IMAGE: fx.entry('h1', ['@bogus'])}),
    ('h1', {fx.IMAGE: fx.entry('h1', ['h1'])}),
    ('h1', {fx.IMAGE: fx.entry('h1', ['h%d' % i for i in range(20)])}),
    ('h1', {fx.IMAGE: fx.entry('h1', [], state='Ready!')}),
    ('h1', {fx.IMAGE: dict(fx.entry('h1', []), stats={'x': 'many'})}),
    ('h1', {fx.IMAGE: dict(fx.entry('h1', []), stats=[1])}),
    ('h1', {fx.IMAGE: dict(fx.entry('h1', []), origin={'x': 1})}),
]


@pytest.mark.parametrize('node,templates', BAD_HEARTBEATS)
def test_bogus_heartbeat_is_refused_and_changes_nothing(mgr, clock, node,
                                                        templates):
    six(mgr)
    clock.advance(2)
    before = mgr.get_tree(fx.IMAGE)
    with pytest.raises(exception.InvalidInput):
        mgr.heartbeat(node, templates)
    # Not even the liveness of the sender changed.
    assert mgr.get_tree(fx.IMAGE) == before


def test_bogus_heartbeat_with_one_good_entry_changes_nothing(mgr, clock):
    six(mgr)
    clock.advance(2)
    before = mgr.get_tree(fx.IMAGE)
    other = str(uuid.uuid4())
    with pytest.raises(exception.InvalidHeartbeat):
        mgr.heartbeat('h3', {fx.IMAGE: fx.entry('h3', ['h1']),
                             other: fx.entry('h3', ['h3'])})
    assert mgr.get_tree(fx.IMAGE) == before
    assert other not in mgr.list_trees()


# -- leave --

def test_leave_of_a_leaf_is_immediate(mgr):
    six(mgr)
    assert mgr.leave(fx.IMAGE, 'h6') == {'pending_children': []}
    assert 'h6' not in fx.shape(mgr)


def test_leave_moves_children_before_the_parent_goes(mgr, clock):
    six(mgr)
    result = mgr.leave(fx.IMAGE, 'h1')
    assert result == {'pending_children': ['h3', 'h4']}
    shape = fx.shape(mgr)
    assert shape['h3'] == ['origin'] and shape['h4'] == ['h3']
    assert mgr.get_tree(fx.IMAGE)['nodes']['h1']['leaving']
    # New joiners never land under a leaving node.
    assert fx.parent_ids(fx.join(mgr, 'h7')) == ['h3']
    # Idempotent while children still read from h1.
    assert mgr.leave(fx.IMAGE, 'h1') == {'pending_children': ['h3', 'h4']}
    # h3 learns its new parent and switches; h4 has not yet.
    answer = mgr.heartbeat('h3', {fx.IMAGE: fx.entry('h3', ['h1'])})
    assert answer[fx.IMAGE]['parents'] == [fx.ORIGIN_INFO]
    mgr.heartbeat('h3', {fx.IMAGE: fx.entry('h3', [ORIGIN])})
    assert mgr.leave(fx.IMAGE, 'h1') == {'pending_children': ['h4']}
    mgr.heartbeat('h4', {fx.IMAGE: fx.entry('h4', ['h3'])})
    # The last child moved: the heartbeat completed the leave.
    assert 'h1' not in fx.shape(mgr)


def test_leave_errors(mgr):
    six(mgr)
    with pytest.raises(exception.ImageTreeNotFound):
        mgr.leave(str(uuid.uuid4()), 'h1')
    with pytest.raises(exception.NodeNotInTree):
        mgr.leave(fx.IMAGE, 'h9')
    with pytest.raises(exception.InvalidNodeId):
        mgr.leave(fx.IMAGE, 'h 1')
    assert len(fx.shape(mgr)) == 6


def test_rejoin_cancels_a_leave(mgr):
    six(mgr)
    mgr.leave(fx.IMAGE, 'h1')
    fx.join(mgr, 'h1')
    assert not mgr.get_tree(fx.IMAGE)['nodes']['h1']['leaving']


def test_last_leave_drops_the_tree(mgr):
    fx.join(mgr, 'h1')
    mgr.leave(fx.IMAGE, 'h1')
    assert mgr.list_trees() == {}
    with pytest.raises(exception.ImageTreeNotFound):
        mgr.get_tree(fx.IMAGE)


# -- parent failure --

def test_failed_parent_children_go_to_grandparent_then_sibling(mgr):
    six(mgr)
    answer = mgr.report_parent_failure(fx.IMAGE, 'h4', 'h1')
    shape = fx.shape(mgr)
    assert 'h1' not in shape
    assert shape['h3'] == ['origin'] and shape['h4'] == ['h3']
    assert answer == {'parents': [{'node': 'h3',
                                   'address': fx.address('h3')}],
                      'depth': 2, 'children': [], 'child_hosts': {}}


def test_failed_parent_is_quarantined(mgr, clock):
    six(mgr)
    mgr.report_parent_failure(fx.IMAGE, 'h3', 'h1')
    # h1 is alive after all: its heartbeat brings it back, without children.
    mgr.heartbeat('h1', {fx.IMAGE: fx.entry('h1', [ORIGIN])})
    node = mgr.get_tree(fx.IMAGE)['nodes']['h1']
    assert node['quarantined'] and node['parents'] == [ORIGIN]
    for name in ('h7', 'h8'):
        assert 'h1' not in fx.parent_ids(fx.join(mgr, name))
    clock.advance(11)
    heartbeat_all(mgr)
    assert fx.parent_ids(fx.join(mgr, 'h9')) == ['h1']


def test_stale_failure_report_changes_nothing(mgr):
    six(mgr)
    before = fx.shape(mgr)
    # h2 is not h3's parent (any more).
    answer = mgr.report_parent_failure(fx.IMAGE, 'h3', 'h2')
    assert fx.parent_ids(answer) == ['h1']
    assert fx.shape(mgr) == before


def test_origin_failure_changes_nothing(mgr):
    six(mgr)
    before = fx.shape(mgr)
    answer = mgr.report_parent_failure(fx.IMAGE, 'h1', ORIGIN)
    assert answer['parents'] == [fx.ORIGIN_INFO]
    assert fx.shape(mgr) == before


def test_failure_report_errors(mgr):
    six(mgr)
    before = fx.shape(mgr)
    with pytest.raises(exception.NodeNotInTree):
        mgr.report_parent_failure(fx.IMAGE, 'h9', 'h1')
    with pytest.raises(exception.ImageTreeNotFound):
        mgr.report_parent_failure(str(uuid.uuid4()), 'h3', 'h1')
    with pytest.raises(exception.InvalidNodeId):
        mgr.report_parent_failure(fx.IMAGE, 'h3', 'h1; rm')
    assert fx.shape(mgr) == before


def test_failure_of_a_deep_parent_keeps_the_subtrees(clock):
    mgr = fx.make_manager(fan_out=2, clock=clock)
    for i in range(1, 31):
        fx.join(mgr, 'n%d' % i)
    before = fx.shape(mgr)
    assert before['n7'] == before['n8'] == ['n3']
    assert before['n15'] == before['n16'] == ['n7']
    assert before['n17'] == before['n18'] == ['n8']
    mgr.report_parent_failure(fx.IMAGE, 'n7', 'n3')
    after = fx.shape(mgr)
    assert after['n7'] == ['n1']       # the grandparent
    # n8 goes to the shallowest free slot outside its subtree: a leaf
    # under n7, its former sibling.
    assert after['n8'] == ['n15']
    # Nothing else moved: subtrees travel with their root.
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {'n7', 'n8'}
    assert fx.join(mgr, 'n31')['depth'] == 4


# -- timeouts --

def test_silent_node_times_out_and_children_learn_on_heartbeat(mgr, clock):
    six(mgr)
    for _ in range(3):
        clock.advance(2)
        heartbeat_all(mgr, exclude={'h2'})
    assert 'h2' not in fx.shape(mgr)
    answer = mgr.heartbeat('h5', {fx.IMAGE: fx.entry('h5', ['h2'])})
    assert answer[fx.IMAGE]['parents'] == [fx.ORIGIN_INFO]
    answer = mgr.heartbeat('h6', {fx.IMAGE: fx.entry('h6', ['h2'])})
    assert fx.parent_ids(answer[fx.IMAGE]) == ['h5']


def test_expire_runs_without_any_call(mgr, clock):
    six(mgr)
    clock.advance(4)
    heartbeat_all(mgr, exclude={'h1', 'h3'})
    clock.advance(2)
    mgr.expire()
    shape = fx.shape(mgr)
    assert 'h1' not in shape and 'h3' not in shape
    # Both went at once: h4 moved under the origin, not under h3.
    assert shape['h4'] == ['origin']


def test_node_back_after_timeout_is_adopted(mgr, clock):
    six(mgr)
    clock.advance(6)
    mgr.expire()
    assert mgr.list_trees() == {}
    heartbeat_all_before = {'h1': [ORIGIN], 'h3': ['h1']}
    for node, parents in heartbeat_all_before.items():
        mgr.heartbeat(node, {fx.IMAGE: fx.entry(node, parents)})
    assert fx.shape(mgr) == {'h1': ['origin'], 'h3': ['h1']}


# -- rebuild after a restart --

def test_restart_rebuilds_the_same_tree_from_heartbeats(clock):
    old = fx.make_manager(fan_out=2, clock=clock)
    for i in range(1, 15):
        fx.join(old, 'n%d' % i)
    reported = {node: [ORIGIN if p == 'origin' else p for p in parents]
                for node, parents in fx.shape(old).items()}

    new = fx.make_manager(fan_out=2, clock=clock)
    # Children first: the worst order for the new coordinator.
    for node in reversed(list(reported)):
        answer = new.heartbeat(node, {fx.IMAGE: fx.entry(node,
                                                         reported[node])})
        # Every agent keeps the parents it has: no data-plane change.
        assert fx.parent_ids(answer[fx.IMAGE]) == [
            'origin' if p == ORIGIN else p for p in reported[node]]
    assert fx.shape(new) == fx.shape(old)
    tree = new.get_tree(fx.IMAGE)
    assert all(n['confirmed'] for n in tree['nodes'].values())
    assert tree['height'] == 3
    # New joiners fill the rebuilt tree at the level the old one would.
    assert fx.join(new, 'n15')['depth'] == fx.join(old, 'n15')['depth'] == 4


def test_parent_that_never_reports_after_restart_is_replaced(clock):
    mgr = fx.make_manager(fan_out=2, clock=clock)
    mgr.heartbeat('a', {fx.IMAGE: fx.entry('a', [ORIGIN])})
    answer = mgr.heartbeat('c', {fx.IMAGE: fx.entry('c', ['b'])})
    # b is held as a placeholder: c keeps it for now.
    assert answer[fx.IMAGE] == {'parents': [{'node': 'b', 'address': None}],
                                'depth': None, 'children': [],
                                'child_hosts': {}}
    assert not mgr.get_tree(fx.IMAGE)['nodes']['b']['confirmed']
    # A placeholder takes no children.
    assert fx.parent_ids(fx.join(mgr, 'd')) == ['origin']
    for _ in range(3):
        clock.advance(2)
        mgr.heartbeat('a', {fx.IMAGE: fx.entry('a', [ORIGIN])})
        answer = mgr.heartbeat('c', {fx.IMAGE: fx.entry('c', ['b'])})
        mgr.heartbeat('d', {fx.IMAGE: fx.entry('d', [ORIGIN])})
    assert 'b' not in fx.shape(mgr)
    assert fx.parent_ids(answer[fx.IMAGE]) == ['a']


def test_contradicting_heartbeats_never_make_a_cycle(clock):
    mgr = fx.make_manager(fan_out=2, clock=clock)
    mgr.heartbeat('a', {fx.IMAGE: fx.entry('a', ['b'])})
    answer = mgr.heartbeat('b', {fx.IMAGE: fx.entry('b', ['a'])})
    assert fx.parent_ids(answer[fx.IMAGE]) == ['origin']
    assert fx.shape(mgr) == {'a': ['b'], 'b': ['origin']}


def test_adoption_ignores_a_quarantined_parent(mgr, clock):
    six(mgr)
    mgr.report_parent_failure(fx.IMAGE, 'h3', 'h1')
    # h3's agent restarts and misses heartbeats: h3 times out...
    clock.advance(3)
    heartbeat_all(mgr, exclude={'h3'})
    clock.advance(3)
    mgr.expire()
    assert 'h3' not in fx.shape(mgr)
    # ...and comes back naming the parent it had before the failure.
    answer = mgr.heartbeat('h3', {fx.IMAGE: fx.entry('h3', ['h1'])})
    assert 'h1' not in fx.parent_ids(answer[fx.IMAGE])
    assert 'h1' not in fx.shape(mgr)


def test_quarantine_outlives_an_empty_tree(mgr, clock):
    fx.join(mgr, 'a')
    fx.join(mgr, 'b')
    fx.join(mgr, 'c')
    mgr.report_parent_failure(fx.IMAGE, 'c', 'a')
    clock.advance(6)
    mgr.expire()
    assert mgr.list_trees() == {}
    answer = mgr.heartbeat('c', {fx.IMAGE: fx.entry('c', ['a'])})
    assert fx.parent_ids(answer[fx.IMAGE]) == ['origin']


def test_adoption_ignores_a_leaving_parent(mgr):
    six(mgr)
    mgr.leave(fx.IMAGE, 'h2')
    answer = mgr.heartbeat('h9', {fx.IMAGE: fx.entry('h9', ['h2'])})
    assert 'h2' not in fx.parent_ids(answer[fx.IMAGE])
    # h9 still reads from h2 until it switches: h2 waits for it.
    assert 'h9' in mgr.leave(fx.IMAGE, 'h2')['pending_children']


# -- failure reports, quotas, notifications -----------------------------

def test_a_report_from_a_non_child_evicts_nobody(mgr):
    six(mgr)
    before = fx.shape(mgr)
    # h5 is h2's child, not h1's; h1 is nobody's child in the tree of h3.
    mgr.report_parent_failure(fx.IMAGE, 'h5', 'h1')
    mgr.report_parent_failure(fx.IMAGE, 'h1', 'h3')
    assert fx.shape(mgr) == before


def test_a_report_flood_counts_once_per_reporter_and_parent(clock):
    mgr = fx.make_manager(fan_out=2, clock=clock, node_timeout=100,
                          failure_quarantine=10)
    six(mgr)
    mgr.report_parent_failure(fx.IMAGE, 'h3', 'h1')
    assert 'h1' not in fx.shape(mgr)
    # h1 comes back after its quarantine and h3 is placed under it again
    # (as the policy may): h3's reports about h1 do not count again until
    # failure_quarantine has passed since its last one.
    clock.advance(5)
    mgr.heartbeat('h1', {fx.IMAGE: fx.entry('h1', [ORIGIN])})
    mgr._trees[fx.IMAGE].set_parents('h3', ['h1'])
    for _ in range(100):
        answer = mgr.report_parent_failure(fx.IMAGE, 'h3', 'h1')
        assert fx.parent_ids(answer) == ['h1']
    assert 'h1' in fx.shape(mgr)
    clock.advance(5)
    mgr.report_parent_failure(fx.IMAGE, 'h3', 'h1')
    assert 'h1' not in fx.shape(mgr)


def test_node_tree_quota_refuses_the_excess_only(clock):
    mgr = fx.make_manager(clock=clock, max_trees_per_node=3)
    images = sorted(str(uuid.uuid4()) for _ in range(5))
    for image in images[:3]:
        fx.join(mgr, 'h1', image)
    with pytest.raises(exception.InvalidInput) as info:
        fx.join(mgr, 'h1', images[3])
    assert 'max_trees_per_node' in str(info.value)
    # A heartbeat of all five keeps the three trees and refuses the rest.
    answers = mgr.heartbeat('h1', {image: fx.entry('h1', [ORIGIN])
                                   for image in reversed(images)})
    assert sorted(answers) == images[:3]
    assert sorted(mgr.list_trees()) == images[:3]
    # Another node is not affected.
    fx.join(mgr, 'h2', images[4])


def test_templates_per_heartbeat_and_total_trees_are_bounded(clock):
    """20 heartbeats of 1000 templates made 20 000 trees."""
    mgr = fx.make_manager(clock=clock, max_templates_per_heartbeat=50,
                          max_trees=300, max_trees_per_node=100)
    for n in range(20):
        templates = {str(uuid.uuid4()): fx.entry('n%d' % n, [ORIGIN])
                     for _ in range(1000)}
        answers = mgr.heartbeat('n%d' % n, templates)
        assert len(answers) <= 50
    assert len(mgr.list_trees()) == 300
    with pytest.raises(exception.InvalidInput) as info:
        fx.join(mgr, 'n0', str(uuid.uuid4()))
    assert 'max_trees' in str(info.value)
    # Joining a tree that exists is still fine.
    fx.join(mgr, 'fresh', next(iter(mgr.list_trees())))


def test_nodes_are_told_when_they_get_new_children(clock):
    told = []
    mgr = fx.make_manager(fan_out=2, clock=clock, notify=told.extend)
    six(mgr)
    # Each join gave its parent a child; the origin is nobody's agent.
    assert told == [('h1', fx.IMAGE), ('h1', fx.IMAGE), ('h2', fx.IMAGE),
                    ('h2', fx.IMAGE)]
    del told[:]
    mgr.report_parent_failure(fx.IMAGE, 'h3', 'h1')
    # h1's children moved: their new parents are told, h1 is not.
    assert told and 'h1' not in {node for node, _ in told}
    new_parents = {p for node, parents in fx.shape(mgr).items()
                   for p in parents if node in ('h3', 'h4')} - {'origin'}
    assert {node for node, _ in told} == new_parents
    del told[:]
    mgr.heartbeat('h5', {fx.IMAGE: fx.entry('h5', ['h2'])})
    assert told == []


def test_answers_carry_the_childrens_hosts(mgr):
    six(mgr)
    answer = mgr.get_placement(fx.IMAGE, 'h1')
    assert answer['children'] == ['h3', 'h4']
    assert answer['child_hosts'] == {'h3': 'h3.example.test',
                                     'h4': 'h4.example.test'}
    with pytest.raises(exception.NodeNotInTree):
        mgr.get_placement(fx.IMAGE, 'h9')


def test_being_named_as_a_parent_uses_no_quota_of_the_parent(clock):
    mgr = fx.make_manager(clock=clock, max_trees_per_node=2)
    named = [str(uuid.uuid4()) for _ in range(2)]
    own = [str(uuid.uuid4()) for _ in range(3)]
    # h2 names h1 as its parent in two trees (placeholders for h1)...
    mgr.heartbeat('h2', {image: fx.entry('h2', ['h1']) for image in named})
    assert all('h1' in mgr.get_tree(image)['nodes'] for image in named)
    # ...which costs h1 nothing: its own joins go, up to its quota.
    fx.join(mgr, 'h1', own[0])
    fx.join(mgr, 'h1', own[1])
    with pytest.raises(exception.InvalidInput):
        fx.join(mgr, 'h1', own[2])
