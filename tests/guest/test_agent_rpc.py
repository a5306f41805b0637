"""The kernel driver through the agent and the coordinator (guest).

Three real ``thunder-agent`` processes (hosts A, B, C) and a real
``thunder-coordinator`` talk over oslo.messaging on the broker the harness
runs on the host; the tests reach them over RPC only (AgentAPI and the
coordinator's get_tree), never the driver, except to try a login to an
agent's export with a wrong relay key. fan_out and origin_fan_out are 1,
so each image's tree is a chain in join order.

The tests share one cluster and run in file order (every step is slow
under TCG, so they build on each other):

1. image 1 on A, B, C: the chain origin -> A -> B -> C; every snapshot
   reads the image, which the origin sent once; writes stay in their
   snapshot;
2. a login to C's export with a wrong relay key is refused;
3. C is killed with -9 and started again: its snapshots stay, with their
   data;
4. C lets go of image 1, refused while a snapshot is open or exists;
5. image 2 on B and C; B's tgtd dies while C reads: the reads wait and
   resume after C moves to the origin; B's template of image 1 keeps its
   parent A; B's prefetch and garbage collection of image 2;
6. image 1 is released on B and A, with the refusals while it is in
   use, until nothing is left.

The fixture checks after the module that no agent left anything in the
kernel or in tgt.
"""

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid

import pytest

from thunder_agent.coordinator import ORIGIN
from thunder_agent.drivers.kernel import chap
from thunder_agent import exception
from thunder_agent import records
from tests.guest.conftest import Agent
from tests.guest.conftest import cluster_portals
from tests.guest.conftest import iscsi_sessions
from tests.guest.conftest import leftovers
from tests.guest.conftest import MIB
from tests.guest.conftest import read_device
from tests.guest.conftest import record
from tests.guest.conftest import settle
from tests.guest.conftest import START_TIMEOUT
from tests.guest.conftest import wait_until
from tests.guest.conftest import write_device

pytestmark = [pytest.mark.guest]

FIGURES = ('bytes_fetched', 'bytes_served', 'cached_bytes', 'blocks_cached',
           'block_size', 'disk_bytes')
BLOCK = 65536


class Phases:
    """Wall time of each step of a test, recorded in measurements.json
    (nothing asserts on them)."""

    def __init__(self, name):
        self.name = name
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, step):
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[step] = round(time.monotonic() - started, 1)
            record(self.name, self.seconds)


def _device(info):
    return info['data']['device_path']


def _sha256(path, size=None):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def _figures(cluster, image_id, names):
    """``{name: template status}`` once each named agent's template of the
    image is settled (READY, nothing running on it, figures in)."""
    return {name: wait_until(lambda a=cluster.agents[name]: a.settled(
        image_id), 'the template of %s on %s' % (image_id, name))
        for name in names}


def _prepare_chain(cluster, image, names, snapshot_on):
    """Prepare the image on *names* in that order (with a snapshot on
    those in *snapshot_on*); returns ``{name: connection_info}`` (and
    under ``'origin_bytes'`` what each prepare cost the origin) once the
    tree is the chain in that order and each template reads from its
    parent and knows its child."""
    infos = {}
    for name in names:
        agent = cluster.agents[name]
        before = image.origin_bytes_read()
        if name in snapshot_on:
            infos[name] = agent.prepare(image)
        else:
            agent.prepare_template(image)
        settle()
        infos.setdefault('origin_bytes', {})[name] = \
            image.origin_bytes_read() - before
    nodes = ['agent-' + n for n in names]
    assert cluster.parents(image.image_id) == {
        node: [parent] for node, parent in zip(nodes, [ORIGIN] + nodes)}
    assert cluster.tree(image.image_id)['origin_children'] == nodes[:1]
    for i, name in enumerate(names):
        agent = cluster.agents[name]
        child = nodes[i + 1:i + 2]
        # Children come with the answers to heartbeats.
        wait_until(lambda: agent.template(image.image_id)['children'] ==
                   child, 'the children of %s' % name)
        assert agent.template(image.image_id)['source'] == (
            [ORIGIN] + nodes)[i]
    return infos


