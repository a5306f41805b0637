"""The agent with the qemu backend on one node, over a real RabbitMQ."""

import os
import signal
import time
import uuid

import pytest

from thunder_agent import exception
from thunder_lab.emulation import reader

pytestmark = pytest.mark.functional


def _template(agent, image_id):
    for t in agent.client.get_status()['templates']:
        if t['image_id'] == image_id:
            return t
    return None


def _prepare(agent, image, origin, instance_id=None):
    return agent.client.prepare(image['id'], origin.connection(),
                                image['size'], 'raw',
                                instance_id or str(uuid.uuid4()))


def test_snapshot_reads_origin_bytes_once(agent, image, origin):
    before = origin.bytes_read()
    conn_a = _prepare(agent, image, origin)
    assert conn_a['driver_volume_type'] == 'thunder'
    assert reader.checksum(conn_a) == (image['sha256'], image['size'])
    fetched = origin.bytes_read() - before
    # Every byte once, plus NBD/QMP chatter.
    assert image['size'] <= fetched <= image['size'] * 1.01
    status = _template(agent, image['id'])
    assert status['bytes_fetched'] == image['size']
    assert status['blocks_cached'] == image['size'] // status['block_size']

    # A second VM on the same template costs the origin nothing.
    conn_b = agent.client.create_snapshot(image['id'], str(uuid.uuid4()))
    middle = origin.bytes_read()
    assert reader.checksum(conn_b) == (image['sha256'], image['size'])
    assert origin.bytes_read() - middle == 0
    status = _template(agent, image['id'])
    assert status['bytes_fetched'] == image['size']
    # Both VMs' reads were served by the template: the first by fetches,
    # the second from the cache, where zero clusters cost no read (a
    # quarter of the test image is zeros).
    assert status['bytes_served'] >= 1.75 * image['size']
    assert status['bytes_served'] <= 2.02 * image['size']
    assert sorted(status['snapshots']) == sorted(
        [conn_a['data']['instance_id'], conn_b['data']['instance_id']])


def test_writes_stay_in_their_snapshot_and_survive_agent_kill(
        agent, image, origin):
    conn_a = _prepare(agent, image, origin)
    conn_b = agent.client.create_snapshot(image['id'], str(uuid.uuid4()))
    payload = b'written-by-vm-a!' * 65536  # 1 MiB
    offset = 5 << 20
    original = reader.read(conn_b, offset, len(payload))
    reader.write(conn_a, offset, payload)

    assert reader.read(conn_a, offset, len(payload)) == payload
    assert reader.read(conn_b, offset, len(payload)) == original
    with open(image['path'], 'rb') as f:
        f.seek(offset)
        assert f.read(len(payload)) == original

    daemons = sorted(agent.data_plane_pids())
    agent.kill()
    agent.start()
    # The template daemon kept running and was re-adopted, not restarted.
    assert sorted(agent.data_plane_pids()) == daemons
    assert reader.read(conn_a, offset, len(payload)) == payload
    assert reader.read(conn_b, offset, len(payload)) == original
    status = agent.client.get_status()
    assert {s['instance_id'] for s in status['snapshots']} == {
        conn_a['data']['instance_id'], conn_b['data']['instance_id']}
    # The rest of A is still the image.
    digest, _ = reader.checksum(conn_b)
    assert digest == image['sha256']


def test_killed_data_plane_is_rebuilt_from_its_cache(agent, image, origin):
    conn = _prepare(agent, image, origin)
    payload = b'\xa5' * 65536
    reader.write(conn, 0, payload)
    assert reader.checksum(conn)[1] == image['size']
    # Status flushes the cache metadata; then crash the data plane. The
    # first cluster was never fetched: the VM overwrote it.
    assert _template(agent, image['id'])['cached_bytes'] == (
        image['size'] - len(payload))
    pid, = agent.data_plane_pids()
    os.kill(pid, signal.SIGKILL)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        t = _template(agent, image['id'])
        # No 'healthy' while the repair holds the template (busy).
        if t.get('healthy') and agent.data_plane_pids() != [pid]:
            break
        time.sleep(0.5)
    else:
        pytest.fail('template daemon was not restarted: %s'
                    % agent.log_tail())
    before = origin.bytes_read()
    assert reader.read(conn, 0, len(payload)) == payload
    with open(image['path'], 'rb') as f:
        f.seek(len(payload))
        expected_rest = f.read(image['size'] - len(payload))
    assert reader.read(conn, len(payload),
                       image['size'] - len(payload)) == expected_rest
    # The cache survived the crash: nothing was fetched again.
    assert origin.bytes_read() - before == 0


def test_eviction_is_lru_and_spares_templates_in_use(
        agent_factory, workdir, qemu_tools):
    from tests.conftest import make_image
    images = os.path.join(workdir, 'images')
    os.makedirs(images)
    # 20 MiB images of which 15 MiB data. The limit counts what each cache
    # may grow to (20.3 MiB for a 20 MiB image: its qcow2 fully
    # allocated), so 62 MiB holds three templates, not four.
    size = 20 << 20
    agent = agent_factory(options={'cache': {'size_limit_mb': 62}})
    names = 'abcde'
    ids = {n: str(uuid.uuid4()) for n in names}
    origins = {}
    for n in names:
        # File origins are "<dir>/<image id>" ([agent] file_origin_dirs).
        path = make_image(os.path.join(images, ids[n]), size,
                          seed=n.encode())
        origins[n] = {'driver_volume_type': 'file', 'data': {'path': path}}

    def fill(n):
        conn = agent.client.prepare(ids[n], origins[n], size, 'raw',
                                    str(uuid.uuid4()))
        reader.checksum(conn)
        return conn

    conns = {n: fill(n) for n in 'abc'}   # 60.9 MiB committed of 62
    for n in 'ab':
        agent.client.delete_snapshot(conns[n]['data']['instance_id'])
    # d needs room: a is the least recently used idle template.
    conns['d'] = fill('d')
    present = {t['image_id'] for t in agent.client.get_status()['templates']}
    assert ids['a'] not in present
    assert {ids['b'], ids['c'], ids['d']} <= present
    # b, c, d commit 60.9 MiB: no room for e; b is idle, so e evicts b.
    conns['e'] = fill('e')
    present = {t['image_id'] for t in agent.client.get_status()['templates']}
    assert present == {ids['c'], ids['d'], ids['e']}
    # Everything left is in use: a new template cannot get room.
    state_before = sorted(os.listdir(os.path.join(agent.state_path,
                                                  'templates')))
    with pytest.raises(exception.CacheFull) as err:
        agent.client.prepare_template(ids['a'], origins['a'], size, 'raw')
    assert 'no idle template' in str(err.value)
    assert sorted(os.listdir(os.path.join(
        agent.state_path, 'templates'))) == state_before


def test_release_and_garbage_collection(agent, image, origin):
    conn = _prepare(agent, image, origin)
    with pytest.raises(exception.TemplateInUse):
        agent.client.release_template(image['id'])
    assert agent.client.collect_garbage(0) == []
    agent.client.delete_snapshot(conn['data']['instance_id'])
    assert agent.client.collect_garbage(3600) == []
    assert agent.client.collect_garbage(0) == [image['id']]
    assert agent.client.get_status()['templates'] == []
    assert agent.data_plane_pids() == [] or all(
        not os.path.exists('/proc/%d' % p) for p in agent.data_plane_pids())
    assert os.listdir(os.path.join(agent.state_path, 'templates')) == []
