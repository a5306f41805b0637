"""The verifying upstream on real parts: the origin server (qemu-storage-
daemon with its manifest export), a parent played by nbdkit serving the
image with flipped bytes, the verifier (nbdkit + verifier_plugin over
libnbd) and a template daemon (copy-on-read qcow2 cache) reading through
it, as the qemu driver builds one.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time

import nbd
import pytest

from thunder_lab import pki

from thunder_agent.drivers.qemu import storage_daemon
from thunder_agent.drivers.qemu import upstream
from thunder_agent import manifest as manifest_mod
from thunder_agent import records

pytestmark = pytest.mark.functional

MIB = 1 << 20
BLOCK = manifest_mod.DEFAULT_BLOCK_SIZE
PARENT_PLUGIN = os.path.join(os.path.dirname(__file__), 'flipping_parent.py')
FLIPPED = (3, 17, 130, 700)


@pytest.fixture
def nbdkit_python():
    try:
        subprocess.run(['nbdkit', 'python', '--version'], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip('nbdkit and nbdkit-plugin-python are not installed')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Parent:
    """An nbdkit parent on 127.0.0.1 serving *image* with one byte
    flipped in each of the *flip* blocks; a read touching block *stall*
    waits *stall_seconds* first."""

    def __init__(self, workdir, image, flip=(), stall=None,
                 stall_seconds=0, tls_dir=None):
        self.port = free_port()
        self.count_path = os.path.join(workdir, 'parent-%d.count'
                                       % self.port)
        args = ['file=%s' % image, 'count=%s' % self.count_path,
                'flip=%s' % ','.join(str(b) for b in flip),
                'block_size=%d' % BLOCK]
        if stall is not None:
            args += ['stall=%d' % stall, 'stall_seconds=%s' % stall_seconds]
        tls = []
        if tls_dir is not None:
            # As a parent's relay export: TLS required, client checked.
            tls = ['--tls=require', '--tls-certificates=%s' % tls_dir,
                   '--tls-verify-peer']
        self.proc = subprocess.Popen(
            ['nbdkit', '-f', '-r', '-i', '127.0.0.1', '-p', str(self.port)]
            + tls + ['python', PARENT_PLUGIN] + args,
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(('127.0.0.1', self.port),
                                         timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, 'parent did not start'
                time.sleep(0.02)

    def served(self):
        try:
            with open(self.count_path) as f:
                return int(f.read() or 0)
        except FileNotFoundError:
            return 0

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def endpoint(self, export):
        return records.Endpoint('nbd', {'host': '127.0.0.1',
                                        'port': self.port,
                                        'export': export})


def fetch_manifest(origin, image, path):
    handle = nbd.NBD()
    handle.set_export_name(manifest_mod.export_name(image['id']))
    handle.connect_unix(origin.listen['path'])
    manifest = manifest_mod.Manifest.from_bytes(
        handle.pread(handle.get_size(), 0), image['size'])
    manifest.write(path)
    return manifest


class Template:
    """A template daemon as the driver builds it: copy-on-read over a
    qcow2 cache whose backing reads the verifier's socket."""

    def __init__(self, workdir, image, source_socket):
        self.socket = os.path.join(workdir, 'tpl.nbd')
        cache = os.path.join(workdir, 'cache.qcow2')
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-o',
                        'cluster_size=%d' % BLOCK, cache,
                        str(image['size'])], check=True, timeout=30)
        self.daemon = storage_daemon.StorageDaemon('tpl', workdir)
        blockdevs = [
            {'driver': 'nbd', 'node-name': 'source', 'read-only': True,
             'server': {'type': 'unix', 'path': source_socket},
             'export': image['id'], 'reconnect-delay': 30,
             'open-timeout': 10},
            {'driver': 'raw', 'node-name': 'origin', 'file': 'source',
             'read-only': True},
            {'driver': 'file', 'node-name': 'cache-file',
             'filename': cache},
            {'driver': 'qcow2', 'node-name': 'cache', 'file': 'cache-file',
             'backing': 'origin'},
            {'driver': 'copy-on-read', 'node-name': 'template',
             'file': 'cache'}]
        args = []
        for bd in blockdevs:
            args += ['--blockdev', json.dumps(bd)]
        args += ['--export', json.dumps({
            'type': 'nbd', 'id': 'template', 'node-name': 'template',
            'name': image['id'], 'writable': False})]
        self.daemon.start(nbd_server={'type': 'unix', 'path': self.socket},
                          extra_args=args, max_connections=4)
        self.handle = nbd.NBD()
        self.handle.set_export_name(image['id'])
        self.handle.connect_unix(self.socket)

    def read(self, offset, length):
        return self.handle.pread(length, offset)

    def sha256(self, size, chunk=4 * MIB):
        digest = hashlib.sha256()
        for offset in range(0, size, chunk):
            digest.update(self.read(offset, min(chunk, size - offset)))
        return digest.hexdigest()

    def stop(self):
        self.handle = None
        self.daemon.stop()