def _secrets(cluster, image, key_file):
    """The image's origin CHAP secret and the relay secret each agent's
    export of it derives from the relay key."""
    with open(key_file, 'rb') as f:
        key = f.read()
    found = [image.secret]
    for agent in cluster.agents.values():
        relay = agent.template(image.image_id)['export']['relay']
        found.append(chap.relay_secret(key, relay['export']))
    return found


@pytest.fixture(scope='module')
def relay_image(make_image):
    return make_image()


@pytest.fixture(scope='module')
def state():
    """What the tests of this module hand on to the next ones."""
    return {}


def test_chain_of_three_agents_reads_the_image_from_the_origin_once(
        rpc_cluster, relay_image, relay_key_file, state):
    cluster, image, size = rpc_cluster, relay_image, relay_image.size
    phase = Phases('agent_relay_seconds')
    start = image.origin_bytes_read()
    with phase('prepare_a_b_c'):
        infos = _prepare_chain(cluster, image, 'abc', 'abc')
    tree = cluster.tree(image.image_id)
    # udev probes every new block device (blkid reads its first and last
    # blocks), and each agent's prepare probes the origin once (a login
    # of its own): that is the setup's share.
    with phase('settle'):
        settle()
        before = _figures(cluster, image.image_id, 'abc')
    setup = image.origin_bytes_read() - start
    for name in 'abc':
        for field in FIGURES:
            assert isinstance(before[name][field], int), (name, field)
        assert before[name]['block_size'] == BLOCK
        assert before[name]['healthy'] is True

    # C first: its misses go up the chain, each level caching them.
    steps = {}
    previous = before
    with phase('read_c_b_a'):
        for name in 'cba':
            assert read_device(_device(infos[name]), size) == image.sha256
            settle()
            now = _figures(cluster, image.image_id, 'abc')
            steps[name] = {n: {f: now[n][f] - previous[n][f]
                               for f in ('bytes_fetched', 'bytes_served')}
                           for n in 'abc'}
            previous = now
    after = previous
    origin = image.origin_bytes_read() - start
    record('agent_relay_origin_bytes', {
        'image_bytes': size, 'origin_bytes': origin,
        'origin_bytes_setup': setup, 'origin_bytes_reads': origin - setup,
        'ratio': round(origin / size, 4),
        'ratio_reads': round((origin - setup) / size, 4),
        'origin_bytes_per_prepare': infos['origin_bytes'],
        'tree': {node: entry['parents']
                 for node, entry in tree['nodes'].items()},
        'height': tree['height'], 'per_read': steps,
        'final': {name: {f: after[name][f] for f in FIGURES}
                  for name in after}})

    # Reading C: every level fetched the image from the one above, and
    # what a child fetched is what its parent served it.
    read_c = steps['c']
    for name in 'abc':
        assert size * 0.95 <= read_c[name]['bytes_fetched'] <= size * 1.10
    for parent, child in ('ab', 'bc'):
        assert read_c[parent]['bytes_served'] == pytest.approx(
            read_c[child]['bytes_fetched'], rel=0.02), (parent, child)
    # C served its own snapshot.
    assert read_c['c']['bytes_served'] >= size
    # Reading B, then A: served from their own caches, up to the misses
    # bcache did not insert the first time (see
    # thunder_agent.drivers.kernel.cache), which B fetched from A.
    for name in 'ba':
        assert steps[name][name]['bytes_served'] >= size
        assert steps[name][name]['bytes_fetched'] <= size * 0.10
    assert steps['b']['a']['bytes_served'] == pytest.approx(
        steps['b']['b']['bytes_fetched'], rel=0.02, abs=MIB)
    for name in 'abc':
        assert after[name]['cached_bytes'] >= size * 0.95
        assert after[name]['blocks_cached'] * BLOCK >= size * 0.95
        assert after[name]['disk_bytes'] >= size * 0.95
    # Reading the image on the whole tree cost the origin about one image.
    assert size * 0.95 <= origin - setup <= size * 1.10
    # Each prepare costs the origin the blocks udev's probes of the new
    # devices read (blkid: the first and last blocks) through the
    # origin's LUN: every agent probes the origin once, whatever its
    # parent. About 1 to 3 MiB per host, whatever the image's size.
    assert setup <= 3 * MIB * len(cluster.agents)

    # No secret in any answer (statuses, the coordinator's tree) nor in
    # the agents' logs.
    with phase('secrets'):
        secrets = _secrets(cluster, image, relay_key_file)
        texts = [json.dumps(agent.status())
                 for agent in cluster.agents.values()]
        texts.append(json.dumps(cluster.tree(image.image_id)))
        for agent in cluster.agents.values():
            with open(agent.process.log_file, errors='replace') as f:
                texts.append(f.read())
        for text in texts:
            for secret in secrets:
                assert secret not in text

    # Writes to one of C's snapshots reach neither the template, nor C's
    # other snapshot, nor the hosts above.
    with phase('writes'):
        second = cluster.agents['c'].client.create_snapshot(
            image.image_id, str(uuid.uuid4()))
        patches = {0: os.urandom(MIB),
                   5 * MIB + 4096: os.urandom(64 * 1024),
                   size - MIB: os.urandom(MIB)}
        for offset, data in patches.items():
            write_device(_device(infos['c']), offset, data)
        with open(image.path, 'rb') as f:
            expected = bytearray(f.read())
        for offset, data in patches.items():
            expected[offset:offset + len(data)] = data
        head = hashlib.sha256(expected[:4 * MIB]).hexdigest()
        expected = hashlib.sha256(expected).hexdigest()
        assert read_device(_device(infos['c']), size) == expected
        assert read_device(_device(second), size) == image.sha256
        template_c = cluster.agents['c'].template(image.image_id)
        assert read_device(template_c['export']['local']['device_path'],
                           4 * MIB) == _sha256(image.path, 4 * MIB)
        assert _sha256(image.path) == image.sha256
    state.update(infos=infos, second=second, patched=expected,
                 patched_head=head)


