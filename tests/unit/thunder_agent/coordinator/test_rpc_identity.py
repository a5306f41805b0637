"""The endpoint with a verifier: forged calls change no tree.

Each attack of an unauthenticated coordinator is played against the
endpoint with real keys and certificates: a node's own certificate for
another node's name, a stranger (another CA, no envelope, a bad
signature, a replay, a stale timestamp), an address outside the node's
certificate. Each is first shown to work without a verifier (what the
coordinator believed before), then refused with one.
"""

import copy
import uuid

from oslo_config import cfg
import pytest

from tests.unit.thunder_agent.coordinator import fixtures as fx
from tests.unit.thunder_agent import test_identity as idfx
from thunder_agent.coordinator import ORIGIN
from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent import exception
from thunder_agent import identity
from thunder_agent import rpc

IPS = {'h%d' % i: '192.0.2.%d' % i for i in range(1, 8)}
ATTACKER = '203.0.113.66'


def address(node):
    return {'host': IPS[node], 'port': 10809, 'export': fx.IMAGE}


def entry(node, parents):
    return {'address': address(node), 'origin': fx.ORIGIN_INFO,
            'parents': list(parents), 'state': 'ready'}


class Node:
    """A node's signed calls straight into an endpoint."""

    def __init__(self, endpoint, signer):
        self.endpoint = endpoint
        self.signer = signer

    def call(self, method, envelope=None, **args):
        if envelope is None and self.signer is not None:
            envelope = self.signer.sign(method, args)
        return getattr(self.endpoint, method)({}, envelope=envelope, **args)


@pytest.fixture(scope='module')
def ca():
    return idfx.make_ca()


@pytest.fixture(scope='module')
def signers(ca):
    return {node: idfx.make_node(ca, node, [ip]) for node, ip in IPS.items()}


@pytest.fixture
def clock():
    return idfx.Clock()


@pytest.fixture
def endpoint(ca, clock):
    mgr = fx.make_manager(fan_out=2)
    return coordinator_rpc.CoordinatorEndpoint(
        mgr, identity.Verifier([ca[1]], skew=60, clock=clock))


@pytest.fixture
def nodes(endpoint, signers):
    return {node: Node(endpoint, signer) for node, signer in signers.items()}


def tree_of(endpoint):
    try:
        tree = endpoint.manager.get_tree(fx.IMAGE)
    except exception.ImageTreeNotFound:
        return None
    for info in tree['nodes'].values():
        info.pop('last_seen_age')
    return tree


def build(nodes, count=4):
    """h1 and h2 under the origin, h3 and h4 under h1 (fan-out 2)."""
    for i in range(1, count + 1):
        node = 'h%d' % i
        nodes[node].call('join', image_id=fx.IMAGE, node=node,
                         address=address(node), origin=fx.ORIGIN_INFO)


def refused(endpoint, call):
    before = copy.deepcopy(tree_of(endpoint))
    with pytest.raises(coordinator_rpc.CallRefused) as info:
        call()
    # Generic: nothing of the reason reaches the caller.
    assert str(info.value) == 'The coordinator refused the call.'
    assert tree_of(endpoint) == before


def test_signed_calls_of_every_method_are_taken(endpoint, nodes):
    build(nodes)
    answer = nodes['h3'].call('heartbeat', node='h3',
                              templates={fx.IMAGE: entry('h3', ['h1'])})
    assert answer[fx.IMAGE]['parents'] == [{'node': 'h1',
                                            'address': address('h1')}]
    placement = nodes['h1'].call('get_placement', image_id=fx.IMAGE,
                                 node='h1')
    assert placement['children'] == ['h3', 'h4']
    assert placement['child_hosts'] == {'h3': IPS['h3'], 'h4': IPS['h4']}
    assert nodes['h2'].call('list_trees') == {
        fx.IMAGE: {'nodes': 4, 'height': 2}}
    assert nodes['h2'].call('get_tree', image_id=fx.IMAGE)['height'] == 2
    nodes['h3'].call('report_parent_failure', image_id=fx.IMAGE,
                     node='h3', parent='h1')
    assert 'h1' not in tree_of(endpoint)['nodes']
    nodes['h4'].call('leave', image_id=fx.IMAGE, node='h4')
    assert sorted(tree_of(endpoint)['nodes']) == ['h2', 'h3']


