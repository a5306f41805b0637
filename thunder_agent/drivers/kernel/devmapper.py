"""device-mapper devices through ``dmsetup`` (run by privsep)."""

import time

from thunder_agent import exception
from thunder_agent.drivers.kernel import check
from thunder_agent.privileged import kernel as priv

MAPPER_DIR = '/dev/mapper/'
UUID_PREFIX = 'THUNDER-'
# dmsetup exit code when the device does not exist is 1 with this text.
_NO_DEVICE = ('No such device', 'does not exist')


def device_path(name):
    return MAPPER_DIR + name


def exists(name):
    code, _out, err = priv.dmsetup(['info', name])
    if code == 0:
        return True
    if any(text in err for text in _NO_DEVICE):
        return False
    raise exception.BackendError(reason='dmsetup info %s: %s'
                                 % (name, err.strip()))


def create(name, table, readonly=False):
    args = ['create', name, '--uuid', UUID_PREFIX + name]
    if readonly:
        args.append('--readonly')
    check(priv.dmsetup(args, stdin=table + '\n'),
          'dmsetup create %s' % name)
    return device_path(name)


def reload(name, table, readonly=False):
    """Swap the table of a live device; queued I/O carries over.

    ``--noflush`` keeps I/O that a multipath map queued (no usable path)
    queued across the swap instead of failing it.
    """
    check(priv.dmsetup(['suspend', '--noflush', name]),
          'dmsetup suspend %s' % name)
    try:
        args = ['load', name]
        if readonly:
            args.append('--readonly')
        check(priv.dmsetup(args, stdin=table + '\n'),
              'dmsetup load %s' % name)
    finally:
        # Resume in any case: with a failed load the old table comes back.
        check(priv.dmsetup(['resume', name]),
              'dmsetup resume %s' % name)


def remove(name, timeout=30):
    """Remove *name*; absent is fine. udev may hold a just-created device
    open for a moment, hence the retries."""
    deadline = time.monotonic() + timeout
    while True:
        code, _out, err = priv.dmsetup(['remove', '--retry', name])
        if code == 0 or any(text in err for text in _NO_DEVICE):
            return
        if time.monotonic() >= deadline:
            raise exception.BackendError(
                reason='dmsetup remove %s: %s' % (name, err.strip()))
        time.sleep(0.5)


def status(name):
    return check(priv.dmsetup(['status', name]),
                 'dmsetup status %s' % name).strip()


def open_count(name):
    out = check(priv.dmsetup(['info', '-c', '--noheadings', '-o', 'open',
                              name]), 'dmsetup info %s' % name)
    return int(out.strip())
