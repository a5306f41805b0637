"""The ``kernel`` backend: iSCSI relay, local block cache, dm snapshots.

Per template, on each host (device names from
:mod:`thunder_agent.drivers.kernel.dmtables`)::

    tgt target <iqn_prefix>:<host>:<image_id>, LUN 1, read-only, CHAP
      <prefix>-<image>-tpl     read-only linear map, the template
        cache                  bcache over -bk (or dm-cache), files in
                               the template directory
          <prefix>-<image>-src multipath map, queue_if_no_path, one path
                               per source
            /dev/sdX ...       os-brick iSCSI sessions to the origin or
                               the parents' exports

and per instance ``<prefix>-snap-<instance>``: a dm snapshot of the
template with its COW store in a sparse file (loop device) in the
snapshot directory; its /dev/mapper path goes to libvirt.

A block is fetched from a source on its first read only (the cache keeps
it), so a relay tree moves each block over each link once. Re-parenting
swaps the paths of the multipath map; I/O that finds no path meanwhile
waits in the kernel, so readers see a pause, never an error.

What the backend set up for a template (sources and their SCSI devices,
cache type, CHAP account) is kept in ``kernel.json`` in the template
directory, so teardown and re-adoption after a restart need nothing else.
"""

import json
import logging
import os
import re
import time

from thunder_agent import exception
from thunder_agent.drivers import base
from thunder_agent.drivers.kernel import cache as kcache
from thunder_agent.drivers.kernel import chap
from thunder_agent.drivers.kernel import check
from thunder_agent.drivers.kernel import devmapper
from thunder_agent.drivers.kernel import dmtables
from thunder_agent.drivers.kernel import iscsi
from thunder_agent.drivers.kernel import loop
from thunder_agent.drivers.kernel import sysfs
from thunder_agent.drivers.kernel import target as ktarget
from thunder_agent import privileged

LOG = logging.getLogger(__name__)

LAYOUT_FILE = 'kernel.json'
COW_FILE = 'cow.img'
MODULES = ['sd_mod', 'iscsi_tcp', 'dm_multipath', 'dm_snapshot', 'loop']
CACHE_MODULES = {'bcache': ['bcache'], 'dm-cache': ['dm_cache',
                                                    'dm_cache_smq']}


