"""The ``kernel`` driver: iSCSI relay, local block cache, dm snapshots.

Per template, on each host (device names from
:mod:`thunder_agent.drivers.kernel.dmtables`)::

    tgt target <iqn_prefix>:<host>:<image_id>, LUN 1, read-only, CHAP
    (only when the template relays: children log in here)
      <prefix>-<image>-tpl     read-only linear map, the template; local
                               readers (snapshots, the prefetcher) use it
                               directly
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

CHAP: the origin's credentials come with the origin (Cinder's connection
info). A relay export's secret is derived on each host from the
deployment's relay key and the export's IQN (:func:`chap.relay_secret`):
the parent derives it to create the export, a child to log in, and the
secret itself is never in a record, a source, the coordinator's messages
or a log. Without [relay] enabled a template that exports anyway gets a
random secret, kept in ``kernel.json``.

What the driver set up for a template (sources and their SCSI devices,
cache type, export) is kept in ``kernel.json`` in the template directory
(mode 0600: an origin's source holds its secret), so teardown and
re-adoption after a restart need nothing else.
"""

import json
import os
import re
import stat
import time

from oslo_log import log as logging
from oslo_utils import excutils

from thunder_agent import exception
from thunder_agent import prefetch
from thunder_agent import records
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
from thunder_agent.privileged import kernel as priv
from thunder_agent.privileged import scope as pscope

LOG = logging.getLogger(__name__)

LAYOUT_FILE = 'kernel.json'
LAYOUT_VERSION = 2
COW_FILE = 'cow.img'
MODULES = ['sd_mod', 'iscsi_tcp', 'dm_multipath', 'dm_snapshot', 'loop']
CACHE_MODULES = {'bcache': ['bcache'], 'dm-cache': ['dm_cache',
                                                    'dm_cache_smq']}
# What tgtadm takes as a target name: an IQN of plain characters.
_IQN = re.compile(r'^iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[A-Za-z0-9.:-]+)?$')
_MAX_IQN = 223
# Export credentials: derived from the relay key, or random (kept).
RELAY_KEY = 'relay-key'
RANDOM = 'random'
# The prefetcher's largest read of a template device. bcache inserts a
# read miss only where it can allocate cache room at once, without
# waiting; a large miss needs many buckets at once. Measured in the guest
# (8 MiB image, 64 KiB buckets, full prefetch, then the image read again):
# with 1 MiB reads bcache kept 6.4 MiB and the second read fetched 27% of
# the image again; with 256 KiB or 64 KiB reads it kept 7.8 to 8.0 MiB
# and the second read fetched 4 to 5%.
PREFETCH_READ = 256 * 1024


