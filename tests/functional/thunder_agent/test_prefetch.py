"""Prefetch against real templates: an agent with the qemu backend, an
origin qemu-storage-daemon, NBD_CMD_CACHE through the copy-on-read graph."""

import hashlib
import os
import threading
import time
import uuid

import pytest

from thunder_agent import origin as origin_mod
from thunder_agent import prefetch
from thunder_agent import trace as trace_mod
from thunder_lab.emulation import reader
from thunder_lab import trace_recorder

pytestmark = pytest.mark.functional

KIB = 1024
MIB = 1 << 20


def synthetic_trace(image):
    """A boot-like trace: scattered reads of 4 KiB..128 KiB, some
    repeated, over about a tenth of the image."""
    reads = []
    t = 0.0
    for i in range(240):
        length = 4 * KIB * (1 + (i * 37) % 32)
        offset = (i * 7919 * 4 * KIB) % (image['size'] - length)
        offset -= offset % 512
        t += 0.001 * (i % 5)
        reads.append(trace_mod.Read(t, offset, length, 0.0005))
    reads += [trace_mod.Read(t + 0.01, r.offset, r.length, 0.0005)
              for r in reads[:20]]
    return trace_mod.Trace(image['size'], image['sha256'], reads)


def replay_digest(conn, trace):
    """Read the trace through a snapshot; sha256 of the bytes read."""
    digest = hashlib.sha256()
    with reader.open_snapshot(conn) as handle:
        for read in trace.reads:
            digest.update(handle.pread(read.length, read.offset))
    return digest.hexdigest()


def expected_digest(path, trace):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for read in trace.reads:
            f.seek(read.offset)
            digest.update(f.read(read.length))
    return digest.hexdigest()


def assert_no_image_data(origin_bytes):
    # The origin daemon's read counter also sees its event loop's 8-byte
    # eventfd reads; image data comes in sectors (512 bytes) or more.
    assert origin_bytes < 512, origin_bytes


def template_export(agent, image_id):
    for template in agent.client.get_status()['templates']:
        if template['image_id'] == image_id:
            return prefetch.NbdAddress.from_export(template['export'])
    raise AssertionError('no template %s' % image_id)


def test_trace_prefetch_then_replay_fetches_nothing(agent, image, origin):
    trace = synthetic_trace(image)
    working_set = trace.unique_bytes(64 * KIB)
    agent.client.prepare_template(image['id'], origin.connection(),
                                  image['size'], 'raw')
    address = template_export(agent, image['id'])
    updates = []
    before = origin.bytes_read()
    engine = prefetch.TracePrefetcher(address, trace, concurrency=4,
                                      progress=updates.append)
    status = engine.start().result()
    fetched = origin.bytes_read() - before
    print('\ntrace prefetch: %d requests, %d bytes in %.2f s (%s); origin '
          'sent %d bytes for a working set of %d'
          % (status['requests_done'], status['bytes_done'],
             status['elapsed_s'], status['method'], fetched, working_set))
    assert status['state'] == 'done' and status['method'] == 'cache'
    assert status['bytes_done'] == status['bytes_total'] == working_set
    assert updates[-1]['bytes_done'] == working_set
    # Each block once, nothing beyond the working set.
    assert 0.95 * working_set <= fetched <= 1.02 * working_set
    assert agent.client.get_status()['templates'][0]['bytes_fetched'] == \
        working_set

    conn = agent.client.create_snapshot(image['id'], str(uuid.uuid4()))
    middle = origin.bytes_read()
    assert replay_digest(conn, trace) == expected_digest(image['path'],
                                                         trace)
    assert_no_image_data(origin.bytes_read() - middle)


