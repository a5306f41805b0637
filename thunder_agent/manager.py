"""The agent's brain: validates requests, keeps records, drives a backend.

Every public method validates all of its arguments before it touches
anything, so a refused request changes nothing on disk or in the data
plane. One lock serialises changes; reads of status take it too so they
see a consistent picture.
"""

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time

import oslo_messaging as messaging

from thunder_agent import drivers
from thunder_agent.coordinator import ORIGIN
from thunder_agent import exception
from thunder_agent import state
from thunder_agent import validation

LOG = logging.getLogger(__name__)

# How often a new template checks whether its parent serves yet.
PARENT_POLL_INTERVAL = 0.05
MIB = 1024 * 1024


class AgentManager:
    def __init__(self, conf, backend=None):
        self.conf = conf
        self.host = conf.host
        self.backend = backend or drivers.load(conf.agent.backend, conf)
        self.store = state.StateStore(conf.agent.state_path)
        self.lock = threading.RLock()
        self.templates = {}
        self.snapshots = {}
        self._last_flush = 0.0
        self.prefetchers = {}
        self.relay = None
        if conf.relay.enabled:
            from thunder_agent import relay
            self.relay = relay.RelayMember(conf)

    # -- lifecycle -------------------------------------------------------
    def start(self):
        self.backend.start()
        self.reconcile()
        if self.relay and self.conf.relay.rate_limit_mbit:
            from thunder_agent import ratelimit
            ratelimit.limit(self.conf.relay.interface,
                            self.conf.relay.rate_limit_mbit * 1000 * 1000,
                            list(range(self.conf.relay.port_min,
                                       self.conf.relay.port_max + 1)))

    def stop(self):
        with self.lock:
            for template in self.templates.values():
                with contextlib.suppress(exception.ThunderException):
                    self.backend.flush_template(
                        template, self._tdir(template.image_id))
                self.store.save_template(template)
            self.backend.stop()

    def reconcile(self):
        """Bring records and the data plane back in line after a start."""
        with self.lock:
            self.templates = self.store.load_templates()
            self.snapshots = self.store.load_snapshots()
            self._drop_unfinished(self.store.templates_dir, self.templates)
            self._drop_unfinished(self.store.snapshots_dir, self.snapshots)
            for template in self.templates.values():
                try:
                    template.export = self.backend.ensure_template(
                        template, self._tdir(template.image_id))
                    self.store.save_template(template)
                except exception.ThunderException as e:
                    # Kept: housekeeping retries (the source may be down).
                    LOG.error('Template %s not restored: %s',
                              template.image_id, e)
            for snap in self.snapshots.values():
                template = self.templates.get(snap.image_id)
                if template is None:
                    LOG.error('Snapshot %s has no template %s',
                              snap.instance_id, snap.image_id)
                    continue
                try:
                    snap.connection_info = self.backend.ensure_snapshot(
                        template, self._tdir(template.image_id), snap,
                        self._sdir(snap.instance_id))
                except exception.ThunderException as e:
                    LOG.error('Snapshot %s not restored: %s',
                              snap.instance_id, e)
            LOG.info('Reconciled %d templates and %d snapshots',
                     len(self.templates), len(self.snapshots))

    def _drop_unfinished(self, directory, records):
        # A directory without a record is a create that crashed midway.
        for name in os.listdir(directory):
            if name not in records:
                LOG.warning('Removing unfinished %s', os.path.join(
                    directory, name))
                if directory == self.store.templates_dir:
                    # Its daemon may have started before the crash.
                    with contextlib.suppress(Exception):
                        self.backend.delete_template(
                            _Stub(name), os.path.join(directory, name))
                    self.store.remove_template(name)
                else:
                    self.store.remove_snapshot(name)

    def _tdir(self, image_id):
        return self.store.template_dir(image_id)

    def _sdir(self, instance_id):
        return self.store.snapshot_dir(instance_id)

    # -- templates -------------------------------------------------------
    def prepare_template(self, image_id, origin, size, image_format):
        image_id = validation.image_id(image_id)
        origin = validation.origin(origin, self.conf.agent.file_origin_dirs)
        size = validation.size(size)
        image_format = validation.image_format(image_format)
        with self.lock:
            template = self.templates.get(image_id)
            if template is not None:
                for field, asked in (('origin', origin), ('size', size),
                                     ('image_format', image_format)):
                    existing = getattr(template, field)
                    if existing != asked:
                        raise exception.TemplateMismatch(
                            image_id=image_id, field=field,
                            existing=existing, asked=asked)
                template.last_used_at = time.time()
                self.store.save_template(template)
                return self._template_status(template, stats=False)
            info = self.backend.probe_origin(origin, image_format)
            if size > info.size:
                raise exception.InvalidSize(
                    size=size, reason='larger than the origin (%d bytes)'
                                      % info.size)
            self._make_room()
            template = state.Template(
                image_id=image_id, origin=origin, size=size,
                image_format=image_format, backend=self.backend.name,
                sources=[origin])
            if self.relay and self.relay.takes_part(origin, image_id):
                self._join_tree(template)
            tdir = self._tdir(image_id)
            os.makedirs(tdir, mode=0o750)
            try:
                template.export = self.backend.create_template(template, tdir)
            except Exception as e:
                LOG.exception('Creating template %s failed', image_id)
                with contextlib.suppress(Exception):
                    self.backend.delete_template(template, tdir)
                if template.relay:
                    with contextlib.suppress(Exception):
                        self.relay.leave(image_id)
                self.store.remove_template(image_id)
                if isinstance(e, exception.ThunderException):
                    raise
                raise exception.BackendError(reason=str(e))
            self.store.save_template(template)
            self.templates[image_id] = template
            LOG.info('Template %s ready (%d bytes, %s origin)', image_id,
                     size, origin['driver_volume_type'])
            self._start_prefetch(template, automatic=True)
            return self._template_status(template, stats=False)

    # -- prefetch --------------------------------------------------------
    def prefetch(self, image_id, mode='full', rate_mb=None):
        """Warm a template: ``trace`` (its boot trace) or ``full`` (the
        whole image at *rate_mb* MiB/s, default [prefetch] full_rate_mb
        or unlimited). Returns the prefetch status."""
        image_id = validation.image_id(image_id)
        if mode not in ('trace', 'full'):
            raise exception.InvalidInput(
                reason='prefetch mode must be "trace" or "full"')
        if rate_mb is not None and (isinstance(rate_mb, bool) or not
                                    isinstance(rate_mb, (int, float)) or
                                    rate_mb <= 0):
            raise exception.InvalidInput(
                reason='rate_mb must be a positive number of MiB/s')
        with self.lock:
            template = self._get_template(image_id)
            if mode == 'trace' and self._trace_of(image_id) is None:
                raise exception.InvalidInput(
                    reason='no boot trace for image %s in %s'
                           % (image_id, self._trace_dir()))
            return self._start_prefetch(template, mode=mode, rate_mb=rate_mb)

    def _trace_dir(self):
        return self.conf.prefetch.trace_dir or os.path.join(
            self.conf.agent.state_path, 'traces')

    def _trace_of(self, image_id):
        from thunder_agent import trace as trace_mod
        path = os.path.join(self._trace_dir(), image_id + '.trace')
        if not os.path.exists(path):
            return None
        try:
            return trace_mod.load(path)
        except exception.ThunderException as e:
            LOG.error('Ignoring the boot trace of %s: %s', image_id, e)
            return None

    def _start_prefetch(self, template, mode=None, rate_mb=None,
                        automatic=False):
        from thunder_agent import prefetch as prefetch_mod
        image_id = template.image_id
        address = prefetch_mod.NbdAddress.from_export(template.export)
        jobs = []
        if mode in (None, 'trace'):
            trace = self._trace_of(image_id)
            if trace is not None:
                jobs.append(prefetch_mod.TracePrefetcher(
                    address, trace, granularity=self.conf.cache.cluster_size,
                    concurrency=self.conf.prefetch.concurrency))
        if mode == 'full' or (automatic and self.conf.prefetch.full_rate_mb):
            rate = rate_mb or self.conf.prefetch.full_rate_mb or 1 << 20
            jobs.append(prefetch_mod.FullPrefetcher(
                address, template.size, int(rate * MIB)))
        if not jobs:
            return None
        old = self.prefetchers.get(image_id)
        if old is not None:
            old.cancel()
        runner = _PrefetchChain(jobs)
        self.prefetchers[image_id] = runner.start()
        LOG.info('Prefetching template %s: %s', image_id,
                 ', '.join(j.kind for j in jobs))
        return runner.status()

    def _join_tree(self, template):
        template.export = {'host': self.conf.relay.listen_address,
                           'port': self._free_port()}
        try:
            parent, source = self.relay.join(template)
        except messaging.MessagingException as e:
            # Booting matters more than relaying: read from the origin; the
            # next heartbeat enters the tree.
            LOG.warning('Coordinator unreachable (%s); template %s reads '
                        'from the origin for now', e, template.image_id)
            parent, source = ORIGIN, template.origin
        template.sources = [source]
        template.relay = {'parent': parent, 'failures': 0}
        LOG.info('Template %s joins the relay tree under %s',
                 template.image_id, parent)
        if parent != ORIGIN:
            self._wait_for_parent(template, source)

    def _wait_for_parent(self, template, source):
        """Return once the parent serves the image, or after [relay]
        parent_ready_timeout (the graph's own reconnects take over)."""
        timeout = self.conf.relay.parent_ready_timeout
        started = time.monotonic()
        while True:
            try:
                self.backend.probe_origin(source, 'raw')
                waited = time.monotonic() - started
                if waited > PARENT_POLL_INTERVAL:
                    LOG.info('Parent of template %s serves after %.2f s',
                             template.image_id, waited)
                return
            except exception.ThunderException as e:
                if time.monotonic() - started >= timeout:
                    LOG.warning('Parent of template %s does not serve yet '
                                '(%s); building the template anyway',
                                template.image_id, e)
                    return
            time.sleep(PARENT_POLL_INTERVAL)

    def _free_port(self):
        used = {t.export.get('port') for t in self.templates.values()}
        address = self.conf.relay.listen_address
        for port in range(self.conf.relay.port_min,
                          self.conf.relay.port_max + 1):
            if port in used:
                continue
            try:
                family = socket.AF_INET6 if ':' in address else socket.AF_INET
                with socket.socket(family) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((address, port))
                return port
            except OSError:
                continue
        raise exception.BackendError(
            reason='no free relay port in %d-%d on %s'
                   % (self.conf.relay.port_min, self.conf.relay.port_max,
                      address))

    def release_template(self, image_id):
        image_id = validation.image_id(image_id)
        with self.lock:
            template = self._get_template(image_id)
            reason = self._busy_reason(template)
            if reason:
                raise exception.TemplateInUse(image_id=image_id,
                                              reason=reason)
            self._delete_template(template)
            return {'image_id': image_id, 'deleted': True}

    def collect_garbage(self, max_idle=None):
        if max_idle is None:
            max_idle = self.conf.agent.template_grace_period
        if isinstance(max_idle, bool) or not isinstance(
                max_idle, (int, float)) or max_idle < 0:
            raise exception.InvalidInput(
                reason='max_idle must be a number of seconds >= 0')
        now = time.time()
        collected = []
        with self.lock:
            for template in sorted(self.templates.values(),
                                   key=lambda t: t.last_used_at):
                if (not self._busy_reason(template)
                        and now - template.last_used_at >= max_idle):
                    try:
                        self._delete_template(template)
                    except exception.TemplateInUse as e:
                        LOG.info('Not collected: %s', e)
                        continue
                    collected.append(template.image_id)
        if collected:
            LOG.info('Collected idle templates %s', collected)
        return collected

    def _get_template(self, image_id):
        try:
            return self.templates[image_id]
        except KeyError:
            raise exception.TemplateNotFound(image_id=image_id)

    def _snapshots_of(self, image_id):
        return [s for s in self.snapshots.values() if s.image_id == image_id]

    def _busy_reason(self, template):
        snaps = self._snapshots_of(template.image_id)
        if snaps:
            return '%d snapshot(s)' % len(snaps)
        if template.children:
            return '%d child node(s)' % len(template.children)
        return None

    def _delete_template(self, template):
        if template.relay:
            # Children are moved away before the export goes.
            try:
                pending = self.relay.leave(template.image_id)
            except messaging.MessagingException as e:
                raise exception.TemplateInUse(
                    image_id=template.image_id,
                    reason='the coordinator cannot be asked to move its '
                           'children away (%s)' % e)
            if pending:
                template.children = pending
                raise exception.TemplateInUse(
                    image_id=template.image_id,
                    reason='children %s are still being moved' % pending)
        prefetcher = self.prefetchers.pop(template.image_id, None)
        if prefetcher is not None:
            prefetcher.cancel()
            prefetcher.wait(10)
        tdir = self._tdir(template.image_id)
        self.backend.delete_template(template, tdir)
        self.store.remove_template(template.image_id)
        del self.templates[template.image_id]
        LOG.info('Template %s deleted', template.image_id)

    def _cache_used(self):
        return sum(self.backend.disk_usage(t, self._tdir(t.image_id))
                   for t in self.templates.values())

    def _make_room(self):
        """Evict idle templates, least recently used first, until the
        cache is below its limit."""
        limit = self.conf.cache.size_limit_mb * MIB
        used = self._cache_used()
        refused = set()
        while used >= limit:
            idle = sorted((t for t in self.templates.values()
                           if not self._busy_reason(t)
                           and t.image_id not in refused),
                          key=lambda t: t.last_used_at)
            if not idle:
                raise exception.CacheFull(used=used, limit=limit)
            victim = idle[0]
            LOG.info('Cache at %d of %d bytes: evicting idle template %s',
                     used, limit, victim.image_id)
            try:
                self._delete_template(victim)
            except exception.TemplateInUse as e:
                LOG.info('Not evicted: %s', e)
                refused.add(victim.image_id)
            used = self._cache_used()

    # -- snapshots -------------------------------------------------------
    def create_snapshot(self, image_id, instance_id):
        image_id = validation.image_id(image_id)
        instance_id = validation.instance_id(instance_id)
        with self.lock:
            template = self._get_template(image_id)
            if instance_id in self.snapshots:
                raise exception.SnapshotExists(instance_id=instance_id)
            sdir = self._sdir(instance_id)
            os.makedirs(sdir, mode=0o750)
            snap = state.Snapshot(instance_id=instance_id, image_id=image_id)
            try:
                snap.connection_info = self.backend.create_snapshot(
                    template, self._tdir(image_id), instance_id, sdir)
            except Exception as e:
                LOG.exception('Creating snapshot %s failed', instance_id)
                with contextlib.suppress(Exception):
                    self.backend.delete_snapshot(
                        template, self._tdir(image_id), snap, sdir)
                self.store.remove_snapshot(instance_id)
                if isinstance(e, exception.ThunderException):
                    raise
                raise exception.BackendError(reason=str(e))
            self.store.save_snapshot(snap)
            self.snapshots[instance_id] = snap
            template.last_used_at = time.time()
            self.store.save_template(template)
            LOG.info('Snapshot %s created on template %s', instance_id,
                     image_id)
            return snap.connection_info

    def prepare(self, image_id, origin, size, image_format, instance_id):
        # Check the instance id too before building anything.
        validation.instance_id(instance_id)
        with self.lock:
            self.prepare_template(image_id, origin, size, image_format)
            return self.create_snapshot(image_id, instance_id)

    def delete_snapshot(self, instance_id):
        instance_id = validation.instance_id(instance_id)
        with self.lock:
            snap = self.snapshots.get(instance_id)
            if snap is None:
                raise exception.SnapshotNotFound(instance_id=instance_id)
            template = self.templates.get(snap.image_id)
            if template is not None:
                self.backend.delete_snapshot(
                    template, self._tdir(template.image_id), snap,
                    self._sdir(instance_id))
                template.last_used_at = time.time()
                self.store.save_template(template)
            self.store.remove_snapshot(instance_id)
            del self.snapshots[instance_id]
            LOG.info('Snapshot %s deleted', instance_id)
            return {'instance_id': instance_id, 'deleted': True}

    # -- status and housekeeping -----------------------------------------
    def _template_status(self, template, stats=True):
        status = {
            'image_id': template.image_id,
            'size': template.size,
            'image_format': template.image_format,
            'backend': template.backend,
            'origin': template.origin,
            'sources': template.sources,
            'export': template.export,
            'children': template.children,
            'snapshots': sorted(s.instance_id for s in
                                self._snapshots_of(template.image_id)),
            'created_at': template.created_at,
            'last_used_at': template.last_used_at,
        }
        prefetcher = self.prefetchers.get(template.image_id)
        if prefetcher is not None:
            status['prefetch'] = prefetcher.status()
        if stats:
            tdir = self._tdir(template.image_id)
            status['healthy'] = self.backend.is_healthy(template, tdir)
            try:
                status.update(dataclasses.asdict(
                    self.backend.template_stats(template, tdir)))
            except exception.ThunderException as e:
                status['error'] = str(e)
        return status

    def get_status(self):
        with self.lock:
            templates = [self._template_status(t)
                         for t in self.templates.values()]
            for template in self.templates.values():
                self.store.save_template(template)
            return {
                'host': self.host,
                'backend': self.backend.name,
                'templates': templates,
                'snapshots': [dataclasses.asdict(s)
                              for s in self.snapshots.values()],
                'cache': {
                    'used_bytes': sum(t.get('disk_bytes', 0)
                                      for t in templates),
                    'limit_bytes': self.conf.cache.size_limit_mb * MIB,
                },
            }

    def housekeeping(self):
        """Supervise data planes, flush caches, collect idle templates."""
        with self.lock:
            now = time.monotonic()
            flush = now - self._last_flush >= self.conf.cache.flush_interval
            for template in list(self.templates.values()):
                tdir = self._tdir(template.image_id)
                try:
                    if not self.backend.is_healthy(template, tdir):
                        LOG.warning('Data plane of template %s is down; '
                                    'restoring it', template.image_id)
                        template.export = self.backend.ensure_template(
                            template, tdir)
                        self.store.save_template(template)
                    elif flush:
                        self.backend.flush_template(template, tdir)
                except exception.ThunderException as e:
                    LOG.error('Housekeeping of %s: %s', template.image_id, e)
            if flush:
                self._last_flush = now
            if self.relay:
                self._relay_tick()
        self.collect_garbage()
        with self.lock:
            with contextlib.suppress(exception.CacheFull):
                self._make_room()

    # -- relay tree ------------------------------------------------------
    def _relay_tick(self):
        members = [t for t in self.templates.values() if t.relay]
        if not members:
            return
        try:
            for template in members:
                self._probe_parent(template)
            answers = self.relay.heartbeat(members)
            for template in members:
                if template.image_id in answers:
                    self._follow(template, answers[template.image_id])
                template.children = self.relay.children(template.image_id)
        except messaging.MessagingException as e:
            LOG.warning('Coordinator unreachable (%s); templates keep '
                        'their parents', e)

    def _probe_parent(self, template):
        if self.relay.probe(template.sources[0]):
            template.relay['failures'] = 0
            return
        template.relay['failures'] = template.relay.get('failures', 0) + 1
        LOG.warning('Template %s: parent %s does not answer (%d)',
                    template.image_id, template.relay['parent'],
                    template.relay['failures'])
        if (template.relay['failures'] < self.conf.relay.parent_failures
                or template.relay['parent'] == ORIGIN):
            return
        self._follow(template, self.relay.report_failure(template))

    def _follow(self, template, answer):
        parent = self.relay.parent_of(answer, template.origin)
        if parent is None:
            return
        node, source = parent
        if node == template.relay.get('parent') and (
                source == template.sources[0]):
            return
        LOG.info('Template %s: parent %s -> %s', template.image_id,
                 template.relay.get('parent'), node)
        self.backend.set_sources(template, self._tdir(template.image_id),
                                 [source])
        template.sources = [source]
        template.relay = {'parent': node, 'failures': 0}
        self.store.save_template(template)


class _PrefetchChain:
    """Prefetch jobs of one template, run one after the other in a thread
    (the trace first: it is what the next boot needs)."""

    def __init__(self, jobs):
        self.jobs = jobs
        self._cancelled = threading.Event()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='prefetch')
        self._thread.start()
        return self

    def _run(self):
        for job in self.jobs:
            if self._cancelled.is_set():
                break
            job.run()

    def cancel(self):
        self._cancelled.set()
        for job in self.jobs:
            job.cancel()

    def wait(self, timeout=None):
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()

    def status(self):
        jobs = [job.status() for job in self.jobs]
        return {'jobs': jobs,
                'bytes_done': sum(j['bytes_done'] for j in jobs),
                'bytes_total': sum(j['bytes_total'] for j in jobs),
                'state': next((j['state'] for j in jobs
                               if j['state'] not in ('done',)), 'done')}


@dataclasses.dataclass
class _Stub:
    """Enough of a template for a backend to tear down leftovers."""
    image_id: str
    sources: list = dataclasses.field(default_factory=list)
    counters: dict = dataclasses.field(default_factory=dict)
