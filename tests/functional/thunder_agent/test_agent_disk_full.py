"""The agent (qemu backend, over a real RabbitMQ) on a small, real disk.

Its ``[agent] state_path`` is a 64 MiB tmpfs. Each image is 20 MiB of
pseudo-random data (no zero block: a full read makes the cache take its
whole capacity, about 20.6 MiB), and 8 MiB are kept in reserve: two
templates fit, a third would not, and on today's main it was admitted and
its VM's reads failed once the disk filled (copy-on-read fills that
cannot be written fail the read).
"""

import errno
import os
import random
import subprocess
import time
import uuid

import pytest

from tests.conftest import sha256_file
from thunder_agent.drivers.qemu import driver as qemu_driver
from thunder_agent import exception
from thunder_lab.emulation import reader

pytestmark = pytest.mark.functional

MIB = 1 << 20
FS_SIZE = 64 * MIB
IMAGE_SIZE = 20 * MIB
RESERVE_MB = 8
CLUSTER = 65536


@pytest.fixture
def small_state(workdir):
    """A 64 MiB tmpfs where the agent named "agent" keeps its state."""
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root')
    path = os.path.join(workdir, 'agent', 'state')
    os.makedirs(path)
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o',
                           'size=%d,mode=0750' % FS_SIZE, 'thunder-disk-full',
                           path], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip('cannot mount a tmpfs: %s' % proc.stderr.strip())
    yield path
    subprocess.run(['umount', '-l', path], check=True)


@pytest.fixture
def disk_agent(small_state, agent_factory):
    return agent_factory(options={'cache': {'reserve_mb': RESERVE_MB,
                                            'reserve_percent': 0}})


def _images(workdir, names):
    """File origins "<dir>/<image id>" of IMAGE_SIZE non-zero bytes."""
    images = os.path.join(workdir, 'images')
    os.makedirs(images, exist_ok=True)
    found = {}
    for name in names:
        image_id = str(uuid.uuid4())
        path = os.path.join(images, image_id)
        rng = random.Random(name)
        with open(path, 'wb') as f:
            for _ in range(IMAGE_SIZE // MIB):
                # A block that is all zero would not take cache space.
                f.write(rng.randbytes(MIB).replace(b'\0', b'\1'))
        found[name] = {'id': image_id, 'sha256': sha256_file(path),
                       'origin': {'driver_volume_type': 'file',
                                  'data': {'path': path}}}
    return found


def _prepare(agent, image):
    return agent.client.prepare(image['id'], image['origin'], IMAGE_SIZE,
                                'raw', str(uuid.uuid4()))


def _on_disk(agent, kind='templates'):
    return sorted(os.listdir(os.path.join(agent.state_path, kind)))


def _fill(path):
    """Write into *path* until its file system is full; bytes written."""
    written = 0
    chunk = b'\xff' * MIB
    with open(path, 'wb', buffering=0) as f:
        try:
            while True:
                written += f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return written


def _templates(status):
    return {t['image_id']: t for t in status['templates']}


def test_full_disk_refuses_templates_and_never_fails_reads(
        disk_agent, workdir):
    agent = disk_agent
    images = _images(workdir, 'abc')
    capacity = (qemu_driver.qcow2_full_size(IMAGE_SIZE, CLUSTER)
                + qemu_driver.CAPACITY_SPARE_CLUSTERS * CLUSTER)

    # Two templates fit at full size (2 x 20.6 MiB of 64 - 8 MiB), and
    # each VM reads its whole image: its cache fills completely.
    conns = {n: _prepare(agent, images[n]) for n in 'ab'}
    for n in 'ab':
        assert reader.checksum(conns[n]) == (images[n]['sha256'],
                                             IMAGE_SIZE)
    status = agent.client.get_status()
    for n in 'ab':
        t = _templates(status)[images[n]['id']]
        assert t['bytes_fetched'] == IMAGE_SIZE
        # What the cache takes once full stays within what was admitted.
        assert IMAGE_SIZE < t['disk_bytes'] <= capacity
    assert status['cache']['committed_bytes'] == 2 * capacity
    assert status['cache']['reserve_bytes'] == RESERVE_MB * MIB

    # The third would not fit: refused with the typed error nova-compute
    # shows, and nothing of it exists (no directory, daemon or socket).
    daemons = sorted(agent.data_plane_pids())
    c = images['c']
    with pytest.raises(exception.InsufficientDiskSpace) as error:
        _prepare(agent, c)
    assert error.value.client_error
    assert c['id'] in error.value.message
    assert 'kept in reserve' in error.value.message
    assert _on_disk(agent) == sorted(images[n]['id'] for n in 'ab')
    assert sorted(agent.data_plane_pids()) == daemons
    assert not [n for n in os.listdir(agent.run_path) if c['id'] in n]

    # Something else fills the disk (VM overlays, an operator's file).
    filler = os.path.join(agent.state_path, 'filler')
    assert _fill(filler) > 0
    assert os.statvfs(agent.state_path).f_bavail == 0
    # Status works and reads: both templates, with their figures.
    status = agent.client.get_status()
    assert {images[n]['id'] for n in 'ab'} == set(_templates(status))
    for t in status['templates']:
        assert t['state'] == 'ready' and t['bytes_fetched'] == IMAGE_SIZE
    assert status['cache']['free_bytes'] == 0
    # VMs read their whole disks without an I/O error: the caches were
    # given their space up front.
    for n in 'ab':
        assert reader.checksum(conns[n]) == (images[n]['sha256'],
                                             IMAGE_SIZE)
    # Still refused, still nothing left behind.
    with pytest.raises(exception.InsufficientDiskSpace):
        _prepare(agent, c)
    assert _on_disk(agent) == sorted(images[n]['id'] for n in 'ab')
    # A new VM cannot get its record written: refused with a typed error
    # and no overlay left.
    snapshots = _on_disk(agent, 'snapshots')
    with pytest.raises(exception.ThunderException) as error:
        agent.client.create_snapshot(images['a']['id'], str(uuid.uuid4()))
    assert 'No space left on device' in error.value.message
    assert _on_disk(agent, 'snapshots') == snapshots
    # Housekeeping (every 2 s) keeps failing to save records; the agent
    # lives on and answers.
    time.sleep(5)
    assert len(agent.client.get_status()['templates']) == 2

    # Room again, and an idle template: admitting c evicts a (least
    # recently used, no VM), never b, whose VM runs.
    os.unlink(filler)
    agent.client.delete_snapshot(conns['a']['data']['instance_id'])
    conns['c'] = _prepare(agent, c)
    assert reader.checksum(conns['c']) == (c['sha256'], IMAGE_SIZE)
    assert _on_disk(agent) == sorted(images[n]['id'] for n in 'bc')
    assert reader.checksum(conns['b']) == (images['b']['sha256'],
                                           IMAGE_SIZE)


def test_size_limit_counts_caches_at_full_size(agent_factory, workdir):
    # 41 MiB allow one 20.6 MiB template at full size, not two, though
    # the first has cached nothing yet.
    agent = agent_factory(options={'cache': {'size_limit_mb': 41}})
    images = _images(workdir, 'ab')
    _prepare(agent, images['a'])
    assert _templates(agent.client.get_status())[images['a']['id']][
        'cached_bytes'] == 0
    with pytest.raises(exception.CacheLimitExceeded) as error:
        _prepare(agent, images['b'])
    assert error.value.client_error
    assert 'size_limit_mb (41 MiB)' in error.value.message
    assert _on_disk(agent) == [images['a']['id']]
