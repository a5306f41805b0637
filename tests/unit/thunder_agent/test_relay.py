"""RelayMember: coordinator answers are remote input, calls have deadlines."""

import uuid

from oslo_config import cfg
import pytest

from tests.unit.thunder_agent import fakes
from thunder_agent import conf as agent_conf
from thunder_agent import exception
from thunder_agent import records
from thunder_agent import relay

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
