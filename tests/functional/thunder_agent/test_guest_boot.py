"""A real guest (QEMU, TCG) boots from a thunder snapshot."""

import os
import shutil
import uuid

import pytest

from thunder_agent import origin as origin_mod
from thunder_lab.guest import vm as guest
from thunder_lab.guest import image as guest_image

pytestmark = [pytest.mark.functional]


@pytest.fixture(scope='module')
def test_image():
    if not shutil.which('qemu-system-x86_64'):
        pytest.skip('qemu-system-x86_64 not installed (qemu-system-x86)')
    return guest_image.build()


def test_guest_boots_from_thunder_snapshots(test_image, agent_factory,
                                            workdir):
    image_dir = os.path.join(workdir, 'images')
    os.makedirs(image_dir)
    path = os.path.join(image_dir, 'guest.raw')
    shutil.copyfile(test_image['path'], path)
    image_id = str(uuid.uuid4())
    origin = origin_mod.OriginServer(
        path, 'raw', image_id,
        {'type': 'unix', 'path': os.path.join(workdir, 'o.sock')},
        os.path.join(workdir, 'orun')).start()
    try:
        agent = agent_factory()
        size = os.path.getsize(path)
        first = agent.client.prepare(image_id, origin.connection(), size,
                                     'raw', str(uuid.uuid4()))
        disk = {'path': first['data']['path'], 'format': 'qcow2'}
        result = guest.boot(disk)
        assert result.ok, result.failure
        assert result.boot_count == 1
        assert result.data_sha == test_image['data_sha256']
        fetched = origin.bytes_read()
        status = agent.client.get_status()['templates'][0]
        # A boot reads only part of its disk, and the template fetched it.
        assert 0 < status['bytes_fetched'] < size
        assert status['bytes_fetched'] <= fetched

        # The guest's writes live in its snapshot: a second boot counts 2.
        again = guest.boot(disk)
        assert again.ok and again.boot_count == 2

        # A second VM starts from the pristine image and costs the origin
        # nothing: its boot working set is already in the cache.
        second = agent.client.create_snapshot(image_id, str(uuid.uuid4()))
        before = origin.bytes_read()
        other = guest.boot({'path': second['data']['path'],
                            'format': 'qcow2'})
        assert other.ok and other.boot_count == 1
        assert other.data_sha == test_image['data_sha256']
        assert origin.bytes_read() - before == 0
        # The origin image itself never changed.
        assert guest_image.sha256_file(path) == test_image['image_sha256']
        print('guest boot: %.1fs, fetched %d of %d bytes'
              % (result.elapsed_s, status['bytes_fetched'], size))
    finally:
        origin.stop()
