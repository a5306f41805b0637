"""Relay tree origin -> A -> B with the kernel backend (inside the guest)."""

import hashlib
import os

import pytest

from tests.guest.conftest import MIB
from tests.guest.conftest import read_device
from tests.guest.conftest import record
from tests.guest.conftest import settle
from tests.guest.conftest import write_device

pytestmark = [pytest.mark.guest]


def _device(snap):
    return snap.connection_info['data']['device_path']


def test_b_snapshot_matches_image_and_origin_sends_it_once(agents,
                                                           make_image):
    image = make_image()
    a, b = agents('a'), agents('b')
    before = image.origin_bytes_read()
    ta = a.create_template(image, [image.export('10.99.1.1')])
    tb = b.create_template(image, [ta.export])
    snap_b = b.create_snapshot(tb)
    snap_a = a.create_snapshot(ta)
    tdir_a, tdir_b = (a.template_dir(image.image_id),
                      b.template_dir(image.image_id))
    try:
        info = snap_b.connection_info
        assert info['driver_volume_type'] == 'thunder'
        assert info['data']['backend'] == 'kernel'
        assert info['data']['device_path'].startswith('/dev/mapper/')
        # udev probes every new block device (blkid reads its first and
        # last blocks); below the cache those reads go upstream once.
        settle()
        setup = image.origin_bytes_read() - before
        setup_b = b.backend.template_stats(tb, tdir_b).bytes_fetched

        assert read_device(_device(snap_b), image.size) == image.sha256
        assert read_device(_device(snap_a), image.size) == image.sha256
        fetched_b = b.backend.template_stats(tb, tdir_b).bytes_fetched
        # B again: its cache has everything, nothing moves upstream.
        assert read_device(_device(snap_b), image.size) == image.sha256

        origin = image.origin_bytes_read() - before
        stats_a = a.backend.template_stats(ta, tdir_a)
        stats_b = b.backend.template_stats(tb, tdir_b)
        record('relay_origin_bytes', {
            'image_bytes': image.size, 'origin_bytes': origin,
            'origin_bytes_device_probes': setup,
            'origin_bytes_reads': origin - setup,
            'ratio': round(origin / image.size, 4),
            'ratio_reads': round((origin - setup) / image.size, 4),
            'a_fetched': stats_a.bytes_fetched,
            'a_served': stats_a.bytes_served,
            'b_fetched': stats_b.bytes_fetched,
            'b_fetched_device_probes': setup_b,
            'b_served': stats_b.bytes_served,
            'b_cached': stats_b.cached_bytes})
        # Reading both snapshots in full moved the image from the origin
        # once: every block once, at most 2 % fetched twice.
        assert image.size * 0.9 <= origin - setup <= image.size * 1.02
        assert origin <= image.size * 1.02 + 8 * MIB
        assert stats_b.bytes_fetched - setup_b <= image.size * 1.06
        assert stats_b.bytes_fetched == fetched_b
        # A served its own snapshot and B's fetches.
        assert stats_a.bytes_served >= 2 * image.size
        assert stats_b.cached_bytes >= image.size * 0.95
        assert stats_b.disk_bytes >= image.size
    finally:
        b.delete_snapshot(tb, snap_b)
        b.delete_template(tb)
        a.delete_snapshot(ta, snap_a)
        a.delete_template(ta)


def test_snapshot_writes_reach_neither_template_nor_other_snapshot(
        agents, make_image):
    image = make_image(8 * MIB)
    a, b = agents('a'), agents('b')
    ta = a.create_template(image, [image.export('10.99.1.1')])
    tb = b.create_template(image, [ta.export])
    snaps = [b.create_snapshot(tb), b.create_snapshot(tb)]
    try:
        patches = {0: os.urandom(MIB), 5 * MIB + 4096: os.urandom(64 * 1024),
                   image.size - MIB: os.urandom(MIB)}
        for offset, data in patches.items():
            write_device(_device(snaps[0]), offset, data)
        with open(image.path, 'rb') as f:
            expected = bytearray(f.read())
        for offset, data in patches.items():
            expected[offset:offset + len(data)] = data
        assert read_device(_device(snaps[0]), image.size) == \
            hashlib.sha256(expected).hexdigest()
        assert read_device(_device(snaps[1]), image.size) == image.sha256
        for agent, template in ((a, ta), (b, tb)):
            tpl = '/dev/mapper/%s-%s-tpl' % (
                agent.conf.kernel.device_prefix, template.image_id)
            assert read_device(tpl, image.size) == image.sha256
        with open(image.path, 'rb') as f:
            assert hashlib.sha256(f.read()).hexdigest() == image.sha256
    finally:
        for snap in snaps:
            b.delete_snapshot(tb, snap)
        b.delete_template(tb)
        a.delete_template(ta)
