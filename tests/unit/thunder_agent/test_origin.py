"""The origin server's checks and command line, with a fake daemon."""

import json
import subprocess

import pytest

from thunder_agent import exception
from thunder_agent import manifest
from thunder_agent import origin as origin_mod
from tests.unit.thunder_agent import test_image_check as headers


class FakeDaemon:
    def __init__(self):
        self.started = None

    def start(self, nbd_server=None, extra_args=(), max_connections=None,
              server_options=None, objects=()):
        self.started = {'nbd_server': nbd_server, 'args': list(extra_args),
                        'max_connections': max_connections,
                        'server_options': server_options,
                        'objects': list(objects)}

    def stop(self):
        pass


class FakeProbe:
    """qemu-img's format probe, answering *probed*."""

    def __init__(self, probed='raw'):
        self.probed = probed
        self.runs = []

    def __call__(self, args, timeout):
        self.runs.append(args)
        return subprocess.CompletedProcess(
            args, 0, json.dumps({'format': self.probed}), '')


def _server(tmp_path, head, image_format, probed='raw', **kwargs):
    path = tmp_path / 'image'
    path.write_bytes(head + bytes(1 << 20))
    server = origin_mod.OriginServer(
        str(path), image_format, 'img-1',
        {'type': 'inet', 'host': '127.0.0.1', 'port': 10809},
        str(tmp_path / 'run'), probe_runner=FakeProbe(probed), **kwargs)
    server.daemon = FakeDaemon()
    server.scans = 0

    def scan():
        # What the scanning daemon would read: a raw image's bytes.
        server.scans += 1
        data = path.read_bytes()
        return manifest.build(lambda o, n: data[o:o + n], len(data))

    server._scan = scan
    return server


def _exports(started):
    args = started['args']
    return [json.loads(args[i + 1]) for i, arg in enumerate(args)
            if arg == '--export']


def _blockdevs(started):
    args = started['args']
    return [json.loads(args[i + 1]) for i, arg in enumerate(args)
            if arg == '--blockdev']


def test_qcow2_is_served_without_backing_and_with_a_cap(tmp_path):
    server = _server(tmp_path, headers.qcow2(), 'qcow2').start()
    started = server.daemon.started
    image = _blockdevs(started)[1]
    assert image == {'driver': 'qcow2', 'node-name': 'image',
                     'file': 'image-file', 'read-only': True,
                     'backing': None}
    assert started['max_connections'] == origin_mod.DEFAULT_MAX_CONNECTIONS
    assert started['nbd_server'] == {'type': 'inet', 'host': '127.0.0.1',
                                     'port': '10809'}
    server = _server(tmp_path, bytes(4096), 'raw', max_connections=3)
    assert server.start().daemon.started['max_connections'] == 3


@pytest.mark.parametrize('head, image_format', [
    (headers.qcow2(backing=512), 'qcow2'),
    (headers.qcow2(features=1 << 2), 'qcow2'),
    (headers.qcow2(), 'raw'),
    (b'KDMV' + bytes(4092), 'raw'),
])
def test_unsafe_images_are_not_served(tmp_path, head, image_format):
    server = _server(tmp_path, head, image_format)
    with pytest.raises(exception.UnsafeImage):
        server.start()
    assert server.daemon.started is None


def test_a_raw_image_qemu_probes_as_another_format_is_not_served(
        tmp_path):
    server = _server(tmp_path, b'# Disk DescriptorFile\nversion=1\n',
                     'raw', probed='vmdk')
    with pytest.raises(exception.UnsafeImage, match='vmdk'):
        server.start()
    assert server.daemon.started is None


@pytest.mark.parametrize('value', [0, -1, True, '5'])
def test_max_connections_must_be_a_positive_integer(tmp_path, value):
    with pytest.raises(exception.InvalidInput):
        _server(tmp_path, bytes(4096), 'raw', max_connections=value)


def test_the_manifest_is_served_and_kept_across_restarts(tmp_path):
    server = _server(tmp_path, bytes(4096), 'raw').start()
    started = server.daemon.started
    assert [e['name'] for e in _exports(started)] == ['img-1',
                                                      'img-1.manifest']
    manifest_file = [b for b in _blockdevs(started)
                     if b['node-name'] == 'manifest-file'][0]['filename']
    made = manifest.Manifest.from_file(manifest_file, 4096 + (1 << 20))
    with open(server.image_path, 'rb') as f:
        assert made.bad_blocks(0, f.read()) == []
    # A restart of the same file reads nothing.
    again = origin_mod.OriginServer(
        server.image_path, 'raw', 'img-1', server.listen,
        str(tmp_path / 'run'), probe_runner=FakeProbe())
    again.daemon = FakeDaemon()
    again._scan = lambda: pytest.fail('the image was read again')
    again.start()
    assert _blockdevs(again.daemon.started) == _blockdevs(started)
    assert server.scans == 1


def test_a_changed_image_gets_a_new_manifest(tmp_path):
    server = _server(tmp_path, bytes(4096), 'raw').start()
    assert server.scans == 1
    with open(server.image_path, 'r+b') as f:
        f.write(b'changed')
    server.start()
    assert server.scans == 2
    manifests = list((tmp_path / 'run').glob('*.manifest'))
    assert len(manifests) == 1


def test_a_unix_listen_is_served_without_tls(tmp_path):
    path = tmp_path / 'image'
    path.write_bytes(bytes(8192))
    server = origin_mod.OriginServer(
        str(path), 'raw', 'img-1', {'type': 'unix', 'path': 'o.sock'},
        str(tmp_path / 'run'), probe_runner=FakeProbe(),
        tls_dir=str(tmp_path / 'missing'))
    assert server.credentials is None


def test_tcp_with_a_tls_dir_checks_it_now(tmp_path):
    with pytest.raises(exception.InvalidInput, match='ca-cert.pem'):
        _server(tmp_path, bytes(4096), 'raw',
                tls_dir=str(tmp_path / 'missing'))
