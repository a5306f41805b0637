"""Power-loss safety of a template's cache file.

A copy-on-read fill is an ordinary qcow2 write of a whole cluster: QEMU
writes the data, then the L2 entry mapping it, with no flush in between;
the agent flushes every ``[cache] flush_interval`` seconds. A process
crash loses nothing written (the page cache holds it), but after a power
cut or a host crash the disk may hold the mapping of a cluster whose data
never reached it: the cluster reads back as zeros or as stale bytes of a
freed cluster, and the template would serve (and relay) that as the image.

So every template directory holds a clean-shutdown marker (MARKER_FILE):

* removed, and the removal made durable, before a daemon opens the cache
  read-write;
* written (fsync'd, the directory fsync'd) only after a successful flush
  and a daemon that quit by itself on the agent's ``quit``.

A cache found without its marker and without a running daemon is verified
before any reader sees it (:meth:`CacheRecovery.recover`):

1. ``qemu-img check -r all``: the qcow2 metadata (refcounts, leaks);
   corruptions it cannot repair discard the cache.
2. ``qemu-img map`` of the cache opened with ``backing: null`` lists what
   the cache itself holds, with each data extent's offset in the file;
   those bytes are read straight from the file and hashed against the
   image's manifest (:mod:`thunder_agent.manifest`), one block at a time.
3. Clusters that do not match are dropped. A qcow2 v3 discard cannot do
   that: it leaves a zero cluster, which reads as zeros instead of falling
   through to the backing (QEMU 7.2 qcow2_cluster_discard). So the bad
   clusters' file ranges are zeroed and ``qemu-img convert`` (sparse by
   default, 4 KiB) copies the cache into a new file that holds only the
   good, non-zero clusters; it replaces the old one. The dropped clusters,
   and any cached zero clusters, are fetched again on their next read.

Without a manifest nothing can be checked and the cache is discarded (it
is only a cache: the image is fetched again). Snapshots are never touched:
VM overlays hold the VMs' data, written by their own QEMU.

Cost: reading the cached bytes once and hashing them (SHA-256 at about
1.5 GB/s per core here), plus a rewrite of the cached bytes when a cluster
is dropped. Measured (tests/functional/thunder_agent/drivers/qemu/
test_power_loss.py, 2 shared cores): a 32 MiB cache with 224 bad clusters,
checked, hashed and rewritten in 0.11 s. ``qemu-img convert`` runs within
``[qemu] command_timeout``; a cache too large to rewrite in time is
discarded instead.
"""

import bisect
import contextlib
import hashlib
import json
import os
import time

from oslo_log import log as logging

from thunder_agent import exception
from thunder_agent import manifest as manifest_mod
from thunder_agent import store

LOG = logging.getLogger(__name__)

MARKER_FILE = 'clean-shutdown'
RECOVERED_SUFFIX = '.recovered'

# What to do with a cache before a daemon opens it.
NOTHING = 'nothing'
VERIFY = 'verify'
DISCARD = 'discard'

# qemu-img check exit codes: 0 consistent, 3 leaks only (space, not data).
_CHECK_USABLE = (0, 3)


def marker_path(template_dir):
    return os.path.join(template_dir, MARKER_FILE)


def clear_marker(template_dir):
    """Remove the marker durably: a power cut after this point finds the
    cache unmarked."""
    try:
        os.unlink(marker_path(template_dir))
    except FileNotFoundError:
        return
    store.fsync_dir(template_dir)