def test_an_export_refuses_a_wrong_relay_key(rpc_cluster, relay_image,
                                             guest):
    """A login to C's export (made by agent C; nobody reads it, so no
    session of this shared initiator is reused) with the driver of a host
    whose relay key differs, and how that driver sees C serve."""
    cluster, image = rpc_cluster, relay_image
    relay = records.RelayAddress.from_dict(
        cluster.agents['c'].template(image.image_id)['export']['relay'])
    assert (relay.host, relay.port) == ('10.99.4.1', 3260)
    wrong_key = os.urandom(32)
    # One login attempt: os-brick would try again after a refusal.
    wrong = Agent(guest['b'], relay_key=wrong_key, device_scan_attempts=1)
    source = wrong.driver.parent_source('agent-c', relay, image.image_id)
    assert source.endpoint.data['auth_method'] == 'CHAP'
    assert 'auth_password' not in source.endpoint.data
    sessions = sorted(iscsi_sessions())
    with pytest.raises(exception.SourceUnavailable) as info:
        wrong.create_template(image, [source])
    assert chap.relay_secret(wrong_key, relay.export) not in str(info.value)
    # No CHAP at all is refused before any login is tried.
    data = dict(source.endpoint.data)
    del data['auth_method']
    with pytest.raises(exception.InvalidSource):
        wrong.create_template(image, [records.Source(
            source.node, records.Endpoint('iscsi', data))])
    assert sorted(iscsi_sessions()) == sessions
    # (Host B's tgtd holds agent B's exports: only devices are counted.)
    left = leftovers(wrong)
    assert (left['dm'], left['loops']) == ([], [])

    # C serves the image; C's tgtd answers for a target it does not have;
    # nobody answers on a closed port.
    assert wrong.driver.source_answers(source, 5)
    assert wrong.driver.source_ready(source)
    unknown = wrong.driver.parent_source('agent-c', records.RelayAddress(
        relay.host, relay.port, relay.export[:-36] +
        '00000000-0000-4000-8000-000000000000'), image.image_id)
    assert wrong.driver.source_answers(unknown, 5)
    assert not wrong.driver.source_ready(unknown)
    closed = socket.socket()
    closed.bind(('127.0.0.1', 0))
    port = closed.getsockname()[1]
    closed.close()
    gone = wrong.driver.parent_source('agent-c', records.RelayAddress(
        '127.0.0.1', port, relay.export), image.image_id)
    assert not wrong.driver.source_answers(gone, 5)
    assert not wrong.driver.source_ready(gone)


