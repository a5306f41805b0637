import hashlib
import os
import shutil
import subprocess
import tempfile

import pytest


def _have(*tools):
    return all(shutil.which(t) for t in tools)


@pytest.fixture
def workdir():
    # Short paths: unix sockets live below it.
    path = tempfile.mkdtemp(prefix='th-', dir='/tmp')
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope='session')
def rabbit():
    from thunder_agent.testing import rabbitmq
    try:
        broker = rabbitmq.RabbitMQ().start()
    except rabbitmq.RabbitMQUnavailable as e:
        pytest.skip('RabbitMQ cannot run here: %s' % e)
    yield broker
    broker.stop()


def make_image(path, size, seed=b'thunder'):
    """A deterministic image: pseudo-random blocks with zero holes."""
    block = 1 << 20
    with open(path, 'wb') as f:
        for i in range(size // block):
            if i % 4 == 3:
                f.write(b'\0' * block)
            else:
                chunk = hashlib.sha256(seed + b'%d' % i).digest()
                f.write(chunk * (block // len(chunk)))
    return path


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def qemu_tools():
    if not _have('qemu-storage-daemon', 'qemu-img', 'qemu-nbd', 'nbdcopy'):
        pytest.skip('qemu-utils/libnbd-bin not installed: run '
                    'tools/bootstrap.sh')
