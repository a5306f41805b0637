"""Privileged block-device operations of the kernel driver (see
:mod:`thunder_agent.drivers.kernel`), in the :data:`block` context.

Each entry point does one thing to the agent's own files and devices
(:mod:`thunder_agent.privileged.scope`): it takes ids, sizes and device
names, checks them, and builds the command line or the device-mapper
table itself from the checked values; nothing a caller passes becomes an
option or a table field unchecked. Callers get ``(exit code, stdout,
stderr)`` back and turn failures into typed errors themselves, because a
ProcessExecutionError loses its exit code crossing the privsep channel.

What the driver does, and the entry point it uses:

=====================================  ==================================
attach a loop device to a state file   :func:`attach_loop`
detach one                             :func:`detach_loop`
``<p>-<image>-src`` multipath map      :func:`create_source_map`,
                                       :func:`reload_source_map`
``<p>-<image>-bk`` bcache backing      :func:`create_bcache_backing`
``<p>-<image>-dmc`` dm-cache           :func:`create_dm_cache`
``<p>-<image>-tpl`` template           :func:`create_template_map`
``<p>-snap-<instance>`` snapshot       :func:`create_snapshot_map`
info, open count, status, remove       :func:`dm_info`, :func:`dm_status`,
                                       :func:`dm_open_count`,
                                       :func:`remove_dm_device`
make-bcache over ``-bk`` and a loop    :func:`make_bcache`
bcache and iSCSI session attributes    :func:`write_sysfs`
modprobe of the modules it uses        :func:`load_kernel_modules`
=====================================  ==================================
"""

import errno
import fcntl
import os
import re
import stat
import struct
import subprocess

from thunder_agent.drivers.kernel import dmtables
from thunder_agent import privileged
from thunder_agent.privileged import block
from thunder_agent.privileged import scope as sc

KERNEL_MODULES = frozenset({
    'bcache', 'dm_cache', 'dm_cache_smq', 'dm_multipath', 'dm_snapshot',
    'iscsi_tcp', 'loop', 'sd_mod'})
UUID_PREFIX = 'THUNDER-'
# The largest image a table may describe: 2**63 bytes in sectors.
MAX_SECTORS = 2 ** 54
# bcache buckets: 4 KiB (a page) to 64 MiB; make-bcache's own limits are
# wider, the driver uses [kernel] cache_block_size (64 KiB by default).
MIN_BUCKET = 4096
MAX_BUCKET = 64 << 20
# Seconds an iSCSI session holds I/O for a dead target (recovery_tmo);
# the driver sets [kernel] source_recovery_timeout (5 s).
MAX_RECOVERY_TMO = 600
BCACHE_MODES = ('writethrough', 'writeback', 'writearound', 'none')
DMSETUP_TIMEOUT = 120

# linux/loop.h
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_READ_ONLY = 1
_LO_NAME_SIZE = 64
# struct loop_config: fd, block_size, struct loop_info64, 8 reserved u64.
# loop_info64: device, inode, rdevice, offset, sizelimit (u64), number,
# encrypt_type, encrypt_key_size, flags (u32), file_name[64],
# crypt_name[64], encrypt_key[32], init[2] (u64).
_LOOP_CONFIG = struct.Struct('=II5Q4I64s64s32s2Q8Q')
_LOOP_ATTEMPTS = 8


