"""The origin server on a real qemu-storage-daemon: a hostile image is not
served, a qcow2 node never follows a backing file, clients are capped."""

import hashlib
import os
import subprocess
import time

import nbd
import pytest

from thunder_agent import exception
from thunder_agent import image_check
from thunder_agent import origin as origin_mod

pytestmark = pytest.mark.functional

MIB = 1 << 20
SECRET = b'root:secret-hash:19000::::::\n'


@pytest.fixture
def secret(workdir):
    path = os.path.join(workdir, 'shadow')
    with open(path, 'wb') as f:
        f.write(SECRET.ljust(MIB, b'\0'))
    os.chmod(path, 0o600)
    return path


def _backed(workdir, secret):
    path = os.path.join(workdir, 'top.qcow2')
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw',
                    '-b', secret, path, str(MIB)], check=True)
    return path


def _server(workdir, path, image_format, **kwargs):
    return origin_mod.OriginServer(
        path, image_format, 'img-1',
        {'type': 'unix', 'path': os.path.join(workdir, 'origin.sock')},
        os.path.join(workdir, 'origin-run'), **kwargs)


def _connect(workdir):
    handle = nbd.NBD()
    handle.set_export_name('img-1')
    handle.connect_unix(os.path.join(workdir, 'origin.sock'))
    return handle


@pytest.mark.parametrize('image_format', ['qcow2', 'raw'])
def test_an_image_naming_a_backing_file_is_not_served(workdir, secret,
                                                      qemu_tools,
                                                      image_format):
    server = _server(workdir, _backed(workdir, secret), image_format)
    with pytest.raises(exception.UnsafeImage):
        server.start()
    assert server.daemon.pid is None
    assert not os.path.exists(os.path.join(workdir, 'origin.sock'))


def test_the_qcow2_node_never_follows_a_backing_file(workdir, secret,
                                                     qemu_tools,
                                                     monkeypatch):
    """Even with the inspection out of the way, the daemon opens the
    qcow2 with backing: null: the unallocated clusters read as zeros, not
    as the file the header names."""
    monkeypatch.setattr(image_check, 'check_file', lambda *a, **k: None)
    server = _server(workdir, _backed(workdir, secret), 'qcow2').start()
    try:
        data = _connect(workdir).pread(MIB, 0)
    finally:
        server.stop()
    assert data == bytes(MIB)


def test_clients_beyond_the_cap_wait(workdir, image, qemu_tools):
    server = _server(workdir, image['path'], 'raw',
                     max_connections=2).start()
    try:
        first, second = _connect(workdir), _connect(workdir)
        third = nbd.NBD()
        third.set_export_name('img-1')
        third.aio_connect_unix(os.path.join(workdir, 'origin.sock'))
        # Held unanswered while two are served...
        third.poll(500)
        assert third.aio_is_connecting()
        # ... and served once one leaves.
        first.shutdown()
        first = None
        deadline = time.monotonic() + 30
        while third.aio_is_connecting() and time.monotonic() < deadline:
            third.poll(100)
        assert third.aio_is_ready()
        with open(image['path'], 'rb') as f:
            expected = hashlib.sha256(f.read(MIB)).hexdigest()
        cookie = third.aio_pread(nbd.Buffer(MIB), 0)
        while not third.aio_command_completed(cookie):
            third.poll(100)
        assert hashlib.sha256(second.pread(MIB, 0)).hexdigest() == expected
    finally:
        server.stop()