def test_a_killed_agent_keeps_its_snapshots_and_their_data(
        rpc_cluster, relay_image, state):
    cluster, image = rpc_cluster, relay_image
    phase = Phases('agent_restart_seconds')
    c = cluster.agents['c']
    patched, second = state['infos']['c'], state['second']
    listed = sorted(c.status()['snapshots'],
                    key=lambda s: s['instance_id'])
    assert len(listed) == 2
    c.process.kill()
    # The data plane does not need the agent.
    assert read_device(_device(patched), image.size) == state['patched']
    with phase('restart'):
        c.process.spawn()
        c.process.wait_ready(START_TIMEOUT)
        restored = wait_until(lambda: c.settled(image.image_id),
                              'C to restore its template')
    assert restored['source'] == 'agent-b'
    assert restored['healthy'] is True
    assert sorted(c.status()['snapshots'],
                  key=lambda s: s['instance_id']) == listed
    assert read_device(_device(patched), image.size) == state['patched']
    assert read_device(_device(second), 4 * MIB) == _sha256(image.path,
                                                            4 * MIB)
    instance_id = second['data']['instance_id']
    assert c.client.delete_snapshot(instance_id) == {
        'instance_id': instance_id, 'deleted': True}
    assert not os.path.exists(_device(second))
    assert [s['instance_id'] for s in c.status()['snapshots']] == [
        patched['data']['instance_id']]


def test_a_leaf_lets_go_of_its_template_once_unused(
        rpc_cluster, relay_image, state):
    """C leaves image 1's tree before the failover test: two children of
    one parent would share one iSCSI session here (one initiator for
    every host), which the kernel driver of separate hosts never does."""
    cluster, image = rpc_cluster, relay_image
    image_id = image.image_id
    c = cluster.agents['c']
    snap, = [s for s in c.status()['snapshots']
             if s['image_id'] == image_id]
    path = _device(snap['connection_info'])
    # A VM (here: an open file descriptor) uses C's snapshot.
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(exception.SnapshotInUse):
            c.client.delete_snapshot(snap['instance_id'])
    finally:
        os.close(fd)
    with pytest.raises(exception.TemplateInUse):
        c.client.release_template(image_id)
    # The refusals changed nothing.
    assert c.status()['snapshots'] == [snap]
    assert read_device(path, 4 * MIB) == state['patched_head']
    assert c.client.delete_snapshot(snap['instance_id']) == {
        'instance_id': snap['instance_id'], 'deleted': True}
    assert not os.path.exists(path)
    with pytest.raises(exception.SnapshotNotFound):
        c.client.delete_snapshot(snap['instance_id'])
    assert c.release(image_id) == {'image_id': image_id, 'deleted': True}
    assert c.status()['templates'] == []
    assert c.leftovers() == {'dm': [], 'loops': [], 'targets': []}
    # A heartbeat C sent just before it left may put it back for one
    # heartbeat interval; the next one, without the image, takes it out.
    wait_until(lambda: cluster.parents(image_id) == {
        'agent-a': [ORIGIN], 'agent-b': ['agent-a']},
        'the coordinator to drop C')
    wait_until(lambda: cluster.agents['b'].template(image_id)['children']
               == [], 'B to learn that C left')


