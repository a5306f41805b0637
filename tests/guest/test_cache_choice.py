"""Which cache makes each block cross each link once? (guest)

The same relay (origin -> A -> B, both snapshots read in full) with each
cache candidate; the bytes read at the origin's backing device are
recorded in measurements.json and the configured default must be the
candidate that reads the image from the origin once.
"""

import pytest

from thunder_agent import conf as agent_conf
from tests.guest.conftest import MIB
from tests.guest.conftest import read_device
from tests.guest.conftest import record
from tests.guest.conftest import settle

pytestmark = [pytest.mark.guest, pytest.mark.slow]

CANDIDATES = {
    'bcache': {'cache_type': 'bcache'},
    'dm-cache smq writethrough': {'cache_type': 'dm-cache',
                                  'dm_cache_mode': 'writethrough'},
    'dm-cache smq passthrough': {'cache_type': 'dm-cache',
                                 'dm_cache_mode': 'passthrough'},
}


def _origin_bytes(agents, image, settings):
    """Origin bytes while A's and B's snapshots are read in full (after
    the devices were set up and probed by udev)."""
    a, b = agents('a', **settings), agents('b', **settings)
    ta = a.create_template(image, [image.export('10.99.1.1')])
    tb = b.create_template(image, [ta.export])
    snap_b, snap_a = b.create_snapshot(tb), a.create_snapshot(ta)
    try:
        settle()
        before = image.origin_bytes_read()
        for snap in (snap_b, snap_a):
            assert read_device(snap.connection_info['data']['device_path'],
                               image.size) == image.sha256
        return image.origin_bytes_read() - before
    finally:
        b.delete_snapshot(tb, snap_b)
        b.delete_template(tb)
        a.delete_snapshot(ta, snap_a)
        a.delete_template(ta)


def test_default_cache_reads_the_image_from_the_origin_once(agents,
                                                            make_image):
    image = make_image(8 * MIB)
    measured = {name: _origin_bytes(agents, image, settings)
                for name, settings in CANDIDATES.items()}
    record('cache_choice_origin_bytes', dict(
        measured, image_bytes=image.size,
        ratios={name: round(value / image.size, 3)
                for name, value in measured.items()}))
    default = [opt.default for opt in agent_conf.kernel_opts
               if opt.name == 'cache_type'][0]
    assert default == 'bcache'
    assert image.size * 0.9 <= measured['bcache'] <= image.size * 1.05
    assert measured['bcache'] == min(measured.values())
