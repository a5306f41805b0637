"""Prefetch: warm a template's cache before (or while) VMs need it.

Two engines, both reading through the template itself, so that what they
pull in lands in the cache exactly as a VM's read would (and a relay
template's parent serves it the same way): through its NBD export (the
qemu driver, :class:`NbdAddress`) or its block device (the kernel driver,
:class:`BlockDevice`):

* :class:`TracePrefetcher` issues the reads of a boot trace in trace
  order, each cache block once, with bounded concurrency. It runs ahead of
  the first VM: while the guest thinks, the blocks it will read next are
  already on their way.
* :class:`FullPrefetcher` streams the whole image at a configured rate in
  the background, and stands back while foreground reads are busy, so it
  never competes with a booting VM for the link.

Requests are ``NBD_CMD_CACHE`` when the server offers it (QEMU's server
does: it reads the range with copy-on-read and prefetch flags, so the
blocks are fetched into the cache and no data comes back to us); otherwise
plain reads whose data is thrown away (always so for a block device).

Both report progress (bytes done of bytes total) through a callback and a
status dict, and can be cancelled. They run in a thread of their own
(:meth:`Prefetcher.start`) or in the caller's (:meth:`Prefetcher.run`).
"""

import collections
from concurrent import futures
import copy
import errno
import itertools
import mmap
import os
import threading
import time

from oslo_log import log as logging

from thunder_agent import exception

LOG = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_GRANULARITY = 64 * 1024
# QEMU's NBD server takes requests of up to 32 MiB; smaller ones keep the
# store-and-forward delay at each relay hop short.
DEFAULT_MAX_REQUEST = 1 * MIB
POLL_MS = 200
METHODS = ('auto', 'cache', 'read')
MAX_CONCURRENCY = 64
# O_DIRECT wants the buffer address, the file offset and the length
# aligned to the device's logical block size: 512 bytes for dm and bcache
# devices, the file system block (4 KiB) for files. A page covers both.
DIRECT_ALIGN = 4096


class NbdAddress:
    """Where a template's NBD export is: a unix socket or host and port,
    and the export name."""

    def __init__(self, socket=None, host=None, port=None, export=''):
        if (socket is None) == (host is None):
            raise exception.InvalidInput(
                reason='an NBD address needs either a socket or a host')
        if host is not None:
            if isinstance(port, bool) or not isinstance(port, int) or \
                    not 0 < port < 65536:
                raise exception.InvalidInput(
                    reason='NBD port must be 1..65535, got %r' % (port,))
        if not isinstance(export, str):
            raise exception.InvalidInput(reason='export must be a string')
        self.socket = socket
        self.host = host
        self.port = port
        self.export = export

    @classmethod
    def from_export(cls, export):
        """From the ``export`` an agent reports for a template of the qemu
        driver (``{'driver': 'qemu', 'local': {'socket': P, 'export':
        NAME}, ...}``), or from its ``local`` part alone."""
        if isinstance(export, dict) and export.get('driver') == 'qemu':
            export = export.get('local')
        if not isinstance(export, dict) or export.get('driver', 'nbd') != \
                'nbd':
            raise exception.InvalidInput(
                reason='not an NBD export: %r' % (export,))
        if 'socket' in export:
            return cls(socket=export['socket'],
                       export=export.get('export', ''))
        return cls(host=export.get('host'), port=export.get('port'),
                   export=export.get('export', ''))

    def __str__(self):
        where = (self.socket if self.socket is not None
                 else '%s:%s' % (self.host, self.port))
        return 'nbd://%s/%s' % (where, self.export)

    def connect(self):
        """A connected libnbd handle."""
        import nbd
        handle = nbd.NBD()
        handle.set_export_name(self.export)
        try:
            if self.socket is not None:
                handle.connect_unix(self.socket)
            else:
                handle.connect_tcp(self.host, str(self.port))
        except nbd.Error as e:
            raise exception.PrefetchFailed(address=str(self),
                                           reason='cannot connect: %s' % e)
        return handle


