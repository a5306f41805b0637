"""The verifying upstream of a relaying template: an nbdkit python plugin.

A relaying template's NBD client reads ``<run_path>/<image_id>.up``, served
by ``nbdkit -U <id>.up python verifier_plugin.py key=value ...``. Each read
is rounded out to manifest blocks (64 KiB, the cache cluster: a
copy-on-read fill is one block), read from the parent over libnbd, and
every block's SHA-256 is checked against the image's manifest (fetched from
the origin by the agent, see :mod:`thunder_agent.manifest`). A block that
does not match is read from the origin and checked again (an origin block
that does not match either means the image changed: EIO); the parent's
address and the rejected blocks go to the report file, and from then on
this process reads the origin only. Nothing a parent sends reaches the
cache unchecked.

A parent that does not answer (refused, a TLS authorization refusal while
it has not learnt of its new child yet, a dropped connection, a read that
does not finish) is retried with backoff for ``parent_wait`` seconds while
the request blocks, then the request is read from the origin and the
parent is bypassed for as long again (its bytes are read from the origin
meanwhile, at once: the agent's probes report a parent that stays dead),
then tried with one attempt of RETRY_AGAIN seconds; a parent's fault never
turns into EIO. A parent whose bytes were rejected is
bypassed for good, until the agent re-parents (a new verifier).

This file runs inside nbdkit under the system's python, so it imports the
standard library and ``nbd`` (libnbd) only. Its manifest parsing is a copy
of :meth:`thunder_agent.manifest.Manifest.from_bytes` (a unit test checks
both agree on the same bytes).

Parameters (each checked in :func:`config`; the agent's
:class:`~thunder_agent.drivers.qemu.upstream.Upstream` checks them again
before they reach nbdkit's command line):

``origin_socket=PATH`` or ``origin_host=HOST origin_port=PORT``, and
``origin_export=NAME``; ``parent_host=IP parent_port=PORT
parent_export=NAME`` (all three or none); ``manifest=PATH``;
``tls_dir=PATH`` (TLS required and peers' certificates checked; omitted
when ``[tls] enabled`` is off); ``report=PATH``; ``stats=PATH``;
``parent_wait=SECONDS``; ``connections=N`` (libnbd handles per source).

Why an nbdkit python plugin on libnbd: nbdkit serves the socket and runs
the threads, libnbd does NBD and TLS to the parent and the origin in C, and
what is Python (rounding, SHA-256 through hashlib, the fallback) is
testable with fakes and needs no build. Measured on loopback here (64 KiB
sequential reads, the parent a qemu-storage-daemon on TCP, 2 shared cores,
best of 2-3 runs; queue depth 16 is what QEMU's NBD client keeps in
flight)::

                          QD1 MB/s  us/read  QD16 MB/s  CPU s/GiB
    libnbd to the parent     600      107       950         -
    socat (before)           350      190    610-1100    0.4-0.6
    nbdkit nbd plugin (C)    200      330     600-820    1.1-1.5
    this verifier, 4 conns   150-180  370-440  200-255    3.4-5.7
    this verifier, 1 conn    160-170  390      150-186    3.8-4.1

SHA-256 is 40 us (0.65 CPU s/GiB) of each 64 KiB read, the Python glue
about 30 us; the rest is nbdkit's Python binding and the GIL shared by its
threads (more libnbd handles help little past 4). That is 1.6 Gbit/s per
template, above a 1 Gbit/s relay link and below 10 Gbit/s: where links are
faster, the same checks in an nbdkit C filter over the nbd plugin would
run at the C plugin's rate (plus 0.65 CPU s/GiB). socat alone checks
nothing, and a proxy in the agent would put every template's reads in the
agent's process, stalled by each restart of it.
"""

import builtins
import errno
import hashlib
import ipaddress
import json
import os
import queue
import re
import socket
import struct
import threading
import time

try:
    import nbdkit
except ImportError:          # imported by the agent's unit tests
    nbdkit = None