@pytest.fixture
def setup(workdir, image, origin, nbdkit_python):
    made = []

    def make(tls_dir=None, **parent_args):
        manifest = fetch_manifest(origin, image,
                                  os.path.join(workdir, 'manifest'))
        parent = Parent(workdir, image['path'],
                        tls_dir=parent_args.pop('parent_tls', None),
                        **parent_args)
        up = upstream.Upstream(image['id'], workdir)
        verify = upstream.Verify(
            records.Endpoint('nbd', {'socket': origin.listen['path'],
                                     'export': image['id']}),
            os.path.join(workdir, 'manifest'), tls_dir=tls_dir,
            parent_wait=2)
        up.start_verifier(parent.endpoint(image['id']), verify)
        template = Template(workdir, image, up.socket)
        made.extend((template, up, parent))
        return manifest, parent, up, template

    yield make
    for thing in made:
        getattr(thing, 'stop', getattr(thing, 'kill', None))()


def test_wrong_parent_is_caught_and_bypassed(setup, image, origin):
    origin_before = origin.bytes_read()
    manifest, parent, up, template = setup(flip=FLIPPED)
    manifest_bytes = len(manifest.to_bytes())

    assert template.sha256(image['size']) == image['sha256']

    report = up.mismatch()
    assert report['parent'] == '127.0.0.1:%d/%s' % (parent.port,
                                                    image['id'])
    # The first flipped block was rejected; the parent was bypassed from
    # then on (the blocks of that same request aside), so later flipped
    # blocks came from the origin.
    assert report['bad_blocks'][0] == FLIPPED[0]
    assert set(report['bad_blocks']) <= set(FLIPPED)
    stats = wait_stats(up, lambda s: s['blocks_checked'] == manifest.count)
    assert stats['bypass'] == 'mismatch'
    assert stats['blocks_rejected'] == len(report['bad_blocks'])
    assert stats['parent_bytes'] + stats['origin_bytes'] - (
        stats['blocks_rejected'] * BLOCK) == image['size']
    # The origin read the rejected block, what followed the rejection, and
    # the manifest: not the image twice.
    origin_read = origin.bytes_read() - origin_before
    assert origin_read >= stats['origin_bytes'] + manifest_bytes
    assert origin_read < stats['origin_bytes'] + manifest_bytes + MIB

    # Later reads (past the cache: a new range) bypass the parent.
    served = parent.served()
    assert template.read(0, MIB) == image_bytes(image, 0, MIB)
    assert parent.served() == served