def _cache_identity(cache):
    st = os.stat(cache)
    return {'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def write_marker(template_dir, cache):
    """Mark *cache* cleanly shut down. The marker names the file's size and
    mtime: a cache changed after the marker was written is not clean."""
    path = marker_path(template_dir)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(_cache_identity(cache), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    store.fsync_dir(template_dir)


def is_clean(template_dir, cache):
    """True when the marker is there and names *cache* as it is."""
    try:
        with open(marker_path(template_dir)) as f:
            recorded = json.load(f)
        return recorded == _cache_identity(cache)
    except (OSError, ValueError):
        return False


def decide(daemon_running, cache_exists, clean, has_manifest):
    """What a (re)build does with the cache before a daemon opens it."""
    if daemon_running or not cache_exists or clean:
        # A running daemon holds the cache open: what it serves is what it
        # wrote, in its page cache. A clean cache was flushed and closed.
        return NOTHING
    return VERIFY if has_manifest else DISCARD


def stop_cleanly(daemon, template_dir, cache, flush, timeout,
                 clock=time.monotonic, sleep=time.sleep):
    """Stop *daemon* and mark its cache clean when *flush()* succeeded and
    the daemon quit by itself within *timeout* seconds (QEMU flushes and
    closes every node on quit). Anything else leaves the cache unmarked:
    the next build verifies it. True when marked."""
    if not daemon.is_running():
        daemon.stop()
        return False
    try:
        flush()
    except exception.BackendError as e:
        LOG.warning('%s; its cache will be verified at the next build', e)
        daemon.stop()
        return False
    with contextlib.suppress(exception.BackendError):
        daemon.command('quit')
    deadline = clock() + timeout
    while daemon.is_running() and clock() < deadline:
        sleep(0.02)
    quit_by_itself = not daemon.is_running()
    # Kills one that ignored quit; removes its pid file and socket.
    daemon.stop()
    if not quit_by_itself or not os.path.exists(cache):
        return False
    write_marker(template_dir, cache)
    return True


class Result:
    """What one recovery found, for the log and for tests."""

    def __init__(self, action, checked=0, dropped=0, seconds=0.0,
                 reason=None):
        self.action = action        # NOTHING, 'kept', 'dropped', DISCARD
        self.checked = checked      # clusters hashed
        self.dropped = dropped      # clusters dropped
        self.seconds = seconds
        self.reason = reason

    def __repr__(self):
        return ('Result(%s, checked=%d, dropped=%d, %.3f s, %s)'
                % (self.action, self.checked, self.dropped, self.seconds,
                   self.reason))


class CacheRecovery:
    """Verifies a template's cache file; *run(args)* runs qemu-img with
    *args* and returns its CompletedProcess (within ``[qemu]
    command_timeout``), *clock* times the run."""

    def __init__(self, run, clock=time.monotonic):
        self._run = run
        self._clock = clock

    def _qemu_img(self, args, what):
        proc = self._run(args)
        if proc.returncode != 0:
            raise exception.BackendError(
                reason='qemu-img %s of the cache failed: %s'
                       % (what, (proc.stderr or '').strip()[-300:]))
        return proc

    @staticmethod
    def _unbacked(cache):
        # Only the cache's own layer: never the backing its node has in
        # the graph.
        return 'json:' + json.dumps({'driver': 'qcow2', 'backing': None,
                                     'file': {'driver': 'file',
                                              'filename': cache}})

    def recover(self, image_id, template_dir, cache, image_size):
        """Make *cache* safe to serve; the Result. Discarding removes the
        file (the build then makes an empty one)."""
        start = self._clock()
        path = os.path.join(template_dir, 'manifest')
        if not os.path.exists(path):
            result = self._discard(cache, 'no manifest to check it against')
        else:
            try:
                result = self._verify(cache, path, image_size)
            except (exception.BackendError, exception.InvalidManifest,
                    OSError, ValueError, KeyError, TypeError) as e:
                result = self._discard(cache, str(e))
        result.seconds = self._clock() - start
        if result.action == DISCARD:
            LOG.warning('Template %s was not shut down cleanly; its cache '
                        'is discarded (%s) after %d clusters checked, in '
                        '%.2f s', image_id, result.reason, result.checked,
                        result.seconds)
        else:
            LOG.warning('Template %s was not shut down cleanly; its cache: '
                        '%d clusters checked, %d dropped, in %.2f s',
                        image_id, result.checked, result.dropped,
                        result.seconds)
        return result

    @staticmethod
    def _discard(cache, reason):
        for name in (cache, cache + RECOVERED_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        store.fsync_dir(os.path.dirname(cache))
        return Result(DISCARD, reason=reason)

    def _check(self, cache):
        proc = self._run(['check', '-r', 'all', '--output=json', '-f',
                          'qcow2', cache])
        if proc.returncode not in _CHECK_USABLE:
            raise exception.BackendError(
                reason='qemu-img check -r all left it inconsistent (exit '
                       '%d): %s' % (proc.returncode,
                                    (proc.stdout or proc.stderr or '')
                                    .strip()[-300:]))
        with contextlib.suppress(ValueError):
            report = json.loads(proc.stdout)
            if report.get('corruptions-fixed') or report.get('leaks-fixed'):
                LOG.info('qemu-img check of %s fixed %s corruptions and %s '
                         'leaks', cache, report.get('corruptions-fixed', 0),
                         report.get('leaks-fixed', 0))

    def _extents(self, cache):
        """[(start, length, file offset or None for zeros)] of what the
        cache holds, and its cluster size."""
        info = json.loads(self._qemu_img(
            ['info', '--output=json', self._unbacked(cache)], 'info').stdout)
        cluster = int(info['cluster-size'])
        size = int(info['virtual-size'])
        extents = json.loads(self._qemu_img(
            ['map', '--output=json', self._unbacked(cache)], 'map').stdout)
        held = []
        for e in extents:
            if not e.get('present') or e.get('depth', 0) != 0:
                continue
            if e.get('data'):
                if 'offset' not in e or e.get('compressed'):
                    # A copy-on-read fill is never compressed.
                    raise exception.BackendError(
                        reason='an extent at %d has no plain file offset'
                               % e['start'])
                held.append((int(e['start']), int(e['length']),
                             int(e['offset'])))
            else:
                held.append((int(e['start']), int(e['length']), None))
        return held, cluster, size

    def _verify(self, cache, manifest_path, image_size):
        self._check(cache)
        held, cluster, size = self._extents(cache)
        if size != image_size:
            raise exception.BackendError(
                reason='its size %d is not the image\'s %d'
                       % (size, image_size))
        manifest = manifest_mod.Manifest.from_file(manifest_path, image_size)
        bad, checked = self._bad_ranges(cache, held, manifest, cluster)
        if not bad:
            return Result('kept', checked=checked)
        dropped = self._drop(cache, held, bad, cluster)
        return Result('dropped', checked=checked, dropped=dropped)

    @staticmethod
    def _runs(held):
        """Contiguous runs of held extents: [(start, end, [extents])]."""
        runs = []
        for extent in sorted(held):
            start, length, _ = extent
            if runs and runs[-1][1] == start:
                runs[-1][1] = start + length
                runs[-1][2].append(extent)
            else:
                runs.append([start, start + length, [extent]])
        return runs

    @staticmethod
    def _read(fd, extents, starts, offset, length):
        """Virtual bytes [offset, offset+length) of a run."""
        out = bytearray()
        i = bisect.bisect_right(starts, offset) - 1
        while length > 0:
            start, size, host = extents[i]
            skip = offset - start
            take = min(length, size - skip)
            if host is None:
                out += bytes(take)
            else:
                # A mapping past the end of the file reads short: a
                # mismatch.
                out += os.pread(fd, take, host + skip)
            offset += take
            length -= take
            i += 1
        return bytes(out)

    def _bad_ranges(self, cache, held, manifest, cluster):
        """Virtual ranges [(start, end)] whose blocks do not match, and the
        number of clusters hashed."""
        bad = []
        checked = 0
        with open(cache, 'rb') as f:
            fd = f.fileno()
            for start, end, extents in self._runs(held):
                checked += -(-(end - start) // cluster)
                starts = [e[0] for e in extents]
                first, last = manifest.block_range(start, end - start)
                for block in range(first, last):
                    b_start, b_len = manifest.block_span(block, block + 1)
                    if b_start < start or b_start + b_len > end:
                        # Partly held (blocks larger than clusters): its
                        # held part cannot be checked.
                        bad.append((max(b_start, start),
                                    min(b_start + b_len, end)))
                        continue
                    data = self._read(fd, extents, starts, b_start, b_len)
                    if (hashlib.sha256(data).digest()
                            != manifest.digest(block)):
                        bad.append((b_start, b_start + b_len))
        return bad, checked

    def _drop(self, cache, held, bad, cluster):
        """Zero the bad clusters' file ranges, then copy the cache sparsely
        into a new file that replaces it; the number of clusters dropped."""
        clusters = set()
        for start, end in bad:
            clusters.update(range(start // cluster, -(-end // cluster)))
        with open(cache, 'r+b') as f:
            for index in sorted(clusters):
                offset = index * cluster
                for start, length, host in held:
                    if host is None or not start <= offset < start + length:
                        continue
                    n = min(cluster, start + length - offset)
                    os.pwrite(f.fileno(), bytes(n), host + offset - start)
            f.flush()
            os.fsync(f.fileno())
        new = cache + RECOVERED_SUFFIX
        with contextlib.suppress(FileNotFoundError):
            os.unlink(new)
        self._qemu_img(['convert', '-q', '-O', 'qcow2', '-o',
                        'cluster_size=%d' % cluster, self._unbacked(cache),
                        new], 'convert')
        with open(new, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(new, cache)
        store.fsync_dir(os.path.dirname(cache))
        return len(clusters)
