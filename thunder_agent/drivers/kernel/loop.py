"""Loop devices over local files (COW stores, caches, bcache superblocks)."""

import os

from thunder_agent.drivers.kernel import check
from thunder_agent.drivers.kernel import sysfs
from thunder_agent.privileged import kernel as priv


def create_sparse_file(path, size):
    """Create *path* as a sparse file of *size* bytes unless it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def find(path):
    """Loop devices currently backed by *path*."""
    real = os.path.realpath(path)
    return sorted(dev for dev, backing in sysfs.loop_backing_files().items()
                  if backing == real)


def attach(path, read_only=False):
    """Attach *path*, reusing a loop device already backed by it."""
    existing = find(path)
    if existing:
        return existing[0]
    args = ['--find', '--show']
    if read_only:
        args.append('--read-only')
    out = check(priv.losetup(args + [os.path.realpath(path)]),
                'losetup %s' % path)
    return out.strip()


def detach(device):
    check(priv.losetup(['--detach', device]),
          'losetup --detach %s' % device, ok_codes=(0, 1))


def detach_under(directory):
    """Detach every loop device whose backing file lies in *directory*."""
    root = os.path.realpath(directory) + os.sep
    for dev, backing in sysfs.loop_backing_files().items():
        if backing.startswith(root):
            detach(dev)
