"""Prefetch planning, pacing, yielding and the request pump.

The NBD handle here is a recording stand-in with libnbd's aio interface;
the real server is exercised in
tests/functional/thunder_agent/test_prefetch.py. The block-device target
reads a real file (O_DIRECT where the file system takes it);
tests/guest/test_prefetch.py reads a kernel template with it.
"""

import collections

import pytest

from thunder_agent import exception
from thunder_agent import prefetch
from thunder_agent import trace as trace_mod

KIB = 1024
MIB = 1 << 20
SHA = '0' * 64


def make_trace(reads, size=8 * MIB):
    return trace_mod.Trace(size, SHA, [trace_mod.Read(t, o, n)
                                       for t, o, n in reads])


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


class FakeHandle:
    """libnbd's aio calls; completes requests in order, *per_poll* at a
    time, optionally advancing a clock."""

    def __init__(self, size=8 * MIB, can_cache=True, per_poll=1,
                 fail_at=None, on_poll=None):
        self.size = size
        self._can_cache = can_cache
        self.per_poll = per_poll
        self.fail_at = fail_at
        self.on_poll = on_poll
        self.issued = []
        self.max_in_flight = 0
        self.queue = collections.deque()
        self.completed = collections.deque()
        self.cookies = 0
        self.closed = False

    def can_cache(self):
        return self._can_cache

    def get_size(self):
        return self.size

    def _issue(self, kind, length, offset):
        self.cookies += 1
        self.issued.append((kind, offset, length))
        self.queue.append(self.cookies)
        self.max_in_flight = max(self.max_in_flight,
                                 len(self.queue) + len(self.completed))
        return self.cookies

    def aio_cache(self, length, offset):
        return self._issue('cache', length, offset)

    def aio_pread(self, buf, offset):
        return self._issue('read', len(buf), offset)

    def poll(self, timeout):
        if self.on_poll:
            self.on_poll(self)
        for _ in range(self.per_poll):
            if self.queue:
                self.completed.append(self.queue.popleft())
        return 1

    def aio_peek_command_completed(self):
        return self.completed[0] if self.completed else 0

    def aio_command_completed(self, cookie):
        assert self.completed.popleft() == cookie
        if self.fail_at is not None and cookie == self.fail_at:
            import nbd
            raise nbd.Error('EIO: injected', 5)
        return True

    def shutdown(self):
        self.closed = True


ADDRESS = prefetch.NbdAddress(socket='/run/x.nbd', export='img')


# -- addresses --

def test_nbd_address():
    unix = prefetch.NbdAddress.from_export(
        {'driver': 'nbd', 'socket': '/run/a.nbd', 'export': 'e',
         'format': 'raw'})
    assert (unix.socket, unix.export) == ('/run/a.nbd', 'e')
    tcp = prefetch.NbdAddress.from_export({'host': '198.18.0.2',
                                           'port': 10809, 'export': 'e'})
    assert str(tcp) == 'nbd://198.18.0.2:10809/e'
    for bad in (dict(), {'driver': 'iscsi', 'socket': '/x'},
                {'host': 'h', 'port': 0}, {'host': 'h', 'port': '80'}, 'x'):
        with pytest.raises(exception.InvalidInput):
            prefetch.NbdAddress.from_export(bad)
    with pytest.raises(exception.InvalidInput):
        prefetch.NbdAddress(socket='/x', host='h', port=1)


# -- planning --

def test_plan_trace_follows_trace_order_and_fetches_each_block_once():
    g = 64 * KIB
    trace = make_trace([
        (0.1, 5 * g + 100, 10),          # block 5
        (0.2, 0, 2 * g),                 # blocks 0, 1
        (0.3, 5 * g, 4 * g),             # 5 again, then 6, 7, 8
        (0.4, g, 10),                    # block 1 again: nothing
        (0.5, 2 * g - 1, 2),             # blocks 1 (known) and 2
    ])
    assert prefetch.plan_trace(trace, g, max_request=2 * g) == [
        (5 * g, g), (0, 2 * g), (6 * g, 2 * g), (8 * g, g), (2 * g, g)]
    # Larger requests merge contiguous new blocks of one read.
    assert prefetch.plan_trace(trace, g, max_request=MIB)[2] == (6 * g,
                                                                 3 * g)


