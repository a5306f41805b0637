"""Read and write a snapshot the way a VM would, for tests and the demo.

A qemu-backend snapshot is a qcow2 overlay: it is opened with ``qemu-nbd``
(socket-activated by libnbd), so reads go overlay -> template export ->
cache -> source exactly as they do for a VM's QEMU.
"""

import contextlib
import hashlib

import nbd

CHUNK = 1 << 20


@contextlib.contextmanager
def open_snapshot(connection_info, writable=False):
    data = connection_info['data']
    handle = nbd.NBD()
    if data['backend'] == 'qemu':
        argv = ['qemu-nbd', '-f', data['format'], '--cache=none']
        if not writable:
            argv.append('--read-only')
        argv.append(data['path'])
    else:
        argv = ['qemu-nbd', '-f', 'raw', '--cache=none',
                data['device_path']]
        if not writable:
            argv.insert(1, '--read-only')
    handle.connect_systemd_socket_activation(argv)
    try:
        yield handle
    finally:
        if writable:
            handle.flush()
        handle.shutdown()


def checksum(connection_info, length=None):
    """sha256 and byte count of the snapshot's first *length* bytes."""
    digest = hashlib.sha256()
    with open_snapshot(connection_info) as handle:
        size = handle.get_size() if length is None else length
        offset = 0
        while offset < size:
            n = min(CHUNK, size - offset)
            digest.update(handle.pread(n, offset))
            offset += n
    return digest.hexdigest(), size


def read(connection_info, offset, length):
    parts = []
    with open_snapshot(connection_info) as handle:
        # NBD requests are limited in size (32 MiB for QEMU's server).
        for start in range(offset, offset + length, CHUNK):
            parts.append(handle.pread(min(CHUNK, offset + length - start),
                                      start))
    return b''.join(parts)


def write(connection_info, offset, payload):
    with open_snapshot(connection_info, writable=True) as handle:
        handle.pwrite(payload, offset)


def main(argv=None):
    """``python -m thunder_lab.emulation.reader CONNECTION_JSON``: read the
    whole snapshot (run it inside a host's namespace) and print a JSON line
    with sha256, bytes, seconds and the error, if any."""
    import json
    import sys
    import time
    argv = sys.argv[1:] if argv is None else argv
    conn = json.loads(argv[0])
    start = time.monotonic()
    try:
        digest, size = checksum(conn)
        result = {'sha256': digest, 'bytes': size, 'error': None}
    except Exception as e:  # reported, not raised: the caller asserts
        result = {'sha256': None, 'bytes': 0, 'error': repr(e)}
    result['seconds'] = time.monotonic() - start
    print(json.dumps(result), flush=True)
    return 0 if result['error'] is None else 1


if __name__ == '__main__':
    raise SystemExit(main())
