"""Every bad argument gets a typed error over RPC and changes nothing."""

import os
import shutil
import socket
import uuid

import pytest

from tests import socket_server
from thunder_agent import exception
from thunder_lab.emulation import reader

pytestmark = pytest.mark.functional


def _tree(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            # The cache file's metadata is flushed in the background after
            # reads; its contents are compared through the agent's status.
            stamp = None if name == 'cache.qcow2' else st.st_mtime_ns
            out.append((path, st.st_size, stamp))
    return sorted(out)


def test_bad_inputs_are_refused_without_change(agent, image, origin,
                                               workdir):
    size = image['size']
    good = origin.connection()
    conn = agent.client.prepare(image['id'], good, size, 'raw',
                                str(uuid.uuid4()))
    instance = conn['data']['instance_id']
    digest = reader.checksum(conn)[0]
    outside = os.path.join(workdir, 'outside.raw')
    with open(outside, 'wb') as f:
        f.truncate(size)
    other_image = str(uuid.uuid4())
    escape = os.path.join(image['dir'], '..', 'outside.raw')
    cases = [
        (exception.InvalidImageId, 'prepare_template',
         ('not-a-uuid', good, size, 'raw')),
        (exception.InvalidImageId, 'prepare_template',
         ('../../etc/passwd', good, size, 'raw')),
        (exception.InvalidImageId, 'prepare_template',
         (image['id'].upper(), good, size, 'raw')),
        (exception.InvalidSize, 'prepare_template',
         (other_image, good, 0, 'raw')),
        (exception.InvalidSize, 'prepare_template',
         (other_image, good, -512, 'raw')),
        (exception.InvalidSize, 'prepare_template',
         (other_image, good, 'big', 'raw')),
        (exception.InvalidSize, 'prepare_template',
         (other_image, good, size + 1 << 20, 'raw')),
        (exception.InvalidSize, 'prepare_template',
         (other_image, good, size + 512, 'raw')),
        (exception.UnsupportedFormat, 'prepare_template',
         (other_image, good, size, 'vmdk')),
        (exception.OriginUnavailable, 'prepare_template',
         (other_image, good, size, 'qcow2')),
        (exception.OriginNotAllowed, 'prepare_template',
         (other_image, {'driver_volume_type': 'file',
                        'data': {'path': '/etc/passwd'}}, 512, 'raw')),
        (exception.OriginNotAllowed, 'prepare_template',
         (other_image, {'driver_volume_type': 'file',
                        'data': {'path': escape}}, size, 'raw')),
        (exception.InvalidOrigin, 'prepare_template',
         (other_image, {'driver_volume_type': 'file',
                        'data': {'path': 'relative.raw'}}, size, 'raw')),
        (exception.InvalidOrigin, 'prepare_template',
         (other_image, {'driver_volume_type': 'nbd',
                        'data': {'host': '127.0.0.1', 'port': 70000}},
          size, 'raw')),
        (exception.InvalidOrigin, 'prepare_template',
         (other_image, {'driver_volume_type': 'ftp', 'data': {}},
          size, 'raw')),
        (exception.InvalidOrigin, 'prepare_template',
         (other_image, 'nbd://127.0.0.1/x', size, 'raw')),
        (exception.OriginUnavailable, 'prepare_template',
         (other_image, {'driver_volume_type': 'nbd',
                        'data': {'socket': os.path.join(workdir, 'nope'),
                                 'export': 'x'}}, size, 'raw')),
        (exception.TemplateMismatch, 'prepare_template',
         (image['id'], good, size - 512, 'raw')),
        (exception.TemplateNotFound, 'create_snapshot',
         (other_image, str(uuid.uuid4()))),
        (exception.SnapshotExists, 'create_snapshot',
         (image['id'], instance)),
        (exception.InvalidInstanceId, 'create_snapshot',
         (image['id'], '../' + instance)),
        (exception.SnapshotNotFound, 'delete_snapshot',
         (str(uuid.uuid4()),)),
        (exception.InvalidInstanceId, 'delete_snapshot', ('x/../y',)),
        (exception.TemplateNotFound, 'release_template', (other_image,)),
        (exception.TemplateInUse, 'release_template', (image['id'],)),
        (exception.InvalidInput, 'collect_garbage', (-1,)),
        (exception.InvalidInput, 'collect_garbage', ('soon',)),
        (exception.InvalidInstanceId, 'prepare',
         (other_image, good, size, 'raw', 'bad')),
    ]
    cached = agent.client.get_status()['templates'][0]['cached_bytes']
    before_tree = _tree(agent.workdir)
    before_pids = sorted(agent.data_plane_pids())
    for error, method, args in cases:
        with pytest.raises(error) as info:
            getattr(agent.client, method)(*args)
        # A message a person can act on, naming what was wrong.
        assert len(str(info.value)) > 15, (method, args)
    # The agent's log grows; nothing else on disk or in the data plane.
    after_tree = [e for e in _tree(agent.workdir)
                  if not e[0].startswith(agent.log_file)]
    assert after_tree == [e for e in before_tree
                          if not e[0].startswith(agent.log_file)]
    assert sorted(agent.data_plane_pids()) == before_pids
    status = agent.client.get_status()
    assert [t['image_id'] for t in status['templates']] == [image['id']]
    assert status['templates'][0]['cached_bytes'] == cached
    assert [s['instance_id'] for s in status['snapshots']] == [instance]
    assert reader.checksum(conn)[0] == digest


class Banner(socket_server.AcceptLoop):
    """A TCP service that greets each client with a banner (an SSH server
    on the management network, say) and counts its clients."""

    GREETING = b'SSH-2.0-OpenSSH_9.2p1 management-secret-7f3a\r\n'

    def __init__(self, host=None, path=None):
        if path:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(path)
        else:
            self.sock = socket.socket(socket.AF_INET)
            self.sock.bind((host, 0))
        self.sock.listen(16)
        self.host = host
        self.path = path
        self.port = None if path else self.sock.getsockname()[1]
        self.accepted = 0
        self.serve_in_background()

    def handle(self, conn):
        self.accepted += 1
        with conn:
            try:
                conn.sendall(self.GREETING)
                conn.settimeout(5)
                conn.recv(4096)
            except OSError:
                pass

    def close(self):
        self.sock.close()


@pytest.fixture
def banners():
    made = []

    def make(host=None, path=None):
        made.append(Banner(host, path))
        return made[-1]

    yield make
    for banner in made:
        banner.close()


def _nbd(**data):
    data.setdefault('export', '')
    return {'driver_volume_type': 'nbd', 'data': data}


def _file(path):
    return {'driver_volume_type': 'file', 'data': {'path': path}}


def test_hostile_origins_are_refused_and_say_nothing(
        agent_factory, image, origin, workdir, banners):
    """Issue 10 item 1: a tenant (or anything on RabbitMQ) naming where
    root reads from. Each attack is refused with a message naming only
    the image, nothing is created, nothing is connected to, and the agent's
    log has the detail."""
    allowed = banners('127.0.0.1')        # allowed network and port
    other_net = banners('127.0.0.2')      # outside nbd_origin_networks
    other_port = banners('127.0.0.1')     # outside nbd_origin_ports
    agent = agent_factory(options={'agent': {
        'origin_socket_dirs': workdir,
        'nbd_origin_networks': '127.0.0.1/32',
        'nbd_origin_ports': str(allowed.port)}})
    size = image['size']
    good = origin.connection()
    conn = agent.client.prepare(image['id'], good, size, 'raw',
                                str(uuid.uuid4()))
    digest = reader.checksum(conn)[0]
    own_socket = conn['data']['backing']['socket']
    # Another tenant's image in the same store, and a private file.
    store = image['dir']
    secret = os.path.join(workdir, 'secret.raw')
    with open(secret, 'wb') as f:
        f.truncate(size)
    victim, planted, linked = (str(uuid.uuid4()) for _ in range(3))
    os.symlink(image['path'], os.path.join(store, linked))
    os.symlink(secret, os.path.join(store, planted))
    elsewhere = os.path.join(workdir, 'elsewhere')
    os.makedirs(elsewhere)
    stray = banners(path=os.path.join(elsewhere, 'o.sock'))
    # A second, allowed origin of the prepared image: a different origin.
    shutil.copyfile(image['path'], os.path.join(store, image['id']))
    attacks = [
        # file:// anywhere in the store: another image's file.
        (exception.OriginNotAllowed, victim, _file(image['path']),
         [image['path']]),
        # <dir>/<id> a symlink: to another image, to a private file.
        (exception.OriginNotAllowed, linked,
         _file(os.path.join(store, linked)), [store]),
        (exception.OriginNotAllowed, planted,
         _file(os.path.join(store, planted)), [store, secret]),
        (exception.OriginNotAllowed, victim,
         _file(os.path.join(store, '..', 'secret.raw')), [secret]),
        (exception.OriginNotAllowed, victim, _file('/etc/shadow'),
         ['/etc/shadow']),
        # nbd+unix: this agent's own template socket (another tenant's
        # template), a socket outside origin_socket_dirs.
        (exception.OriginNotAllowed, victim,
         _nbd(socket=own_socket, export=image['id']), [own_socket]),
        (exception.OriginNotAllowed, victim,
         _nbd(socket=stray.path, export=victim),
         [elsewhere]),
        # nbd://: outside the networks, outside the ports, by name,
        # IPv6 and its disguises.
        (exception.OriginNotAllowed, victim,
         _nbd(host=other_net.host, port=other_net.port),
         ['127.0.0.2', str(other_net.port)]),
        (exception.OriginNotAllowed, victim,
         _nbd(host='127.0.0.1', port=other_port.port),
         [str(other_port.port)]),
        (exception.OriginNotAllowed, victim,
         _nbd(host='localhost', port=allowed.port), ['localhost']),
        (exception.OriginNotAllowed, victim,
         _nbd(host='::1', port=allowed.port), ['::1']),
        (exception.OriginNotAllowed, victim,
         _nbd(host='::ffff:127.0.0.1', port=allowed.port), ['ffff']),
        (exception.OriginNotAllowed, victim,
         _nbd(host='fe80::1%lo', port=allowed.port), ['fe80']),
        # Allowed, but what answers is no NBD server: the banner grab.
        (exception.OriginUnavailable, victim,
         _nbd(host='127.0.0.1', port=allowed.port, export=victim),
         [str(allowed.port), 'SSH', 'management-secret',
          '5353482d', 'magic']),
        # The template exists with another origin: the answer must not
        # describe the existing one.
        (exception.TemplateMismatch, image['id'],
         _file(os.path.join(store, image['id'])),
         [good['data']['socket'], store]),
    ]
    before_tree = _tree(agent.workdir)
    before_pids = sorted(agent.data_plane_pids())
    for error, image_id, bad, words in attacks:
        with pytest.raises(error) as info:
            agent.client.prepare(image_id, bad, size, 'raw',
                                 str(uuid.uuid4()))
        # str() of a remote error holds the agent's message and
        # traceback, everything that reached the caller.
        text = str(info.value)
        assert image_id in info.value.message, text
        for word in words:
            assert word not in text, (bad, word, text)
    # Nothing connected where it was not allowed.
    assert (other_net.accepted, other_port.accepted, stray.accepted) == (
        0, 0, 0)
    assert allowed.accepted >= 1
    # The agent's log grows; nothing else on disk or in the data plane.
    after_tree = [e for e in _tree(agent.workdir)
                  if not e[0].startswith(agent.log_file)]
    assert after_tree == [e for e in before_tree
                          if not e[0].startswith(agent.log_file)]
    assert sorted(agent.data_plane_pids()) == before_pids
    status = agent.client.get_status()
    assert [t['image_id'] for t in status['templates']] == [image['id']]
    assert reader.checksum(conn)[0] == digest
    # The detail is the operator's, in the agent's log.
    with open(agent.log_file) as f:
        log = f.read()
    for word in (own_socket, '127.0.0.2', 'not an IP address',
                 os.path.join(store, planted)):
        assert word in log, word
    # What is allowed still works: <dir>/<image id>, a regular file.
    legit = str(uuid.uuid4())
    shutil.copyfile(image['path'], os.path.join(store, legit))
    other = agent.client.prepare(legit, _file(os.path.join(store, legit)),
                                 size, 'raw', str(uuid.uuid4()))
    assert reader.checksum(other)[0] == image['sha256']