class KernelDriver(base.Backend):
    name = 'kernel'

    def __init__(self, conf):
        super().__init__(conf)
        self.kconf = conf.kernel
        self.prefix = self.kconf.device_prefix
        self.tgt = ktarget.Tgt(self.kconf.tgt_control_port)
        self._connector = None

    # -- lifecycle -------------------------------------------------------
    def start(self):
        if not self.kconf.export_address:
            raise exception.BackendError(
                reason='[kernel] export_address is not set')
        check(privileged.load_kernel_modules(
            MODULES + CACHE_MODULES[self.kconf.cache_type]),
            'loading kernel modules')
        self.tgt.check_running()
        iscsi.setup_lock_path(self.conf.agent.run_path)

    @property
    def connector(self):
        # os-brick's connector probes the system when created; only do it
        # once a source is attached.
        if self._connector is None:
            self._connector = iscsi.SourceConnector(
                device_scan_attempts=self.kconf.device_scan_attempts,
                recovery_timeout=self.kconf.source_recovery_timeout)
        return self._connector

    # -- names -----------------------------------------------------------
    def _dev(self, role, image_id):
        return dmtables.device_name(self.prefix, role, image_id)

    def _iqn(self, image_id):
        host = re.sub(r'[^a-z0-9.-]', '-', self.conf.host.lower()) or 'host'
        return '%s:%s:%s' % (self.kconf.iqn_prefix, host, image_id)

    def _portal(self):
        address = self.kconf.export_address
        if ':' in address:
            address = '[%s]' % address
        return '%s:%d' % (address, self.kconf.export_port)

    def _export(self, template, secret):
        return {'driver_volume_type': 'iscsi',
                'data': {'target_portal': self._portal(),
                         'target_iqn': self._iqn(template.image_id),
                         'target_lun': ktarget.LUN,
                         'target_discovered': False,
                         'auth_method': 'CHAP',
                         'auth_username': chap.username(template.image_id),
                         'auth_password': secret,
                         'access_mode': 'ro'}}

    # -- per-template layout ---------------------------------------------
    def _load_layout(self, template_dir):
        try:
            with open(os.path.join(template_dir, LAYOUT_FILE)) as f:
                return json.load(f)
        except FileNotFoundError:
            return {'cache_type': self.kconf.cache_type, 'sources': []}

    def _save_layout(self, template_dir, layout):
        path = os.path.join(template_dir, LAYOUT_FILE)
        tmp = path + '.tmp'
        # It holds CHAP secrets.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'w') as f:
            json.dump(layout, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _cache(self, template, template_dir, layout):
        # The manager tears down leftovers with a stub that has no size;
        # the size only matters when the cache file is created.
        return kcache.make(layout['cache_type'], self.prefix,
                           template.image_id, template_dir,
                           getattr(template, 'size', 0), self.conf)

    # -- origin ----------------------------------------------------------
    def probe_origin(self, origin, image_format):
        props = iscsi.check_source(origin)
        if image_format != 'raw':
            raise exception.OriginUnavailable(
                image_id=props['target_iqn'],
                reason='the kernel backend serves raw images only, not %s'
                       % image_format)
        try:
            info = self.connector.connect(origin)
        except exception.SourceUnavailable as e:
            raise exception.OriginUnavailable(image_id=props['target_iqn'],
                                              reason=e.message)
        try:
            size = sysfs.size_bytes(info['path'])
        finally:
            if not sysfs.holders(info['path']):
                # Only log out if no template uses the same LUN.
                self.connector.disconnect(origin, force=True)
        return base.OriginInfo(size=size, image_format='raw')

    # -- sources ---------------------------------------------------------
    def _connect_sources(self, template, sources, current=()):
        """Attach *sources*; return ``[{'source', 'device'}]``.

        Sources already in *current* keep their device. On failure, what
        this call attached is detached again.
        """
        for source in sources:
            iscsi.check_source(source)
        if not sources:
            raise exception.InvalidSource(reason='no source given')
        attached = []
        new = []
        try:
            for source in sources:
                known = [c for c in current
                         if iscsi.same_source(c['source'], source)]
                if known:
                    attached.append(known[0])
                    continue
                device = self.connector.connect(source)
                entry = {'source': source, 'device': device}
                new.append(entry)
                size = sysfs.size_bytes(device['path'])
                if size < template.size:
                    raise exception.SourceUnavailable(
                        target=source['data']['target_iqn'],
                        portal=source['data']['target_portal'],
                        reason='LUN has %d bytes, the image %d'
                               % (size, template.size))
                attached.append(entry)
        except Exception:
            for entry in new:
                self._disconnect(entry)
            raise
        return attached

    @staticmethod
    def _still_attached(entry):
        """True when the recorded SCSI device still belongs to a session
        with the source's target."""
        path = entry.get('device', {}).get('path')
        if not path or not os.path.exists(path):
            return False
        session = sysfs.iscsi_session_dir(path)
        if session is None:
            return False
        try:
            with open(os.path.join(session, 'targetname')) as f:
                return (f.read().strip()
                        == entry['source']['data']['target_iqn'])
        except OSError:
            return False

    def _disconnect(self, entry):
        try:
            self.connector.disconnect(entry['source'], force=True)
        except exception.ThunderException as e:
            LOG.warning('Leaving source %s: %s',
                        entry['source']['data'].get('target_iqn'), e)

    def _source_table(self, template, entries):
        paths = [sysfs.dev_numbers(e['device']['path']) for e in entries]
        return dmtables.multipath(dmtables.sectors(template.size), paths)

    # -- templates -------------------------------------------------------
    def create_template(self, template, template_dir):
        started = time.monotonic()
        sources = template.sources or [template.origin]
        layout = self._load_layout(template_dir)
        layout['secret'] = chap.new_secret()
        layout['sources'] = self._connect_sources(template, sources)
        self._save_layout(template_dir, layout)
        attached = time.monotonic()
        try:
            export = self._build(template, template_dir, layout, fresh=True)
        except Exception:
            LOG.exception('Building template %s failed; tearing down',
                          template.image_id)
            self._teardown(template, template_dir, layout)
            raise
        LOG.info('Template %s exported as %s (sources attached in %.1f s, '
                 'cache and export in %.1f s)', template.image_id,
                 export['data']['target_iqn'], attached - started,
                 time.monotonic() - attached)
        return export

    def _build(self, template, template_dir, layout, fresh):
        length = dmtables.sectors(template.size)
        image_id = template.image_id
        src = self._dev('src', image_id)
        table = self._source_table(template, layout['sources'])
        if devmapper.exists(src):
            devmapper.reload(src, table, readonly=True)
        else:
            # Read-only: parents export write-protected LUNs.
            devmapper.create(src, table, readonly=True)
        cache = self._cache(template, template_dir, layout)
        if fresh:
            cached = cache.create(devmapper.device_path(src), length)
        else:
            cached = cache.assemble(devmapper.device_path(src), length)
        tpl = self._dev('tpl', image_id)
        if not devmapper.exists(tpl):
            devmapper.create(tpl, dmtables.linear([(cached, 0, length)]),
                             readonly=True)
        self.tgt.export(self._iqn(image_id), devmapper.device_path(tpl),
                        chap.username(image_id), layout['secret'])
        return self._export(template, layout['secret'])

    def ensure_template(self, template, template_dir):
        layout = self._load_layout(template_dir)
        if 'secret' not in layout:
            raise exception.BackendError(
                reason='template %s has no kernel layout; recreate it'
                       % template.image_id)
        sources = layout['sources'] or [
            {'source': s} for s in (template.sources or [template.origin])]
        # Sessions that survived (agent restart) are kept as they are;
        # after a reboot they are logged in again.
        live = [e for e in sources if self._still_attached(e)]
        layout['sources'] = self._connect_sources(
            template, [e['source'] for e in sources], current=live)
        self._save_layout(template_dir, layout)
        return self._build(template, template_dir, layout, fresh=False)

    def set_sources(self, template, template_dir, sources):
        started = time.monotonic()
        layout = self._load_layout(template_dir)
        old = layout['sources']
        entries = self._connect_sources(template, sources, current=old)
        attached = time.monotonic()
        src = self._dev('src', template.image_id)
        # Queued and in-flight I/O moves to the new paths.
        devmapper.reload(src, self._source_table(template, entries),
                         readonly=True)
        layout['sources'] = entries
        self._save_layout(template_dir, layout)
        switched = time.monotonic()
        LOG.info('Template %s now reads from %s (attached in %.1f s, '
                 'switched in %.1f s)', template.image_id,
                 [e['source']['data']['target_portal'] for e in entries],
                 attached - started, switched - attached)
        for entry in old:
            if not any(iscsi.same_source(entry['source'], e['source'])
                       for e in entries):
                self._disconnect(entry)
        LOG.info('Template %s left its old sources in %.1f s',
                 template.image_id, time.monotonic() - switched)

    def delete_template(self, template, template_dir):
        started = time.monotonic()
        layout = self._load_layout(template_dir)
        tpl = self._dev('tpl', template.image_id)
        if devmapper.exists(tpl):
            users = sysfs.holders(devmapper.device_path(tpl))
            if users:
                raise exception.TemplateInUse(
                    image_id=template.image_id,
                    reason='snapshot devices %s' % ', '.join(users))
        sessions = self.tgt.sessions(self._iqn(template.image_id))
        if sessions:
            raise exception.TemplateInUse(
                image_id=template.image_id,
                reason='%d child session(s) on its export' % sessions)
        self._teardown(template, template_dir, layout)
        LOG.info('Template %s torn down in %.1f s', template.image_id,
                 time.monotonic() - started)

    def _teardown(self, template, template_dir, layout):
        """Reverse of _build, tolerant of missing pieces."""
        image_id = template.image_id
        self.tgt.unexport(self._iqn(image_id), chap.username(image_id))
        devmapper.remove(self._dev('tpl', image_id))
        self._cache(template, template_dir, layout).destroy()
        devmapper.remove(self._dev('src', image_id))
        for entry in layout.get('sources', []):
            self._disconnect(entry)
        loop.detach_under(template_dir)
        layout['sources'] = []
        if os.path.isdir(template_dir):
            self._save_layout(template_dir, layout)

    def is_healthy(self, template, template_dir):
        tpl = self._dev('tpl', template.image_id)
        try:
            return (devmapper.exists(tpl)
                    and self.tgt.find(self._iqn(template.image_id))
                    is not None)
        except exception.BackendError:
            return False

    def source_paths(self, template, template_dir):
        """State of the template's paths: ``{'queued_ios', 'paths'}``."""
        return dmtables.parse_multipath_status(
            devmapper.status(self._dev('src', template.image_id)))

    def template_stats(self, template, template_dir):
        layout = self._load_layout(template_dir)
        src = devmapper.device_path(self._dev('src', template.image_id))
        tpl = devmapper.device_path(self._dev('tpl', template.image_id))
        stats = self._cache(template, template_dir, layout).stats()
        return base.TemplateStats(
            bytes_fetched=sysfs.read_bytes(src) if os.path.exists(src)
            else 0,
            bytes_served=sysfs.read_bytes(tpl) if os.path.exists(tpl)
            else 0,
            cached_bytes=min(stats['cached_bytes'], template.size),
            blocks_cached=stats['blocks_cached'],
            block_size=stats['block_size'],
            disk_bytes=stats['disk_bytes'])

    def disk_usage(self, template, template_dir):
        layout = self._load_layout(template_dir)
        return self._cache(template, template_dir, layout).disk_bytes()

    # -- snapshots -------------------------------------------------------
    def _connection_info(self, template, instance_id):
        return {'driver_volume_type': 'thunder',
                'data': {'backend': self.name,
                         'device_path': devmapper.device_path(
                             dmtables.snapshot_name(self.prefix,
                                                    instance_id)),
                         'format': 'raw',
                         'image_id': template.image_id,
                         'instance_id': instance_id}}

    def _snapshot_table(self, template, cow_device):
        chunk = self.kconf.snapshot_chunk_size
        return dmtables.snapshot(
            dmtables.sectors(template.size),
            devmapper.device_path(self._dev('tpl', template.image_id)),
            cow_device, persistent=True,
            chunk_sectors=chunk // dmtables.SECTOR)

    def create_snapshot(self, template, template_dir, instance_id,
                        snapshot_dir):
        # Room for every chunk plus the exception tables (16 bytes per
        # chunk); sparse, so only written chunks take space.
        chunk = self.kconf.snapshot_chunk_size
        size = template.size + template.size * 16 // chunk + 1024 * 1024
        cow = os.path.join(snapshot_dir, COW_FILE)
        loop.create_sparse_file(cow, -(-size // chunk) * chunk)
        self._activate_snapshot(template, instance_id, cow)
        return self._connection_info(template, instance_id)

    def _activate_snapshot(self, template, instance_id, cow):
        name = dmtables.snapshot_name(self.prefix, instance_id)
        if not devmapper.exists(name):
            devmapper.create(name, self._snapshot_table(
                template, loop.attach(cow)))

    def ensure_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        cow = os.path.join(snapshot_dir, COW_FILE)
        if not os.path.exists(cow):
            raise exception.BackendError(
                reason='COW store of instance %s is missing'
                       % snapshot.instance_id)
        # A persistent snapshot re-reads its exception table from the COW.
        self._activate_snapshot(template, snapshot.instance_id, cow)
        return self._connection_info(template, snapshot.instance_id)

    def delete_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        name = dmtables.snapshot_name(self.prefix, snapshot.instance_id)
        if devmapper.exists(name):
            users = devmapper.open_count(name)
            if users:
                raise exception.SnapshotInUse(
                    instance_id=snapshot.instance_id,
                    reason='device %s is open %d time(s)' % (name, users))
            devmapper.remove(name)
        loop.detach_under(snapshot_dir)
