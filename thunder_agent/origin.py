"""An origin node: one image file served read-only over NBD.

The server is a qemu-storage-daemon exporting the file through its format
driver (raw or qcow2), so templates always see the image's raw contents.
``thunder-origin`` (:mod:`thunder_agent.cmd.origin`) runs one; to serve
inside a network namespace, run that command there (``ip netns exec``).

The image is the tenant's: before the daemon opens it, it is inspected as
the agent inspects its file origins (:func:`thunder_agent.image_check.
check_file`: the declared format, no backing or data file), and the qcow2
node is opened with ``backing: null`` all the same. The NBD server takes an
explicit number of clients (QEMU's ``max-connections``, 100 by default in
this QEMU): each host reading the origin directly holds one connection per
template, and a client beyond the cap waits unanswered until one leaves.

On a TCP address the NBD server requires TLS (:mod:`thunder_agent.tls`):
every client shows a certificate of the deployment CA, and its DN must
match one of the *tls_allow* globs (``CN=*`` by default: any node of the
deployment). A unix socket stays plain: it is local, guarded by its
directory's permissions.

The origin also serves the image's digest manifest
(:mod:`thunder_agent.manifest`) as a second read-only export,
``<export>.manifest``: relays check every block a parent sends against it,
and fetch it from the origin only. It is made at start by reading the
image's raw contents through a short-lived daemon on a private unix socket
(the same read-only, backing-less block graph), at ~1.5 GB/s of SHA-256
per core: about 1 s per GiB when the disk keeps up. It is kept in the run
directory under the image file's (device, inode, size, mtime): a restart
of an unchanged image reads nothing.
"""

import contextlib
import glob
import json
import os
import time

import nbd
from oslo_log import log as logging

from thunder_agent import exception
from thunder_agent.drivers.qemu import storage_daemon
from thunder_agent import image_check
from thunder_agent import manifest as manifest_mod
from thunder_agent import tls

LOG = logging.getLogger(__name__)

# Clients an origin serves at once: one per host that reads it directly
# (every host without relay; the tree's first level with it), plus their
# probes.
DEFAULT_MAX_CONNECTIONS = 256
# Every client's certificate DN must match one of these globs.
DEFAULT_TLS_ALLOW = ('CN=*',)
# Deadline of each 4 MiB read of the manifest scan (a local daemon).
SCAN_READ_TIMEOUT = 60
# A progress line every this many bytes of a scan.
SCAN_LOG_BYTES = 1 << 30