class BlockDevice:
    """A template's local block device (or a file), read directly.

    The kernel driver's template is a device-mapper device over the local
    cache; reading it fetches misses from the source into the cache, as a
    VM's reads through a snapshot would. The agent needs read access to
    the device node.
    """

    def __init__(self, path, max_read=None):
        if not isinstance(path, str) or not os.path.isabs(path):
            raise exception.InvalidInput(
                reason='a block device path must be absolute, got %r'
                       % (path,))
        if max_read is not None and (
                isinstance(max_read, bool) or not isinstance(max_read, int)
                or max_read <= 0 or max_read % DIRECT_ALIGN):
            raise exception.InvalidInput(
                reason='max_read must be a positive multiple of %d, got %r'
                       % (DIRECT_ALIGN, max_read))
        self.path = path
        # The largest single read the device is given (None: a request's
        # length); the device's driver knows what its cache takes best.
        self.max_read = max_read

    def __str__(self):
        return self.path

    def connect(self):
        """A :class:`BlockDeviceHandle` open on the device."""
        return BlockDeviceHandle(self.path, self.max_read)


class _Buffer:
    """Room for one read of *length* bytes at any offset: page-aligned
    (an anonymous mmap), one alignment unit longer than the length
    rounded up, so that the aligned range around the request fits."""

    def __init__(self, length, memory):
        self.length = length
        self.memory = memory

    def __len__(self):
        return self.length