def test_plan_trace_clips_the_last_block_at_the_image_end():
    size = 100 * KIB
    trace = make_trace([(0.1, 99 * KIB, KIB)], size=size)
    assert prefetch.plan_trace(trace, 64 * KIB) == [(64 * KIB, 36 * KIB)]
    # Reads past the end ask for nothing there (no empty requests).
    trace = make_trace([(0.1, 99 * KIB, 200 * KIB), (0.2, 150 * KIB, 10)],
                       size=size)
    assert prefetch.plan_trace(trace, 16 * KIB) == [(96 * KIB, 4 * KIB)]


def test_plan_trace_covers_the_working_set_exactly():
    trace = make_trace([(0.01 * i, (i * 7919 * 4096) % (8 * MIB - 8192),
                         4096 + i * 512) for i in range(200)])
    requests = prefetch.plan_trace(trace, 64 * KIB)
    assert sum(n for _, n in requests) == trace.unique_bytes(64 * KIB)
    covered = trace_mod.merge_extents(requests)
    assert covered == trace.extents(64 * KIB)


def test_plan_full_and_subtract():
    assert prefetch.plan_full(10 * MIB, 4 * MIB) == [
        (0, 4 * MIB), (4 * MIB, 4 * MIB), (8 * MIB, 2 * MIB)]
    assert prefetch._subtract([(0, 100), (100, 100)],
                              [(50, 20), (90, 30), (300, 5)]) == [
        (0, 50), (70, 20), (120, 80)]
    assert prefetch._subtract([(0, 100)], [(0, 100)]) == []


# -- pacing and yielding --

def test_pacer_keeps_the_average_rate():
    clock = FakeClock()
    pacer = prefetch.Pacer(rate=10 * MIB, burst=MIB, clock=clock)
    start = clock.now
    for _ in range(50):
        clock.sleep(pacer.reserve(MIB))
    # 50 MiB at 10 MiB/s, the first MiB free (the burst).
    assert clock.now - start == pytest.approx(4.9)
    # Idle time refills the bucket up to the burst only.
    clock.sleep(60)
    assert pacer.reserve(MIB) == 0
    assert pacer.reserve(MIB) == pytest.approx(0.1)


def test_pacer_refuses_a_bad_rate():
    for rate in (0, -1, True, 'fast'):
        with pytest.raises(exception.InvalidInput):
            prefetch.Pacer(rate)


def test_foreground_gate():
    clock = FakeClock()
    served = [0]
    gate = prefetch.ForegroundGate(lambda: served[0], threshold=MIB,
                                   window=1.0, clock=clock)
    assert not gate.busy()
    for _ in range(5):
        clock.sleep(0.25)
        served[0] += MIB           # 4 MiB/s of foreground reads
        assert gate.busy()
    for _ in range(4):
        clock.sleep(0.25)          # reads stopped
        gate.busy()
    clock.sleep(0.25)
    assert not gate.busy()
    assert gate.rate() == 0


# -- engines --

def test_trace_prefetch_issues_the_plan_in_order_with_bounded_concurrency():
    trace = make_trace([(0.01 * i, i * 300 * KIB, 200 * KIB)
                        for i in range(20)])
    handle = FakeHandle(per_poll=1)
    updates = []
    engine = prefetch.TracePrefetcher(
        ADDRESS, trace, concurrency=3, progress=updates.append,
        connect=lambda: handle)
    status = engine.run()
    assert [(o, n) for _, o, n in handle.issued] == engine.requests
    assert {kind for kind, _, _ in handle.issued} == {'cache'}
    assert handle.max_in_flight == 3
    assert status['state'] == 'done' and status['method'] == 'cache'
    assert status['bytes_done'] == status['bytes_total'] == \
        trace.unique_bytes(64 * KIB)
    assert status['requests_done'] == len(engine.requests)
    done = [u['bytes_done'] for u in updates]
    assert done == sorted(done) and done[-1] == status['bytes_total']
    assert updates[0]['state'] == 'running'
    assert handle.closed


