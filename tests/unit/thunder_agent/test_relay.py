"""RelayMember: coordinator answers are remote input, calls have deadlines."""

import uuid

from oslo_config import cfg
import oslo_messaging as messaging
import pytest

from tests.unit.thunder_agent import fakes
from thunder_agent import conf as agent_conf
from thunder_agent import exception
from thunder_agent import identity
from thunder_agent import records
from thunder_agent import relay
from thunder_lab import pki

IMAGE = str(uuid.uuid4())
ADDRESS = records.RelayAddress('192.0.2.10', 10810, IMAGE)
ORIGIN = records.Endpoint.from_dict(fakes.origin_for(IMAGE))


@pytest.fixture
def member():
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    conf.set_override('host', 'node-a')
    return relay.RelayMember(conf, api=fakes.FakeCoordinatorAPI())


def test_placement_of_a_parent_and_children():
    p = relay.placement({'parents': [{'node': 'node-b', 'address': {
        'host': '192.0.2.20', 'port': 10811, 'export': IMAGE}}],
        'children': ['node-d', 'node-c', 'node-c']}, 'node-a')
    assert p == relay.Placement(
        'node-b', records.RelayAddress('192.0.2.20', 10811, IMAGE),
        ('node-c', 'node-d'))
    assert p.known


def test_placement_of_the_origin_and_of_an_unknown_address():
    assert relay.placement({'parents': [fakes.ORIGIN]}, 'n').parent == \
        records.ORIGIN
    assert relay.placement({}, 'n').parent == records.ORIGIN
    p = relay.placement({'parents': [{'node': 'node-b', 'address': None}]},
                        'node-a')
    assert not p.known


@pytest.mark.parametrize('answer', [
    [],
    {'parents': 'node-b'},
    {'parents': [{'node': 'node-a', 'address': None}]},
    {'parents': [{'node': 'x;reboot', 'address': None}]},
    {'parents': [{'node': 'node-b', 'address': {
        'host': 'SYSTEM:id', 'port': 1, 'export': IMAGE}}]},
    {'parents': [{'node': 'node-b', 'address': {
        'host': '192.0.2.2', 'port': 70000, 'export': IMAGE}}]},
    {'parents': [{'node': 'node-b', 'address': {
        'host': '192.0.2.2', 'port': 1, 'export': IMAGE, 'x': 1}}]},
    {'children': ['node-b'] * 2000},
    {'children': ['../../etc']},
    {'children': ['node-b'], 'child_hosts': ['192.0.2.2']},
    {'children': ['node-b'], 'child_hosts': {'node-c': '192.0.2.2'}},
    {'children': ['node-b'], 'child_hosts': {'node-b': '192.0.2.2/0'}},
    {'children': ['node-b'], 'child_hosts': {'node-b': 'fe80::1%eth0'}},
    {'children': ['node-b'], 'child_hosts': {'node-b': None}},
])
def test_hostile_answers_are_refused(answer):
    with pytest.raises(exception.InvalidInput):
        relay.placement(answer, 'node-a')


def test_a_timeout_marks_the_coordinator_down_until_an_answer(member):
    member.api.down = True
    with pytest.raises(relay.CoordinatorUnavailable):
        member.join(IMAGE, ADDRESS, ORIGIN)
    assert member.coordinator_down
    # Known down: no second wait.
    with pytest.raises(relay.CoordinatorUnavailable):
        member.join(IMAGE, ADDRESS, ORIGIN)
    assert member.api.calls['join'] == 1
    member.api.down = False
    answers = member.heartbeat([(IMAGE, ADDRESS, ORIGIN, records.ORIGIN,
                                 'ready')])
    assert not member.coordinator_down
    assert answers[IMAGE].parent == records.ORIGIN


def test_heartbeat_skips_malformed_and_unasked_answers(member):
    other = str(uuid.uuid4())

    def heartbeat(node, templates, timeout=None):
        return {IMAGE: {'parents': [{'node': 'node-a', 'address': None}]},
                other: {'parents': []}}
    member.api.heartbeat = heartbeat
    assert member.heartbeat([(IMAGE, ADDRESS, ORIGIN, records.ORIGIN,
                              'ready')]) == {}