class OriginServer:
    def __init__(self, image_path, image_format, export, listen, run_path,
                 name=None, executable='qemu-storage-daemon',
                 max_connections=DEFAULT_MAX_CONNECTIONS, probe_runner=None,
                 tls_dir=None, tls_allow=DEFAULT_TLS_ALLOW):
        """*listen* is ``{'type': 'unix', 'path': P}`` or
        ``{'type': 'inet', 'host': H, 'port': N}``; *probe_runner*
        replaces the unprivileged qemu-img run of the format probe in
        tests. *tls_dir* is a ``[tls] certificates_dir`` (checked now,
        InvalidCredentials); on TCP, None serves without TLS (a lab
        only: anyone who reaches the port reads the image)."""
        self._probe_runner = probe_runner
        if image_format not in ('raw', 'qcow2'):
            raise exception.UnsupportedFormat(image_format=image_format,
                                              supported='raw, qcow2')
        if not os.path.isfile(image_path):
            raise exception.InvalidOrigin(reason='%s is not a file'
                                          % image_path)
        self.image_path = os.path.realpath(image_path)
        self.image_format = image_format
        self.export = export
        if isinstance(max_connections, bool) or not isinstance(
                max_connections, int) or max_connections < 1:
            raise exception.InvalidInput(
                reason='max_connections must be a positive integer')
        self.max_connections = max_connections
        self.listen = dict(listen)
        if self.listen.get('type') == 'inet':
            self.listen['port'] = str(self.listen['port'])
        self.name = name or 'origin-%s' % export
        self.run_path = run_path
        self.executable = executable
        self.daemon = storage_daemon.StorageDaemon(
            self.name, run_path, executable)
        self.credentials = None
        self.tls_allow = tuple(tls_allow)
        if self.listen['type'] == 'inet':
            if tls_dir is not None:
                self.credentials = tls.Credentials.from_dir(tls_dir)
                # Checked now, not at the first handshake.
                tls.authz_globs(self.tls_allow)
            else:
                LOG.warning('Origin %s serves %s:%s WITHOUT TLS: anyone '
                            'who reaches it reads the image', export,
                            self.listen['host'], self.listen['port'])

    def _blockdevs(self):
        blockdevs = [
            {'driver': 'file', 'node-name': 'image-file',
             'filename': self.image_path, 'read-only': True},
            {'driver': self.image_format, 'node-name': 'image',
             'file': 'image-file', 'read-only': True},
        ]
        if self.image_format == 'qcow2':
            # Image content is the tenant's: never follow a backing file
            # its header names.
            blockdevs[1]['backing'] = None
        args = []
        for bd in blockdevs:
            args += ['--blockdev', json.dumps(bd)]
        return args

    def start(self):
        """Inspect the image (UnsafeImage), make or find its manifest,
        then serve both."""
        image_check.check_file(
            self.image_path, self.image_format, self.export,
            lambda head, label: image_check.probe_with_qemu(
                head, label, run=self._probe_runner))
        manifest_path = self._manifest()
        args = self._blockdevs()
        args += ['--blockdev', json.dumps({
            'driver': 'file', 'node-name': 'manifest-file',
            'filename': manifest_path, 'read-only': True})]
        args += ['--blockdev', json.dumps({
            'driver': 'raw', 'node-name': 'manifest',
            'file': 'manifest-file', 'read-only': True})]
        args += ['--export', json.dumps({
            'type': 'nbd', 'id': 'origin', 'node-name': 'image',
            'name': self.export, 'writable': False})]
        args += ['--export', json.dumps({
            'type': 'nbd', 'id': 'manifest', 'node-name': 'manifest',
            'name': manifest_mod.export_name(self.export),
            'writable': False})]
        objects, options = (), None
        if self.credentials is not None:
            objects = (self.credentials.server_creds(),
                       tls.authz_globs(self.tls_allow))
            options = {'tls-creds': objects[0]['id'],
                       'tls-authz': objects[1]['id']}
        self.daemon.start(nbd_server=self.listen, extra_args=args,
                          max_connections=self.max_connections,
                          server_options=options, objects=objects)
        return self

    # -- manifest ----------------------------------------------------------
    def _manifest_key(self):
        st = os.stat(self.image_path)
        return '%x-%x-%d-%d' % (st.st_dev, st.st_ino, st.st_size,
                                st.st_mtime_ns)

    def _manifest(self):
        """The path of the image's manifest in the run directory, made by
        reading the image when no manifest of this very file is there."""
        os.makedirs(self.run_path, exist_ok=True)
        path = os.path.join(self.run_path, '%s-%s.manifest' % (
            self.name, self._manifest_key()))
        try:
            manifest_mod.Manifest.from_file(path)
            LOG.info('Origin %s: manifest %s kept from an earlier run',
                     self.export, path)
            return path
        except FileNotFoundError:
            pass
        except exception.InvalidManifest as e:
            LOG.warning('Origin %s: remaking manifest %s: %s',
                        self.export, path, e)
        # Manifests of an earlier version of the file.
        for old in glob.glob(os.path.join(
                glob.escape(self.run_path), glob.escape(self.name)
                + '-*.manifest')):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
        self._scan().write(path)
        return path

    def _scan(self):
        """Read the image's raw contents once and digest them."""
        scanner = storage_daemon.StorageDaemon(
            self.name + '-scan', self.run_path, self.executable)
        sock = os.path.join(self.run_path, self.name + '-scan.sock')
        scanner.stop()
        started = time.monotonic()
        try:
            scanner.start(
                nbd_server={'type': 'unix', 'path': sock},
                max_connections=1,
                extra_args=self._blockdevs() + ['--export', json.dumps({
                    'type': 'nbd', 'id': 'scan', 'node-name': 'image',
                    'name': self.export, 'writable': False})])
            handle = nbd.NBD()
            handle.set_export_name(self.export)
            handle.connect_unix(sock)
            size = handle.get_size()
            LOG.info('Origin %s: making the digest manifest of %d bytes',
                     self.export, size)
            logged = [0]

            def progress(done):
                if done - logged[0] >= SCAN_LOG_BYTES:
                    logged[0] = done
                    LOG.info('Origin %s: manifest %d%% (%d of %d bytes)',
                             self.export, done * 100 // size, done, size)

            result = manifest_mod.build(
                lambda offset, length: _pread(handle, offset, length),
                size, progress=progress)
            handle.shutdown()
        except nbd.Error as e:
            raise exception.OriginUnavailable(
                image_id=self.export,
                reason='reading it for its manifest failed: %s' % e)
        finally:
            handle = None
            scanner.stop()
            scanner.remove_log()
        LOG.info('Origin %s: manifest of %d blocks made in %.1f s',
                 self.export, result.count, time.monotonic() - started)
        return result

    def stop(self):
        self.daemon.stop()

    def connection(self):
        """The origin as the agent's ``origin`` argument expects it."""
        if self.listen['type'] == 'unix':
            data = {'socket': self.listen['path']}
        else:
            data = {'host': self.listen['host'],
                    'port': int(self.listen['port'])}
        data['export'] = self.export
        return {'driver_volume_type': 'nbd', 'data': data}

    def bytes_read(self):
        """Bytes the origin daemon has read so far (image data it served,
        plus a few bytes per request of protocol and control traffic)."""
        counters = self.daemon.io_counters()
        return counters['rchar'] if counters else None

    def manifest_connection(self):
        """The manifest's export, as :meth:`connection` gives the image's.
        """
        info = self.connection()
        info['data']['export'] = manifest_mod.export_name(self.export)
        return info

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _pread(handle, offset, length, timeout=SCAN_READ_TIMEOUT):
    """*length* bytes at *offset*, within *timeout* seconds."""
    buf = nbd.Buffer(length)
    cookie = handle.aio_pread(buf, offset)
    deadline = time.monotonic() + timeout
    while not handle.aio_command_completed(cookie):
        left = deadline - time.monotonic()
        if left <= 0:
            raise exception.OriginUnavailable(
                image_id=handle.get_export_name(),
                reason='a read at %d took more than %d s'
                       % (offset, timeout))
        handle.poll(max(1, int(min(left, 1.0) * 1000)))
    return buf.to_bytearray()
