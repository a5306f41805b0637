"""Device-mapper tables and device names of the kernel backend.

Pure functions: they check their arguments and return table text for
``dmsetup create/load``; nothing here touches the system. A template
stacks, bottom to top::

    <prefix>-<image>-src   multipath over the iSCSI LUNs of the sources
                           (one path per parent, queue_if_no_path, created
                           read-only: parents export write-protected LUNs)
    <prefix>-<image>-bk    bcache backing device: 16 local sectors holding
                           the bcache superblock, then the source
    /dev/bcacheN           (bcache) or <prefix>-<image>-dmc (dm-cache)
    <prefix>-<image>-tpl   read-only linear map over the cache: the stable
                           name tgt exports and snapshots stack on

and each instance gets ``<prefix>-snap-<instance>``: a dm ``snapshot``
whose origin is the template and whose COW store is a local loop device.
The template never changes, so no ``snapshot-origin`` is needed under it.
"""

import re

from thunder_agent import exception

SECTOR = 512
# bcache's default data offset: the superblock lives in sectors 8..15 and
# the cached data starts after them.
BCACHE_DATA_OFFSET = 16
# dm names are limited to 127 bytes (DM_NAME_LEN - 1).
_MAX_NAME = 127
_NAME_PART = re.compile(r'^[a-z0-9][a-z0-9-]*$')
_DEVICE = re.compile(r'^(/dev/[A-Za-z0-9/_.:-]+|\d+:\d+)$')
ROLES = ('src', 'bk', 'dmc', 'tpl')


def _invalid(reason):
    raise exception.InvalidDeviceTable(reason=reason)


def sectors(size_bytes):
    """Convert a byte size to 512-byte sectors; it must be a whole number."""
    if (isinstance(size_bytes, bool) or not isinstance(size_bytes, int)
            or size_bytes <= 0):
        _invalid('size %r must be a positive integer' % (size_bytes,))
    if size_bytes % SECTOR:
        _invalid('size %d is not a multiple of %d bytes'
                 % (size_bytes, SECTOR))
    return size_bytes // SECTOR


def _length(value, what='length'):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _invalid('%s %r must be a positive number of sectors'
                 % (what, value))
    return value


def _device(value):
    if not isinstance(value, str) or not _DEVICE.match(value):
        _invalid('%r is not a device path or major:minor' % (value,))
    return value


def _power_of_two_sectors(value, what, minimum):
    _length(value, what)
    if value & (value - 1) or value < minimum:
        _invalid('%s %d must be a power of two of at least %d sectors'
                 % (what, value, minimum))
    return value


def device_name(prefix, role, ident):
    """``<prefix>-<ident>-<role>``, e.g. ``thunder-<image_id>-tpl``."""
    if role not in ROLES:
        _invalid('unknown device role %r' % (role,))
    return _name(prefix, ident, role)


def snapshot_name(prefix, instance_id):
    return _name(prefix, 'snap', instance_id)


def _name(*parts):
    for part in parts:
        if not isinstance(part, str) or not _NAME_PART.match(part):
            _invalid('name part %r must be lower-case letters, digits and '
                     'dashes' % (part,))
    name = '-'.join(parts)
    if len(name) > _MAX_NAME:
        _invalid('device name %s is longer than %d bytes'
                 % (name, _MAX_NAME))
    return name


def multipath(length, paths, queue_if_no_path=True):
    """One priority group holding every path, round-robin between them.

    With ``queue_if_no_path`` an I/O that finds no working path waits in
    the kernel until a table with a working path is loaded (re-parenting)
    instead of failing up to the template and the VMs.
    """
    _length(length)
    if not isinstance(paths, (list, tuple)) or not paths:
        _invalid('a multipath table needs at least one path')
    paths = [_device(p) for p in paths]
    if len(set(paths)) != len(paths):
        _invalid('duplicate paths in %s' % (paths,))
    features = ['queue_if_no_path'] if queue_if_no_path else []
    fields = ['0', str(length), 'multipath', str(len(features))] + features
    # No hardware handler; one group, used first; round-robin selector with
    # no selector arguments; each path takes one argument (repeat count).
    fields += ['0', '1', '1', 'round-robin', '0', str(len(paths)), '1']
    for path in paths:
        fields += [path, '1']
    return ' '.join(fields)


