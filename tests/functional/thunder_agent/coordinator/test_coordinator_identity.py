"""A real thunder-coordinator with TLS: forged calls over a real broker.

Real certificates (the lab's certtool PKI), a real coordinator process
checking them, real oslo.messaging clients. A node's own certificate used
in another node's name, a certificate of another CA, an unsigned call and
a replayed envelope are refused and change no tree.
"""

import uuid

import oslo_messaging as messaging
from oslo_config import cfg
import pytest

from thunder_agent.coordinator import ORIGIN
from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent import identity
from thunder_agent import rpc
from thunder_lab.emulation import coordinator as coordinator_mod
from thunder_lab import pki

pytestmark = pytest.mark.functional

HOSTS = {'host-1': '192.0.2.1', 'host-2': '192.0.2.2', 'host-3': '192.0.2.3'}


@pytest.fixture(scope='module')
def credentials(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('pki')
    ca = pki.CA.create(str(tmp / 'ca'))
    dirs = {node: ca.issue(node, str(tmp / node), ips=[ip])
            for node, ip in HOSTS.items()}
    dirs['coordinator'] = ca.issue('coordinator', str(tmp / 'coordinator'))
    evil = pki.CA.create(str(tmp / 'evil-ca'), name='evil')
    dirs['stranger'] = evil.issue('host-1', str(tmp / 'stranger'),
                                  ips=[HOSTS['host-1']])
    return dirs


@pytest.fixture(scope='module')
def coordinator(rabbit, credentials, tmp_path_factory):
    process = coordinator_mod.CoordinatorProcess(
        rabbit.transport_url, str(tmp_path_factory.mktemp('coordinator')),
        topic='coordinator-%s' % uuid.uuid4().hex[:8],
        options={'coordinator': {'fan_out': 2, 'heartbeat_interval': 1,
                                 'node_timeout': 30},
                 'tls': {'enabled': 'true',
                         'certificates_dir': credentials['coordinator']}})
    yield process.start()
    process.stop()


@pytest.fixture(scope='module')
def transport(rabbit):
    transport = rpc.get_transport(cfg.CONF, rabbit.transport_url)
    yield transport
    transport.cleanup()


@pytest.fixture
def client(coordinator, credentials, transport):
    def make(who=None):
        signer = identity.Signer.from_dir(credentials[who]) if who else None
        return coordinator_rpc.CoordinatorAPI(
            transport, topic=coordinator.topic, timeout=20, signer=signer)
    return make


def address(node, host=None):
    return {'host': host or HOSTS[node], 'port': 10809, 'export': 'e'}


def refused(call):
    with pytest.raises(messaging.RemoteError) as info:
        call()
    assert info.value.exc_type == 'CallRefused'
    assert info.value.value == 'The coordinator refused the call.'


def test_forged_calls_change_no_tree(coordinator, client):
    image = str(uuid.uuid4())
    origin = {'driver_volume_type': 'nbd',
              'data': {'host': '198.18.0.1', 'port': 10809, 'export': image}}
    reader = client('coordinator')
    # A stranger may not become the origin's only child.
    for who in ('stranger', None):
        refused(lambda: client(who).join(image, 'host-1', address('host-1'),
                                         origin))
    assert image not in reader.list_trees()
    for node in HOSTS:
        client(node).join(image, node, address(node), origin)
    before = reader.get_tree(image)
    # host-3's own certificate, in host-1's name: no re-pointing of
    # host-1's children, no eviction of host-1.
    evil = {image: {'address': address('host-1', '203.0.113.66'),
                    'origin': origin, 'parents': [ORIGIN]}}
    refused(lambda: client('host-3').heartbeat('host-1', evil))
    refused(lambda: client('host-3').report_parent_failure(
        image, 'host-2', 'host-1'))
    refused(lambda: client('host-3').leave(image, 'host-1'))
    # host-1's own key, from an address outside its certificate.
    refused(lambda: client('host-1').heartbeat('host-1', evil))
    # Replaying a good envelope captured on the wire.
    sent = []
    honest = client('host-2')
    honest.signer = _Recording(honest.signer, sent)
    honest.get_placement(image, 'host-2')
    replay = client()
    replay.signer = _Replaying(sent[0])
    refused(lambda: replay.get_placement(image, 'host-2'))
    after = reader.get_tree(image)
    for tree in (before, after):
        for info in tree['nodes'].values():
            info.pop('last_seen_age')
    assert after == before
    assert coordinator.proc.poll() is None


class _Recording:
    def __init__(self, signer, sent):
        self.signer = signer
        self.sent = sent

    def sign(self, method, args):
        envelope = self.signer.sign(method, args)
        self.sent.append(envelope)
        return envelope


class _Replaying:
    def __init__(self, envelope):
        self.envelope = envelope

    def sign(self, method, args):
        return self.envelope
