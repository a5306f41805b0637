"""A power cut under a template's cache, on real qemu-storage-daemons.

The power cut is made by hand: the template daemon is killed during a
flush (its writes are in the page cache, so the file has them), then the
clusters filled since the flush before keep their qcow2 mapping but lose
their data in the file: what a disk that got the L2 tables and not the
data leaves.
"""

import hashlib
import json
import os
import signal
import subprocess
import time

import nbd
import pytest

from oslo_config import cfg

from thunder_agent import conf as agent_conf
from thunder_agent.drivers.qemu import driver as qemu_driver
from thunder_agent.drivers.qemu import recovery
from thunder_agent.drivers.qemu import storage_daemon
from thunder_agent import manifest as manifest_mod
from thunder_agent import origin as origin_mod
from thunder_agent import records

pytestmark = pytest.mark.functional

MIB = 1 << 20
CLUSTER = 65536


def _conf(workdir):
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    conf.set_override('run_path', os.path.join(workdir, 'run'),
                      group='agent')
    conf.set_override('state_path', os.path.join(workdir, 'state'),
                      group='agent')
    conf.set_override('listen_address', '127.0.0.1', group='relay')
    conf.set_override('flush_timeout', 2, group='qemu')
    conf.set_override('enabled', False, group='tls')
    return conf


@pytest.fixture
def origin(workdir, image, qemu_tools):
    server = origin_mod.OriginServer(
        image['path'], 'raw', image['id'],
        {'type': 'unix', 'path': os.path.join(workdir, 'origin.sock')},
        os.path.join(workdir, 'origin-run')).start()
    yield server
    server.stop()