class KernelDriver(base.Driver):
    name = 'kernel'
    # A poll is a TCP connect and one SendTargets discovery (one iscsiadm
    # run); a parent's template takes seconds to build, so twice a second
    # starts a child well within a second of its parent.
    ready_poll_interval = 0.5

    def __init__(self, conf):
        super().__init__(conf)
        self.kconf = conf.kernel
        self.prefix = self.kconf.device_prefix
        self.relay = conf.relay.enabled
        # What the privileged helpers let this agent touch: files under
        # [agent] state_path, devices and targets with its prefixes.
        self.scope = pscope.of(conf)
        self.tgt = ktarget.Tgt(self.kconf.tgt_control_port, self.scope)
        self._connector = None
        self._relay_key = None

    # -- lifecycle -------------------------------------------------------
    def start(self):
        if self.relay:
            if not self.kconf.export_address:
                raise exception.BackendError(
                    reason='[kernel] export_address is not set; relaying '
                           'templates are exported there')
            self._relay_key = self._read_relay_key()
        check(priv.load_kernel_modules(
            MODULES + CACHE_MODULES[self.kconf.cache_type]),
            'loading kernel modules')
        if self.relay:
            self.tgt.check_running()
        iscsi.setup_lock_path(self.conf.agent.run_path)

    def _read_relay_key(self):
        path = self.kconf.relay_key_file
        if not path:
            raise exception.BackendError(
                reason='[kernel] relay_key_file is not set; relay exports '
                       'and logins to parents need the relay key')
        try:
            with open(path, 'rb') as f:
                key = f.read()
                mode = os.fstat(f.fileno()).st_mode
        except OSError as e:
            raise exception.BackendError(
                reason='[kernel] relay_key_file %s cannot be read: %s'
                       % (path, e.strerror))
        if len(key) < chap.MIN_KEY_BYTES:
            raise exception.BackendError(
                reason='[kernel] relay_key_file %s holds %d bytes; the '
                       'relay key needs at least %d'
                       % (path, len(key), chap.MIN_KEY_BYTES))
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            LOG.warning('[kernel] relay_key_file %s is accessible to other '
                        'users (mode %o); it should be readable by the '
                        'agent only', path, stat.S_IMODE(mode))
        return key

    def _relay_secret(self, iqn):
        if self._relay_key is None:
            self._relay_key = self._read_relay_key()
        return chap.relay_secret(self._relay_key, iqn)

    @property
    def connector(self):
        # os-brick's connector probes the system when created; only do it
        # once a source is attached.
        if self._connector is None:
            self._connector = iscsi.SourceConnector(
                device_scan_attempts=self.kconf.device_scan_attempts,
                recovery_timeout=self.kconf.source_recovery_timeout,
                scope=self.scope)
        return self._connector

    # -- names -----------------------------------------------------------
    def _dev(self, role, image_id):
        return dmtables.device_name(self.prefix, role, image_id)

    def _tpl_path(self, image_id):
        return devmapper.device_path(self._dev('tpl', image_id))

    def _iqn(self, image_id):
        host = re.sub(r'[^a-z0-9.-]', '-', self.conf.host.lower()) or 'host'
        return '%s:%s:%s' % (self.kconf.iqn_prefix, host, image_id)

    @staticmethod
    def _portal(host, port):
        if ':' in host:
            host = '[%s]' % host
        return '%s:%d' % (host, port)

    # -- transport -------------------------------------------------------
    def check_origin(self, origin):
        if origin.driver_volume_type != 'iscsi':
            raise exception.InvalidOrigin(
                reason='the kernel driver reads iscsi origins, not %r'
                       % (origin.driver_volume_type,))
        try:
            iscsi.check_source(origin)
        except exception.InvalidSource as e:
            raise exception.InvalidOrigin(reason=e.kwargs.get('reason'))

    def can_relay(self, image_id, origin):
        return origin.driver_volume_type == 'iscsi'

    def relay_address(self, image_id, taken):
        # One tgtd serves every template on one portal; the IQN tells the
        # exports apart, so the port is the same for all of them.
        if not self.kconf.export_address:
            raise exception.BackendError(
                reason='[kernel] export_address is not set')
        return records.RelayAddress(self.kconf.export_address,
                                    self.kconf.export_port,
                                    self._iqn(image_id))

    def parent_source(self, node, address, image_id):
        # No secret: the child derives it from the relay key at login.
        return records.Source(node, records.Endpoint('iscsi', {
            'target_portal': self._portal(address.host, address.port),
            'target_iqn': address.export,
            'target_lun': ktarget.LUN,
            'auth_method': 'CHAP',
            'auth_username': chap.username(image_id)}))

    def _login_properties(self, source):
        """os-brick properties to log in to *source*; validates it.

        An origin brings its secret; a relay parent's export does not, and
        its secret is derived here (a record written before relay keys
        may still carry one: it is used as it is).
        """
        if not isinstance(source, records.Source):
            raise exception.InvalidSource(reason='a source must be a Source')
        _portal, iqn, _lun = iscsi.target_of(source.endpoint)
        secret = None
        if not source.is_origin and 'auth_password' not in \
                source.endpoint.data:
            secret = self._relay_secret(iqn)
        return iscsi.check_source(source.endpoint, secret)

    def probe_source(self, source, image_format):
        props = self._login_properties(source)
        if image_format != 'raw':
            raise exception.OriginUnavailable(
                image_id=props['target_iqn'],
                reason='the kernel driver serves raw images only, not %s'
                       % image_format)
        try:
            info = self.connector.connect(props)
        except exception.SourceUnavailable as e:
            raise exception.OriginUnavailable(image_id=props['target_iqn'],
                                              reason=e.message)
        try:
            size = sysfs.size_bytes(info['path'])
        finally:
            if not sysfs.holders(info['path']):
                # Only log out if no template uses the same LUN.
                self.connector.disconnect(source.endpoint, force=True)
        return base.OriginInfo(size=size, image_format='raw')

    def source_answers(self, source, timeout):
        portal, _iqn, _lun = iscsi.target_of(source.endpoint)
        return iscsi.portal_answers(portal, timeout)

    def source_ready(self, source):
        """True when the source's portal lists its target (tgt lists a
        target once it is complete: LUN, account and ACL)."""
        portal, iqn, _lun = iscsi.target_of(source.endpoint)
        timeout = self.conf.relay.parent_probe_timeout
        if not iscsi.portal_answers(portal, timeout):
            return False
        return iscsi.target_listed(portal, iqn, timeout)

    # -- per-template layout ---------------------------------------------
    def _new_layout(self):
        return {'version': LAYOUT_VERSION,
                'cache_type': self.kconf.cache_type, 'sources': [],
                'export': None}

    def _load_layout(self, template, template_dir):
        """``kernel.json`` with its sources as :class:`records.Source`;
        None when there is none."""
        try:
            with open(os.path.join(template_dir, LAYOUT_FILE)) as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        layout = {'version': LAYOUT_VERSION,
                  'cache_type': raw['cache_type'],
                  'sources': [self._decode_entry(e) for e in raw['sources']],
                  'export': raw.get('export')}
        if raw.get('version') != LAYOUT_VERSION and 'secret' in raw:
            # The first layout exported every template, with a random
            # secret, under the IQN of this host.
            layout['export'] = {'iqn': self._iqn(template.image_id),
                                'credentials': RANDOM,
                                'secret': raw['secret']}
        return layout

    @staticmethod
    def _decode_entry(raw):
        source = raw['source']
        if 'endpoint' in source:
            source = records.Source.from_dict(source)
        else:
            # First layout: a bare endpoint that carries its secret.
            source = records.Source.origin(records.Endpoint.from_dict(
                source))
        return {'source': source, 'device': raw.get('device', {})}

    def _save_layout(self, template_dir, layout):
        path = os.path.join(template_dir, LAYOUT_FILE)
        tmp = path + '.tmp'
        value = dict(layout, sources=[
            {'source': e['source'].to_dict(), 'device': e['device']}
            for e in layout['sources']])
        # An origin's source holds its CHAP secret, a random export
        # secret is kept here.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'w') as f:
            json.dump(value, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _new_export(self, iqn):
        """The layout's export entry for a template relaying as *iqn*."""
        if not isinstance(iqn, str) or len(iqn) > _MAX_IQN or \
                not _IQN.match(iqn):
            raise exception.BackendError(
                reason='relay export name %r is not an IQN' % (iqn,))
        if self.relay:
            self._relay_secret(iqn)     # a missing key fails now
            return {'iqn': iqn, 'credentials': RELAY_KEY}
        return {'iqn': iqn, 'credentials': RANDOM,
                'secret': chap.new_secret()}

    def _export_secret(self, export):
        if export['credentials'] == RELAY_KEY:
            return self._relay_secret(export['iqn'])
        return export['secret']

    @staticmethod
    def _relay_of(template):
        return template.export.relay if template.export else None

    def _export(self, template, layout):
        relay = self._relay_of(template) if layout['export'] else None
        return records.Export(
            self.name, {'device_path': self._tpl_path(template.image_id)},
            relay=relay)

    def _cache(self, template, template_dir, layout):
        return kcache.make(layout['cache_type'], self.prefix,
                           template.image_id, template_dir, template.size,
                           self.conf)

    # -- sources ---------------------------------------------------------
    def _connect_sources(self, template, sources, current=()):
        """Attach *sources*; return ``[{'source', 'device'}]``.

        Sources already in *current* keep their device. Every source is
        checked before the first login; on failure, what this call
        attached is detached again.
        """
        if not sources:
            raise exception.InvalidSource(reason='no source given')
        logins = [self._login_properties(s) for s in sources]
        attached = []
        new = []
        try:
            for source, props in zip(sources, logins):
                known = [c for c in current
                         if iscsi.same_source(c['source'].endpoint,
                                              source.endpoint)]
                if known:
                    attached.append({'source': source,
                                     'device': known[0]['device']})
                    continue
                device = self.connector.connect(props)
                entry = {'source': source, 'device': device}
                new.append(entry)
                size = sysfs.size_bytes(device['path'])
                if size < template.size:
                    raise exception.SourceUnavailable(
                        target=props['target_iqn'],
                        portal=props['target_portal'],
                        reason='LUN has %d bytes, the image %d'
                               % (size, template.size))
                attached.append(entry)
        except Exception:
            with excutils.save_and_reraise_exception():
                for entry in new:
                    self._disconnect(entry)
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
                        == entry['source'].endpoint.data['target_iqn'])
        except OSError:
            return False

    def _disconnect(self, entry):
        try:
            self.connector.disconnect(entry['source'].endpoint, force=True)
        except exception.ThunderException as e:
            LOG.warning('Leaving source %s: %s',
                        entry['source'].endpoint.data.get('target_iqn'), e)

    def _disconnect_others(self, old, kept):
        for entry in old:
            if not any(iscsi.same_source(entry['source'].endpoint,
                                         e['source'].endpoint)
                       for e in kept):
                self._disconnect(entry)

    @staticmethod
    def _source_disks(entries):
        # The helper checks each is an iSCSI disk and builds the
        # multipath table over their major:minor numbers.
        return [os.path.realpath(e['device']['path']) for e in entries]

    @staticmethod
    def _wanted_sources(template):
        return list(template.sources) or [
            records.Source.origin(template.origin)]

    # -- templates -------------------------------------------------------
    def create_template(self, template, template_dir):
        started = time.monotonic()
        layout = self._new_layout()
        relay = self._relay_of(template)
        if relay is not None:
            layout['export'] = self._new_export(relay.export)
        layout['sources'] = self._connect_sources(
            template, self._wanted_sources(template))
        attached = time.monotonic()
        try:
            self._save_layout(template_dir, layout)
            export = self._build(template, template_dir, layout, fresh=True)
        except Exception:
            with excutils.save_and_reraise_exception():
                LOG.error('Building template %s failed; tearing down',
                          template.image_id)
                self._teardown(template, template_dir, layout)
        LOG.info('Template %s ready at %s%s (sources attached in %.1f s, '
                 'cache and export in %.1f s)', template.image_id,
                 export.local['device_path'],
                 ', exported as %s' % layout['export']['iqn']
                 if layout['export'] else '', attached - started,
                 time.monotonic() - attached)
        return base.TemplateBuild(export=export)

    def _build(self, template, template_dir, layout, fresh):
        length = dmtables.sectors(template.size)
        image_id = template.image_id
        src = self._dev('src', image_id)
        disks = self._source_disks(layout['sources'])
        if devmapper.exists(self.scope, src):
            check(priv.reload_source_map(self.scope, image_id, length,
                                         disks), 'dmsetup reload %s' % src)
        else:
            # Read-only: parents export write-protected LUNs.
            devmapper.created(priv.create_source_map(
                self.scope, image_id, length, disks), src)
        cache = self._cache(template, template_dir, layout)
        if fresh:
            cached = cache.create(devmapper.device_path(src), length)
        else:
            cached = cache.assemble(devmapper.device_path(src), length)
        tpl = self._dev('tpl', image_id)
        if not devmapper.exists(self.scope, tpl):
            # Read-only linear map over the cache.
            devmapper.created(priv.create_template_map(
                self.scope, image_id, length, cached), tpl)
        export = layout['export']
        if export:
            # LUN 1 is the -tpl device, the account thunder-<image_id>.
            self.tgt.export(export['iqn'], image_id,
                            self._export_secret(export))
        return self._export(template, layout)

    def ensure_template(self, template, template_dir):
        layout = self._load_layout(template, template_dir)
        if layout is None:
            raise exception.BackendError(
                reason='template %s has no kernel layout; recreate it'
                       % template.image_id)
        relay = self._relay_of(template)
        if relay is not None and not layout['export']:
            layout['export'] = self._new_export(relay.export)
        old = layout['sources']
        # Sessions that survived (agent restart) are kept as they are;
        # after a reboot they are logged in again.
        live = [e for e in old if self._still_attached(e)]
        layout['sources'] = self._connect_sources(
            template, self._wanted_sources(template), current=live)
        self._save_layout(template_dir, layout)
        export = self._build(template, template_dir, layout, fresh=False)
        self._disconnect_others(old, layout['sources'])
        return base.TemplateBuild(export=export)

    def set_sources(self, template, template_dir, sources):
        started = time.monotonic()
        sources = list(sources)
        if not sources:
            raise exception.InvalidSource(reason='no source given')
        for source in sources:
            self._login_properties(source)
        layout = self._load_layout(template, template_dir)
        if layout is None:
            raise exception.BackendError(
                reason='template %s has no kernel layout'
                       % template.image_id)
        old = layout['sources']
        entries = self._connect_sources(template, sources, current=old)
        attached = time.monotonic()
        src = self._dev('src', template.image_id)
        # Queued and in-flight I/O moves to the new paths.
        check(priv.reload_source_map(
            self.scope, template.image_id, dmtables.sectors(template.size),
            self._source_disks(entries)), 'dmsetup reload %s' % src)
        layout['sources'] = entries
        self._save_layout(template_dir, layout)
        switched = time.monotonic()
        LOG.info('Template %s now reads from %s (attached in %.1f s, '
                 'switched in %.1f s)', template.image_id,
                 [e['source'].endpoint.data['target_portal']
                  for e in entries],
                 attached - started, switched - attached)
        self._disconnect_others(old, entries)
        LOG.info('Template %s left its old sources in %.1f s',
                 template.image_id, time.monotonic() - switched)
        return None

    def delete_template(self, template, template_dir):
        started = time.monotonic()
        layout = (self._load_layout(template, template_dir)
                  or self._new_layout())
        tpl = self._dev('tpl', template.image_id)
        if devmapper.exists(self.scope, tpl):
            users = sysfs.holders(devmapper.device_path(tpl))
            if users:
                raise exception.TemplateInUse(
                    image_id=template.image_id,
                    reason='snapshot devices %s' % ', '.join(users))
        iqn = self._export_iqn(template, layout)
        sessions = self.tgt.sessions(iqn) if iqn else 0
        if sessions:
            raise exception.TemplateInUse(
                image_id=template.image_id,
                reason='%d child session(s) on its export' % sessions)
        self._teardown(template, template_dir, layout)
        LOG.info('Template %s torn down in %.1f s', template.image_id,
                 time.monotonic() - started)

    def _export_iqn(self, template, layout):
        """The template's tgt target, if it has or may have one (a
        template whose layout was never written may have been exported
        under the name the manager reserved)."""
        if layout['export']:
            return layout['export']['iqn']
        relay = self._relay_of(template)
        return relay.export if relay is not None else None

    def _teardown(self, template, template_dir, layout):
        """Reverse of _build, tolerant of missing pieces."""
        image_id = template.image_id
        iqn = self._export_iqn(template, layout)
        if iqn:
            self.tgt.unexport(iqn, image_id)
        devmapper.remove(self.scope, self._dev('tpl', image_id))
        self._cache(template, template_dir, layout).destroy()
        devmapper.remove(self.scope, self._dev('src', image_id))
        for entry in layout.get('sources', []):
            self._disconnect(entry)
        loop.detach_under(self.scope, template_dir)
        layout['sources'] = []
        layout['export'] = None
        if os.path.isdir(template_dir):
            self._save_layout(template_dir, layout)

    def is_healthy(self, template, template_dir):
        layout = self._load_layout(template, template_dir)
        if layout is None:
            return False
        try:
            if not (devmapper.exists(self.scope,
                                     self._dev('src', template.image_id))
                    and devmapper.exists(self.scope,
                                         self._dev('tpl',
                                                   template.image_id))):
                return False
            if layout['export']:
                target = self.tgt.find(layout['export']['iqn'])
                return (target is not None
                        and target['luns'].get(ktarget.LUN) is not None)
            return True
        except exception.BackendError:
            return False

    def source_paths(self, template, template_dir):
        """State of the template's paths: ``{'queued_ios', 'paths'}``."""
        return dmtables.parse_multipath_status(
            devmapper.status(self.scope,
                             self._dev('src', template.image_id)))

    def template_stats(self, template, template_dir):
        layout = (self._load_layout(template, template_dir)
                  or self._new_layout())
        src = devmapper.device_path(self._dev('src', template.image_id))
        tpl = self._tpl_path(template.image_id)
        stats = self._cache(template, template_dir, layout).stats()
        return base.TemplateStats(
            bytes_fetched=sysfs.read_bytes(src) if os.path.exists(src)
            else 0,
            bytes_served=sysfs.read_bytes(tpl) if os.path.exists(tpl)
            else 0,
            cached_bytes=min(stats['cached_bytes'], template.size),
            blocks_cached=stats['blocks_cached'],
            block_size=stats['block_size'],
            disk_bytes=stats['disk_bytes']), None

    def cache_capacity(self, template, template_dir):
        # Exactly the layout's files at full size (see kcache.capacity):
        # twice the image with a [kernel] cache_min_size_mb floor, plus
        # 1 MiB (bcache) or the dm-cache metadata.
        layout = None
        if os.path.isdir(template_dir):
            layout = self._load_layout(template, template_dir)
        kind = layout['cache_type'] if layout else self.kconf.cache_type
        return kcache.capacity(kind, template.size, self.conf)

    def disk_usage(self, template, template_dir):
        layout = (self._load_layout(template, template_dir)
                  or self._new_layout())
        return self._cache(template, template_dir, layout).disk_bytes()

    def prefetch_target(self, template, template_dir):
        # Reads of the template device miss into the cache like a
        # snapshot's reads do.
        return prefetch.BlockDevice(self._tpl_path(template.image_id),
                                    max_read=PREFETCH_READ)

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

    def create_snapshot(self, template, template_dir, instance_id,
                        snapshot_dir):
        # Room for every chunk plus the exception tables (16 bytes per
        # chunk); sparse, so only written chunks take space.
        chunk = self.kconf.snapshot_chunk_size
        size = template.size + template.size * 16 // chunk + 1024 * 1024
        cow = os.path.join(snapshot_dir, COW_FILE)
        loop.create_sparse_file(cow, -(-size // chunk) * chunk)
        try:
            self._activate_snapshot(template, instance_id, cow)
        except Exception:
            with excutils.save_and_reraise_exception():
                loop.detach_under(self.scope, snapshot_dir)
        return self._connection_info(template, instance_id)

    def _activate_snapshot(self, template, instance_id, cow):
        name = dmtables.snapshot_name(self.prefix, instance_id)
        if not devmapper.exists(self.scope, name):
            # Persistent, over the template, COW store on the loop device.
            chunk = self.kconf.snapshot_chunk_size // dmtables.SECTOR
            devmapper.created(priv.create_snapshot_map(
                self.scope, instance_id, template.image_id,
                dmtables.sectors(template.size),
                loop.attach(self.scope, cow), chunk), name)

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

    def snapshot_users(self, template, snapshot, snapshot_dir):
        name = dmtables.snapshot_name(self.prefix, snapshot.instance_id)
        if not devmapper.exists(self.scope, name):
            return None
        users = devmapper.open_count(self.scope, name)
        if users:
            return 'device %s is open %d time(s)' % (
                devmapper.device_path(name), users)
        return None

    def delete_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        users = self.snapshot_users(template, snapshot, snapshot_dir)
        if users:
            raise exception.SnapshotInUse(instance_id=snapshot.instance_id,
                                          reason=users)
        devmapper.remove(self.scope, dmtables.snapshot_name(
            self.prefix, snapshot.instance_id))
        loop.detach_under(self.scope, snapshot_dir)
