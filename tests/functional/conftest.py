import os
import uuid

import pytest

from tests.conftest import make_image, sha256_file
from thunder_agent import origin as origin_mod
from thunder_lab.emulation import agent as agent_mod

IMAGE_SIZE = 48 << 20


@pytest.fixture
def image(workdir):
    images = os.path.join(workdir, 'images')
    os.makedirs(images)
    path = make_image(os.path.join(images, 'disk.raw'), IMAGE_SIZE)
    return {'path': path, 'size': IMAGE_SIZE, 'sha256': sha256_file(path),
            'id': str(uuid.uuid4()), 'dir': images}


@pytest.fixture
def origin(workdir, image, qemu_tools):
    server = origin_mod.OriginServer(
        image['path'], 'raw', image['id'],
        {'type': 'unix', 'path': os.path.join(workdir, 'origin.sock')},
        os.path.join(workdir, 'origin-run'))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope='session')
def deployment_ca(tmp_path_factory):
    """The deployment's CA (lab PKI, certtool): agents get credentials of
    their own from it, as in production."""
    from thunder_lab import pki
    return pki.CA.create(str(tmp_path_factory.mktemp('ca')))


@pytest.fixture
def agent_factory(rabbit, workdir, qemu_tools, deployment_ca):
    agents = []

    def make(name='agent', **kwargs):
        kwargs.setdefault('file_origin_dirs', [os.path.join(workdir,
                                                            'images')])
        # The origin fixture's socket is in workdir.
        options = {group: dict(values) for group, values in
                   (kwargs.pop('options', None) or {}).items()}
        options.setdefault('agent', {}).setdefault('origin_socket_dirs',
                                                   workdir)
        host = '%s-%s' % (name, uuid.uuid4().hex[:8])
        options.setdefault('tls', {}).setdefault(
            'certificates_dir', deployment_ca.issue(
                host, os.path.join(workdir, 'pki-' + name),
                ips=['127.0.0.1']))
        kwargs['options'] = options
        agent = agent_mod.AgentProcess(
            rabbit.transport_url, os.path.join(workdir, name),
            host=host, **kwargs)
        agents.append(agent)
        return agent.start()

    yield make
    for agent in agents:
        agent.teardown()


@pytest.fixture
def agent(agent_factory):
    return agent_factory()