def test_trace_prefetch_reads_when_the_server_cannot_cache():
    trace = make_trace([(0.1, 0, 100 * KIB)])
    handle = FakeHandle(can_cache=False)
    status = prefetch.TracePrefetcher(ADDRESS, trace,
                                      connect=lambda: handle).run()
    assert status['method'] == 'read'
    assert handle.issued == [('read', 0, 128 * KIB)]
    # Asked for cache explicitly: a clear failure instead.
    engine = prefetch.TracePrefetcher(ADDRESS, trace, method='cache',
                                      connect=lambda: FakeHandle(
                                          can_cache=False))
    assert engine.run()['state'] == 'failed'
    with pytest.raises(exception.PrefetchFailed):
        engine.result()


def test_trace_prefetch_cancel_stops_issuing():
    trace = make_trace([(0.01 * i, i * 64 * KIB, 64 * KIB)
                        for i in range(100)])
    engine = None

    def cancel_after_ten(handle):
        if len(handle.issued) >= 10:
            engine.cancel()

    handle = FakeHandle(on_poll=cancel_after_ten)
    engine = prefetch.TracePrefetcher(ADDRESS, trace, concurrency=2,
                                      connect=lambda: handle)
    status = engine.run()
    assert status['state'] == 'cancelled'
    assert len(handle.issued) == 10
    # What was in flight finished and is counted.
    assert status['requests_done'] == 10
    assert status['bytes_done'] == 10 * 64 * KIB < status['bytes_total']


def test_trace_prefetch_failure_is_reported():
    trace = make_trace([(0.01 * i, i * 64 * KIB, 64 * KIB)
                        for i in range(10)])
    handle = FakeHandle(fail_at=4)
    engine = prefetch.TracePrefetcher(ADDRESS, trace,
                                      connect=lambda: handle)
    status = engine.run()
    assert status['state'] == 'failed'
    assert 'injected' in status['error']
    assert status['requests_done'] == 3


def test_trace_prefetch_refuses_a_smaller_export():
    trace = make_trace([(0.1, 0, 512)], size=8 * MIB)
    engine = prefetch.TracePrefetcher(
        ADDRESS, trace, connect=lambda: FakeHandle(size=4 * MIB))
    assert engine.run()['state'] == 'failed'
    assert 'export has' in engine.status()['error']


def test_trace_prefetch_in_a_thread():
    trace = make_trace([(0.1, 0, MIB)])
    engine = prefetch.TracePrefetcher(ADDRESS, trace,
                                      connect=lambda: FakeHandle())
    assert engine.start() is engine
    assert engine.wait(10)['state'] == 'done'
    assert engine.result()['bytes_done'] == MIB


def test_full_prefetch_paces_at_the_configured_rate():
    clock = FakeClock()
    handle = FakeHandle(size=64 * MIB, per_poll=2)
    engine = prefetch.FullPrefetcher(
        ADDRESS, 64 * MIB, rate=16 * MIB, chunk=4 * MIB, concurrency=2,
        clock=clock, sleep=clock.sleep, connect=lambda: handle)
    start = clock.now
    status = engine.run()
    assert status['state'] == 'done'
    assert [(o, n) for _, o, n in handle.issued] == prefetch.plan_full(
        64 * MIB, 4 * MIB)
    assert status['bytes_done'] == 64 * MIB
    # 64 MiB at 16 MiB/s with one chunk of burst.
    assert clock.now - start == pytest.approx(60 / 16)
    assert status['rate_bps'] == 8 * 16 * MIB


