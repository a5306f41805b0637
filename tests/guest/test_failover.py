"""A parent dies while a child reads: the reads wait, then resume after
re-parenting, with the right data and no I/O error (guest)."""

import threading
import time

import pytest

from tests.guest.conftest import MIB
from tests.guest.conftest import read_device
from tests.guest.conftest import record

pytestmark = [pytest.mark.guest]


def test_reads_block_on_parent_loss_and_resume_after_reparent(
        agents, make_image, guest):
    image = make_image(16 * MIB)
    a, b = agents('a'), agents('b')
    ta = a.create_template(image, relay=True)
    tb = b.create_template(image, [b.parent_source(a, ta)])
    snap = b.create_snapshot(tb)
    tdir_b = b.template_dir(image.image_id)
    # B's re-attachment to the origin (B's own address of it).
    origin = b.origin(image)
    progress = {'offset': 0, 'paused_at': None}
    paused, go = threading.Event(), threading.Event()
    outcome = {}

    def on_chunk(offset):
        progress['offset'] = offset
        if progress['paused_at'] is None and offset >= image.size // 4:
            progress['paused_at'] = offset
            paused.set()
            go.wait()

    def reader():
        try:
            outcome['sha256'] = read_device(
                snap.connection_info['data']['device_path'], image.size,
                on_chunk=on_chunk)
        except Exception as e:          # an I/O error fails the test
            outcome['error'] = e

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        assert paused.wait(120)
        guest['a'].kill_tgtd()
        go.set()
        killed = time.monotonic()
        # Past the source's recovery timeout: the iSCSI layer has given
        # the I/O up and dm-multipath holds it.
        time.sleep(b.conf.kernel.source_recovery_timeout + 5)
        assert thread.is_alive(), outcome
        assert 'error' not in outcome
        stalled_at = progress['offset']
        time.sleep(2)
        assert progress['offset'] == stalled_at
        # The only path has failed; dm-multipath holds the I/O.
        paths = b.driver.source_paths(tb, tdir_b)
        assert [active for _dev, active in paths['paths']] == [False]

        b.set_sources(tb, [origin])
        reparented = time.monotonic()
        thread.join(180)
        assert not thread.is_alive()
        assert 'error' not in outcome, outcome
        assert outcome['sha256'] == image.sha256
        paths = b.driver.source_paths(tb, tdir_b)
        assert [active for _dev, active in paths['paths']] == [True]
        # A's tgtd comes back empty: its template is unhealthy until the
        # agent re-exports it, under the same address and credentials.
        guest['a'].restart_tgtd()
        tdir_a = a.template_dir(image.image_id)
        assert not a.driver.is_healthy(ta, tdir_a)
        build = a.driver.ensure_template(ta, tdir_a)
        assert build.export == ta.export
        assert a.driver.is_healthy(ta, tdir_a)
        assert b.driver.source_ready(b.parent_source(a, ta))
        record('failover', {
            'paused_at_bytes': progress['paused_at'],
            'stalled_at_bytes': stalled_at,
            'blocked_seconds_before_reparent': round(
                reparented - killed, 1),
            'finished_seconds_after_reparent': round(
                time.monotonic() - reparented, 1)})
    finally:
        go.set()
        if thread.is_alive() and tb.sources != [origin]:
            # Unblock the reader whatever failed above.
            b.set_sources(tb, [origin])
        thread.join(180)
        b.delete_snapshot(tb, snap)
        b.delete_template(tb)
        # A's exports died with its tgtd; a fresh tgtd has none.
        guest['a'].restart_tgtd()
        a.delete_template(ta)