def _held(cache):
    """{cluster index: file offset or None (zero cluster)} of what the
    cache itself holds."""
    name = 'json:' + json.dumps({'driver': 'qcow2', 'backing': None,
                                 'file': {'driver': 'file',
                                          'filename': cache}})
    out = subprocess.run(['qemu-img', 'map', '-U', '--output=json', name],
                         capture_output=True, text=True, check=True,
                         timeout=30).stdout
    held = {}
    for e in json.loads(out):
        if not e['present'] or e['depth'] != 0:
            continue
        for n in range(e['length'] // CLUSTER):
            held[e['start'] // CLUSTER + n] = (
                e['offset'] + n * CLUSTER if e['data'] else None)
    return held


def _read_sha(socket_path, export, offset, length):
    handle = nbd.NBD()
    handle.set_export_name(export)
    handle.connect_unix(socket_path)
    digest = hashlib.sha256()
    for start in range(offset, offset + length, 4 * MIB):
        digest.update(handle.pread(min(4 * MIB, offset + length - start),
                                   start))
    handle.shutdown()
    return digest.hexdigest()


def _image_sha(image, offset, length):
    with open(image['path'], 'rb') as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


def _kill(daemon):
    pid = daemon.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while storage_daemon.StorageDaemon._alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_power_cut_clusters_are_dropped_and_fetched_again(
        workdir, image, origin, monkeypatch):
    conf = _conf(workdir)
    driver = qemu_driver.QemuDriver(conf)
    driver.start()
    template = records.Template(
        image_id=image['id'], origin=records.Endpoint.from_dict(
            origin.connection()),
        size=image['size'], image_format='raw', driver='qemu',
        sources=[records.Source.origin(records.Endpoint.from_dict(
            origin.connection()))])
    tdir = os.path.join(conf.agent.state_path, 'templates', image['id'])
    os.makedirs(tdir)
    with open(image['path'], 'rb') as f:
        def read(offset, length):
            f.seek(offset)
            return f.read(length)
        manifest_mod.build(read, image['size']).write(
            os.path.join(tdir, qemu_driver.MANIFEST_FILE))
    build = driver.create_template(template, tdir)
    template.export = build.export
    template.driver_state = build.driver_state
    sock = build.export.local['socket']
    cache = os.path.join(tdir, qemu_driver.CACHE_FILE)
    daemon = storage_daemon.StorageDaemon(image['id'], conf.agent.run_path)
    try:
        # Fills, flushed; then fills after that flush. A kill alone loses
        # the later fills' mappings (QEMU keeps L2 updates in memory until
        # a flush), so the cut comes during the next flush: QEMU has
        # written the L2 tables, the disk kept them and not the data.
        _read_sha(sock, image['id'], 0, 16 * MIB)
        driver.flush_template(template, tdir)
        flushed = _held(cache)
        _read_sha(sock, image['id'], 16 * MIB, 16 * MIB)
        driver.flush_template(template, tdir)
        _kill(daemon)
        unflushed = {i: off for i, off in _held(cache).items()
                     if i not in flushed and off is not None}
        # Copy-on-read writes the image's zero MiBs as data too.
        assert len(unflushed) == 16 * MIB // CLUSTER
        assert not os.path.exists(recovery.marker_path(tdir))
        # The power cut: half the clusters come back as zeros, half as
        # stale bytes.
        wrong = set()
        with open(cache, 'r+b') as f, open(image['path'], 'rb') as src:
            for n, (index, off) in enumerate(sorted(unflushed.items())):
                lost = bytes(CLUSTER) if n % 2 else b'\xa5' * CLUSTER
                f.seek(off)
                f.write(lost)
                src.seek(index * CLUSTER)
                if src.read(CLUSTER) != lost:
                    wrong.add(index)
        # Zeros where the image is zero are no loss.
        assert len(wrong) == len(unflushed) - 32

        # Without recovery the template serves the wrong bytes.
        real_recover = driver._recover_cache
        monkeypatch.setattr(driver, '_recover_cache', lambda *args: None)
        driver.ensure_template(template, tdir)
        assert (_read_sha(sock, image['id'], 16 * MIB, 16 * MIB)
                != _image_sha(image, 16 * MIB, 16 * MIB))
        _kill(daemon)
        monkeypatch.setattr(driver, '_recover_cache', real_recover)

        results = []
        real = driver._recovery.recover
        monkeypatch.setattr(driver._recovery, 'recover',
                            lambda *a: results.append(real(*a)) or
                            results[-1])
        started = time.monotonic()
        build = driver.ensure_template(template, tdir)
        rebuilt = time.monotonic() - started
        template.driver_state = build.driver_state
        [result] = results
        assert result.action == 'dropped'
        assert result.dropped == len(wrong)
        assert result.checked == len(flushed) + len(unflushed)
        kept = _held(cache)
        assert not set(kept) & wrong
        # The flushed clusters are kept, but for those of zeros: the
        # sparse rewrite leaves them out (a fetch of zeros each).
        with open(image['path'], 'rb') as src:
            nonzero = {i for i in flushed
                       if os.pread(src.fileno(), CLUSTER, i * CLUSTER)
                       != bytes(CLUSTER)}
        assert len(nonzero) == len(flushed) * 3 // 4
        assert set(kept) - set(unflushed) == nonzero

        sent = origin.bytes_read()
        assert _read_sha(sock, image['id'], 0, image['size']) == (
            image['sha256'])
        fetched = origin.bytes_read() - sent
        # What the cache no longer holds came from the origin again, the
        # dropped clusters with it.
        missing = image['size'] - len(kept) * CLUSTER
        assert missing >= len(wrong) * CLUSTER
        assert missing <= fetched <= missing + 64 * 1024
        print('recovery %r, rebuild %.2f s, fetched again %d bytes'
              % (result, rebuilt, fetched))

        # A clean stop marks the cache; the next build trusts it.
        driver.delete_template(template, tdir)
        assert recovery.is_clean(tdir, cache)
        results.clear()
        driver.ensure_template(template, tdir)
        assert results == []
        assert not os.path.exists(recovery.marker_path(tdir))
        sent = origin.bytes_read()
        assert _read_sha(sock, image['id'], 0, image['size']) == (
            image['sha256'])
        assert origin.bytes_read() - sent < 64 * 1024
    finally:
        driver.delete_template(template, tdir)