def test_reads_resume_when_the_parent_dies_mid_read(rpc_cluster,
                                                    relay_image, make_image):
    cluster, first = rpc_cluster, relay_image
    phase = Phases('agent_failover_seconds')
    image = make_image(16 * MIB)
    size = image.size
    b, c = cluster.agents['b'], cluster.agents['c']
    start = image.origin_bytes_read()
    with phase('prepare_b_c'):
        infos = _prepare_chain(cluster, image, 'bc', 'c')
    settle()
    setup = image.origin_bytes_read() - start
    chunks = []
    paused, go = threading.Event(), threading.Event()
    outcome = {}

    def on_chunk(offset):
        chunks.append((offset, time.monotonic()))
        if not paused.is_set() and offset >= size // 4:
            paused.set()
            go.wait()

    def reader():
        try:
            outcome['sha256'] = read_device(_device(infos['c']), size,
                                            on_chunk=on_chunk)
        except Exception as e:          # an I/O error fails the test
            outcome['error'] = e

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        assert paused.wait(120)
        # B's exports vanish without a goodbye: C's reads of what it has
        # not cached wait in its multipath map until C has moved.
        cluster.hosts['b'].kill_tgtd()
        killed = time.monotonic()
        go.set()
        with phase('read_after_kill'):
            thread.join(300)
        assert not thread.is_alive()
        assert 'error' not in outcome, outcome
        assert outcome['sha256'] == image.sha256
        # C's record names its new parent once the move is complete
        # (after its logout from B, which is slow with B dead).
        with phase('move_complete'):
            moved = wait_until(lambda: c.template(image.image_id)[
                'source'] != 'agent-b' and c.template(image.image_id),
                'C to leave B')
        after_kill = [t for _offset, t in chunks if t >= killed]
        gaps = [t2 - t1 for t1, t2 in zip([killed] + after_kill,
                                          after_kill)]
        origin = image.origin_bytes_read() - start
        # C moved under the origin, B's parent in this tree.
        assert moved['source'] == ORIGIN
        parents = cluster.parents(image.image_id)
        assert parents['agent-c'] == [ORIGIN]
        # B's export of image 1 died too; B still reads it from A: its
        # parent is not to blame, and A keeps its place.
        assert b.template(first.image_id)['source'] == 'agent-a'
        first_parents = cluster.parents(first.image_id)
        assert first_parents == {'agent-a': [ORIGIN],
                                 'agent-b': ['agent-a']}
        record('agent_failover', {
            'image_bytes': size,
            'killed_at_bytes': [o for o, t in chunks if t < killed][-1],
            'blocked_seconds': round(max(gaps), 1),
            'read_seconds_after_kill': round(chunks[-1][1] - killed, 1),
            'new_parent': moved['source'],
            'tree_after': parents,
            'image_1_tree_after': first_parents,
            'io_error': 'error' in outcome,
            'checksum_ok': outcome['sha256'] == image.sha256,
            'origin_bytes': origin, 'origin_bytes_setup': setup,
            'ratio_reads': round((origin - setup) / size, 4)})
        # What B had fetched for C, C had cached: the origin sent the
        # image about once.
        assert origin - setup <= size * 1.10
    finally:
        go.set()
        cluster.hosts['b'].restart_tgtd()
        thread.join(180)
    # B's tgtd came back empty: B's housekeeping exports its templates
    # again, under the same names.
    with phase('b_exports_again'):
        for image_id in (first.image_id, image.image_id):
            iqn = b.template(image_id)['export']['relay']['export']
            wait_until(lambda: iqn in cluster.hosts['b'].targets()
                       and b.settled(image_id)
                       and b.settled(image_id)['healthy'],
                       'B to export %s again' % image_id)

    # C lets go of image 2; B prefetches all of it, paced so that the
    # progress shows in get_status.
    instance_id = infos['c']['data']['instance_id']
    assert c.client.delete_snapshot(instance_id)['deleted']
    assert c.release(image.image_id)['deleted']
    settle()
    before = b.settled(image.image_id)
    start = image.origin_bytes_read()
    answer = b.client.prefetch(image.image_id, mode='full', rate_mb=2)
    assert answer['jobs'][0]['kind'] == 'full'
    samples = []

    def done():
        progress = b.template(image.image_id).get('prefetch')
        samples.append(progress and (progress['state'],
                                     progress['bytes_done']))
        return progress and progress['state'] == 'done' and progress
    with phase('prefetch'):
        progress = wait_until(done, 'the prefetch of %s' % image.image_id)
    assert progress['bytes_done'] == progress['bytes_total'] == size
    done_bytes = [s[1] for s in samples if s]
    assert done_bytes == sorted(done_bytes)
    assert any(0 < n < size for n in done_bytes), samples
    settle()
    after = b.settled(image.image_id)
    origin = image.origin_bytes_read() - start
    fetched = after['bytes_fetched'] - before['bytes_fetched']
    record('agent_prefetch', {
        'image_bytes': size, 'cached_before': before['cached_bytes'],
        'origin_bytes': origin, 'fetched_bytes': fetched,
        'cached_after': after['cached_bytes'],
        'progress_samples': [list(s) for s in samples if s]})
    # It fetched what B lacked, from the origin, once.
    missing = size - before['cached_bytes']
    assert missing * 0.90 <= fetched <= missing * 1.10 + MIB
    assert origin == pytest.approx(fetched, rel=0.05, abs=MIB)
    assert after['cached_bytes'] >= size * 0.90

    # B's template of image 2 is idle now (no snapshot, no child once
    # B has heard that C left); its template of image 1 has a snapshot.
    wait_until(lambda: b.template(image.image_id)['children'] == [],
               'B to learn that C left')
    collected = set()
    wait_until(lambda: collected.update(
        b.client.collect_garbage(max_idle=0)) or collected,
        'garbage collection')
    assert collected == {image.image_id}
    assert [t['image_id'] for t in b.status()['templates']] == [
        first.image_id]


