"""The ``qemu`` backend: templates as qemu-storage-daemon block graphs.

Per template, one qemu-storage-daemon (one failure domain, one process to
restart, its own NBD server) holds::

    export "<image_id>"  (NBD, read-only, unix socket <run_path>/<id>.nbd)
      copy-on-read filter "template"
        qcow2 "cache"  (file <state>/templates/<id>/cache.qcow2)
          backing: format node "origin-<gen>" over protocol "source-<gen>"
                   (nbd to a parent or the origin server, a file, or iscsi)

A read that misses the cache is fetched from the source and written into
the cache (copy-on-read), so every block crosses the source link once.
A snapshot is a qcow2 overlay file whose backing is the template's NBD
export; the VM's QEMU opens it directly, so VM writes never pass through
the agent or the template daemon, and the NBD client's reconnect delay
carries the VM over a template daemon restart.
"""

import contextlib
import json
import logging
import os
import subprocess

import nbd

from thunder_agent import exception
from thunder_agent.drivers import base
from thunder_agent.drivers.qemu import storage_daemon
from thunder_agent.drivers.qemu import upstream

LOG = logging.getLogger(__name__)

CACHE_FILE = 'cache.qcow2'
OVERLAY_FILE = 'overlay.qcow2'
EXPORT_ID = 'template'