def run(context, argv, stdin=None, timeout=DMSETUP_TIMEOUT,
        capabilities=None):
    """Run the tool *argv* with at most *capabilities* (default:
    *context*'s); ``(exit code, stdout, stderr)``."""
    try:
        proc = subprocess.run(privileged.confined(context, argv,
                                                  capabilities),
                              input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return -1, '', '%s timed out after %ss' % (argv[0], timeout)
    except FileNotFoundError:
        return 127, '', '%s: command not found' % privileged.SETPRIV
    if proc.returncode == 127 and not proc.stdout:
        # setpriv could not execute the tool.
        return 127, '', '%s: command not found (%s)' % (
            argv[0], proc.stderr.strip())
    return proc.returncode, proc.stdout, proc.stderr


def _run(argv, stdin=None, timeout=DMSETUP_TIMEOUT):
    return run(block, argv, stdin=stdin, timeout=timeout)


def _sectors(value, what='length'):
    return sc.integer(value, what, 1, MAX_SECTORS)


@block.entrypoint
def load_kernel_modules(names):
    if not isinstance(names, (list, tuple)) or not names:
        sc.refuse('kernel modules must be a list of names')
    names = [sc.text(n, 'module') for n in names]
    unknown = set(names) - KERNEL_MODULES
    if unknown:
        sc.refuse('kernel modules %s are not used here' % sorted(unknown))
    return _run(['modprobe', '-a'] + names)


# -- loop devices ------------------------------------------------------------

@block.entrypoint
def attach_loop(scope, path, read_only=False):
    """Attach a free loop device to the regular file *path* under
    ``state_path``; ``(0, '/dev/loopN', '')``.

    The file is opened here with ``O_NOFOLLOW`` and checked through the
    open descriptor (regular, really under ``state_path``), and the loop
    device is bound to that descriptor (``LOOP_CONFIGURE``), so the file
    cannot be swapped for a link between the check and the attach, as
    it could under ``losetup <path>``.
    """
    scope = sc.admit(scope)
    real = sc.own_file(scope, path)
    if not isinstance(read_only, bool):
        sc.refuse('read_only must be a boolean')
    try:
        if not stat.S_ISREG(os.lstat(real).st_mode):
            sc.refuse('%s is not a regular file' % path)
    except FileNotFoundError as e:
        return e.errno, '', '%s: %s' % (path, e.strerror)
    # O_NONBLOCK: a FIFO swapped in after the check must not hang us.
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NOFOLLOW | \
        os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(real, flags)
    except OSError as e:
        return e.errno, '', '%s: %s' % (path, e.strerror)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or \
                os.readlink('/proc/self/fd/%d' % fd) != real:
            sc.refuse('%s is not a regular file of this agent' % path)
        # The loop device reads and writes through this descriptor.
        fcntl.fcntl(fd, fcntl.F_SETFL,
                    fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return _configure_loop(fd, real, read_only)
    finally:
        os.close(fd)


def _configure_loop(fd, real, read_only):
    name = real.encode()[:_LO_NAME_SIZE - 1]
    config = _LOOP_CONFIG.pack(
        fd, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        _LO_FLAGS_READ_ONLY if read_only else 0, name, b'', b'', 0, 0,
        *([0] * 8))
    last = None
    for _ in range(_LOOP_ATTEMPTS):
        try:
            control = os.open('/dev/loop-control', os.O_RDWR | os.O_CLOEXEC)
            try:
                number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
            finally:
                os.close(control)
            device = '/dev/loop%d' % number
            loop_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(loop_fd, _LOOP_CONFIGURE, config)
            finally:
                os.close(loop_fd)
            return 0, device, ''
        except OSError as e:
            # EBUSY: another process took that free device first.
            if e.errno != errno.EBUSY:
                return e.errno, '', 'attaching a loop device: %s' \
                    % e.strerror
            last = e
    return last.errno, '', 'no free loop device: %s' % last.strerror


@block.entrypoint
def detach_loop(scope, device):
    """Detach ``/dev/loopN`` if it is backed by a file under state_path
    (losetup's exit code 1: it was not attached)."""
    scope = sc.admit(scope)
    sc.own_loop(scope, device)
    return _run(['losetup', '--detach', device])


# -- device-mapper -----------------------------------------------------------

def _dmsetup_create(name, table, readonly):
    args = ['dmsetup', 'create', name, '--uuid', UUID_PREFIX + name]
    if readonly:
        args.append('--readonly')
    return _run(args, stdin=table + '\n')


@block.entrypoint
def dm_info(scope, name):
    """``dmsetup info`` of one of the agent's devices (exists or not)."""
    name = sc.own_dm_name(sc.admit(scope), name)
    return _run(['dmsetup', 'info', name])


@block.entrypoint
def dm_open_count(scope, name):
    name = sc.own_dm_name(sc.admit(scope), name)
    return _run(['dmsetup', 'info', '-c', '--noheadings', '-o', 'open',
                 name])


@block.entrypoint
def dm_status(scope, name):
    name = sc.own_dm_name(sc.admit(scope), name)
    return _run(['dmsetup', 'status', name])


@block.entrypoint
def remove_dm_device(scope, name):
    """``dmsetup remove --retry`` of one of the agent's devices."""
    name = sc.own_dm_name(sc.admit(scope), name)
    return _run(['dmsetup', 'remove', '--retry', name])


def _source_table(scope, length, disks):
    if not isinstance(disks, (list, tuple)) or not disks:
        sc.refuse('a source map needs at least one disk')
    paths = [sc.dev_numbers(sc.iscsi_disk(d)[1]) for d in disks]
    return dmtables.multipath(_sectors(length), paths)


@block.entrypoint
def create_source_map(scope, image_id, length, disks):
    """``<p>-<image>-src``: read-only multipath over the iSCSI disks
    *disks* (``/dev/sdX``), ``queue_if_no_path``."""
    scope = sc.admit(scope)
    name = sc.dm_name(scope, 'src', image_id)
    return _dmsetup_create(name, _source_table(scope, length, disks),
                           readonly=True)


@block.entrypoint
def reload_source_map(scope, image_id, length, disks):
    """Swap the paths of ``<p>-<image>-src``; queued I/O carries over.

    ``suspend --noflush`` keeps I/O that the map queued (no usable path)
    queued across the swap instead of failing it; the device is resumed
    in any case, so a failed load brings the old table back. Returns the
    first failure, or the load's result.
    """
    scope = sc.admit(scope)
    name = sc.dm_name(scope, 'src', image_id)
    table = _source_table(scope, length, disks)
    result = _run(['dmsetup', 'suspend', '--noflush', name])
    if result[0] != 0:
        return result
    try:
        result = _run(['dmsetup', 'load', name, '--readonly'],
                      stdin=table + '\n')
    finally:
        resumed = _run(['dmsetup', 'resume', name])
    return result if result[0] != 0 else resumed


def _mapper(scope, role, image_id):
    return '/dev/mapper/' + sc.dm_name(scope, role, image_id)


@block.entrypoint
def create_bcache_backing(scope, image_id, superblock, length):
    """``<p>-<image>-bk``: the 16-sector local superblock area *superblock*
    (a loop device over a state file) in front of ``<p>-<image>-src``."""
    scope = sc.admit(scope)
    name = sc.dm_name(scope, 'bk', image_id)
    table = dmtables.bcache_backing(sc.own_loop(scope, superblock),
                                    _mapper(scope, 'src', image_id),
                                    _sectors(length))
    return _dmsetup_create(name, table, readonly=False)


@block.entrypoint
def create_dm_cache(scope, image_id, length, metadata, cache_device,
                    block_sectors, mode):
    """``<p>-<image>-dmc``: dm-cache over ``<p>-<image>-src`` with its
    metadata and cache on loop devices over state files."""
    scope = sc.admit(scope)
    name = sc.dm_name(scope, 'dmc', image_id)
    table = dmtables.cache(
        _sectors(length), sc.own_loop(scope, metadata),
        sc.own_loop(scope, cache_device), _mapper(scope, 'src', image_id),
        sc.integer(block_sectors, 'cache block size', 64, 2 ** 21),
        mode=sc.text(mode, 'dm-cache mode'))
    return _dmsetup_create(name, table, readonly=False)


@block.entrypoint
def create_template_map(scope, image_id, length, cached):
    """``<p>-<image>-tpl``: read-only linear map over the cache, which is
    ``/dev/bcacheN`` over ``<p>-<image>-bk`` or ``<p>-<image>-dmc``."""
    scope = sc.admit(scope)
    name = sc.dm_name(scope, 'tpl', image_id)
    if sc.text(cached, 'cache device').startswith('/dev/bcache'):
        sc.own_bcache(scope, cached)
        backing = _bcache_backing_name(cached)
        if backing != sc.dm_name(scope, 'bk', image_id):
            sc.refuse('%s is not the cache of image %s' % (cached,
                                                           image_id))
    elif cached != _mapper(scope, 'dmc', image_id):
        sc.refuse('%s is not the cache of image %s' % (cached, image_id))
    table = dmtables.linear([(cached, 0, _sectors(length))])
    return _dmsetup_create(name, table, readonly=True)


def _bcache_backing_name(device):
    kname = device[len('/dev/'):]
    for slave in sc._listdir(sc._sys('block', kname, 'slaves')):
        name = sc._read(sc._sys('block', slave, 'dm', 'name'))
        if name:
            return name
    return None


@block.entrypoint
def create_snapshot_map(scope, instance_id, image_id, length, cow,
                        chunk_sectors):
    """``<p>-snap-<instance>``: persistent dm snapshot of
    ``<p>-<image>-tpl`` with its COW store on *cow* (a loop device over a
    state file)."""
    scope = sc.admit(scope)
    name = sc.dm_name(scope, 'snap', instance_id)
    table = dmtables.snapshot(
        _sectors(length), _mapper(scope, 'tpl', image_id),
        sc.own_loop(scope, cow), persistent=True,
        chunk_sectors=sc.integer(chunk_sectors, 'chunk size', 8, 2 ** 21))
    return _dmsetup_create(name, table, readonly=False)


# -- bcache ------------------------------------------------------------------

@block.entrypoint
def make_bcache(scope, image_id, cache_device, bucket_size):
    """``make-bcache`` with ``<p>-<image>-bk`` as the backing device and
    *cache_device* (a loop device over a state file) as the cache."""
    scope = sc.admit(scope)
    backing = _mapper(scope, 'bk', image_id)
    sc.own_dm(scope, backing, roles=('bk',))
    sc.own_loop(scope, cache_device)
    bucket = sc.integer(bucket_size, 'bucket size', MIN_BUCKET, MAX_BUCKET)
    if bucket & (bucket - 1):
        sc.refuse('bucket size %d is not a power of two' % bucket)
    return _run(['make-bcache', '--bucket', str(bucket), '--block', '512',
                 '-B', backing, '-C', cache_device])


_CACHE_SET = r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
_SYSFS_WRITABLE = (
    ('register', re.compile(r'^/fs/bcache/(register|register_quiet)$')),
    ('cache set', re.compile(r'^/fs/bcache/(%s)/(stop|unregister|'
                             r'congested_read_threshold_us|'
                             r'congested_write_threshold_us)$'
                             % _CACHE_SET)),
    ('backing', re.compile(r'^/devices/virtual/block/(dm-\d+)/bcache/'
                           r'(stop|sequential_cutoff|cache_mode)$')),
    ('session', re.compile(r'^/devices/platform/host\d+/session\d+/'
                           r'iscsi_session/session\d+/(recovery_tmo)$')),
)


@block.entrypoint
def write_sysfs(scope, path, value):
    """Write *value* to one of the bcache or iSCSI session attributes the
    driver tunes, of the agent's own devices only:

    * ``/sys/fs/bcache/register``: one of the agent's loop or ``-bk``
      devices;
    * a cache set's ``stop``/``unregister`` (1) or congestion thresholds
      (microseconds), for a set whose cache is one of the agent's loop
      devices;
    * a ``-bk`` device's ``stop`` (1), ``sequential_cutoff`` (bytes) or
      ``cache_mode``;
    * an iSCSI session's ``recovery_tmo`` (1 to 600 s).

    OSError comes back as ``(errno, '', text)``: bcache answers "already
    registered" with EINVAL/EBUSY and callers decide from the state.
    """
    scope = sc.admit(scope)
    real = os.path.realpath(sc.text(path, 'path'))
    if not real.startswith(sc.SYSFS + '/'):
        sc.refuse('writing %s' % real)
    relative = real[len(sc.SYSFS):]
    for kind, pattern in _SYSFS_WRITABLE:
        match = pattern.match(relative)
        if match:
            value = _sysfs_value(scope, kind, match, value)
            break
    else:
        sc.refuse('writing %s' % real)
    try:
        with open(real, 'w') as f:
            f.write(value)
    except OSError as e:
        return e.errno, '', '%s: %s' % (real, e.strerror)
    return 0, '', ''


def _sysfs_value(scope, kind, match, value):
    if kind == 'register':
        device = sc.text(value, 'device')
        if device.startswith('/dev/loop'):
            sc.own_loop(scope, device)
        else:
            sc.own_dm(scope, device, roles=('bk',))
        return device
    attribute = match.groups()[-1]
    if kind == 'cache set':
        cache = os.path.realpath(sc._sys('fs', 'bcache', match.group(1),
                                         'cache0'))
        loop = re.match(r'^.*/block/(loop\d+)/bcache$', cache)
        if not loop:
            sc.refuse('cache set %s is not on a loop device'
                      % match.group(1))
        sc.own_loop(scope, '/dev/' + loop.group(1))
    elif kind == 'backing':
        sc.own_dm(scope, '/dev/' + match.group(1), roles=('bk',))
    if attribute in ('stop', 'unregister'):
        sc.integer(value, attribute, 1, 1)
    elif attribute == 'cache_mode':
        if value not in BCACHE_MODES:
            sc.refuse('bcache cache mode %r is unknown' % (value,))
        return value
    elif attribute == 'recovery_tmo':
        sc.integer(value, attribute, 1, MAX_RECOVERY_TMO)
    else:
        sc.integer(value, attribute, 0, 2 ** 31)
    return str(value)