def test_release_is_refused_while_in_use_then_leaves_nothing(
        rpc_cluster, relay_image):
    cluster, image = rpc_cluster, relay_image
    image_id = image.image_id
    a, b = cluster.agents['a'], cluster.agents['b']
    snaps = {name: [s for s in cluster.agents[name].status()['snapshots']
                    if s['image_id'] == image_id] for name in 'ab'}
    assert [len(snaps[n]) for n in 'ab'] == [1, 1]

    # A has a snapshot and a child.
    with pytest.raises(exception.TemplateInUse):
        a.client.release_template(image_id)
    a.client.delete_snapshot(snaps['a'][0]['instance_id'])
    with pytest.raises(exception.TemplateInUse) as info:
        a.client.release_template(image_id)
    assert 'agent-b' in str(info.value)
    # B has a snapshot.
    with pytest.raises(exception.TemplateInUse):
        b.client.release_template(image_id)
    assert read_device(_device(snaps['b'][0]['connection_info']),
                       4 * MIB) == _sha256(image.path, 4 * MIB)
    b.client.delete_snapshot(snaps['b'][0]['instance_id'])
    assert b.release(image_id) == {'image_id': image_id, 'deleted': True}
    wait_until(lambda: cluster.parents(image_id) == {'agent-a': [ORIGIN]},
               'the coordinator to drop B')

    # A's template is idle once A has heard that its children left.
    wait_until(lambda: a.template(image_id)['children'] == [],
               'A to learn that B left')
    collected = set()
    wait_until(lambda: collected.update(
        a.client.collect_garbage(max_idle=0)) or collected,
        'garbage collection')
    assert collected == {image_id}
    for agent in cluster.agents.values():
        assert agent.status()['templates'] == []
        assert agent.status()['snapshots'] == []
        assert agent.leftovers() == {'dm': [], 'loops': [], 'targets': []}
    wait_until(lambda: cluster.coordinator.client.list_trees() == {},
               'the coordinator to drop every tree')
    portals = cluster_portals(cluster.hosts)
    assert [s for s in iscsi_sessions() if s[0] in portals] == []