def linear(segments):
    """A concatenation of ``(device, offset_sectors, length_sectors)``."""
    if not isinstance(segments, (list, tuple)) or not segments:
        _invalid('a linear table needs at least one segment')
    lines = []
    start = 0
    for segment in segments:
        if not isinstance(segment, (list, tuple)) or len(segment) != 3:
            _invalid('segment %r must be (device, offset, length)'
                     % (segment,))
        device, offset, length = segment
        _device(device)
        if isinstance(offset, bool) or not isinstance(offset, int) \
                or offset < 0:
            _invalid('offset %r must be >= 0' % (offset,))
        _length(length)
        lines.append('%d %d linear %s %d' % (start, length, device, offset))
        start += length
    return '\n'.join(lines)


def bcache_backing(superblock_device, source_device, length):
    """The source behind a local superblock area, for ``make-bcache -B``.

    bcache writes its superblock at the start of the backing device; the
    source (an origin or a parent's template) must never be written, so
    the first 16 sectors come from a small local file instead.
    """
    return linear([(superblock_device, 0, BCACHE_DATA_OFFSET),
                   (source_device, 0, length)])


def snapshot(length, origin, cow, persistent=True, chunk_sectors=8):
    """Writable COW layer over *origin* keeping its changes in *cow*."""
    _length(length)
    _power_of_two_sectors(chunk_sectors, 'chunk size', 8)
    return '0 %d snapshot %s %s %s %d' % (
        length, _device(origin), _device(cow), 'P' if persistent else 'N',
        chunk_sectors)


DM_CACHE_MODES = ('writethrough', 'passthrough')


def cache(length, metadata, cache_device, origin, block_sectors,
          mode='writethrough', policy='smq'):
    """dm-cache over *origin* (kept to compare with bcache)."""
    _length(length)
    # dm-cache blocks are 32 KiB to 1 GiB.
    _power_of_two_sectors(block_sectors, 'cache block size', 64)
    if mode not in DM_CACHE_MODES:
        _invalid('dm-cache mode %r is not one of %s'
                 % (mode, ', '.join(DM_CACHE_MODES)))
    if policy not in ('smq', 'mq', 'cleaner'):
        _invalid('dm-cache policy %r is unknown' % (policy,))
    return '0 %d cache %s %s %s %d 1 %s %s 0' % (
        length, _device(metadata), _device(cache_device), _device(origin),
        block_sectors, mode, policy)


def parse_multipath_status(status):
    """Paths and their state from ``dmsetup status`` of a multipath map.

    Returns ``{'queued_ios': n, 'paths': [(device, active)]}``; *active* is
    False for a failed path. Raises InvalidDeviceTable on other text.
    """
    fields = status.split()
    try:
        if fields[2] != 'multipath':
            raise ValueError
        i = 3
        nfeat = int(fields[i])
        feature_args = fields[i + 1:i + 1 + nfeat]
        i += 1 + nfeat
        nhw = int(fields[i])
        i += 1 + nhw
        ngroups = int(fields[i])
        i += 2          # group count, next group to use
        paths = []
        for _ in range(ngroups):
            i += 1      # group state (A/E/D)
            nsel = int(fields[i])
            i += 1 + nsel
            npaths, npath_args = int(fields[i]), int(fields[i + 1])
            i += 2
            for _ in range(npaths):
                device, state = fields[i], fields[i + 1]
                paths.append((device, state == 'A'))
                i += 3 + npath_args   # device, state, fail count, args
    except (IndexError, ValueError):
        _invalid('not a multipath status: %r' % status)
    # The first status feature counts queued I/Os ("queue_if_no_path" is
    # reported as the number of I/Os currently queued).
    queued = int(feature_args[0]) if feature_args else 0
    return {'queued_ios': queued, 'paths': paths}


def parse_cache_status(status):
    """Used and total cache blocks from ``dmsetup status`` of dm-cache."""
    fields = status.split()
    try:
        if fields[2] != 'cache':
            raise ValueError
        used, total = fields[6].split('/')
        return {'block_sectors': int(fields[5]), 'used_blocks': int(used),
                'total_blocks': int(total), 'read_hits': int(fields[7]),
                'read_misses': int(fields[8]),
                'promotions': int(fields[12])}
    except (IndexError, ValueError):
        _invalid('not a dm-cache status: %r' % status)
