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
"""

import json
import os

from thunder_agent import exception
from thunder_agent.drivers.qemu import storage_daemon
from thunder_agent import image_check

# Clients an origin serves at once: one per host that reads it directly
# (every host without relay; the tree's first level with it), plus their
# probes.
DEFAULT_MAX_CONNECTIONS = 256


class OriginServer:
    def __init__(self, image_path, image_format, export, listen, run_path,
                 name=None, executable='qemu-storage-daemon',
                 max_connections=DEFAULT_MAX_CONNECTIONS, probe_runner=None):
        """*listen* is ``{'type': 'unix', 'path': P}`` or
        ``{'type': 'inet', 'host': H, 'port': N}``; *probe_runner*
        replaces the unprivileged qemu-img run of the format probe in
        tests."""
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
        self.daemon = storage_daemon.StorageDaemon(
            name or 'origin-%s' % export, run_path, executable)

    def start(self):
        """Inspect the image (UnsafeImage), then serve it."""
        image_check.check_file(
            self.image_path, self.image_format, self.export,
            lambda head, label: image_check.probe_with_qemu(
                head, label, run=self._probe_runner))
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
        args += ['--export', json.dumps({
            'type': 'nbd', 'id': 'origin', 'node-name': 'image',
            'name': self.export, 'writable': False})]
        self.daemon.start(nbd_server=self.listen, extra_args=args,
                          max_connections=self.max_connections)
        return self

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

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
