"""The local read cache under a template: bcache (default) or dm-cache.

A template must keep every block on its first read so that each block
crosses each link once. Measured inside the guest (Debian 6.1 kernel under
QEMU TCG; tests/guest/test_cache_choice.py and test_relay.py), bytes read at
the origin's backing loop device while the image is read twice in full
(A's own snapshot, then A's template as a child reads it), in images:

=============================  =========================================
bcache (writearound,           1.03 to 1.07 (8 MiB image, six runs);
sequential_cutoff 0, no        1.002 to 1.027 in the full relay
congestion bypass, 1 GiB       origin -> A -> B with both snapshots read
sparse cache, 64 KiB buckets)  (32 MiB image, six runs)
dm-cache smq writethrough      2.29 to 2.63: smq promotes a block only
(64 KiB blocks)                after repeated hits, and each promotion
                               reads it from the origin once more
dm-cache smq passthrough       2.00: it never caches reads
=============================  =========================================

So bcache. The few percent above 1 are read misses bcache did not insert:
it inserts a miss only if a free bucket is at hand and never waits for one
on the read path, so a busy allocator (a loaded host, a small cache) drops
some; the cache therefore gets many buckets (a large sparse file). Besides,
udev probes every new block device (blkid); below the cache those reads go
upstream once per device, about 1 MiB each, whatever the image size.

Both variants take the source device (the template's multipath map) and
return the cached block device; files live in the template's directory
and survive agent restarts and reboots (``assemble`` re-adopts them). The
privileged helper builds their tables and runs make-bcache itself, over
the agent's own devices only (:mod:`thunder_agent.privileged.kernel`).
"""

import os
import time

from oslo_log import log as logging

from thunder_agent import exception
from thunder_agent.drivers.kernel import devmapper
from thunder_agent.drivers.kernel import dmtables
from thunder_agent.drivers.kernel import loop
from thunder_agent.drivers.kernel import sysfs
from thunder_agent.privileged import kernel as priv
from thunder_agent.privileged import scope as pscope

LOG = logging.getLogger(__name__)

CACHE_FILE = 'cache.img'
BCACHE_SB_FILE = 'bcache-sb.img'
DMCACHE_META_FILE = 'dmcache-meta.img'
MIB = 1024 * 1024
_UNITS = {'': 1, 'k': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40,
          'P': 1 << 50}


def parse_bcache_size(text):
    """bcache's human-readable sizes ("31.0M", "0.5k") in bytes."""
    text = text.strip()
    unit = text[-1] if text and text[-1] in _UNITS else ''
    number = text[:-1] if unit else text
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise exception.BackendError(reason='unexpected bcache size %r'
                                            % text)