API_VERSION = 2

MAGIC = b'THNDRMF1'
DIGEST_SIZE = 32
HEADER_SIZE = 64
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 4 * 1024 * 1024
_FIXED = struct.Struct('<8sIIQQ')

# Backoff between attempts on a parent that does not answer.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
# What a parent that did not answer last time gets when tried again.
RETRY_AGAIN = 1.0
# Longest wait for one connection or one read of the origin.
ORIGIN_TIMEOUT = 60.0
# Longest wait for one read of a parent that is connected (a hung parent
# costs this much before the next attempt).
PARENT_READ_TIMEOUT = 10.0
# The stats file is rewritten at most this often (and at unload).
STATS_INTERVAL = 1.0
MAX_CONNECTIONS = 16
# How often the watchdog looks for reads past their deadline.
WATCH_INTERVAL = 0.2

_PATH = re.compile(r'/[A-Za-z0-9._/+-]{0,4000}\Z')
_EXPORT = re.compile(r'[A-Za-z0-9._-]{1,255}\Z')
_HOST_NAME = re.compile(
    r'(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
    r'(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z')


class ConfigError(ValueError):
    """A parameter is missing or not of its shape."""


class SourceFailed(Exception):
    """A source did not answer a read (refused, dropped, timed out)."""


class ImageChanged(Exception):
    """The origin's bytes do not match the manifest."""