def test_the_first_joiner_is_no_longer_whoever_asks_first(endpoint, nodes,
                                                          ca):
    stranger = Node(endpoint, idfx.make_node(idfx.make_ca('evil'), 'h9',
                                             [ATTACKER]))
    join = dict(image_id=fx.IMAGE, node='h9',
                address={'host': ATTACKER, 'port': 10809, 'export': ''},
                origin=fx.ORIGIN_INFO)
    # Before: anyone became the origin's only child.
    endpoint.verifier, saved = None, endpoint.verifier
    stranger.call('join', **join)
    assert tree_of(endpoint)['origin_children'] == ['h9']
    endpoint.manager = fx.make_manager(fan_out=2)
    endpoint.verifier = saved
    # Now: a certificate of another CA, none, a bad signature.
    refused(endpoint, lambda: stranger.call('join', **join))
    refused(endpoint, lambda: Node(endpoint, None).call('join', **join))
    forged = nodes['h1'].signer.sign('join', join)
    refused(endpoint, lambda: stranger.call('join', envelope=dict(
        forged, certificate=stranger.signer.certificate), **join))
    assert tree_of(endpoint) is None
    build(nodes, 1)
    assert tree_of(endpoint)['origin_children'] == ['h1']


def test_a_heartbeat_in_another_nodes_name_moves_nobody(endpoint, nodes):
    build(nodes)
    evil = {fx.IMAGE: {'address': {'host': ATTACKER, 'port': 10809,
                                   'export': ''},
                       'origin': fx.ORIGIN_INFO, 'parents': [ORIGIN]}}
    # h7 signs, in h1's name.
    refused(endpoint, lambda: nodes['h7'].call('heartbeat', node='h1',
                                               templates=evil,
                                               envelope=nodes['h7'].signer
                                               .sign('heartbeat', dict(
                                                   node='h1',
                                                   templates=evil))))
    # h1's own key, but an address not in its certificate.
    refused(endpoint, lambda: nodes['h1'].call('heartbeat', node='h1',
                                               templates=evil))
    refused(endpoint, lambda: nodes['h1'].call(
        'join', image_id=fx.IMAGE, node='h1',
        address=evil[fx.IMAGE]['address'], origin=fx.ORIGIN_INFO))
    answer = nodes['h3'].call('heartbeat', node='h3',
                              templates={fx.IMAGE: entry('h3', ['h1'])})
    assert answer[fx.IMAGE]['parents'] == [{'node': 'h1',
                                            'address': address('h1')}]


def test_without_a_verifier_the_same_heartbeat_moved_the_children(
        endpoint, nodes):
    build(nodes)
    endpoint.verifier = None
    endpoint.heartbeat({}, node='h1', templates={fx.IMAGE: {
        'address': {'host': ATTACKER, 'port': 10809, 'export': ''},
        'origin': fx.ORIGIN_INFO, 'parents': [ORIGIN]}})
    answer = endpoint.heartbeat({}, node='h3',
                                templates={fx.IMAGE: entry('h3', ['h1'])})
    assert answer[fx.IMAGE]['parents'][0]['address']['host'] == ATTACKER


