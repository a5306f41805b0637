"""Hostile image content through a real agent (qemu backend, RabbitMQ).

The attacks of OSSA-2024-001 against a file origin in an allowed
directory: a qcow2 whose header names a host file as its backing file or as
its external data file (QEMU would serve that file as the VM's disk), a
"raw" image that is a qcow2, a VMDK claimed raw. Each is refused, the
agent's log says why, and nothing is created: no record, no cache, no
daemon. (The caller is told only that the origin cannot be read: the
agent's RPC endpoint answers every origin failure so.)
"""

import os
import subprocess
import uuid

import pytest

from thunder_agent import exception
from thunder_lab.emulation import reader

pytestmark = pytest.mark.functional

SIZE = 1 << 20
SECRET = b'root:$y$j9T$not-really-a-hash:19000:0:99999:7:::\n'


@pytest.fixture
def secret(workdir):
    """A file outside the allowed directory, as /etc/shadow is."""
    path = os.path.join(workdir, 'shadow')
    with open(path, 'wb') as f:
        f.write(SECRET.ljust(SIZE, b'\0'))
    return path


def _qemu_img(*args):
    subprocess.run(['qemu-img'] + list(args), check=True,
                   capture_output=True)


def _backed_by(path, backing):
    _qemu_img('create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', backing,
              path, str(SIZE))


def _with_data_file(path, data_file):
    """A qcow2 whose header extension names *data_file* as its external
    data file. qemu-img creates (truncates) the data file it is given, so
    it is given a placeholder of the same length, renamed in the header
    afterwards: the secret is never written."""
    placeholder = os.path.join(os.path.dirname(data_file),
                               'x' * len(os.path.basename(data_file)))
    _qemu_img('create', '-q', '-f', 'qcow2', '-o',
              'data_file=%s,data_file_raw=on' % placeholder, path,
              str(SIZE))
    with open(path, 'r+b') as f:
        header = f.read(65536)
        at = header.index(placeholder.encode())
        f.seek(at)
        f.write(data_file.encode())
    os.unlink(placeholder)


def _vmdk_descriptor(path, extent):
    """A text VMDK (a descriptor) whose extent is *extent*."""
    with open(path, 'w') as f:
        f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\n'
                'parentCID=ffffffff\ncreateType="monolithicFlat"\n\n'
                'RW %d FLAT "%s" 0\n\nddb.adapterType = "ide"\n'
                % (SIZE // 512, extent))
    with open(path, 'r+b') as f:
        f.truncate(SIZE)


def _state(agent):
    files = []
    for dirpath, _, names in os.walk(agent.state_path):
        files += [os.path.join(dirpath, n) for n in names]
    return sorted(files)


@pytest.mark.parametrize('attack, claimed, words', [
    ('backing file', 'qcow2', 'backing_file'),
    ('backing file', 'raw', 'content is qcow2, not raw'),
    ('data file', 'qcow2', 'data_file'),
    ('qcow2 claimed raw', 'raw', 'content is qcow2, not raw'),
    # A VMDK text descriptor is raw to the inspector: QEMU's own probe
    # (unprivileged: it cannot open the secret) refuses it.
    ('vmdk claimed raw', 'raw', 'cannot open its first bytes'),
    ('vmdk claimed qcow2', 'qcow2', 'content is raw, not qcow2'),
])
def test_hostile_image_is_refused_and_nothing_is_created(
        agent, image, secret, qemu_tools, attack, claimed, words):
    image_id = str(uuid.uuid4())
    # Exactly <dir>/<image id>, as Glance's file store names its files.
    path = os.path.join(image['dir'], image_id)
    if attack == 'backing file':
        _backed_by(path, secret)
    elif attack == 'data file':
        _with_data_file(path, secret)
    elif attack == 'qcow2 claimed raw':
        _qemu_img('create', '-q', '-f', 'qcow2', path, str(SIZE))
    else:
        _vmdk_descriptor(path, secret)
    # At least as long as the disk (a qcow2's trailing zeros are unused
    # clusters): the agent's size check is not what stops it.
    if os.path.getsize(path) < SIZE:
        os.truncate(path, SIZE)
    # Readable by root only, as /etc/shadow is.
    os.chmod(secret, 0o600)
    origin = {'driver_volume_type': 'file', 'data': {'path': path}}
    before = _state(agent)
    try:
        conn = agent.client.prepare(image_id, origin, SIZE, claimed,
                                    str(uuid.uuid4()))
    except exception.OriginUnavailable as e:
        error = e
    else:
        # The attack worked: say what the VM would have read.
        pytest.fail('prepared; the VM disk starts with %r'
                    % reader.read(conn, 0, len(SECRET)))
    assert image_id in str(error)
    assert 'Image %s is refused' % image_id in agent.log_tail(20000)
    assert words in agent.log_tail(20000)
    # Nothing was created.
    assert agent.client.get_status()['templates'] == []
    assert agent.data_plane_pids() == []
    assert _state(agent) == before
    with open(secret, 'rb') as f:
        assert f.read(len(SECRET)) == SECRET


def test_a_plain_qcow2_image_still_boots(agent, image, qemu_tools):
    image_id = str(uuid.uuid4())
    path = os.path.join(image['dir'], image_id)
    _qemu_img('convert', '-q', '-f', 'raw', '-O', 'qcow2', image['path'],
              path)
    conn = agent.client.prepare(
        image_id, {'driver_volume_type': 'file', 'data': {'path': path}},
        image['size'], 'qcow2', str(uuid.uuid4()))
    assert reader.checksum(conn) == (image['sha256'], image['size'])
