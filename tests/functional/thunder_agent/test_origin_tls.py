"""The origin over TCP with TLS, on a real qemu-storage-daemon and a real
certtool CA: strangers, other CAs' certificates and DNs outside
--tls-allow are refused; a node of the deployment reads the image and its
digest manifest, which verifies it."""

import hashlib
import os
import shutil
import socket
import subprocess

import nbd
import pytest

from thunder_agent import manifest
from thunder_agent import origin as origin_mod
from thunder_agent import tls
from thunder_lab import pki

pytestmark = [pytest.mark.functional,
              pytest.mark.skipif(shutil.which('certtool') is None,
                                 reason='certtool is not installed')]

EXPORT = 'img-1'


@pytest.fixture(scope='module')
def creds(tmp_path_factory):
    """Credentials by node: the origin's (with 127.0.0.1 among its
    addresses), two nodes of the deployment, and a node certified by
    another CA under a deployment node's name."""
    root = str(tmp_path_factory.mktemp('pki'))
    ca = pki.CA.create(os.path.join(root, 'ca'))
    rogue = pki.CA.create(os.path.join(root, 'rogue-ca'), 'rogue')
    out = {name: ca.issue(name, os.path.join(root, name), ips=ips)
           for name, ips in (('origin-1', ('127.0.0.1',)),
                             ('hosta', ('127.0.0.2',)),
                             ('hostb', ('127.0.0.3',)))}
    out['rogue'] = rogue.issue('hosta', os.path.join(root, 'rogue'))
    return out


def _port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _server(workdir, image, creds, **kwargs):
    kwargs.setdefault('tls_dir', creds['origin-1'])
    return origin_mod.OriginServer(
        image['path'], 'raw', EXPORT,
        {'type': 'inet', 'host': '127.0.0.1', 'port': _port()},
        os.path.join(workdir, 'origin-run'), **kwargs)


def _client(server, certificates=None, export=EXPORT):
    handle = nbd.NBD()
    if certificates is not None:
        tls.secure_handle(handle, certificates)
    handle.set_export_name(export)
    handle.connect_tcp('127.0.0.1', server.listen['port'])
    return handle


def _read_all(handle):
    size, step, digest = handle.get_size(), 4 << 20, hashlib.sha256()
    data = bytearray()
    for offset in range(0, size, step):
        chunk = handle.pread(min(step, size - offset), offset)
        digest.update(chunk)
        data += chunk
    return bytes(data), digest.hexdigest()


def test_a_node_of_the_deployment_reads_the_image_and_its_manifest(
        workdir, image, creds, qemu_tools):
    with _server(workdir, image, creds) as server:
        data, digest = _read_all(_client(server, creds['hosta']))
        assert len(data) == image['size'] and digest == image['sha256']
        raw = _read_all(_client(server, creds['hostb'],
                                manifest.export_name(EXPORT)))[0]
    made = manifest.Manifest.from_bytes(raw, image_size=image['size'])
    assert made.block_size == manifest.DEFAULT_BLOCK_SIZE
    assert made.count == image['size'] // made.block_size
    assert made.bad_blocks(0, data) == []
    # One flipped byte is caught in its block.
    spoiled = bytearray(data)
    spoiled[5 * made.block_size + 17] ^= 1
    assert made.bad_blocks(0, bytes(spoiled)) == [5]


def test_a_plain_client_is_refused(workdir, image, creds, qemu_tools):
    with _server(workdir, image, creds) as server:
        with pytest.raises(nbd.Error, match='TLS'):
            _client(server)
        listed = subprocess.run(
            ['nbdinfo', '--list', 'nbd://127.0.0.1:%s'
             % server.listen['port']],
            capture_output=True, text=True, timeout=30)
        assert listed.returncode != 0
        assert EXPORT not in listed.stdout


def test_a_certificate_of_another_ca_is_refused(workdir, image, creds,
                                                qemu_tools):
    with _server(workdir, image, creds) as server:
        with pytest.raises(nbd.Error):
            _client(server, creds['rogue'])
        # The server still serves the deployment.
        assert _client(server, creds['hosta']).get_size() == image['size']


def test_dns_outside_the_allow_globs_are_refused(workdir, image, creds,
                                                 qemu_tools):
    with _server(workdir, image, creds, tls_allow=('CN=hostb',)) as server:
        with pytest.raises(nbd.Error):
            _client(server, creds['hosta'])
        assert _client(server, creds['hostb']).get_size() == image['size']


def test_the_client_checks_the_origin_certificate(workdir, image, creds,
                                                  qemu_tools):
    """A server whose certificate does not name the address connected to
    (hosta's, for 127.0.0.2) is refused by the client."""
    with _server(workdir, image, creds, tls_dir=creds['hosta']) as server:
        with pytest.raises(nbd.Error):
            _client(server, creds['hostb'])


def test_a_restart_keeps_the_manifest(workdir, image, creds, qemu_tools,
                                      monkeypatch):
    with _server(workdir, image, creds):
        pass
    monkeypatch.setattr(origin_mod.OriginServer, '_scan',
                        lambda self: pytest.fail('image read again'))
    with _server(workdir, image, creds) as server:
        raw = _read_all(_client(server, creds['hosta'],
                                manifest.export_name(EXPORT)))[0]
    assert manifest.Manifest.from_bytes(raw, image['size']).count > 0
