"""StateStore: atomic 0600 records, and loading that never deletes."""

import errno
import json
import os
import subprocess
import uuid

import pytest

from thunder_agent import records
from thunder_agent import store as store_mod


def template(image_id=None, state=records.READY):
    image_id = image_id or str(uuid.uuid4())
    return records.Template(
        image_id=image_id, origin=records.Endpoint(
            'nbd', {'host': '192.0.2.1', 'port': 10809, 'export': image_id}),
        size=1 << 20, image_format='raw', driver='qemu', state=state)


@pytest.fixture
def store(tmp_path):
    s = store_mod.StateStore(str(tmp_path / 'state'))
    s.prepare()
    return s


def test_round_trip_and_mode(store):
    t = template()
    t.sources = [records.Source('node-b', records.Endpoint(
        'nbd', {'host': '192.0.2.2', 'port': 10811, 'export': t.image_id}))]
    t.export = records.Export('qemu', {'host': '192.0.2.3', 'port': 10812},
                              records.RelayAddress('192.0.2.3', 10812,
                                                   t.image_id))
    t.relay = records.RelayState('node-b', 1, ['node-c'])
    store.save_template(t)
    path = os.path.join(store.template_dir(t.image_id), 'record.json')
    assert os.stat(path).st_mode & 0o777 == 0o600
    loaded = store.load()
    assert loaded.templates == {t.image_id: t}
    assert loaded.quarantined == []
    assert not any(n.endswith('.tmp') for n in os.listdir(
        store.template_dir(t.image_id)))


def test_bad_records_move_to_lost_and_found(store):
    good, truncated, renamed, foreign = (template() for _ in range(4))
    for t in (good, truncated, renamed, foreign):
        store.save_template(t)
    with open(os.path.join(store.template_dir(truncated.image_id),
                           'record.json'), 'w') as f:
        f.write('{"version": 2, "image_')
    # A record that names another template than its directory.
    os.rename(store.template_dir(renamed.image_id),
              store.template_dir(str(uuid.uuid4())))
    # A directory whose name is not an image id at all.
    os.rename(store.template_dir(foreign.image_id),
              os.path.join(store.templates_dir, 'not-a-uuid'))
    empty = os.path.join(store.snapshots_dir, str(uuid.uuid4()))
    os.makedirs(empty)
    with open(os.path.join(empty, 'overlay.qcow2'), 'wb') as f:
        f.write(b'guest data')
    loaded = store.load()
    assert list(loaded.templates) == [good.image_id]
    assert len(loaded.quarantined) == 4
    lost = os.listdir(store.lost_found_dir)
    assert sorted(n.split('-')[0] for n in lost) == [
        'snapshot', 'template', 'template', 'template']
    # Everything was moved, nothing removed.
    snapshot_dir = [n for n in lost if n.startswith('snapshot-')][0]
    with open(os.path.join(store.lost_found_dir, snapshot_dir,
                           'overlay.qcow2'), 'rb') as f:
        assert f.read() == b'guest data'
    assert sorted(os.listdir(store.templates_dir)) == [good.image_id]


def test_interrupted_delete_is_finished_not_quarantined(store):
    t = template()
    store.save_template(t)
    doomed = os.path.join(store.templates_dir, '.%s.deleted' % t.image_id)
    os.rename(store.template_dir(t.image_id), doomed)
    loaded = store.load()
    assert loaded.templates == {} and loaded.quarantined == []
    assert not os.path.exists(doomed)


def test_remove_deletes_only_what_it_names(store):
    a, b = template(), template()
    store.save_template(a)
    store.save_template(b)
    store.remove_template(a.image_id)
    assert sorted(os.listdir(store.templates_dir)) == [b.image_id]


def test_version_1_records_are_migrated(store):
    image_id = str(uuid.uuid4())
    old = {
        'image_id': image_id, 'backend': 'qemu', 'size': 1 << 20,
        'image_format': 'raw', 'created_at': 1.0, 'last_used_at': 2.0,
        'origin': {'driver_volume_type': 'nbd',
                   'data': {'host': '192.0.2.1', 'port': 10809,
                            'export': image_id}},
        'sources': [{'driver_volume_type': 'nbd',
                     'data': {'host': '192.0.2.2', 'port': 10811,
                              'export': image_id}}],
        'export': {'driver': 'nbd', 'host': '192.0.2.9', 'port': 10813,
                   'export': image_id, 'format': 'raw'},
        'children': ['node-c'], 'relay': {'parent': 'node-b', 'failures': 0},
        'counters': {'hit_base': 5}}
    os.makedirs(store.template_dir(image_id))
    with open(os.path.join(store.template_dir(image_id), 'record.json'),
              'w') as f:
        json.dump(old, f)
    t = store.load().templates[image_id]
    assert t.state == records.READY and t.driver == 'qemu'
    assert t.source.node == 'node-b'
    assert t.export.relay == records.RelayAddress('192.0.2.9', 10813,
                                                  image_id)
    assert t.relay.children == ['node-c']
    assert t.driver_state == {'hit_base': 5}


# -- a full file system ------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs: a real file system that fills in a moment."""
    mount = tmp_path / 'small'
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root')
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=256k,mode=0700',
                           'thunder-test', str(mount)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip('cannot mount a tmpfs: %s' % proc.stderr.strip())
    try:
        yield str(mount)
    finally:
        subprocess.run(['umount', '-l', str(mount)], check=True)


def _fill(path):
    """Write into *path* until the file system is full."""
    chunk = b'\xff' * 4096
    with open(path, 'wb', buffering=0) as f:
        with pytest.raises(OSError) as e:
            while True:
                f.write(chunk)
    assert e.value.errno == errno.ENOSPC


def test_failed_save_keeps_the_old_record_and_no_temp_file(small_fs):
    store = store_mod.StateStore(os.path.join(small_fs, 'state'))
    store.prepare()
    t = template()
    store.save_template(t)
    path = os.path.join(store.template_dir(t.image_id), 'record.json')
    with open(path, 'rb') as f:
        old = f.read()
    _fill(os.path.join(small_fs, 'filler'))
    # A new record that needs more room than the old one (every write
    # of it needs a new block on a full disk).
    t.relay = records.RelayState('node-b', 0, ['node-%d' % i
                                               for i in range(200)])
    with pytest.raises(OSError) as e:
        store.save_template(t)
    assert e.value.errno == errno.ENOSPC
    with open(path, 'rb') as f:
        assert f.read() == old
    assert os.listdir(store.template_dir(t.image_id)) == ['record.json']
    loaded = store.load()
    assert loaded.templates[t.image_id].relay is None
    assert loaded.quarantined == []
    # Once there is room again, the same save goes through.
    os.unlink(os.path.join(small_fs, 'filler'))
    store.save_template(t)
    assert store.load().templates[t.image_id].relay.children[-1] == (
        'node-199')


def test_loading_on_a_full_file_system_quarantines_without_failing(
        small_fs):
    store = store_mod.StateStore(os.path.join(small_fs, 'state'))
    store.prepare()
    good, bad = template(), template()
    store.save_template(good)
    store.save_template(bad)
    with open(os.path.join(store.template_dir(bad.image_id),
                           'record.json'), 'w') as f:
        f.write('{"trunc')
    os.makedirs(store.lost_found_dir)
    _fill(os.path.join(small_fs, 'filler'))
    loaded = store.load()
    assert list(loaded.templates) == [good.image_id]
    (moved, reason), = loaded.quarantined
    assert 'unreadable record.json' in reason
    # Moved (a rename needs no space), never deleted.
    assert os.path.exists(os.path.join(moved, 'record.json'))
