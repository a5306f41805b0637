"""Read-only queries of block devices through sysfs (no root needed)."""

import glob
import os

SECTOR = 512


def block_name(device_path):
    """Kernel name (``dm-3``, ``sda``, ``bcache0``) of a device node."""
    return os.path.basename(os.path.realpath(device_path))


def dev_numbers(device_path):
    """``major:minor`` of a block device."""
    with open('/sys/class/block/%s/dev' % block_name(device_path)) as f:
        return f.read().strip()


def size_bytes(device_path):
    with open('/sys/class/block/%s/size' % block_name(device_path)) as f:
        return int(f.read()) * SECTOR


def read_bytes(device_path):
    """Bytes read from the device since it appeared (/sys/block/X/stat)."""
    with open('/sys/class/block/%s/stat' % block_name(device_path)) as f:
        return int(f.read().split()[2]) * SECTOR


def holders(device_path):
    """Kernel names of the devices stacked on *device_path*."""
    return sorted(os.listdir('/sys/class/block/%s/holders'
                             % block_name(device_path)))


def iscsi_session_dir(device_path):
    """``/sys/class/iscsi_session/sessionN`` of a SCSI disk, or None."""
    real = os.path.realpath('/sys/class/block/%s/device'
                            % block_name(device_path))
    for part in real.split('/'):
        if part.startswith('session') and part[7:].isdigit():
            return '/sys/class/iscsi_session/' + part
    return None


def loop_backing_files():
    """``{'/dev/loopN': backing file}`` for every attached loop device."""
    found = {}
    for path in glob.glob('/sys/block/loop*/loop/backing_file'):
        with open(path) as f:
            backing = f.read().strip()
        found['/dev/' + path.split('/')[3]] = backing
    return found