def cache_file_size(image_size, min_size_mb, ratio, block_size):
    size = max(int(image_size * ratio), min_size_mb * MIB)
    return -(-size // block_size) * block_size


def dmcache_meta_size(file_size, block_size):
    """dm-cache metadata: 4 MiB plus 16 bytes per cache block
    (lvmcache's rule), in whole MiB."""
    blocks = file_size // block_size
    return -(-(4 * MIB + 16 * blocks) // MIB) * MIB


def capacity(kind, image_size, conf):
    """Most bytes the cache files of one template can take: the sparse
    cache file full, plus bcache's 1 MiB superblock file or dm-cache's
    metadata."""
    block = conf.kernel.cache_block_size
    size = cache_file_size(image_size, conf.kernel.cache_min_size_mb,
                           conf.kernel.cache_size_ratio, block)
    if kind == DmCache.kind:
        return size + dmcache_meta_size(size, block)
    return size + MIB


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise exception.BackendError(reason='timed out waiting for %s'
                                                % what)
        time.sleep(0.2)


def _allocated(path):
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


class Bcache:
    kind = 'bcache'

    def __init__(self, prefix, image_id, template_dir, block_size,
                 file_size, timeout, scope=None):
        self.scope = scope
        self.image_id = image_id
        self.backing_name = dmtables.device_name(prefix, 'bk', image_id)
        self.sb_file = os.path.join(template_dir, BCACHE_SB_FILE)
        self.cache_file = os.path.join(template_dir, CACHE_FILE)
        self.block_size = block_size
        self.file_size = file_size
        self.timeout = timeout

    # -- sysfs views -----------------------------------------------------
    def _backing_sysfs(self):
        path = devmapper.device_path(self.backing_name)
        if not os.path.exists(path):
            return None
        return '/sys/block/%s/bcache' % sysfs.block_name(path)

    def device(self):
        """``/dev/bcacheN`` when the backing device is registered and
        attached to its cache set, else None."""
        bdir = self._backing_sysfs()
        if not bdir or not os.path.exists(os.path.join(bdir, 'cache')):
            return None
        dev = os.path.join(bdir, 'dev')
        if not os.path.exists(dev):
            return None
        return '/dev/' + os.path.basename(os.readlink(dev))

    def _cache_set(self):
        bdir = self._backing_sysfs()
        if bdir and os.path.exists(os.path.join(bdir, 'cache')):
            return os.path.basename(os.readlink(os.path.join(bdir, 'cache')))
        for dev in loop.find(self.cache_file):
            link = '/sys/block/%s/bcache/set' % os.path.basename(dev)
            if os.path.exists(link):
                return os.path.basename(os.readlink(link))
        return None

    # -- life cycle ------------------------------------------------------
    def create(self, source, length):
        loop.create_sparse_file(self.sb_file, MIB)
        loop.create_sparse_file(self.cache_file, self.file_size)
        backing, cache_dev = self._attach(source, length)
        out = priv.make_bcache(self.scope, self.image_id, cache_dev,
                               self.block_size)
        if out[0] != 0:
            raise exception.BackendError(
                reason='make-bcache failed: %s' % out[2].strip())
        return self._register(backing, cache_dev)

    def assemble(self, source, length):
        """Re-adopt a running cache or register the one on disk."""
        device = self.device()
        if device:
            self._tune()
            return device
        backing, cache_dev = self._attach(source, length)
        return self._register(backing, cache_dev)

    def _attach(self, source, length):
        # *source* is the template's -src map: the helper puts exactly
        # that one behind the superblock area.
        sb = loop.attach(self.scope, self.sb_file)
        if not devmapper.exists(self.scope, self.backing_name):
            devmapper.created(priv.create_bcache_backing(
                self.scope, self.image_id, sb, length), self.backing_name)
        cache_dev = loop.attach(self.scope, self.cache_file)
        return devmapper.device_path(self.backing_name), cache_dev

    def _register(self, backing, cache_dev):
        # udev's bcache rule may have registered either device already;
        # bcache then answers EINVAL/EBUSY, so judge by the outcome.
        for dev in (cache_dev, backing):
            code, _out, err = priv.write_sysfs(
                self.scope, '/sys/fs/bcache/register', dev)
            if code:
                LOG.debug('bcache register %s: %s', dev, err)
        device = _wait_for(self.device, self.timeout,
                           'bcache device over %s' % self.backing_name)
        self._tune()
        return device

    def _tune(self):
        bdir = self._backing_sysfs()
        cset = '/sys/fs/bcache/' + self._cache_set()
        settings = [
            # Cache every miss, however sequential the reads are.
            (os.path.join(bdir, 'sequential_cutoff'), 0),
            # Nothing writes to a template; make sure a write could never
            # fill the cache either.
            (os.path.join(bdir, 'cache_mode'), 'writearound'),
            # Never bypass the cache because it looks busy: a bypassed
            # miss would be fetched again later.
            (os.path.join(cset, 'congested_read_threshold_us'), 0),
            (os.path.join(cset, 'congested_write_threshold_us'), 0),
        ]
        for path, value in settings:
            code, _out, err = priv.write_sysfs(self.scope, path, value)
            if code:
                raise exception.BackendError(
                    reason='bcache setting %s failed: %s' % (path, err))

    def destroy(self):
        """Stop the bcache device and cache set, remove what lies below.
        Idempotent."""
        cset = self._cache_set()
        bdir = self._backing_sysfs()
        if bdir and os.path.exists(bdir):
            priv.write_sysfs(self.scope, os.path.join(bdir, 'stop'), 1)
            _wait_for(lambda: not os.path.exists(bdir), self.timeout,
                      'bcache to release %s' % self.backing_name)
        if cset and os.path.exists('/sys/fs/bcache/' + cset):
            priv.write_sysfs(self.scope, '/sys/fs/bcache/%s/stop' % cset,
                             1)
            _wait_for(lambda: not os.path.exists('/sys/fs/bcache/' + cset),
                      self.timeout, 'bcache cache set %s to stop' % cset)
        devmapper.remove(self.scope, self.backing_name)
        for path in (self.cache_file, self.sb_file):
            for dev in loop.find(path):
                loop.detach(self.scope, dev)

    def stats(self):
        cset = self._cache_set()
        cached = 0
        if cset:
            # Data written into the cache; a template's cache is only ever
            # written by read-miss fills.
            with open('/sys/fs/bcache/%s/cache0/written' % cset) as f:
                cached = parse_bcache_size(f.read())
        return {'cached_bytes': cached, 'block_size': self.block_size,
                'blocks_cached': cached // self.block_size,
                'disk_bytes': (_allocated(self.cache_file)
                               + _allocated(self.sb_file))}

    def disk_bytes(self):
        return _allocated(self.cache_file) + _allocated(self.sb_file)


class DmCache:
    kind = 'dm-cache'

    def __init__(self, prefix, image_id, template_dir, block_size,
                 file_size, timeout, mode='writethrough', scope=None):
        self.scope = scope
        self.image_id = image_id
        self.name = dmtables.device_name(prefix, 'dmc', image_id)
        self.cache_file = os.path.join(template_dir, CACHE_FILE)
        self.meta_file = os.path.join(template_dir, DMCACHE_META_FILE)
        self.block_size = block_size
        self.file_size = file_size
        self.timeout = timeout
        self.mode = mode

    def device(self):
        path = devmapper.device_path(self.name)
        return path if devmapper.exists(self.scope, self.name) else None

    def create(self, source, length):
        loop.create_sparse_file(self.meta_file, dmcache_meta_size(
            self.file_size, self.block_size))
        loop.create_sparse_file(self.cache_file, self.file_size)
        return self.assemble(source, length)

    def assemble(self, source, length):
        device = self.device()
        if device:
            return device
        # The helper builds the table over the template's -src map, which
        # is *source*.
        meta = loop.attach(self.scope, self.meta_file)
        cache_dev = loop.attach(self.scope, self.cache_file)
        return devmapper.created(priv.create_dm_cache(
            self.scope, self.image_id, length, meta, cache_dev,
            self.block_size // dmtables.SECTOR, self.mode), self.name)

    def destroy(self):
        devmapper.remove(self.scope, self.name, timeout=self.timeout)
        for path in (self.cache_file, self.meta_file):
            for dev in loop.find(path):
                loop.detach(self.scope, dev)

    def stats(self):
        used = 0
        if self.device():
            used = dmtables.parse_cache_status(
                devmapper.status(self.scope, self.name))['used_blocks']
        return {'cached_bytes': used * self.block_size,
                'block_size': self.block_size, 'blocks_cached': used,
                'disk_bytes': self.disk_bytes()}

    def disk_bytes(self):
        return _allocated(self.cache_file) + _allocated(self.meta_file)


def make(kind, prefix, image_id, template_dir, image_size, conf):
    """The cache of one template, as configured in ``[kernel]``."""
    block = conf.kernel.cache_block_size
    if block & (block - 1):
        raise exception.InvalidInput(
            reason='[kernel] cache_block_size %d is not a power of two'
                   % block)
    size = cache_file_size(image_size, conf.kernel.cache_min_size_mb,
                           conf.kernel.cache_size_ratio, block)
    timeout = conf.kernel.teardown_timeout
    scope = dict(pscope.of(conf), device_prefix=prefix)
    if kind == Bcache.kind:
        return Bcache(prefix, image_id, template_dir, block, size, timeout,
                      scope=scope)
    if kind == DmCache.kind:
        return DmCache(prefix, image_id, template_dir, block, size, timeout,
                       mode=conf.kernel.dm_cache_mode, scope=scope)
    raise exception.InvalidInput(reason='unknown cache type %r' % (kind,))