def test_a_report_in_a_childs_name_evicts_nobody(endpoint, nodes):
    build(nodes)
    args = dict(image_id=fx.IMAGE, node='h3', parent='h1')
    refused(endpoint, lambda: nodes['h7'].call(
        'report_parent_failure', envelope=nodes['h7'].signer.sign(
            'report_parent_failure', args), **args))
    refused(endpoint, lambda: nodes['h7'].call(
        'leave', image_id=fx.IMAGE, node='h1',
        envelope=nodes['h7'].signer.sign('leave', dict(image_id=fx.IMAGE,
                                                       node='h1'))))
    assert sorted(tree_of(endpoint)['nodes']) == ['h1', 'h2', 'h3', 'h4']


def test_a_replayed_or_stale_call_is_refused(endpoint, nodes, clock):
    build(nodes)
    args = dict(image_id=fx.IMAGE, node='h3', parent='h1')
    envelope = nodes['h3'].signer.sign('report_parent_failure', args)
    # Captured on the wire and replayed later: refused (h1 stays).
    endpoint.manager.report_parent_failure = None  # must not be reached
    refused(endpoint, lambda: nodes['h3'].call(
        'report_parent_failure', envelope=dict(
            envelope, nonce='0' * 32), **args))
    clock.now += 61
    refused(endpoint, lambda: nodes['h3'].call(
        'report_parent_failure', envelope=envelope, **args))


def test_the_replay_of_a_good_call_is_refused(endpoint, nodes):
    build(nodes, 1)
    args = dict(image_id=fx.IMAGE, node='h1')
    envelope = nodes['h1'].signer.sign('leave', args)
    nodes['h1'].call('leave', envelope=envelope, **args)
    build(nodes, 1)
    refused(endpoint, lambda: nodes['h1'].call('leave', envelope=envelope,
                                               **args))


def test_reads_need_a_certificate_of_the_ca(endpoint, nodes):
    build(nodes, 1)
    stranger = Node(endpoint, idfx.make_node(idfx.make_ca('evil'), 'h1',
                                             [IPS['h1']]))
    refused(endpoint, lambda: stranger.call('list_trees'))
    refused(endpoint, lambda: stranger.call('get_tree', image_id=fx.IMAGE))
    refused(endpoint, lambda: Node(endpoint, None).call('list_trees'))
    refused(endpoint, lambda: nodes['h2'].call(
        'get_placement', image_id=fx.IMAGE, node='h1',
        envelope=nodes['h2'].signer.sign('get_placement', dict(
            image_id=fx.IMAGE, node='h1'))))


def test_signed_calls_round_trip_over_oslo_messaging(ca, signers):
    """The signature survives the JSON of the wire (fake driver)."""
    transport = rpc.get_transport(cfg.CONF, 'fake:/')
    topic = 'coordinator-%s' % uuid.uuid4().hex[:8]
    server = coordinator_rpc.get_server(
        transport, fx.make_manager(fan_out=2), topic, 'coordinator-host',
        identity.Verifier([ca[1]], skew=60, clock=signers['h1']._clock))
    server.start()
    try:
        api = coordinator_rpc.CoordinatorAPI(transport, topic=topic,
                                             timeout=10,
                                             signer=signers['h1'])
        answer = api.join(fx.IMAGE, 'h1', address('h1'), fx.ORIGIN_INFO)
        assert answer['parents'] == [fx.ORIGIN_INFO]
        beat = api.heartbeat('h1', {fx.IMAGE: entry('h1', [ORIGIN])})
        assert beat[fx.IMAGE] == answer
        assert api.get_placement(fx.IMAGE, 'h1') == answer
        assert api.list_trees() == {fx.IMAGE: {'nodes': 1, 'height': 1}}
        unsigned = coordinator_rpc.CoordinatorAPI(transport, topic=topic,
                                                  timeout=10)
        with pytest.raises(Exception) as info:
            unsigned.leave(fx.IMAGE, 'h1')
        assert 'CallRefused' in repr(info.value)
        assert api.list_trees() == {fx.IMAGE: {'nodes': 1, 'height': 1}}
    finally:
        server.stop()
        server.wait()
        transport.cleanup()