def test_full_prefetch_skips_ranges_already_cached():
    handle = FakeHandle(size=16 * MIB)
    engine = prefetch.FullPrefetcher(
        ADDRESS, 16 * MIB, rate=1e12, chunk=4 * MIB,
        skip=[(0, 6 * MIB), (12 * MIB, 4 * MIB)], connect=lambda: handle)
    status = engine.run()
    assert [(o, n) for _, o, n in handle.issued] == [(6 * MIB, 2 * MIB),
                                                     (8 * MIB, 4 * MIB)]
    assert status['bytes_total'] == status['bytes_done'] == 6 * MIB


def test_full_prefetch_yields_to_foreground_reads():
    clock = FakeClock()
    served = [0]
    busy_until = clock.now + 3.0

    def foreground():
        # A VM reads at 8 MiB/s for the first three seconds.
        if clock.now < busy_until:
            served[0] = int((clock.now - 100.0) * 8 * MIB)
        return served[0]

    states = []
    handle = FakeHandle(size=8 * MIB)
    engine = prefetch.FullPrefetcher(
        ADDRESS, 8 * MIB, rate=1e12, chunk=4 * MIB, foreground=foreground,
        yield_threshold=MIB, window=1.0, pause=0.5, clock=clock,
        sleep=clock.sleep, connect=lambda: handle,
        progress=lambda s: states.append(s['state']))
    clock.sleep(0.5)
    status = engine.run()
    assert status['state'] == 'done'
    assert 'yielding' in states
    # Nothing was issued while the foreground was busy.
    assert status['yielded_s'] >= 2.5
    assert clock.now >= busy_until
    assert status['bytes_done'] == 8 * MIB


def test_full_prefetch_cancel_while_yielding():
    engine = None
    handle = FakeHandle(size=8 * MIB)
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        engine.cancel()

    calls = iter(range(1, 1000))
    engine = prefetch.FullPrefetcher(
        ADDRESS, 8 * MIB, rate=1e12, foreground=lambda: next(calls) * 1e12,
        yield_threshold=0, sleep=sleep, connect=lambda: handle)
    status = engine.run()
    assert status['state'] == 'cancelled'
    assert sleeps == [0.5]
    assert handle.issued == []


def test_full_prefetch_over_the_cap_is_clamped_to_it():
    """A request for "as fast as possible" (the agent asks 2**20 MiB/s
    when no rate is given) runs at [prefetch] max_rate_mb."""
    clock = FakeClock()
    handle = FakeHandle(size=64 * MIB, per_poll=2)
    engine = prefetch.FullPrefetcher(
        ADDRESS, 64 * MIB, rate=(1 << 20) * MIB, chunk=4 * MIB,
        concurrency=2, clock=clock, sleep=clock.sleep,
        connect=lambda: handle, max_rate=16 * MIB)
    start = clock.now
    status = engine.run()
    assert status['state'] == 'done'
    assert status['bytes_done'] == 64 * MIB
    # Paced at the cap: 64 MiB at 16 MiB/s with one chunk of burst.
    assert clock.now - start == pytest.approx(60 / 16)
    assert status['rate_bps'] == 8 * 16 * MIB
    assert status['clamped'] is True


def test_full_prefetch_under_the_cap_keeps_its_rate():
    clock = FakeClock()
    handle = FakeHandle(size=16 * MIB, per_poll=2)
    engine = prefetch.FullPrefetcher(
        ADDRESS, 16 * MIB, rate=4 * MIB, chunk=4 * MIB, clock=clock,
        sleep=clock.sleep, connect=lambda: handle, max_rate=16 * MIB)
    start = clock.now
    status = engine.run()
    assert clock.now - start == pytest.approx(12 / 4)
    assert status['rate_bps'] == 8 * 4 * MIB
    assert status['clamped'] is False


@pytest.mark.parametrize('kwargs', [
    {'concurrency': 0}, {'concurrency': 65}, {'method': 'magic'},
    {'size': 0}, {'rate': 0}, {'pause': 0}, {'max_rate': 0},
    {'max_rate': -1}, {'max_rate': True}, {'max_rate': '10'},
])
def test_full_prefetch_refuses_bad_arguments(kwargs):
    args = dict(size=MIB, rate=MIB)
    args.update(kwargs)
    with pytest.raises(exception.InvalidInput):
        prefetch.FullPrefetcher(ADDRESS, **args)


