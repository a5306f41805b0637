"""``thunder-demo``: one compute node, one image, two VMs, real daemons.

Starts a private RabbitMQ, an origin server (qemu-storage-daemon over NBD)
and a thunder-agent; asks the agent over RPC for a template and two VM
snapshots; lets each VM read the same boot working set; prints how many
bytes the VMs read and how many the origin had to send.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid

from thunder_agent import origin as origin_mod
from thunder_lab.emulation import agent as agent_mod
from thunder_lab.emulation import images
from thunder_lab.emulation import rabbitmq
from thunder_lab.emulation import reader

MIB = 1 << 20


def _say(msg):
    print('[%7.1fs] %s' % (time.monotonic() - _T0, msg), flush=True)


_T0 = time.monotonic()


def working_set(size, fraction, chunk=MIB // 4, align=64 * 1024):
    """Deterministic scattered extents covering *fraction* of the image,
    aligned to the cache's block size."""
    count = max(1, int(size * fraction) // chunk)
    stride = size // count // align * align
    return [(i * stride + (i * 7919 * align) % max(align, stride - chunk)
             // align * align, chunk) for i in range(count)]


def read_extents(conn, extents):
    total = 0
    with reader.open_snapshot(conn) as handle:
        for offset, length in extents:
            total += len(handle.pread(length, offset))
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size-mb', type=int, default=256)
    parser.add_argument('--working-set', type=float, default=0.1,
                        help='fraction of the image a boot reads')
    parser.add_argument('--workdir', help='keep files here (default: temp)')
    args = parser.parse_args(argv)
    if not (0 < args.working_set <= 1) or args.size_mb < 1:
        parser.error('need --size-mb >= 1 and 0 < --working-set <= 1')
    workdir = args.workdir or tempfile.mkdtemp(prefix='thunder-demo-',
                                               dir='/tmp')
    os.makedirs(workdir, exist_ok=True)
    size = args.size_mb * MIB
    image_id = str(uuid.uuid4())
    broker = origin = agent = None
    try:
        _say('starting a private RabbitMQ on loopback')
        broker = rabbitmq.RabbitMQ().start()
        _say('building a %d MiB image' % args.size_mb)
        image_dir = os.path.join(workdir, 'images')
        os.makedirs(image_dir, exist_ok=True)
        path = images.make_image(os.path.join(image_dir, 'demo.raw'), size)
        _say('serving it from an origin (qemu-storage-daemon, NBD)')
        # The agent reads origins only where it is told to, and refuses a
        # socket directory that anyone may write to (--workdir /tmp).
        sockets = os.path.join(workdir, 'origin-socket')
        os.makedirs(sockets, mode=0o700, exist_ok=True)
        origin = origin_mod.OriginServer(
            path, 'raw', image_id,
            {'type': 'unix', 'path': os.path.join(sockets, 'origin.sock')},
            os.path.join(workdir, 'origin-run')).start()
        _say('starting thunder-agent (qemu backend)')
        agent = agent_mod.AgentProcess(
            broker.transport_url, os.path.join(workdir, 'agent'),
            host='demo-node',
            options={'agent': {'origin_socket_dirs': sockets}}).start()
        extents = working_set(size, args.working_set)
        rows = []
        for vm in ('vm-1', 'vm-2'):
            instance = str(uuid.uuid4())
            before = origin.bytes_read()
            conn = agent.client.prepare(image_id, origin.connection(), size,
                                        'raw', instance)
            _say('%s: snapshot %s' % (vm, conn['data']['path']))
            got = read_extents(conn, extents)
            rows.append((vm, got, origin.bytes_read() - before))
            _say('%s: read its boot working set (%d MiB)' % (vm, got // MIB))
        _say('vm-2 reads its whole disk to check it')
        before = origin.bytes_read()
        digest, nbytes = reader.checksum(conn)
        rows.append(('vm-2 full', nbytes, origin.bytes_read() - before))
        ok = digest == images.sha256_file(path)
        status = agent.client.get_status()['templates'][0]
        print()
        print('%-10s %14s %18s' % ('reader', 'bytes read', 'origin bytes'))
        for name, got, sent in rows:
            print('%-10s %14d %18d' % (name, got, sent))
        boot_read = rows[0][1] + rows[1][1]
        boot_origin = rows[0][2] + rows[1][2]
        print()
        print('boot working set: the VMs read %d bytes, the origin sent %d '
              '(%.1f%%)' % (boot_read, boot_origin,
                            100.0 * boot_origin / boot_read))
        print('template %s: fetched %d, served %d, cached %d blocks of %d '
              'bytes' % (image_id, status['bytes_fetched'],
                         status['bytes_served'], status['blocks_cached'],
                         status['block_size']))
        print('vm-2 full read: sha256 %s the image'
              % ('matches' if ok else 'DOES NOT MATCH'))
        return 0 if ok else 1
    finally:
        if agent:
            agent.teardown()
        if origin:
            origin.stop()
        if broker:
            broker.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
