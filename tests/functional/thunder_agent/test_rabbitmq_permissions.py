"""RabbitMQ users of nova-thunder: what each host's credentials can do.

The vhost, users and permissions are the devstack plugin's own
(``create_nova_thunder_rabbit_users`` of devstack/plugin.sh, run with
rabbitmqctl against the test broker), and so are the transport URLs
(``nova_thunder_transport_url``). The agents and the coordinator are real
``thunder-agent`` and ``thunder-coordinator`` processes, the callers and
the would-be servers real oslo.messaging clients and servers; the
refusals are RabbitMQ's own (ACCESS_REFUSED), probed with kombu where
oslo.messaging has no call for it (consuming an existing queue, binding a
routing key, publishing to the default exchange).

doc/operators.rst "RabbitMQ users" says what is enforced and what is not;
the last test here shows what is not.
"""

from concurrent import futures
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid

import kombu
from oslo_config import cfg
from oslo_messaging._drivers import common as rpc_common
import pytest

from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent import identity
from thunder_agent import rpc
from thunder_agent.rpc import api
from thunder_agent.rpc import server as agent_server
from thunder_lab.emulation import agent as agent_mod
from thunder_lab.emulation import coordinator as coordinator_mod
from thunder_lab import pki

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
DEVSTACK = os.path.join(ROOT, 'devstack')
HOSTS = ('host-a', 'host-b')
USERS = ('thunder-coordinator',) + tuple(
    '%s.%s' % (kind, host) for host in HOSTS
    for kind in ('thunder-agent', 'thunder-nova'))

# devstack's functions the plugin calls, rabbitmqctl on the test broker.
HARNESS = r'''
set -e
function sudo { "$@"; }
function rabbitmqctl { "$THUNDER_TEST_CTL" "$@"; }
function die { shift; echo "$*" >&2; exit 1; }
function enable_service { :; }
function is_service_enabled { return 1; }
function get_transport_url { echo "$THUNDER_TEST_BROKER"; }
function trueorfalse {
    local value=${!2:-$1}
    [[ "$value" =~ ^(True|true|1|yes)$ ]] && echo True || echo False
}
source "$DEVSTACK/settings"
source "$DEVSTACK/plugin.sh"
create_nova_thunder_rabbit_users
for user in "$@"; do
    echo "URL $user $(nova_thunder_transport_url "$user")"
done
'''