def test_status_is_a_copy():
    engine = prefetch.TracePrefetcher(ADDRESS, make_trace([(0.1, 0, 1)]),
                                      connect=lambda: FakeHandle())
    status = engine.status()
    status['bytes_done'] = 999
    assert engine.status()['bytes_done'] == 0
    assert engine.status()['state'] == 'pending'


# -- the block-device target (kernel driver) --

class RecordingReads:
    """Wraps BlockDeviceHandle._preadv: every read, its bytes checked
    against the file, and the reads in flight at once."""

    def __init__(self, monkeypatch, content, fail_at=None):
        import threading
        self.content = content
        self.fail_at = fail_at
        self.reads = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        real = prefetch.BlockDeviceHandle._preadv

        def preadv(handle, view, offset):
            with self.lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight,
                                         self.in_flight)
            try:
                if offset == self.fail_at:
                    import errno
                    raise OSError(errno.EIO, 'Input/output error')
                n = real(handle, view, offset)
                assert bytes(view[:n]) == content[offset:offset + n]
                with self.lock:
                    self.reads.append((offset, n))
                return n
            finally:
                with self.lock:
                    self.in_flight -= 1

        monkeypatch.setattr(prefetch.BlockDeviceHandle, '_preadv', preadv)


@pytest.fixture
def image_file(tmp_path):
    import random
    content = random.Random(7).randbytes(8 * MIB)
    path = tmp_path / 'image.raw'
    path.write_bytes(content)
    return str(path), content


def test_block_device_trace_prefetch_reads_every_planned_byte_once(
        image_file, monkeypatch):
    path, content = image_file
    reads = RecordingReads(monkeypatch, content)
    trace = make_trace([(0.01 * i, (i * 7919 * 4096) % (8 * MIB - 8192),
                         4096 + i * 512) for i in range(200)])
    target = prefetch.BlockDevice(path)
    handles = []

    def connect():
        handles.append(target.connect())
        return handles[-1]

    engine = prefetch.TracePrefetcher(target, trace, concurrency=4,
                                      connect=connect)
    status = engine.run()
    assert status['state'] == 'done', status['error']
    # No NBD_CMD_CACHE on a device: reads, and they went to the disk.
    assert status['method'] == 'read'
    assert status['address'] == path
    assert handles[0].direct
    assert status['bytes_done'] == status['bytes_total'] == \
        trace.unique_bytes(64 * KIB)
    # Each planned range read once, in one piece: nothing twice, nothing
    # else.
    assert sorted(reads.reads) == sorted(engine.requests)
    assert sum(n for _, n in reads.reads) == status['bytes_total']
    assert trace_mod.merge_extents(reads.reads) == trace.extents(64 * KIB)
    assert 1 <= reads.max_in_flight <= 4
    assert handles[0]._closed


def test_block_device_full_prefetch_reads_every_planned_byte_once(
        image_file, monkeypatch):
    path, content = image_file
    reads = RecordingReads(monkeypatch, content)
    skip = [(0, 3 * MIB), (5 * MIB, MIB)]
    engine = prefetch.FullPrefetcher(prefetch.BlockDevice(path), 8 * MIB,
                                     rate=1e12, chunk=MIB, concurrency=3,
                                     skip=skip)
    status = engine.run()
    assert status['state'] == 'done', status['error']
    assert status['bytes_done'] == status['bytes_total'] == 4 * MIB
    assert sorted(reads.reads) == [(3 * MIB, MIB), (4 * MIB, MIB),
                                   (6 * MIB, MIB), (7 * MIB, MIB)]
    assert reads.max_in_flight <= 3