def test_full_prefetch_is_paced_and_leaves_nothing_to_fetch(
        agent, image, origin):
    rate = 24 * MIB
    agent.client.prepare_template(image['id'], origin.connection(),
                                  image['size'], 'raw')
    address = template_export(agent, image['id'])
    before = origin.bytes_read()
    engine = prefetch.FullPrefetcher(address, image['size'], rate=rate,
                                     chunk=4 * MIB)
    started = time.monotonic()
    status = engine.start().result()
    elapsed = time.monotonic() - started
    fetched = origin.bytes_read() - before
    print('\nfull prefetch of %d MiB at %d MiB/s: %.2f s, origin sent %d '
          'bytes' % (image['size'] // MIB, rate // MIB, elapsed, fetched))
    assert status['state'] == 'done'
    assert status['bytes_done'] == image['size']
    # One chunk of burst, then the rate.
    ideal = (image['size'] - 4 * MIB) / rate
    assert 0.9 * ideal <= elapsed <= 1.3 * ideal + 1
    assert image['size'] <= fetched <= 1.01 * image['size']

    conn = agent.client.create_snapshot(image['id'], str(uuid.uuid4()))
    middle = origin.bytes_read()
    assert reader.checksum(conn) == (image['sha256'], image['size'])
    assert_no_image_data(origin.bytes_read() - middle)


def test_full_prefetch_stands_back_for_a_reading_vm(agent, image, origin):
    agent.client.prepare_template(image['id'], origin.connection(),
                                  image['size'], 'raw')
    conn = agent.client.create_snapshot(image['id'], str(uuid.uuid4()))
    address = template_export(agent, image['id'])
    foreground = [0]
    stop = threading.Event()

    def vm():
        # A VM reading 8 MiB/s for two seconds, through its snapshot.
        with reader.open_snapshot(conn) as handle:
            for i in range(16):
                if stop.is_set():
                    break
                foreground[0] += len(handle.pread(MIB, i * MIB))
                time.sleep(1 / 8)

    thread = threading.Thread(target=vm)
    samples = []
    engine = prefetch.FullPrefetcher(
        address, image['size'], rate=64 * MIB, chunk=2 * MIB,
        foreground=lambda: foreground[0], yield_threshold=MIB,
        window=0.5, pause=0.1,
        progress=lambda s: samples.append((time.monotonic(), s['state'],
                                           s['bytes_done'])))
    thread.start()
    time.sleep(0.3)
    engine.start()
    thread.join(30)
    stop.set()
    status = engine.result()
    print('\nfull prefetch yielded %.1f s to the VM' % status['yielded_s'])
    assert status['state'] == 'done'
    assert status['bytes_done'] == image['size']
    assert status['yielded_s'] >= 1.0
    assert any(state == 'yielding' for _, state, _ in samples)


@pytest.mark.slow
def test_recorded_boot_trace_prefetch(workdir, qemu_tools):
    """The real thing: record the test image's boot, prefetch its trace
    into a fresh template graph, replay: the origin sends nothing more."""
    from thunder_agent.drivers.qemu import driver as qemu_backend
    from thunder_agent.drivers.qemu import storage_daemon
    from thunder_lab.guest import image as guest_image
    import shutil
    import subprocess
    if not shutil.which('qemu-system-x86_64'):
        pytest.skip('qemu-system-x86 is not installed')
    try:
        manifest = guest_image.build(progress=lambda m: None)
    except Exception as e:
        pytest.skip('test image cannot be built here: %s' % e)
    image = manifest['path']
    trace = trace_recorder.record(image,
                                  output=os.path.join(workdir, 't.trace'))
    assert trace.image_sha256 == manifest['image_sha256']
    assert trace.meta['stop'] == 'poweroff'
    # The guest reads its data file: the working set is megabytes.
    assert trace.unique_bytes() > 4 * MIB
    assert trace.unique_bytes() < trace.image_size

    origin = origin_mod.OriginServer(
        image, 'raw', 'guest', {'type': 'unix',
                                'path': os.path.join(workdir, 'o.sock')},
        os.path.join(workdir, 'orun')).start()
    cache = os.path.join(workdir, 'cache.qcow2')
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', cache,
                    str(trace.image_size)], check=True)
    daemon = storage_daemon.StorageDaemon('tmpl', os.path.join(workdir, 't'))
    socket = os.path.join(workdir, 't.sock')
    daemon.start(nbd_server={'type': 'unix', 'path': socket})
    try:
        # The same graph as the qemu backend's template.
        daemon.commands(
            ('blockdev-add', {'driver': 'nbd', 'node-name': 'src',
                              'server': {'type': 'unix',
                                         'path': os.path.join(workdir,
                                                              'o.sock')},
                              'export': 'guest', 'read-only': True}),
            ('blockdev-add', {'driver': 'raw', 'node-name': 'origin',
                              'file': 'src', 'read-only': True}),
            ('blockdev-add', {'driver': 'file', 'node-name': 'cache-file',
                              'filename': cache}),
            ('blockdev-add', {'driver': 'qcow2', 'node-name': 'cache',
                              'file': 'cache-file', 'backing': 'origin'}),
            ('blockdev-add', {'driver': 'copy-on-read',
                              'node-name': 'template', 'file': 'cache'}),
            ('block-export-add', {'type': 'nbd', 'id': 'template',
                                  'node-name': 'template', 'name': 'guest',
                                  'writable': False}))
        assert qemu_backend.EXPORT_ID == 'template'
        address = prefetch.NbdAddress(socket=socket, export='guest')
        before = origin.bytes_read()
        status = prefetch.TracePrefetcher(address, trace).run()
        fetched = origin.bytes_read() - before
        print('\nboot trace: %d reads, working set %d bytes; prefetch '
              'fetched %d in %.2f s' % (len(trace.reads),
                                        trace.unique_bytes(64 * KIB),
                                        fetched, status['elapsed_s']))
        assert status['state'] == 'done'
        assert fetched <= 1.02 * trace.unique_bytes(64 * KIB)
        import nbd
        handle = nbd.NBD()
        handle.set_export_name('guest')
        handle.connect_unix(socket)
        middle = origin.bytes_read()
        digest = hashlib.sha256()
        for read in trace.reads:
            digest.update(handle.pread(read.length, read.offset))
        handle.shutdown()
        assert_no_image_data(origin.bytes_read() - middle)
        assert digest.hexdigest() == expected_digest(image, trace)
    finally:
        daemon.stop()
        origin.stop()