@pytest.fixture(scope='module')
def users(rabbit, tmp_path_factory):
    """{user: transport_url} of the plugin's users for host-a and host-b,
    in a vhost of their own."""
    tmp = tmp_path_factory.mktemp('rabbit-users')
    ctl = tmp / 'rabbitmqctl'
    ctl.write_text('#!/bin/sh\nexec %s "$@"\n' % ' '.join(
        rabbit.ctl_command()))
    ctl.chmod(0o755)
    vhost = 'thunder-%s' % uuid.uuid4().hex[:8]
    env = dict(rabbit.env, PATH=os.environ['PATH'], DEVSTACK=DEVSTACK,
               THUNDER_TEST_CTL=str(ctl),
               THUNDER_TEST_BROKER=rabbit.transport_url,
               THUNDER_RABBIT_VHOST=vhost,
               THUNDER_RABBIT_HOSTS=','.join(HOSTS),
               THUNDER_RABBIT_SECRET=secrets.token_hex(16),
               DEST='/nonexistent', DATA_DIR='/nonexistent')
    proc = subprocess.run(['bash', '-c', HARNESS, 'harness'] + list(USERS),
                          env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    # rabbitmqctl says what it does on the same output.
    urls = dict(line.split()[1:] for line in proc.stdout.splitlines()
                if line.startswith('URL '))
    assert len(urls) == len(USERS)
    for user, url in urls.items():
        assert url.startswith('rabbit://%s:' % user)
        assert url.endswith('@127.0.0.1:%d/%s' % (rabbit.port, vhost))
    yield urls
    rabbit.ctl('delete_vhost', vhost)
    for user in USERS:
        rabbit.ctl('delete_user', user)


@pytest.fixture
def transports(users):
    """A new oslo.messaging transport with *user*'s credentials per call
    (a refused one is not reused)."""
    made = []

    def get(user):
        made.append(rpc.get_transport(cfg.CONF, users[user]))
        return made[-1]

    yield get
    for transport in made:
        transport.cleanup()


@pytest.fixture(scope='module')
def agents(users):
    """Real agents of host-a and host-b, each with its own user."""
    if not shutil.which('qemu-storage-daemon'):
        pytest.skip('qemu-utils not installed: run tools/bootstrap.sh')
    procs = {}
    # Short: the agents' unix sockets live below it.
    workdir = tempfile.mkdtemp(prefix='th-', dir='/tmp')
    try:
        for host in HOSTS:
            procs[host] = agent_mod.AgentProcess(
                users['thunder-agent.' + host], os.path.join(workdir, host),
                host=host).spawn()
        for proc in procs.values():
            proc.wait_ready(90)
        yield procs
    finally:
        for proc in procs.values():
            proc.teardown()
        shutil.rmtree(workdir, ignore_errors=True)


class _Coordinator(coordinator_mod.CoordinatorProcess):
    """The coordinator's user publishes on the control exchange to the
    agents only: it is pinged with an agent's credentials (and signs with
    the coordinator's certificate)."""

    def __init__(self, ping_url, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ping_url = ping_url

    @property
    def client(self):
        if self._client is None:
            self._transport = rpc.get_transport(cfg.CONF, self.ping_url)
            self._client = coordinator_rpc.CoordinatorAPI(
                self._transport, timeout=60, signer=self.signer())
        return self._client


@pytest.fixture(scope='module')
def credentials(tmp_path_factory):
    """[tls] certificates_dir of the coordinator and of each host (the
    host's relay address in its IP SANs)."""
    tmp = tmp_path_factory.mktemp('pki')
    ca = pki.CA.create(str(tmp / 'ca'))
    dirs = {'coordinator-1': ca.issue('coordinator-1',
                                      str(tmp / 'coordinator-1'))}
    for i, host in enumerate(HOSTS):
        dirs[host] = ca.issue(host, str(tmp / host),
                              ips=['192.0.2.%d' % (i + 1)])
    return dirs


@pytest.fixture(scope='module')
def coordinator(users, credentials, tmp_path_factory):
    proc = _Coordinator(users['thunder-agent.host-a'],
                        users['thunder-coordinator'],
                        str(tmp_path_factory.mktemp('coordinator')),
                        host='coordinator-1',
                        options={'tls': {
                            'enabled': 'true',
                            'certificates_dir':
                                credentials['coordinator-1']}})
    proc.start(90)
    yield proc
    proc.stop()


def amqp(url):
    """kombu's name of an oslo.messaging rabbit:// URL."""
    assert url.startswith('rabbit://')
    return 'amqp://' + url[len('rabbit://'):]


def refusal(call, timeout=60):
    """The text of the error *call* raises; it must raise, within
    *timeout* seconds (a client that retried a refusal forever would hang
    here)."""
    pool = futures.ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    try:
        error = future.exception(timeout)
    except futures.TimeoutError:
        pytest.fail('no refusal within %d s' % timeout)
    assert error is not None, 'no refusal: %r' % (future.result(),)
    return str(error)


class Probe:
    """A raw AMQP client with one user's credentials (kombu, as
    oslo.messaging's rabbit driver uses it: publisher confirms, so that a
    refused publish raises at once)."""

    def __init__(self, url):
        self.conn = kombu.Connection(
            amqp(url), connect_timeout=10,
            transport_options={'confirm_publish': True})
        self.conn.connect()

    def channel(self):
        return self.conn.channel()

    def close(self):
        self.conn.release()


@pytest.fixture
def probe(users):
    made = []

    def make(user):
        made.append(Probe(users[user]))
        return made[-1]

    yield make
    for p in made:
        p.close()


def consume(channel, queue):
    return channel.basic_consume(queue, callback=lambda message: None)


def call_status(transport, host, timeout=30):
    client = api.AgentAPI(transport, timeout=timeout)
    return client.get_status(host)


def test_each_nova_compute_reaches_its_own_agent_only(agents, transports):
    for host in HOSTS:
        status = call_status(transports('thunder-nova.' + host), host)
        assert status['host'] == host
        assert status['backend'] == 'qemu'
    # host-b's nova-compute may not publish host-a's routing key: RabbitMQ
    # closes the channel at the publish (oslo.messaging publishes with
    # confirms), nothing reaches host-a's agent.
    text = refusal(lambda: call_status(transports('thunder-nova.host-b'),
                                       'host-a', timeout=10))
    assert 'ACCESS_REFUSED' in text
    assert ("Basic.publish: (403) ACCESS_REFUSED - access to topic "
            "'thunder-agent.host-a' in exchange 'openstack'") in text
    assert "user 'thunder-nova.host-b'" in text
    # An agent's user calls its own agent (thunder-admin with the agent's
    # configuration), not another host's.
    assert call_status(transports('thunder-agent.host-a'),
                       'host-a')['host'] == 'host-a'
    text = refusal(lambda: call_status(transports('thunder-agent.host-a'),
                                       'host-b', timeout=10))
    assert 'ACCESS_REFUSED' in text and 'thunder-agent.host-b' in text


def test_only_host_a_serves_and_consumes_its_agent_topic(agents, transports,
                                                         probe):
    # host-b's agent credentials serving as host-a: refused when the
    # server declares thunder-agent.host-a, before it consumes anything.
    server = agent_server.get_server(transports('thunder-agent.host-b'),
                                     None, api.TOPIC, 'host-a')
    text = refusal(server.start)
    assert 'ACCESS_REFUSED' in text
    assert "queue 'thunder-agent.host-a'" in text
    assert "user 'thunder-agent.host-b'" in text
    # Consuming the queue host-a's agent declared: refused.
    channel = probe('thunder-agent.host-b').channel()
    text = refusal(lambda: consume(channel, 'thunder-agent.host-a'))
    assert 'ACCESS_REFUSED' in text and "'thunder-agent.host-a'" in text
    # Binding its own queue to host-a's routing key (a copy of every call
    # to host-a): refused by the topic permission.
    channel = probe('thunder-agent.host-b').channel()
    text = refusal(lambda: channel.queue_bind(
        'thunder-agent.host-b', 'openstack', 'thunder-agent.host-a'))
    assert 'ACCESS_REFUSED' in text
    assert ("Queue.bind: (403) ACCESS_REFUSED - access to topic "
            "'thunder-agent.host-a' in exchange 'openstack'") in text
    # nova-compute's user consumes nothing but its replies.
    channel = probe('thunder-nova.host-a').channel()
    text = refusal(lambda: consume(channel, 'thunder-agent.host-a'))
    assert 'ACCESS_REFUSED' in text
    # host-a's agent still answers: the refusals changed nothing.
    assert call_status(transports('thunder-nova.host-a'),
                       'host-a')['host'] == 'host-a'


def test_only_the_coordinator_user_serves_the_coordinator_topic(
        coordinator, transports, probe):
    # The real coordinator serves with its user; an agent calls it.
    client = coordinator_rpc.CoordinatorAPI(
        transports('thunder-agent.host-b'), timeout=30,
        signer=coordinator.signer())
    assert client.list_trees() == {}
    # Nobody else serves or consumes the coordinator's topic.
    for user in ('thunder-agent.host-a', 'thunder-nova.host-a'):
        server = coordinator_rpc.get_server(
            transports(user), None, coordinator_rpc.TOPIC, 'coordinator-2')
        text = refusal(server.start)
        assert 'ACCESS_REFUSED' in text and "user '%s'" % user in text
        channel = probe(user).channel()
        text = refusal(lambda: consume(channel, 'thunder-coordinator'))
        assert 'ACCESS_REFUSED' in text
    # nova-compute does not call the coordinator at all.
    client = coordinator_rpc.CoordinatorAPI(
        transports('thunder-nova.host-a'), timeout=10)
    text = refusal(client.list_trees)
    assert ("Basic.publish: (403) ACCESS_REFUSED - access to topic "
            "'thunder-coordinator' in exchange 'openstack'") in text
    assert coordinator.proc.poll() is None


def test_the_coordinator_tells_an_agent_of_its_new_children(
        coordinator, credentials, transports, probe):
    """The tree_changed cast goes out under the coordinator's user, to
    the routing key of the node that got a child, and nowhere else."""
    image = str(uuid.uuid4())
    origin = {'driver_volume_type': 'nbd',
              'data': {'host': '198.18.0.1', 'port': 10809,
                       'export': image}}
    # Copies of what reaches each agent's routing key, in queues of the
    # agent's own (names its permissions allow).
    queues = {}
    for host in HOSTS:
        channel = probe('thunder-agent.' + host).channel()
        name = 'thunder-agent_fanout_%s' % uuid.uuid4().hex
        channel.queue_declare(name, auto_delete=True)
        channel.queue_bind(name, 'openstack', 'thunder-agent.' + host)
        queues[host] = (channel, name)
    for i, host in enumerate(HOSTS):
        client = coordinator_rpc.CoordinatorAPI(
            transports('thunder-agent.' + host), timeout=30,
            signer=identity.Signer.from_dir(credentials[host]))
        client.join(image, host, {'host': '192.0.2.%d' % (i + 1),
                                  'port': 10809, 'export': image}, origin)
    # host-a is the origin's child, host-b host-a's (origin fan-out 1).
    deadline = time.monotonic() + 10
    channel, name = queues['host-a']
    message = None
    while message is None and time.monotonic() < deadline:
        message = channel.basic_get(name, no_ack=True)
        time.sleep(0.05)
    assert message is not None, 'no tree_changed for host-a'
    body = json.loads(json.loads(message.body)['oslo.message'])
    assert body['method'] == 'tree_changed'
    assert body['args'] == {'image_id': image}
    time.sleep(0.5)
    channel, name = queues['host-b']
    assert channel.basic_get(name, no_ack=True) is None
    assert coordinator.proc.poll() is None


def test_strangers_get_nothing(rabbit, users):
    vhost = users['thunder-coordinator'].rsplit('/', 1)[1]
    wrong = users['thunder-agent.host-a'].replace(
        'thunder-agent.host-a:', 'thunder-agent.host-a:x', 1)
    text = refusal(
        lambda: kombu.Connection(amqp(wrong), connect_timeout=10).connect())
    assert 'ACCESS_REFUSED' in text
    # The broker's guest (every permission on "/"): none on the vhost.
    guest = 'rabbit://guest:guest@127.0.0.1:%d/%s' % (rabbit.port, vhost)
    text = refusal(
        lambda: kombu.Connection(amqp(guest), connect_timeout=10).connect())
    assert "access to vhost '%s' refused for user 'guest'" % vhost in text


def _forged_call(method, reply_q):
    msg_id = uuid.uuid4().hex
    message = {'method': method, 'args': {}, 'version': '1.0',
               '_msg_id': msg_id, '_reply_q': reply_q,
               '_unique_id': uuid.uuid4().hex}
    return msg_id, rpc_common.serialize_msg(message)


def test_limit_agent_users_reach_any_queue_through_the_default_exchange(
        agents, probe):
    """What is NOT enforced: an RPC server answers through RabbitMQ's
    default exchange, which routes by queue name and has no topic
    permissions; so an agent's user (it must answer calls) can put a call
    straight into another host's agent queue. nova-compute's user, which
    answers nothing, cannot."""
    p = probe('thunder-agent.host-b')
    channel = p.channel()
    reply_q = 'reply_' + uuid.uuid4().hex
    queue = kombu.Queue(reply_q, channel=channel, auto_delete=True)
    queue.declare()
    msg_id, body = _forged_call('get_status', reply_q)
    kombu.Producer(channel).publish(body, exchange='',
                                    routing_key='thunder-agent.host-a',
                                    serializer='json')
    deadline = time.monotonic() + 30
    answer = None
    while answer is None and time.monotonic() < deadline:
        message = queue.get(no_ack=True)
        if message is None:
            time.sleep(0.2)
            continue
        reply = json.loads(message.payload['oslo.message'])
        if reply.get('_msg_id') == msg_id and 'result' in reply:
            answer = reply['result']
    assert answer is not None, 'host-a\'s agent did not answer'
    assert answer['host'] == 'host-a'

    channel = probe('thunder-nova.host-b').channel()
    reply_q = 'reply_' + uuid.uuid4().hex
    kombu.Queue(reply_q, channel=channel, auto_delete=True).declare()
    _, body = _forged_call('get_status', reply_q)
    text = refusal(lambda: kombu.Producer(channel).publish(
        body, exchange='', routing_key='thunder-agent.host-a',
        serializer='json'))
    assert 'ACCESS_REFUSED' in text
    assert "exchange 'amq.default'" in text


@pytest.fixture
def second_vhost(rabbit, users):
    """A vhost where host-b's agent user and host-a's nova-compute user
    have the same permissions as in the plugin's: {user: url}."""
    vhost = users['thunder-coordinator'].rsplit('/', 1)[1]
    other = vhost + '-2'
    wanted = ('thunder-agent.host-b', 'thunder-nova.host-a')
    rabbit.ctl('add_vhost', other)
    try:
        for line in rabbit.ctl('-q', 'list_permissions', '-p',
                               vhost).splitlines():
            fields = line.split('\t')
            if fields[0] in wanted:
                rabbit.ctl('set_permissions', '-p', other, *fields)
        for line in rabbit.ctl('-q', 'list_topic_permissions', '-p',
                               vhost).splitlines():
            fields = line.split('\t')
            if fields[0] in wanted:
                rabbit.ctl('set_topic_permissions', '-p', other, *fields)
        yield {user: users[user].rsplit('/', 1)[0] + '/' + other
               for user in wanted}
    finally:
        rabbit.ctl('delete_vhost', other)


def test_limit_any_user_may_replace_the_control_exchange(second_vhost):
    """What is NOT enforced: configure on the control exchange (which
    oslo.messaging declares on every connection) is also the right to
    delete it. host-b's agent user re-declares it as a fanout exchange,
    where topic permissions do not apply, and receives the calls
    nova-compute of host-a publishes on its open connection."""
    transport = rpc.get_transport(cfg.CONF,
                                  second_vhost['thunder-nova.host-a'])
    try:
        client = api.AgentAPI(transport).client.prepare(server='host-a')
        client.cast({}, 'get_status')       # declares the exchange
        p = Probe(second_vhost['thunder-agent.host-b'])
        try:
            channel = p.channel()
            # As oslo.messaging declares them (amqp_durable_queues false).
            exchange = kombu.Exchange('openstack', 'topic', durable=False)
            queue = kombu.Queue('thunder-agent.host-b', channel=channel,
                                exchange=exchange, durable=False,
                                routing_key='thunder-agent.host-b')
            queue.declare()
            channel.exchange_delete('openstack')
            channel.exchange_declare('openstack', 'fanout')
            channel.queue_bind('thunder-agent.host-b', 'openstack', '')
            client.cast({}, 'delete_snapshot', instance_id='i-of-host-a')
            deadline = time.monotonic() + 30
            message = None
            while message is None and time.monotonic() < deadline:
                message = queue.get(no_ack=True)
                time.sleep(0.2)
            assert message is not None
            assert message.delivery_info['routing_key'] == (
                'thunder-agent.host-a')
            call = json.loads(message.payload['oslo.message'])
            assert call['method'] == 'delete_snapshot'
            assert call['args'] == {'instance_id': 'i-of-host-a'}
        finally:
            p.close()
    finally:
        transport.cleanup()
