"""The TLS export of a relaying template: its children's only way in.

With ``[tls] enabled``, children do not reach the template daemon's NBD
server: the relay listener (socat on the relay address, see
:mod:`~thunder_agent.drivers.qemu.upstream`) forwards each connection to
``<run_path>/<image_id>.tls``, the NBD server of a second, per-template
qemu-storage-daemon, the relay exporter::

    child --TCP--> socat relay listener --unix--> exporter <id>.tls
        (TLS: the CA's certificate, DN CN=<child> in the authz-list)
            nbd client node --unix--> template daemon <id>.nbd

The exporter's NBD server requires TLS with a client certificate of the
deployment CA (``tls-creds-x509``, verify-peer) and admits only the DNs of
its ``tls-authz`` object: an ``authz-list`` of ``CN=<node id>`` of the
template's current children, exact matches, everyone else denied. QEMU
7.2 looks that object up by id at each handshake, so :meth:`RelayExport.
set_children` replaces it over QMP (object-del + object-add, a few ms) and
the next connection meets the new list; children already connected keep
their connection (a removed child is refused when it reconnects). QEMU 7.2
has one NBD server per process: the template daemon's server stays on its
plain unix socket for local readers (VMs, flushes, the prefetcher), so TLS
costs them nothing.

The exporter's block node is an NBD client of the template daemon's
socket, read-only, with ``reconnect-delay`` (a template daemon rebuilt
from its cache is reconnected to; children's reads wait, not fail) and
``open-timeout`` (its start never waits long for a daemon that is gone).
It runs in its own session (``--daemonize``), so it survives agent
restarts and is re-adopted from its pid file; it is stopped with the
template.
"""

import contextlib
import json
import os

from oslo_log import log as logging

from thunder_agent.drivers.qemu import storage_daemon
from thunder_agent import exception
from thunder_agent import tls

LOG = logging.getLogger(__name__)

EXPORT_ID = 'relay'
SOURCE_NODE = 'template'


class RelayExport:
    """The relay exporter of template *image_id* under *run_path*."""

    def __init__(self, image_id, run_path, certificates_dir,
                 executable='qemu-storage-daemon', start_timeout=30):
        self.image_id = image_id
        self.certificates_dir = certificates_dir
        self.daemon = storage_daemon.StorageDaemon(
            image_id + '-tls', run_path, executable, start_timeout)
        self.socket = os.path.join(run_path, image_id + '.tls')
        self.template_socket = os.path.join(run_path, image_id + '.nbd')
        if len(self.socket.encode()) > storage_daemon.MAX_SOCKET_PATH:
            raise exception.BackendError(
                reason='socket path %s is too long; use a shorter '
                       '[agent] run_path' % self.socket)

    def is_running(self):
        return self.daemon.is_running()

    def start(self, children, max_connections, reconnect_delay,
              open_timeout):
        """Serve the template to *children* (node ids), at most
        *max_connections* at once; a running exporter is kept and given
        the list. InvalidNodeId for a child id that is not one."""
        authz = tls.authz_list(children)
        if self.is_running():
            self.set_children(children)
            return
        source = {'driver': 'nbd', 'node-name': SOURCE_NODE,
                  'server': {'type': 'unix', 'path': self.template_socket},
                  'export': self.image_id, 'read-only': True,
                  'reconnect-delay': reconnect_delay,
                  'open-timeout': open_timeout}
        export = {'type': 'nbd', 'id': EXPORT_ID, 'node-name': SOURCE_NODE,
                  'name': self.image_id, 'writable': False}
        creds = tls.server_creds(self.certificates_dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        self.daemon.start(
            nbd_server={'type': 'unix', 'path': self.socket},
            objects=(creds, authz),
            server_options={'tls-creds': creds['id'],
                            'tls-authz': authz['id']},
            max_connections=max_connections,
            extra_args=['--blockdev', json.dumps(source),
                        '--export', json.dumps(export)])
        LOG.info('Template %s: TLS relay export for %d children',
                 self.image_id, len(authz['rules']))

    def set_children(self, children):
        """Admit exactly *children* from the next handshake on."""
        authz = tls.authz_list(children)
        self.daemon.commands(*tls.replace_calls(authz))
        LOG.debug('Template %s: relay export admits %s', self.image_id,
                  ', '.join(r['match'] for r in authz['rules']) or 'nobody')

    def children(self):
        """The node ids the running exporter admits (from its QOM)."""
        rules = self.daemon.command('qom-get', path='/objects/'
                                    + tls.AUTHZ_ID, property='rules')
        return sorted(r['match'][len('CN='):] for r in rules)

    def is_healthy(self):
        if not self.is_running():
            return False
        try:
            exports = self.daemon.command('query-block-exports')
        except exception.BackendError as e:
            LOG.warning('Template %s: relay export: %s', self.image_id, e)
            return False
        return any(e.get('id') == EXPORT_ID for e in exports)

    def stop(self):
        self.daemon.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)

    def remove_log(self):
        self.daemon.remove_log()