def test_leave_of_a_node_the_coordinator_forgot(member):
    def leave(image_id, node, timeout=None):
        raise exception.NodeNotInTree(node=node, image_id=image_id)
    member.api.leave = leave
    assert member.leave(IMAGE) == []


def test_the_origin_secret_never_goes_to_the_coordinator(member):
    secret = 'origin-chap-secret-0123456789'
    origin = records.Endpoint('iscsi', {
        'target_portal': '192.0.2.1:3260', 'target_iqn': 'iqn.2010-10.x:y',
        'target_lun': 1, 'auth_method': 'CHAP', 'auth_username': 'u',
        'auth_password': secret})
    sent = []

    def join(image_id, node, address, origin, timeout=None):
        sent.append(origin)
        return {'parents': [origin]}

    def heartbeat(node, templates, timeout=None):
        sent.extend(t['origin'] for t in templates.values())
        return {image_id: {'parents': [t['origin']]}
                for image_id, t in templates.items()}
    member.api.join = join
    member.api.heartbeat = heartbeat
    assert member.join(IMAGE, ADDRESS, origin).parent == records.ORIGIN
    assert member.heartbeat([(IMAGE, ADDRESS, origin, records.ORIGIN,
                              'ready')])[IMAGE].parent == records.ORIGIN
    assert len(sent) == 2
    for value in sent:
        assert secret not in repr(value)
        # Everything else the coordinator may show is there.
        assert value['data']['target_portal'] == '192.0.2.1:3260'
        assert value['data']['auth_password'] == '***'
    # The record keeps its secret: the agent logs in with it.
    assert origin.data['auth_password'] == secret


def test_placement_carries_the_childrens_hosts():
    p = relay.placement({'parents': [fakes.ORIGIN],
                         'children': ['node-c', 'node-b'],
                         'child_hosts': {'node-c': '192.0.2.3',
                                         'node-b': '2001:db8:0::2'}},
                        'node-a')
    assert p.children == ('node-b', 'node-c')
    assert p.child_hosts == (('node-b', '2001:db8::2'),
                             ('node-c', '192.0.2.3'))
    # A 1.1 coordinator sends none.
    assert relay.placement({'parents': []}, 'node-a').child_hosts == ()


def test_placement_of_asks_the_coordinator(member):
    member.api.parents[IMAGE] = ('node-b', {'host': '192.0.2.20',
                                            'port': 10811, 'export': IMAGE})
    p = member.placement_of(IMAGE)
    assert p.parent == 'node-b' and p.address.host == '192.0.2.20'
    assert member.api.log[-1] == ('get_placement', IMAGE, 'node-a')


def test_a_refusal_is_not_an_outage(member):
    def join(image_id, node, address, origin, timeout=None):
        raise messaging.RemoteError('CallRefused',
                                    'The coordinator refused the call.')
    member.api.join = join
    with pytest.raises(relay.CoordinatorRefused):
        member.join(IMAGE, ADDRESS, ORIGIN)
    assert not member.coordinator_down


def test_calls_are_signed_with_the_nodes_key_unless_tls_is_off(tmp_path):
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    conf.set_override('enabled', False, 'tls')
    assert relay.signer(conf) is None
    ca = pki.CA.create(str(tmp_path / 'ca'))
    path = ca.issue('node-a', str(tmp_path / 'node-a'), ips=['192.0.2.10'])
    conf.set_override('enabled', True, 'tls')
    conf.set_override('certificates_dir', path, 'tls')
    envelope = relay.signer(conf).sign('leave', {'node': 'node-a'})
    caller = identity.Verifier.from_file(ca.cert).verify(
        'leave', {'node': 'node-a'}, envelope)
    assert caller.node == 'node-a' and caller.owns('192.0.2.10')