class QemuDriver(base.Backend):
    name = 'qemu'

    def __init__(self, conf):
        super().__init__(conf)
        self.run_path = conf.agent.run_path
        self.qemu_img = conf.qemu.qemu_img
        self.reconnect_delay = conf.qemu.reconnect_delay
        self.cluster_size = conf.cache.cluster_size
        self.relay = conf.relay.enabled

    def start(self):
        os.makedirs(self.run_path, mode=0o750, exist_ok=True)

    # -- helpers ---------------------------------------------------------
    def _daemon(self, image_id):
        return storage_daemon.StorageDaemon(
            image_id, self.run_path, self.conf.qemu.storage_daemon,
            self.conf.qemu.start_timeout)

    def _socket(self, image_id):
        return os.path.join(self.run_path, image_id + '.nbd')

    def _export(self, template):
        if self._relays(template):
            # The manager assigned the TCP listener (children connect to it).
            return dict(template.export, driver='nbd',
                        export=template.image_id, format='raw')
        return {'driver': 'nbd', 'socket': self._socket(template.image_id),
                'export': template.image_id, 'format': 'raw'}

    @staticmethod
    def _relays(template):
        return 'port' in (template.export or {})

    def _nbd_listener(self, template):
        if self._relays(template):
            return {'type': 'inet', 'host': template.export['host'],
                    'port': str(template.export['port'])}
        return {'type': 'unix', 'path': self._socket(template.image_id)}

    def _upstream(self, template):
        return upstream.Upstream(template.image_id, self.run_path)

    def _graph_source(self, template):
        """The source the block graph reads: in a relay tree, always the
        local forwarder (which points at the current parent)."""
        source = (template.sources or [template.origin])[0]
        if self._relays(template) and source['driver_volume_type'] == 'nbd':
            up = self._upstream(template)
            if up.pid is None or up.target() != up.describe(source):
                up.start(source)
            return {'driver_volume_type': 'nbd',
                    'data': {'socket': up.socket,
                             'export': source['data'].get('export', '')}}
        return source

    def _protocol_options(self, source):
        """Blockdev options reaching a source (origin or parent)."""
        kind, data = source['driver_volume_type'], source['data']
        if kind == 'file':
            return {'driver': 'file', 'filename': data['path'],
                    'read-only': True}
        if kind == 'nbd':
            if 'socket' in data:
                server = {'type': 'unix', 'path': data['socket']}
            else:
                server = {'type': 'inet', 'host': data['host'],
                          'port': str(data['port'])}
            # open-timeout: a parent that joined the tree a moment ago may
            # not listen yet.
            return {'driver': 'nbd', 'server': server,
                    'export': data.get('export', ''), 'read-only': True,
                    'reconnect-delay': self.reconnect_delay,
                    'open-timeout': self.reconnect_delay}
        if kind == 'iscsi':
            portal = data['target_portal']
            opts = {'driver': 'iscsi', 'transport': 'tcp', 'portal': portal,
                    'target': data['target_iqn'],
                    'lun': int(data.get('target_lun', 0)),
                    'read-only': True}
            if data.get('auth_method') == 'CHAP':
                opts['user'] = data['auth_username']
            return opts
        raise exception.InvalidOrigin(reason='unsupported source %r' % kind)

    def _secret_objects(self, source, secret_id):
        data = source['data']
        if (source['driver_volume_type'] == 'iscsi'
                and data.get('auth_method') == 'CHAP'):
            return [{'qom-type': 'secret', 'id': secret_id,
                     'data': data['auth_password']}]
        return []

    def _run(self, args, timeout=60):
        try:
            proc = subprocess.run(args, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise exception.BackendError(reason='%s timed out' % args[:2])
        return proc

    # -- origin ----------------------------------------------------------
    def probe_origin(self, origin, image_format):
        opts = {'driver': image_format,
                'file': self._protocol_options(origin)}
        args = [self.qemu_img, 'info', '--output=json', '-U']
        for obj in self._secret_objects(origin, 'probe-secret'):
            args += ['--object', 'secret,id=%s,data=%s'
                     % (obj['id'], obj['data'])]
            opts['file']['password-secret'] = obj['id']
        for key in ('reconnect-delay', 'open-timeout'):
            opts['file'].pop(key, None)
        args.append('json:' + json.dumps(opts))
        proc = self._run(args, timeout=60)
        if proc.returncode != 0:
            raise exception.OriginUnavailable(
                image_id=origin['data'].get('export', '?'),
                reason=proc.stderr.strip() or 'qemu-img info failed')
        info = json.loads(proc.stdout)
        if info.get('format') != image_format:
            raise exception.OriginUnavailable(
                image_id='?', reason='origin is %s, not %s'
                % (info.get('format'), image_format))
        return base.OriginInfo(size=int(info['virtual-size']),
                               image_format=image_format)

    # -- templates -------------------------------------------------------
    def create_template(self, template, template_dir):
        cache = os.path.join(template_dir, CACHE_FILE)
        if not os.path.exists(cache):
            proc = self._run([self.qemu_img, 'create', '-q', '-f', 'qcow2',
                              '-o', 'cluster_size=%d' % self.cluster_size,
                              cache, str(template.size)])
            if proc.returncode != 0:
                raise exception.BackendError(reason=proc.stderr.strip())
        daemon = self._daemon(template.image_id)
        daemon.start(nbd_server=self._nbd_listener(template))
        try:
            self._build_graph(daemon, template, cache)
        except Exception:
            daemon.stop()
            raise
        return self._export(template)

    def _source_nodes(self, template, source, generation):
        """QMP calls adding protocol+format nodes for the source."""
        calls = []
        proto = dict(self._protocol_options(source),
                     **{'node-name': 'source-%d' % generation})
        for obj in self._secret_objects(source, 'secret-%d' % generation):
            calls.append(('object-add', obj))
            proto['password-secret'] = obj['id']
        calls.append(('blockdev-add', proto))
        calls.append(('blockdev-add', {
            'driver': template.image_format,
            'node-name': 'origin-%d' % generation,
            'file': 'source-%d' % generation, 'read-only': True}))
        return calls

    def _build_graph(self, daemon, template, cache):
        generation = template.counters.get('source_generation', 0)
        calls = self._source_nodes(template, self._graph_source(template),
                                   generation)
        calls += [
            ('blockdev-add', {'driver': 'file', 'node-name': 'cache-file',
                              'filename': cache}),
            ('blockdev-add', {'driver': 'qcow2', 'node-name': 'cache',
                              'file': 'cache-file',
                              'backing': 'origin-%d' % generation}),
            ('blockdev-add', {'driver': 'copy-on-read',
                              'node-name': 'template', 'file': 'cache'}),
            ('block-export-add', {'type': 'nbd', 'id': EXPORT_ID,
                                  'node-name': 'template',
                                  'name': template.image_id,
                                  'writable': False}),
        ]
        daemon.commands(*calls)

    def ensure_template(self, template, template_dir):
        daemon = self._daemon(template.image_id)
        # A dead forwarder is restarted in place; the template daemon's NBD
        # client reconnects to it by itself.
        self._graph_source(template)
        if daemon.is_running():
            try:
                exports = daemon.command('query-block-exports')
            except exception.BackendError:
                exports = []
            if any(e['id'] == EXPORT_ID for e in exports):
                LOG.info('Re-adopted running template %s', template.image_id)
                return self._export(template)
            LOG.warning('Template daemon %s is incomplete; rebuilding',
                        template.image_id)
            daemon.stop()
        LOG.info('Rebuilding template %s from its cache', template.image_id)
        self._account_restart(template)
        return self.create_template(template, template_dir)

    def set_sources(self, template, template_dir, sources):
        """Point the template at another parent: swap the forwarder.

        NBD has no multipath; the first source is used (the coordinator
        lists parents in preference order).
        """
        if not self._relays(template):
            raise exception.BackendError(
                reason='template %s does not take part in a relay tree'
                       % template.image_id)
        template.sources = list(sources[:1])
        self._graph_source(template)

    def delete_template(self, template, template_dir):
        self._daemon(template.image_id).stop()
        self._upstream(template).stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._socket(template.image_id))

    def is_healthy(self, template, template_dir):
        if not self._daemon(template.image_id).is_running():
            return False
        if self._relays(template) and (template.sources or [template.origin]
                                       )[0]['driver_volume_type'] == 'nbd':
            return self._upstream(template).pid is not None
        return True

    def flush_template(self, template, template_dir):
        """Flush the cache's metadata to disk through the export.

        Copy-on-read fills are written to the cache like any write; their
        qcow2 mappings reach the disk on a flush. An NBD flush on the
        (read-only) export flushes the whole graph below it.
        """
        handle = nbd.NBD()
        try:
            handle.set_export_name(template.image_id)
            if self._relays(template):
                handle.connect_tcp(template.export['host'],
                                   str(template.export['port']))
            else:
                handle.connect_unix(self._socket(template.image_id))
            handle.flush()
            handle.shutdown()
        except nbd.Error as e:
            raise exception.BackendError(
                reason='flush of template %s failed: %s'
                       % (template.image_id, e))
        finally:
            del handle

    def _cache_map(self, cache):
        proc = self._run([self.qemu_img, 'map', '--output=json', '-U',
                          '-f', 'qcow2', cache])
        if proc.returncode != 0:
            raise exception.BackendError(reason=proc.stderr.strip())
        return json.loads(proc.stdout)

    def _account_restart(self, template):
        # Carry the cache-hit bytes of a daemon that is gone into the base.
        counters = template.counters
        counters['hit_base'] = (counters.get('hit_base', 0)
                                + counters.get('hit_last', 0))
        counters['hit_last'] = 0

    def template_stats(self, template, template_dir):
        cache = os.path.join(template_dir, CACHE_FILE)
        daemon = self._daemon(template.image_id)
        if daemon.is_running():
            with contextlib.suppress(exception.BackendError):
                self.flush_template(template, template_dir)
        extents = self._cache_map(cache)
        # Copy-on-read is the only writer of the cache, so every byte in
        # it was fetched from a source exactly once.
        fetched = sum(e['length'] for e in extents
                      if e.get('present') and e.get('depth', 0) == 0)
        # A read is served either by a fetch (network, counted above) or
        # from the cache file. The daemon's rchar counts exactly the file
        # reads (socket reads are recvmsg and do not count), so it is the
        # cache-hit volume, plus a little qcow2 metadata.
        counters = template.counters
        io = daemon.io_counters()
        if io is not None:
            counters['hit_last'] = io['rchar']
        hits = counters.get('hit_base', 0) + counters.get('hit_last', 0)
        return base.TemplateStats(
            bytes_fetched=fetched,
            bytes_served=fetched + hits,
            cached_bytes=fetched,
            blocks_cached=fetched // self.cluster_size,
            block_size=self.cluster_size,
            disk_bytes=os.stat(cache).st_blocks * 512)

    def disk_usage(self, template, template_dir):
        try:
            return os.stat(os.path.join(template_dir,
                                        CACHE_FILE)).st_blocks * 512
        except FileNotFoundError:
            return 0

    # -- snapshots -------------------------------------------------------
    def _connection_info(self, template, instance_id, snapshot_dir):
        return {'driver_volume_type': 'thunder',
                'data': {'backend': self.name,
                         'image_id': template.image_id,
                         'instance_id': instance_id,
                         'path': os.path.join(snapshot_dir, OVERLAY_FILE),
                         'format': 'qcow2',
                         'backing': dict(
                             self._export(template),
                             reconnect_delay=self.reconnect_delay)}}

    def backing_filename(self, template):
        server = self._nbd_listener(template)
        return 'json:' + json.dumps({'driver': 'raw', 'file': {
            'driver': 'nbd', 'server': server,
            'export': template.image_id,
            'reconnect-delay': self.reconnect_delay}})

    def create_snapshot(self, template, template_dir, instance_id,
                        snapshot_dir):
        overlay = os.path.join(snapshot_dir, OVERLAY_FILE)
        proc = self._run([self.qemu_img, 'create', '-q', '-f', 'qcow2',
                          '-F', 'raw', '-b', self.backing_filename(template),
                          '-o', 'cluster_size=%d' % self.cluster_size,
                          overlay, str(template.size)])
        if proc.returncode != 0:
            raise exception.BackendError(reason=proc.stderr.strip())
        return self._connection_info(template, instance_id, snapshot_dir)

    def ensure_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        overlay = os.path.join(snapshot_dir, OVERLAY_FILE)
        if not os.path.exists(overlay):
            raise exception.BackendError(
                reason='overlay of instance %s is missing'
                       % snapshot.instance_id)
        return self._connection_info(template, snapshot.instance_id,
                                     snapshot_dir)

    def delete_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(snapshot_dir, OVERLAY_FILE))
