import shutil
import tempfile

from oslo_service import backend
import pytest

# As thunder-agent and thunder-coordinator do before anything else: the
# looping calls of the services run in threads, not eventlet.
backend.init_backend(backend.BackendType.THREADING)


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
    from thunder_lab.emulation import rabbitmq
    try:
        broker = rabbitmq.RabbitMQ().start()
    except rabbitmq.RabbitMQUnavailable as e:
        pytest.skip('RabbitMQ cannot run here: %s' % e)
    yield broker
    broker.stop()


from thunder_lab.emulation.images import make_image, sha256_file  # noqa


@pytest.fixture
def qemu_tools():
    if not _have('qemu-storage-daemon', 'qemu-img', 'qemu-nbd', 'nbdcopy'):
        pytest.skip('qemu-utils/libnbd-bin not installed: run '
                    'tools/bootstrap.sh')