# -- manifest (a copy of thunder_agent.manifest's parsing) ------------------
class Manifest:
    """Digests of *image_size* bytes in blocks of *block_size*."""

    def __init__(self, image_size, block_size, digests):
        self.image_size = image_size
        self.block_size = block_size
        self.digests = digests
        self.count = len(digests) // DIGEST_SIZE

    def digest(self, index):
        return self.digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]

    def block_range(self, offset, length):
        """(first, end) blocks covering [offset, offset+length)."""
        if offset < 0 or length <= 0 or offset + length > self.image_size:
            raise ValueError('range %d+%d outside %d bytes'
                             % (offset, length, self.image_size))
        return (offset // self.block_size,
                (offset + length - 1) // self.block_size + 1)

    def block_span(self, first, end):
        start = first * self.block_size
        return start, min(end * self.block_size, self.image_size) - start

    def bad_blocks(self, first, data):
        """Indexes of the blocks of *data* (from block *first*) whose
        SHA-256 is not the manifest's."""
        bs = self.block_size
        view = memoryview(data)
        bad = []
        for n in range(-(-len(data) // bs)):
            if hashlib.sha256(view[n * bs:(n + 1) * bs]).digest() != (
                    self.digest(first + n)):
                bad.append(first + n)
        return bad


def parse_manifest(data, image_size=None):
    """A :class:`Manifest` from *data*, or ValueError (the same checks as
    thunder_agent.manifest.Manifest.from_bytes)."""
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise ValueError('manifest shorter than its header')
    magic, block_size, reserved, size, count = _FIXED.unpack_from(data)
    if magic != MAGIC or reserved:
        raise ValueError('not a thunder manifest')
    if (not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
            or block_size & (block_size - 1)):
        raise ValueError('block size %d' % block_size)
    if image_size is not None and size != image_size:
        raise ValueError('manifest for %d bytes, image of %d'
                         % (size, image_size))
    if count != -(-size // block_size):
        raise ValueError('%d digests for %d bytes' % (count, size))
    end = HEADER_SIZE + count * DIGEST_SIZE
    if end > len(data) or any(data[end:]):
        raise ValueError('%d digests do not fit %d bytes'
                         % (count, len(data)))
    digests = data[HEADER_SIZE:end]
    if hashlib.sha256(data[:_FIXED.size] + digests).digest() != (
            data[32:64]):
        raise ValueError('manifest digest does not match')
    return Manifest(size, block_size, digests)


# -- parameters --------------------------------------------------------------
def check_path(value):
    if not _PATH.match(value) or '/../' in value + '/':
        raise ConfigError('path %r' % (value,))
    return value


def check_export(value):
    if not _EXPORT.match(value):
        raise ConfigError('export %r' % (value,))
    return value


def check_port(value):
    if not re.match(r'[0-9]{1,5}\Z', value) or not 0 < int(value) < 65536:
        raise ConfigError('port %r' % (value,))
    return int(value)


def check_ip(value):
    """An IP address literal (no scope id), in canonical form."""
    try:
        if '%' in value:
            raise ValueError(value)
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError('host %r is not an IP address literal' % (value,))


def check_host(value):
    """An IP literal or (origins only: the operator names them) a DNS
    name."""
    try:
        return check_ip(value)
    except ConfigError:
        if _HOST_NAME.match(value):
            return value
        raise


def check_seconds(value):
    if not re.match(r'[0-9]{1,6}(\.[0-9]{1,3})?\Z', value):
        raise ConfigError('seconds %r' % (value,))
    return float(value)


def check_connections(value):
    if not re.match(r'[0-9]{1,2}\Z', value) or not (
            0 < int(value) <= MAX_CONNECTIONS):
        raise ConfigError('connections %r' % (value,))
    return int(value)


PARAMETERS = {
    'origin_socket': check_path, 'origin_host': check_host,
    'origin_port': check_port, 'origin_export': check_export,
    'parent_host': check_ip, 'parent_port': check_port,
    'parent_export': check_export, 'manifest': check_path,
    'tls_dir': check_path, 'report': check_path, 'stats': check_path,
    'parent_wait': check_seconds, 'connections': check_connections,
}


def parse_settings(pairs):
    """The settings dict of ``(key, value)`` *pairs*, or ConfigError."""
    settings = {}
    for key, value in pairs:
        if key not in PARAMETERS:
            raise ConfigError('unknown parameter %r' % (key,))
        if key in settings:
            raise ConfigError('%s given twice' % key)
        settings[key] = PARAMETERS[key](value)
    for key in ('origin_export', 'report', 'stats'):
        if key not in settings:
            raise ConfigError('%s is missing' % key)
    if ('origin_socket' in settings) == ('origin_host' in settings) or (
            ('origin_host' in settings) != ('origin_port' in settings)):
        raise ConfigError('the origin is origin_socket or origin_host and '
                          'origin_port')
    parent = [k in settings for k in ('parent_host', 'parent_port',
                                      'parent_export')]
    if any(parent) and not all(parent):
        raise ConfigError('the parent is parent_host, parent_port and '
                          'parent_export')
    if any(parent) and 'manifest' not in settings:
        raise ConfigError('a parent\'s bytes are checked: a manifest is '
                          'needed')
    settings.setdefault('parent_wait', 30.0)
    settings.setdefault('connections', 4)
    return settings


# -- sources -----------------------------------------------------------------
class NbdSource:
    """Reads of one NBD export over a pool of at most *connections* libnbd
    handles (one per concurrent request; made on demand, dropped on any
    error so the next request reconnects).

    *address* is ``{'socket': path}`` or ``{'host': h, 'port': p}``;
    *tls_dir* None means plain NBD (so does a unix socket). Over TCP
    libnbd checks the server's certificate against the host string, an IP
    literal for parents.
    """

    def __init__(self, address, export, tls_dir, connections,
                 nbd_module=None):
        self.address = address
        self.export = export
        self.tls_dir = tls_dir
        if nbd_module is None:
            import nbd as nbd_module
        self._nbd = nbd_module
        self._idle = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(connections)
        self._watch_lock = threading.Lock()
        self._watched = []
        self._watchdog = None

    def label(self):
        if 'socket' in self.address:
            return 'unix:%s/%s' % (self.address['socket'], self.export)
        host = self.address['host']
        if ':' in host:
            host = '[%s]' % host
        return '%s:%d/%s' % (host, self.address['port'], self.export)

    def _connect(self, deadline):
        h = self._nbd.NBD()
        h.set_export_name(self.export)
        if self.tls_dir is not None and 'host' in self.address:
            # A unix socket is local and plain (the origin's, guarded by
            # its directory); every TCP link is TLS.
            h.set_tls(self._nbd.TLS_REQUIRE)
            h.set_tls_certificates(self.tls_dir)
            h.set_tls_verify_peer(True)
        if 'socket' in self.address:
            h.aio_connect_unix(self.address['socket'])
        else:
            h.aio_connect_tcp(self.address['host'],
                              str(self.address['port']))
        self._wait(h, lambda: not h.aio_is_connecting(), deadline)
        if not h.aio_is_ready():
            raise SourceFailed('%s refused the handshake' % self.label())
        return h

    @staticmethod
    def _wait(h, done, deadline):
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise SourceFailed('timed out')
            h.poll(max(1, int(min(left, 1.0) * 1000)))

    def size(self, deadline):
        """The export's size (bytes), or SourceFailed."""
        h = self._take(deadline)
        try:
            size = h.get_size()
        except self._nbd.Error as e:
            self._slots.release()
            raise SourceFailed(str(e))
        self._idle.put(h)
        self._slots.release()
        return size

    def _take(self, deadline):
        if not self._slots.acquire(timeout=max(0, deadline
                                               - time.monotonic())):
            raise SourceFailed('no connection free in time')
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        try:
            return self._connect(deadline)
        except self._nbd.Error as e:
            self._slots.release()
            raise SourceFailed(str(e))
        except SourceFailed:
            self._slots.release()
            raise

    def read(self, offset, length, deadline):
        """*length* bytes at *offset* by *deadline*, or SourceFailed.

        libnbd's synchronous pread (in C, without the GIL) takes 66 us per
        64 KiB on loopback here, its aio_pread driven by poll from Python
        140: the deadline is kept by the watchdog instead, which shuts the
        connection of a read that outlives it."""
        h = self._take(deadline)
        watch = self._watch(h, deadline)
        try:
            data = h.pread(length, offset)
        except self._nbd.Error as e:
            data = e
        if not self._unwatch(watch) or isinstance(data, Exception):
            # Dropped: the handle may hold a half-done request.
            h = None
            self._slots.release()
            raise SourceFailed(str(data) if isinstance(data, Exception)
                               else 'timed out')
        self._idle.put(h)
        self._slots.release()
        return data

    def _watch(self, h, deadline):
        try:
            fd = h.aio_get_fd()
        except self._nbd.Error:
            fd = None
        watch = [deadline, fd, True]
        with self._watch_lock:
            self._watched.append(watch)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_loop,
                                                  daemon=True)
                self._watchdog.start()
        return watch

    def _unwatch(self, watch):
        """False when the watchdog cut the read."""
        with self._watch_lock:
            self._watched.remove(watch)
            return watch[2]

    def _watch_loop(self):
        while True:
            time.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            with self._watch_lock:
                for watch in self._watched:
                    if watch[2] and watch[0] <= now:
                        watch[2] = False
                        _cut(watch[1])

    def close(self):
        while True:
            try:
                self._idle.get_nowait().shutdown()
            except queue.Empty:
                return
            except Exception:
                continue


# -- the verifier ------------------------------------------------------------
class Verifier:
    """Checked reads of an image described by *manifest* from *parent*
    (None: origin only) with *origin* as the trusted fallback; both have
    ``read(offset, length, deadline)`` and ``label()``.

    The report (``report_path``) is written when the parent's bytes are
    rejected; the counters go to ``stats_path`` every STATS_INTERVAL.
    """

    def __init__(self, manifest, origin, parent, report_path, stats_path,
                 parent_wait, clock=time.monotonic, sleep=time.sleep,
                 wall=time.time):
        self.manifest = manifest
        self.origin = origin
        self.parent = parent
        self.report_path = report_path
        self.stats_path = stats_path
        self.parent_wait = parent_wait
        self._clock = clock
        self._sleep = sleep
        self._wall = wall
        self._lock = threading.Lock()
        self.bypass = None if parent is not None else 'no parent'
        self.bad = []
        self.counts = {'parent_bytes': 0, 'origin_bytes': 0,
                       'blocks_checked': 0, 'blocks_rejected': 0,
                       'parent_retries': 0}
        self._stats_written = None
        self._timer = None
        self._size = None
        self._retry_parent_at = 0
        self._parent_failed = False

    # Counters and files ------------------------------------------------
    def _count(self, **deltas):
        with self._lock:
            for key, value in deltas.items():
                self.counts[key] += value
            due = (self._stats_written is None
                   or self._clock() - self._stats_written >= STATS_INTERVAL)
            if due:
                self._stats_written = self._clock()
            elif self._timer is None:
                # The last counts of a burst are written when it is over.
                self._timer = threading.Timer(STATS_INTERVAL, self._flush)
                self._timer.daemon = True
                self._timer.start()
        if due:
            self.write_stats()

    def _flush(self):
        with self._lock:
            self._timer = None
            self._stats_written = self._clock()
        self.write_stats()

    def stats(self):
        with self._lock:
            return dict(self.counts, parent=self._parent_label(),
                        bypass=self.bypass)

    def write_stats(self):
        _write_json(self.stats_path, self.stats())

    def _parent_label(self):
        return self.parent.label() if self.parent is not None else None

    def _reject(self, bad, checked):
        with self._lock:
            self.bad = sorted(set(self.bad) | set(bad))
            self.bypass = 'mismatch'
            self.counts['blocks_rejected'] += len(bad)
            report = {'parent': self._parent_label(), 'bad_blocks': self.bad,
                      'blocks_rejected': self.counts['blocks_rejected'],
                      'blocks_checked': (self.counts['blocks_checked']
                                         + checked),
                      'block_size': self.manifest.block_size,
                      'time': self._wall()}
        _write_json(self.report_path, report)
        self.write_stats()

    # Reads -------------------------------------------------------------
    def size(self):
        if self.manifest is not None:
            return self.manifest.image_size
        if self._size is None:
            self._size = self.origin.size(self._clock() + ORIGIN_TIMEOUT)
        return self._size

    def read(self, offset, length):
        """The checked bytes [offset, offset+length); ImageChanged when the
        origin's do not match the manifest, SourceFailed when the origin
        does not answer. Without a manifest (an origin that serves none:
        no parent then) the origin's bytes as they are."""
        if self.manifest is None:
            data = self._from_origin(offset, length)
            self._count(origin_bytes=length)
            return data
        first, end = self.manifest.block_range(offset, length)
        start, span = self.manifest.block_span(first, end)
        data = None
        if self.bypass == 'unreachable' and self._clock() >= (
                self._retry_parent_at):
            # The parent may be back (a short outage): try it again.
            self.bypass = None
        if self.bypass is None:
            data = self._from_parent(start, span)
        if data is None:
            data = self._from_origin(start, span)
            if self.manifest.bad_blocks(first, data):
                raise ImageChanged(first, end)
            self._count(origin_bytes=span, blocks_checked=end - first)
        else:
            bad = self.manifest.bad_blocks(first, data)
            if bad:
                self._reject(bad, end - first)
                data = self._repair(bytearray(data), first, bad)
            self._count(parent_bytes=span, blocks_checked=end - first,
                        origin_bytes=self._span_of(bad))
        skip = offset - start
        return memoryview(data)[skip:skip + length]

    def _span_of(self, blocks):
        return sum(self.manifest.block_span(b, b + 1)[1] for b in blocks)

    def _from_origin(self, start, span):
        return self.origin.read(start, span,
                                self._clock() + ORIGIN_TIMEOUT)

    def _repair(self, data, first, bad):
        """Replace the *bad* blocks of *data* with the origin's, checked."""
        bs = self.manifest.block_size
        for run_first, run_end in _runs(bad):
            start, span = self.manifest.block_span(run_first, run_end)
            fresh = self._from_origin(start, span)
            if self.manifest.bad_blocks(run_first, fresh):
                raise ImageChanged(run_first, run_end)
            at = (run_first - first) * bs
            data[at:at + span] = fresh
        return data

    def _from_parent(self, start, span):
        """The parent's bytes, retried with backoff for parent_wait; None
        (and the parent bypassed) when it never answered. A parent that
        did not answer last time gets one attempt of RETRY_AGAIN seconds:
        a dead one does not stall a read for parent_wait again each time
        its bypass ends."""
        wait = RETRY_AGAIN if self._parent_failed else self.parent_wait
        deadline = self._clock() + wait
        delay = RETRY_FIRST
        while True:
            try:
                data = self.parent.read(
                    start, span,
                    min(deadline, self._clock() + PARENT_READ_TIMEOUT))
            except SourceFailed:
                if self.bypass is not None or self._clock() + delay >= (
                        deadline):
                    with self._lock:
                        if self.bypass is None:
                            self.bypass = 'unreachable'
                            self._parent_failed = True
                            self._retry_parent_at = (self._clock()
                                                     + self.parent_wait)
                    return None
                self._count(parent_retries=1)
                self._sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            self._parent_failed = False
            return data


def _cut(fd):
    """Shut the connection of socket *fd* down (both ways): a read blocked
    on it returns an error at once."""
    if fd is None:
        return
    try:
        dup = os.dup(fd)
    except OSError:
        return
    try:
        with socket.socket(fileno=dup) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _runs(indexes):
    """[(first, end)] of the consecutive runs of sorted *indexes*."""
    runs = []
    for i in indexes:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [tuple(r) for r in runs]


def _write_json(path, value):
    """Write *value* to *path* atomically (a reader sees old or new)."""
    tmp = '%s.%d.tmp' % (path, threading.get_ident())
    with builtins.open(tmp, 'w') as f:
        json.dump(value, f)
    os.replace(tmp, path)


# -- nbdkit callbacks --------------------------------------------------------
_pairs = []
_verifier = None


def config(key, value):
    _pairs.append((key, value))


def config_complete():
    global _verifier
    settings = parse_settings(_pairs)
    manifest = None
    if 'manifest' in settings:
        with builtins.open(settings['manifest'], 'rb') as f:
            manifest = parse_manifest(f.read())
    tls_dir = settings.get('tls_dir')
    if 'origin_socket' in settings:
        address = {'socket': settings['origin_socket']}
    else:
        address = {'host': settings['origin_host'],
                   'port': settings['origin_port']}
    origin = NbdSource(address, settings['origin_export'], tls_dir,
                       settings['connections'])
    parent = None
    if 'parent_host' in settings:
        parent = NbdSource({'host': settings['parent_host'],
                            'port': settings['parent_port']},
                           settings['parent_export'], tls_dir,
                           settings['connections'])
    _verifier = Verifier(manifest, origin, parent, settings['report'],
                         settings['stats'], settings['parent_wait'])
    _verifier.write_stats()


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):       # noqa: A001 (nbdkit's name; builtins.open above)
    return 1


def get_size(h):
    return _verifier.size()


def can_write(h):
    return False


def can_multi_conn(h):
    # Read-only and the same bytes on every connection.
    return True


def pread(h, buf, offset, flags):
    try:
        data = _verifier.read(offset, len(buf))
    except (ImageChanged, SourceFailed) as e:
        nbdkit.debug('read %d+%d failed: %r' % (offset, len(buf), e))
        nbdkit.set_error(errno.EIO)
        raise
    buf[:] = data


def unload():
    if _verifier is not None:
        _verifier.write_stats()
        _verifier.origin.close()
        if _verifier.parent is not None:
            _verifier.parent.close()