def _align_up(value):
    return -(-value // DIRECT_ALIGN) * DIRECT_ALIGN


class BlockDeviceHandle:
    """The part of libnbd's handle the engines drive, over a local device.

    Reads run in a thread pool, as many at once as the engine keeps in
    flight (at most :data:`MAX_CONCURRENCY`), each an ``os.preadv`` with
    ``O_DIRECT`` into a page-aligned buffer, so every byte goes down the
    device stack (the page cache would answer a second read of a block
    without reaching the template's cache). The data is thrown away;
    buffers are reused. Completions are polled as with libnbd: ``poll``
    waits up to its timeout for one, ``aio_peek_command_completed`` names
    it, ``aio_command_completed`` collects it and raises the read's
    OSError. A request longer than *max_read* bytes is read in pieces of
    at most that, one after the other.
    """

    def __init__(self, path, max_read=None):
        self.path = path
        self.max_read = max_read
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECT
                               | os.O_CLOEXEC)
            self.direct = True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise exception.PrefetchFailed(
                    address=path, reason='cannot open: %s' % e.strerror)
            # Some file systems (tmpfs before Linux 6.6) refuse O_DIRECT;
            # only files there, never a block device. Buffered reads then:
            # every byte is still read once, the page cache keeps a copy.
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.direct = False
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        self._pool = futures.ThreadPoolExecutor(
            MAX_CONCURRENCY, thread_name_prefix='prefetch-read')
        self._cookies = itertools.count(1)
        self._changed = threading.Condition()
        self._completed = collections.deque()
        self._errors = {}
        self._idle = []         # buffers' memory ready for reuse
        self._memory = []       # every buffer's memory, closed at shutdown
        self._closed = False

    # -- what the engines call --

    def get_size(self):
        return self.size

    def can_cache(self):
        # No NBD_CMD_CACHE here: reads it is.
        return False

    def new_buffer(self, length):
        capacity = _align_up(length) + DIRECT_ALIGN
        with self._changed:
            fits = [m for m in self._idle if len(m) >= capacity]
            if fits:
                memory = min(fits, key=len)
                self._idle.remove(memory)
                return _Buffer(length, memory)
        memory = mmap.mmap(-1, capacity)
        with self._changed:
            self._memory.append(memory)
        return _Buffer(length, memory)

    def aio_pread(self, buf, offset):
        cookie = next(self._cookies)
        future = self._pool.submit(self._read, buf, offset)
        future.add_done_callback(lambda f: self._done(cookie, buf, f))
        return cookie

    def poll(self, timeout_ms):
        with self._changed:
            self._changed.wait_for(lambda: self._completed,
                                   timeout_ms / 1000.0)
            return 1 if self._completed else 0

    def aio_peek_command_completed(self):
        with self._changed:
            return self._completed[0] if self._completed else 0

    def aio_command_completed(self, cookie):
        with self._changed:
            self._completed.remove(cookie)
            error = self._errors.pop(cookie)
        if error is not None:
            raise error
        return True

    def shutdown(self):
        """Wait for the reads in flight (those not started are dropped),
        close the device and free the buffers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        os.close(self._fd)
        for memory in self._memory:
            memory.close()

    # -- internals --

    def _preadv(self, view, offset):
        return os.preadv(self._fd, [view], offset)

    def _read(self, buf, offset):
        """Read ``[offset, offset + len(buf))``, widened to the alignment
        O_DIRECT needs; a read past the end of the device stops there."""
        start = offset // DIRECT_ALIGN * DIRECT_ALIGN
        want = offset + len(buf)
        end = _align_up(want)
        with memoryview(buf.memory) as view:
            position = start
            while position < want:
                stop = end if self.max_read is None else min(
                    end, position + self.max_read)
                n = self._preadv(view[position - start:stop - start],
                                 position)
                if n <= 0:
                    raise OSError(errno.EIO, 'the device ends at %d bytes'
                                  % position)
                position += n

    def _done(self, cookie, buf, future):
        error = None if future.cancelled() else future.exception()
        with self._changed:
            self._idle.append(buf.memory)
            self._errors[cookie] = error
            self._completed.append(cookie)
            self._changed.notify_all()


# -- planning and pacing (pure) --

def plan_trace(trace, granularity=DEFAULT_GRANULARITY,
               max_request=DEFAULT_MAX_REQUEST):
    """Requests ``(offset, length)`` that fetch a trace's blocks.

    Blocks (of *granularity* bytes, the cache's) come in the order the
    trace first reads them; each appears once; contiguous new blocks of
    one read form one request of at most *max_request* bytes.
    """
    if granularity < 1 or max_request < granularity:
        raise exception.InvalidInput(
            reason='need 1 <= granularity <= max_request')
    per_request = max_request // granularity
    size = trace.image_size
    seen = set()
    requests = []
    for read in trace.reads:
        run_start = run_blocks = 0
        first = read.offset // granularity
        # Nothing past the image's end (a trace may read beyond it).
        last = min(read.end - 1, size - 1) // granularity
        for block in range(first, last + 1):
            if block in seen:
                if run_blocks:
                    requests.append(_request(run_start, run_blocks,
                                             granularity, size))
                    run_blocks = 0
                continue
            seen.add(block)
            if not run_blocks:
                run_start = block
            run_blocks += 1
            if run_blocks == per_request:
                requests.append(_request(run_start, run_blocks,
                                         granularity, size))
                run_blocks = 0
        if run_blocks:
            requests.append(_request(run_start, run_blocks, granularity,
                                     size))
    return requests


def _request(first_block, blocks, granularity, size):
    offset = first_block * granularity
    return offset, min(blocks * granularity, size - offset)


def plan_full(size, chunk, start=0):
    """Chunks ``(offset, length)`` covering ``[start, size)``."""
    if chunk < 1:
        raise exception.InvalidInput(reason='chunk must be positive')
    return [(offset, min(chunk, size - offset))
            for offset in range(start, size, chunk)]


class Pacer:
    """A token bucket: on average *rate* bytes per second, bursts of at
    most *burst* bytes. :meth:`reserve` says how long to wait before
    sending."""

    def __init__(self, rate, burst=None, clock=time.monotonic):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or \
                rate <= 0:
            raise exception.InvalidInput(
                reason='rate must be a positive number of bytes/s, got %r'
                       % (rate,))
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate / 10)
        self.clock = clock
        self.tokens = self.burst
        self.last = clock()

    def reserve(self, nbytes):
        now = self.clock()
        self.tokens = min(self.burst,
                          self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= nbytes
        return max(0.0, -self.tokens / self.rate)


class ForegroundGate:
    """Whether foreground I/O is busy, from a cumulative byte counter.

    *sample* returns bytes served to foreground readers so far (e.g. a
    template's served bytes, without the prefetcher's own). Busy means
    more than *threshold* bytes/s over the last *window* seconds.
    """

    def __init__(self, sample, threshold, window=1.0, clock=time.monotonic):
        if threshold < 0 or window <= 0:
            raise exception.InvalidInput(
                reason='need threshold >= 0 and window > 0')
        self.sample = sample
        self.threshold = threshold
        self.window = window
        self.clock = clock
        # The baseline: a rate needs two samples.
        self.history = collections.deque([(clock(), sample())])

    def rate(self):
        now = self.clock()
        self.history.append((now, self.sample()))
        while len(self.history) > 2 and \
                now - self.history[1][0] >= self.window:
            self.history.popleft()
        (t0, b0), (t1, b1) = self.history[0], self.history[-1]
        if t1 - t0 <= 0:
            return 0.0
        return (b1 - b0) / (t1 - t0)

    def busy(self):
        return self.rate() > self.threshold


# -- engines --

class Prefetcher:
    """Common machinery: status, progress callback, cancel, thread."""

    kind = None

    def __init__(self, address, method='auto', concurrency=4,
                 progress=None, clock=time.monotonic, connect=None):
        if method not in METHODS:
            raise exception.InvalidInput(
                reason='method must be one of %s' % ', '.join(METHODS))
        if isinstance(concurrency, bool) or not isinstance(
                concurrency, int) or not 1 <= concurrency <= MAX_CONCURRENCY:
            raise exception.InvalidInput(
                reason='concurrency must be 1..%d, got %r'
                       % (MAX_CONCURRENCY, concurrency))
        self.address = address
        self.method = method
        self.concurrency = concurrency
        self.progress = progress
        self.clock = clock
        self._connect = connect or address.connect
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        self._status = {
            'kind': self.kind, 'state': 'pending', 'address': str(address),
            'method': None, 'bytes_done': 0, 'bytes_total': 0,
            'requests_done': 0, 'requests_total': 0, 'started_at': None,
            'finished_at': None, 'elapsed_s': 0.0, 'error': None,
        }

    # -- public --

    def status(self):
        with self._lock:
            status = copy.deepcopy(self._status)
        if status['started_at'] is not None and status['finished_at'] is None:
            status['elapsed_s'] = self.clock() - status['started_at']
        return status

    def start(self):
        """Run in a background thread; returns self."""
        self._thread = threading.Thread(
            target=self.run, name='prefetch-%s' % self.kind, daemon=True)
        self._thread.start()
        return self

    def cancel(self):
        """Stop issuing requests; those in flight finish."""
        self._cancel.set()

    @property
    def cancelled(self):
        return self._cancel.is_set()

    def wait(self, timeout=None):
        """Wait for the background run; return the final status (or the
        current one after *timeout*)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()

    def run(self):
        """Prefetch in the calling thread; return the final status."""
        self._update(state='running', started_at=self.clock())
        handle = None
        try:
            handle = self._connect()
            method = self._choose_method(handle)
            self._update(method=method)
            self._run(handle, method)
            state = 'cancelled' if self.cancelled else 'done'
            self._update(state=state)
        except Exception as e:
            LOG.warning('%s prefetch from %s failed: %s', self.kind,
                        self.address, e)
            self._update(state='failed', error=str(e))
        finally:
            if handle is not None:
                try:
                    handle.shutdown()
                except Exception:
                    pass
            now = self.clock()
            with self._lock:
                self._status['finished_at'] = now
                self._status['elapsed_s'] = now - self._status['started_at']
            self._notify()
        return self.status()

    def result(self):
        """Final status; raises PrefetchFailed if the run failed."""
        status = self.wait()
        if status['state'] == 'failed':
            raise exception.PrefetchFailed(address=str(self.address),
                                           reason=status['error'])
        return status

    # -- internals --

    def _choose_method(self, handle):
        if self.method == 'auto':
            return 'cache' if handle.can_cache() else 'read'
        if self.method == 'cache' and not handle.can_cache():
            raise exception.PrefetchFailed(
                address=str(self.address),
                reason='the server does not offer NBD_CMD_CACHE')
        return self.method

    def _update(self, **fields):
        with self._lock:
            self._status.update(fields)
        if 'state' in fields:
            self._notify()

    def _notify(self):
        if self.progress is not None:
            try:
                self.progress(self.status())
            except Exception:
                LOG.exception('prefetch progress callback failed')

    def _completed(self, length):
        with self._lock:
            self._status['bytes_done'] += length
            self._status['requests_done'] += 1
        self._notify()

    def _pump(self, handle, method, requests, before_issue=None):
        """Issue *requests* with at most ``concurrency`` in flight.

        *before_issue(length)* may sleep (pacing) and returns False to stop
        issuing.
        """
        if isinstance(handle, BlockDeviceHandle):
            new_buffer, errors = handle.new_buffer, OSError
        else:
            import nbd
            new_buffer, errors = nbd.Buffer, nbd.Error
        pending = collections.deque(requests)
        in_flight = {}
        while in_flight or (pending and not self.cancelled):
            while pending and len(in_flight) < self.concurrency and \
                    not self.cancelled:
                offset, length = pending[0]
                if before_issue is not None and not before_issue(length):
                    break
                pending.popleft()
                if method == 'cache':
                    cookie = handle.aio_cache(length, offset)
                    buf = None
                else:
                    buf = new_buffer(length)
                    cookie = handle.aio_pread(buf, offset)
                in_flight[cookie] = (offset, length, buf)
            if not in_flight:
                if pending and not self.cancelled:
                    continue
                break
            handle.poll(POLL_MS)
            while in_flight:
                cookie = handle.aio_peek_command_completed()
                if not cookie:
                    break
                offset, length, _ = in_flight.pop(cookie)
                try:
                    handle.aio_command_completed(cookie)
                except errors as e:
                    raise exception.PrefetchFailed(
                        address=str(self.address),
                        reason='request %d+%d: %s' % (offset, length, e))
                self._completed(length)


class TracePrefetcher(Prefetcher):
    """Fetch a boot trace's blocks in trace order.

    :param address: :class:`NbdAddress` of the template export or the
        template's :class:`BlockDevice`.
    :param trace: :class:`thunder_agent.trace.Trace` of the same image.
    :param granularity: the cache's block size; each block is fetched once.
    :param concurrency: requests in flight at most.
    :param progress: called with the status dict after every request.
    """

    kind = 'trace'

    def __init__(self, address, trace, granularity=DEFAULT_GRANULARITY,
                 max_request=DEFAULT_MAX_REQUEST, concurrency=4,
                 method='auto', progress=None, clock=time.monotonic,
                 connect=None):
        super().__init__(address, method, concurrency, progress, clock,
                         connect)
        self.trace = trace
        self.requests = plan_trace(trace, granularity, max_request)
        self._status.update(
            bytes_total=sum(length for _, length in self.requests),
            requests_total=len(self.requests))

    def _run(self, handle, method):
        size = handle.get_size()
        if size < self.trace.image_size:
            raise exception.PrefetchFailed(
                address=str(self.address),
                reason='export has %d bytes, the trace\'s image %d'
                       % (size, self.trace.image_size))
        self._pump(handle, method, self.requests)


class FullPrefetcher(Prefetcher):
    """Stream the whole image into the cache at *rate* bytes/s.

    :param rate: average bytes per second (a token bucket with bursts of
        one chunk).
    :param max_rate: the agent's cap (``[prefetch] max_rate_mb``) in bytes
        per second: a faster *rate* is clamped to it, and the status says
        so (``clamped``). A full prefetch makes the template fetch the
        whole image from its source; the cap bounds what one request (an
        operator's, or a default of "as fast as possible") costs that
        link.
    :param chunk: request size.
    :param foreground: optional callable returning the cumulative bytes
        served to foreground readers; while they exceed
        *yield_threshold* bytes/s the stream pauses, *pause* seconds at a
        time.
    :param skip: ``(offset, length)`` ranges known to be cached already
        (e.g. by a trace prefetch); they are not requested again.
    """

    kind = 'full'

    def __init__(self, address, size, rate, chunk=4 * MIB, concurrency=2,
                 foreground=None, yield_threshold=1 * MIB, window=1.0,
                 pause=0.5, skip=(), method='auto', progress=None,
                 clock=time.monotonic, sleep=None, connect=None,
                 max_rate=None):
        super().__init__(address, method, concurrency, progress, clock,
                         connect)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise exception.InvalidInput(reason='size must be positive')
        if pause <= 0:
            raise exception.InvalidInput(reason='pause must be positive')
        if max_rate is not None:
            if isinstance(max_rate, bool) or not isinstance(
                    max_rate, (int, float)) or max_rate <= 0:
                raise exception.InvalidInput(
                    reason='max_rate must be a positive number of bytes/s, '
                           'got %r' % (max_rate,))
        clamped = (max_rate is not None and isinstance(rate, (int, float))
                   and not isinstance(rate, bool) and rate > max_rate)
        if clamped:
            LOG.info('Full prefetch from %s asked for %.1f MiB/s; it runs '
                     'at the cap of %.1f MiB/s', address, rate / MIB,
                     max_rate / MIB)
            rate = max_rate
        self.size = size
        self.pacer = Pacer(rate, burst=chunk, clock=clock)
        self.gate = (ForegroundGate(foreground, yield_threshold, window,
                                    clock)
                     if foreground is not None else None)
        self.pause = pause
        self._sleep = sleep or self._cancellable_sleep
        self.requests = _subtract(plan_full(size, chunk), skip)
        self._status.update(
            bytes_total=sum(length for _, length in self.requests),
            requests_total=len(self.requests), yielded_s=0.0,
            rate_bps=8 * rate, clamped=clamped)

    def _cancellable_sleep(self, seconds):
        self._cancel.wait(seconds)

    def _before_issue(self, length):
        while self.gate is not None and self.gate.busy():
            if self.cancelled:
                return False
            self._update(state='yielding')
            self._sleep(self.pause)
            with self._lock:
                self._status['yielded_s'] += self.pause
        if self._status['state'] == 'yielding':
            self._update(state='running')
        delay = self.pacer.reserve(length)
        if delay > 0:
            self._sleep(delay)
        return not self.cancelled

    def _run(self, handle, method):
        if handle.get_size() < self.size:
            raise exception.PrefetchFailed(
                address=str(self.address),
                reason='export is smaller than %d bytes' % self.size)
        self._pump(handle, method, self.requests, self._before_issue)


def _subtract(requests, skip):
    """*requests* minus the byte ranges in *skip*."""
    skip = sorted((o, o + n) for o, n in skip if n > 0)
    if not skip:
        return list(requests)
    out = []
    for offset, length in requests:
        start, end = offset, offset + length
        for s, e in skip:
            if e <= start or s >= end:
                continue
            if s > start:
                out.append((start, s - start))
            start = max(start, e)
            if start >= end:
                break
        if start < end:
            out.append((start, end - start))
    return out
