import os
import shutil
import tempfile
import uuid

import pytest

from tests.unit.nova_thunder import nova_env

CONF = nova_env.load()

from nova import context as nova_context  # noqa: E402
from nova import objects  # noqa: E402

from nova_thunder import agent as agent_client  # noqa: E402
from nova_thunder import marking  # noqa: E402
from tests.functional.nova_thunder import iscsi  # noqa: E402
from thunder_lab.emulation import agent as agent_mod  # noqa: E402


@pytest.fixture(scope='module')
def shared_agent(rabbit, qemu_tools_module):
    """One real agent per test module (starting one takes seconds).

    Its origins are where an operator would put them: image files named
    by image id in a store (``agent.store``, Glance's file store on a
    devstack), origin servers' sockets in ``agent.sockets``.
    """
    workdir = tempfile.mkdtemp(prefix='nt-', dir='/tmp')
    store = os.path.join(workdir, 'images')
    sockets = os.path.join(workdir, 'sockets')
    for d in (store, sockets):
        os.makedirs(d, mode=0o755)
    agent = agent_mod.AgentProcess(
        rabbit.transport_url, os.path.join(workdir, 'agent'),
        host='nova-thunder-%s' % uuid.uuid4().hex[:8],
        file_origin_dirs=[store],
        options={'agent': {'origin_socket_dirs': sockets}})
    agent.store = store
    agent.sockets = sockets
    agent.start()
    yield agent
    agent.teardown()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope='module')
def qemu_tools_module():
    if not all(shutil.which(t) for t in ('qemu-storage-daemon', 'qemu-img',
                                         'qemu-nbd')):
        pytest.skip('qemu-utils not installed: run tools/bootstrap.sh')


@pytest.fixture
def agent(shared_agent):
    """The module's agent, emptied after each test."""
    yield shared_agent
    client = shared_agent.client
    for snap in client.get_status()['snapshots']:
        client.delete_snapshot(snap['instance_id'])
    client.collect_garbage(max_idle=0)


@pytest.fixture
def flags():
    overridden = []

    def set_flags(group='thunder', **kwargs):
        for name, value in kwargs.items():
            CONF.set_override(name, value, group=group)
            overridden.append((name, group))

    yield set_flags
    for name, group in overridden:
        CONF.clear_override(name, group=group)


@pytest.fixture
def thunder(rabbit, agent, flags):
    """nova-compute's [thunder] options pointing at a real agent, and
    its Glance images read from the agent's store."""
    flags(transport_url=rabbit.transport_url, agent_host=agent.host,
          timeout=120, agent_state_path=agent.state_path,
          agent_run_path=agent.run_path,
          image_origin='file://%s/{image_id}' % agent.store)
    agent_client.reset_client()
    marking._volume_types.forget()
    yield agent
    agent_client.reset_client()


@pytest.fixture
def wired():
    from nova_thunder import wiring
    wiring.apply()
    yield
    wiring.restore()


def store(agent, path, image_id):
    """Put the image file *path* into the agent's store as Glance's file
    store does: named by the image id. Returns its path there."""
    stored = os.path.join(agent.store, image_id)
    try:
        os.link(path, stored)
    except OSError:
        shutil.copyfile(path, stored)
    return stored


@pytest.fixture
def stored_image(thunder, image):
    """The test image, in the agent's store."""
    path = store(thunder, image['path'], image['id'])
    yield dict(image, stored=path)
    os.unlink(path)


@pytest.fixture
def context():
    return nova_context.RequestContext('user', 'project', is_admin=False)


@pytest.fixture
def instance():
    return objects.Instance(uuid=str(uuid.uuid4()), host=CONF.host,
                            availability_zone='nova',
                            root_device_name='/dev/vda')


@pytest.fixture
def iscsi_volume(workdir, image):
    """A 1 GiB 'Cinder volume' holding the test image, as a LUN of a tgt
    target (sparse file: Cinder sizes are whole GiB)."""
    volume_id = str(uuid.uuid4())
    lun = os.path.join(workdir, 'volume-%s.lun' % volume_id[:8])
    with open(image['path'], 'rb') as src, open(lun, 'wb') as dst:
        dst.write(src.read())
        dst.truncate(1 << 30)
    target = iscsi.IscsiTarget(
        lun, 'iqn.2010-10.org.openstack:volume-' + volume_id)
    try:
        target.start()
    except iscsi.TargetUnavailable as e:
        pytest.skip('no iSCSI target here: %s' % e)
    yield {'id': volume_id, 'target': target}
    target.stop()


def snapshots(agent):
    return {s['instance_id']: s for s in agent.client.get_status()[
        'snapshots']}


def templates(agent):
    return {t['image_id']: t for t in agent.client.get_status()[
        'templates']}


def overlay_exists(connection_info):
    return os.path.exists(connection_info['data']['path'])
