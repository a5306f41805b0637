"""Loop devices over local files (COW stores, caches, bcache superblocks).

The privileged helper attaches only regular files under ``[agent]
state_path`` and detaches only loop devices over such files
(:func:`thunder_agent.privileged.kernel.attach_loop`).
"""

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


def attach(scope, path, read_only=False):
    """Attach *path*, reusing a loop device already backed by it."""
    existing = find(path)
    if existing:
        return existing[0]
    out = check(priv.attach_loop(scope, path, read_only),
                'attaching a loop device to %s' % path)
    return out.strip()


def detach(scope, device):
    check(priv.detach_loop(scope, device),
          'losetup --detach %s' % device, ok_codes=(0, 1))


def detach_under(scope, directory):
    """Detach every loop device whose backing file lies in *directory*."""
    root = os.path.realpath(directory) + os.sep
    for dev, backing in sysfs.loop_backing_files().items():
        if backing.startswith(root):
            detach(scope, dev)