def test_flipped_blocks_within_one_read_all_come_from_the_origin(
        setup, image, origin):
    flipped = (1, 2, 5)
    manifest, parent, up, template = setup(flip=flipped)
    # One 512 KiB read covering blocks 0..7.
    assert template.read(0, 8 * BLOCK) == image_bytes(image, 0, 8 * BLOCK)
    report = up.mismatch()
    assert report['bad_blocks'] == list(flipped)
    stats = wait_stats(up, lambda s: s['blocks_checked'] >= 8)
    assert stats['origin_bytes'] == len(flipped) * BLOCK
    assert stats['blocks_rejected'] == len(flipped)


def test_a_parent_dying_mid_read_blocks_then_reads_the_origin(
        setup, image):
    # Block 200's read stalls in the parent until the parent is killed.
    manifest, parent, up, template = setup(stall=200, stall_seconds=30)
    result = {}

    def read_all():
        try:
            result['sha256'] = template.sha256(image['size'])
        except nbd.Error as e:
            result['error'] = e

    reader = threading.Thread(target=read_all)
    started = time.monotonic()
    reader.start()
    deadline = time.monotonic() + 10
    while parent.served() < 150 * BLOCK:
        assert time.monotonic() < deadline, 'the parent served no data'
        time.sleep(0.02)
    # The reads reached block 200 (4 MiB reads: at most 64 blocks on).
    served = parent.served()
    time.sleep(0.3)
    assert parent.served() == served < 200 * BLOCK
    assert reader.is_alive(), 'the read did not wait for the parent'
    parent.kill()
    reader.join(30)
    assert not reader.is_alive()
    assert result == {'sha256': image['sha256']}
    # Blocked for about parent_wait (2 s), then the origin answered.
    assert time.monotonic() - started < 15
    assert up.mismatch() is None
    stats = wait_stats(up, lambda s: s['blocks_checked'] == manifest.count)
    assert stats['bypass'] == 'unreachable'
    assert stats['parent_retries'] >= 1
    assert stats['parent_bytes'] + stats['origin_bytes'] == image['size']


def image_bytes(image, offset, length):
    with open(image['path'], 'rb') as f:
        f.seek(offset)
        return f.read(length)


def wait_stats(up, done, timeout=5):
    """The verifier's stats once *done(stats)* (they are written at most
    every second)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = up.verifier_stats()
        if stats is not None and done(stats):
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)


@pytest.fixture(scope='module')
def ca(tmp_path_factory):
    return pki.CA.create(str(tmp_path_factory.mktemp('ca')))


def test_a_tls_parent_is_read_when_its_certificate_names_its_address(
        setup, image, workdir, ca):
    parent_pki = ca.issue('node-p', os.path.join(workdir, 'pki-p'),
                          ips=['127.0.0.1'])
    child_pki = ca.issue('node-c', os.path.join(workdir, 'pki-c'),
                         ips=['127.0.0.1'])
    manifest, parent, up, template = setup(
        tls_dir=child_pki, parent_tls=parent_pki)
    assert template.sha256(image['size']) == image['sha256']
    stats = wait_stats(up, lambda s: s['blocks_checked'] == manifest.count)
    assert stats['parent_bytes'] == image['size']
    assert stats['origin_bytes'] == 0
    assert stats['bypass'] is None


def test_a_tls_parent_with_another_address_is_never_read(
        setup, image, workdir, ca):
    # Its certificate is valid (same CA) but names another address.
    parent_pki = ca.issue('node-p', os.path.join(workdir, 'pki-p'),
                          ips=['192.0.2.44'])
    child_pki = ca.issue('node-c', os.path.join(workdir, 'pki-c'),
                         ips=['127.0.0.1'])
    manifest, parent, up, template = setup(
        tls_dir=child_pki, parent_tls=parent_pki)
    started = time.monotonic()
    assert template.sha256(image['size']) == image['sha256']
    # Refused for parent_wait (2 s), then the origin; never EIO.
    assert 1.5 < time.monotonic() - started < 15
    assert parent.served() == 0
    stats = wait_stats(up, lambda s: s['blocks_checked'] == manifest.count)
    assert stats['origin_bytes'] == image['size']
    assert stats['bypass'] == 'unreachable'