def test_block_device_splits_long_requests(image_file, monkeypatch):
    path, content = image_file
    reads = RecordingReads(monkeypatch, content)
    engine = prefetch.FullPrefetcher(
        prefetch.BlockDevice(path, max_read=256 * KIB), 8 * MIB, rate=1e12,
        chunk=MIB, concurrency=2, skip=[(0, 6 * MIB)])
    status = engine.run()
    assert status['state'] == 'done', status['error']
    assert (status['requests_done'], status['bytes_done']) == (2, 2 * MIB)
    # Each MiB as four 256 KiB reads, every byte once.
    assert sorted(reads.reads) == [(6 * MIB + n * 256 * KIB, 256 * KIB)
                                   for n in range(8)]
    for bad in (0, 1000, -4096, True, 4096.0):
        with pytest.raises(exception.InvalidInput):
            prefetch.BlockDevice(path, max_read=bad)


def test_block_device_reads_widen_unaligned_ranges(image_file,
                                                   monkeypatch):
    path, content = image_file
    reads = RecordingReads(monkeypatch, content)
    # A trace prefetch with 1 KiB blocks: requests O_DIRECT cannot take.
    trace = make_trace([(0.1, 5 * KIB, 2 * KIB), (0.2, 8 * MIB - KIB, KIB)])
    engine = prefetch.TracePrefetcher(prefetch.BlockDevice(path), trace,
                                      granularity=KIB, max_request=4 * KIB)
    status = engine.run()
    assert status['state'] == 'done', status['error']
    assert engine.requests == [(5 * KIB, 2 * KIB), (8 * MIB - KIB, KIB)]
    assert status['bytes_done'] == 3 * KIB
    # Read as the 4 KiB units around them.
    assert sorted(reads.reads) == [(4 * KIB, 4 * KIB),
                                   (8 * MIB - 4 * KIB, 4 * KIB)]


def test_block_device_read_errors_fail_the_prefetch(image_file,
                                                    monkeypatch):
    path, content = image_file
    RecordingReads(monkeypatch, content, fail_at=2 * MIB)
    engine = prefetch.FullPrefetcher(prefetch.BlockDevice(path), 8 * MIB,
                                     rate=1e12, chunk=MIB, concurrency=1)
    status = engine.run()
    assert status['state'] == 'failed'
    assert 'request %d+%d' % (2 * MIB, MIB) in status['error']
    assert 'Input/output error' in status['error']
    assert status['bytes_done'] == 2 * MIB


def test_block_device_smaller_than_the_trace_is_refused(image_file):
    path, _ = image_file
    trace = make_trace([(0.1, 0, 512)], size=16 * MIB)
    engine = prefetch.TracePrefetcher(prefetch.BlockDevice(path), trace)
    assert engine.run()['state'] == 'failed'
    assert 'export has %d bytes' % (8 * MIB) in engine.status()['error']


def test_block_device_falls_back_to_buffered_reads(image_file,
                                                   monkeypatch):
    import errno
    import os
    path, content = image_file
    real_open = os.open

    def no_direct(name, flags, *args):
        if name == path and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, 'Invalid argument')
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, 'open', no_direct)
    reads = RecordingReads(monkeypatch, content)
    handle = prefetch.BlockDevice(path).connect()
    engine = prefetch.FullPrefetcher(prefetch.BlockDevice(path), 8 * MIB,
                                     rate=1e12, chunk=2 * MIB,
                                     connect=lambda: handle)
    assert engine.run()['state'] == 'done'
    assert not handle.direct
    assert sorted(reads.reads) == prefetch.plan_full(8 * MIB, 2 * MIB)


def test_block_device_addresses(tmp_path):
    with pytest.raises(exception.InvalidInput):
        prefetch.BlockDevice('dev/mapper/x')
    with pytest.raises(exception.PrefetchFailed) as info:
        prefetch.BlockDevice(str(tmp_path / 'missing')).connect()
    assert 'cannot open' in str(info.value)
    (tmp_path / 'f').write_bytes(b'\0' * 8192)
    handle = prefetch.BlockDevice(str(tmp_path / 'f')).connect()
    assert (handle.get_size(), handle.can_cache()) == (8192, False)
    assert handle.poll(0) == 0 and handle.aio_peek_command_completed() == 0
    handle.shutdown()
    handle.shutdown()
