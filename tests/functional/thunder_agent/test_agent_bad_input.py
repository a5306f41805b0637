"""Every bad argument gets a typed error over RPC and changes nothing."""

import os
import uuid

import pytest

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
        (exception.PathNotAllowed, 'prepare_template',
         (other_image, {'driver_volume_type': 'file',
                        'data': {'path': '/etc/passwd'}}, 512, 'raw')),
        (exception.PathNotAllowed, 'prepare_template',
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
