"""The agent's brain: per-image state machines over a data-plane driver.

Concurrency is per image. The only host-wide lock (``_map_lock``) guards
the two maps image -> template entry and instance -> snapshot entry, and
is held to look up, insert or remove, never across I/O. Each template entry
has a condition variable guarding its record and two kinds of operations:

* **exclusive** ones change the template's data plane: build, repair,
  re-parent, delete. One at a time per template.
* **shared** ones only use it: snapshot creation and deletion, flushes,
  statistics. Any number at once, none while an exclusive one runs; a
  waiting exclusive operation holds new shared ones back, so 50 snapshots
  being created cannot starve a repair.

Operations hold no lock while they work: the entry's markers say what
runs, and waiting for them is a condition wait (which releases the lock)
with a deadline. So prepares of different images proceed in parallel,
prepares of one image wait for its one build, and a dead parent or
coordinator only delays the templates that need it, each by a bounded
time: [relay] join_timeout for the coordinator (then not at all while it
stays down), [relay] parent_ready_timeout for a parent that does not
serve (then the origin is read instead), the driver's own timeouts for the
data plane, and [agent] prepare_timeout for the whole request.

Records are saved at every state transition (see :mod:`thunder_agent.
records`) and whenever the data plane changes; ``last_used_at`` alone is
saved lazily by housekeeping. Every public method validates its arguments
before it touches anything, so a refused request changes nothing.

Disk space is promised, never hoped for. Any reader of a template (a VM, a
child node, the prefetcher, an NBD_CMD_CACHE request) may make it cache
the whole image, and a copy-on-read fill that cannot be written fails the
read that caused it: a VM read error. So a template is admitted only when
its cache at full size (:meth:`~thunder_agent.drivers.base.Driver.
cache_capacity`: for the qemu driver the qcow2 file of the image's virtual
size with all its metadata) fits both under ``[cache] size_limit_mb``,
with every other template counted at its full size, and in the free space
of the state file system (statvfs ``f_bavail``) less ``[cache] reserve_mb``
/ ``reserve_percent``, with every other template counted at what it may
still grow by. Idle templates are evicted to make room, least recently used
first; then the template is refused (InsufficientDiskSpace,
CacheLimitExceeded) before anything of it exists. Admission decisions are
taken one at a time and count every template admitted before, built or
being built, so concurrent admissions never promise the same space
twice. On a full disk all the same (VM overlays grow into the
reserve, which is not promised ahead), status reads, a record that cannot
be written keeps the previous one on disk (typed RecordNotSaved where a
transition depends on it, saved later where the data plane already
changed), and deletes, which free space, go on.

Every wait of the manager has a deadline of its own besides the driver's:
parent probes ([relay] parent_probe_timeout plus PROBE_MARGIN), readiness
polls (the parent wait), status figures (STATUS_WAIT for all templates
together) and the flushes of a stop (STOP_FLUSH_WAIT for all together).
A driver call that outlives its deadline is left to finish in its thread
(its own timeouts end it); nobody waits for it, no lock is held by it.
"""

import concurrent.futures
import contextlib
import copy
import os
import threading
import time

from oslo_log import log as logging
from oslo_utils import excutils

from thunder_agent import drivers
from thunder_agent.drivers import base as drivers_base
from thunder_agent import exception
from thunder_agent import prefetch as prefetch_mod
from thunder_agent.records import CREATING
from thunder_agent.records import DELETING
from thunder_agent.records import ORIGIN
from thunder_agent.records import READY
from thunder_agent import records
from thunder_agent import relay as relay_mod
from thunder_agent import store as store_mod
from thunder_agent import trace as trace_mod
from thunder_agent import validation

LOG = logging.getLogger(__name__)

MIB = 1024 * 1024
# A snapshot or status call waits this long at most for an exclusive
# operation (a repair, a re-parent) of its template to finish.
SHARED_WAIT = 60.0
# Time left to answer Nova after a parent wait that had to be cut short.
ANSWER_MARGIN = 10.0
# get_status waits this long for the figures of all templates together
# (each template's come from the driver: for the qemu driver a flush,
# [qemu] flush_timeout 10 s, and a qemu-img map, command_timeout 60 s).
# A template whose figures are late shows an error instead, and its call
# is not repeated while it runs. 20 s is a third of oslo.messaging's
# default rpc_response_timeout (60 s), so thunder-admin always gets an
# answer.
STATUS_WAIT = 20.0
# Threads computing status figures (a hung one holds one thread).
STATS_WORKERS = 4
# stop() flushes every template at once and waits this long for all of
# them: a hung data plane delays a stop (a service restart) by 30 s, not
# by [qemu] flush_timeout per template. What is not flushed then is
# fetched again after a crash of the data plane, never lost.
STOP_FLUSH_WAIT = 30.0
# A parent probe counts as failed [relay] parent_probe_timeout plus this
# after it started, whether or not the driver's call has returned.
PROBE_MARGIN = 1.0
# A tree_changed hint makes at most one coordinator call per image per this
# many seconds; hints meanwhile are coalesced into the next call. Anyone
# may send the hint: this bounds what a flood of them costs the coordinator
# (2 calls/s per image), while a new child is still admitted within 0.5 s
# of the change, not at the next heartbeat (15 s).
REFRESH_INTERVAL = 0.5


class _Entry:
    """One template: its record and what runs on it (guarded by cond)."""

    def __init__(self, record):
        self.record = record
        self.cond = threading.Condition()
        self.exclusive = None       # name of the exclusive operation
        self.exclusive_waiting = 0
        self.shared = 0
        self.snapshots = set()      # instance ids, any state
        self.error = None           # why the build failed, for waiters
        self.gone = False           # no longer in the map
        self.dirty = False          # record changed, not saved yet
        self.prefetcher = None
        self.in_flight = set()      # background jobs queued or running
        self.refresh_wanted = False  # a tree_changed hint not acted on
        # Children the coordinator no longer lists, still admitted until
        # the clock value (node -> deadline): see _admitted_children.
        self.former_children = {}
        self.applied_children = None  # what the relay export admits now
        self.refreshed_at = None    # clock of its last placement call
        self.stats_job = None       # the future computing its figures
        # Its cache counts in every admission (it exists or was admitted).
        self.admitted = False

    def view(self):
        """A copy of the record to hand to a driver (cond held)."""
        return copy.deepcopy(self.record)


class _SnapEntry:
    def __init__(self, record):
        self.record = record
        self.busy = False           # being created or deleted


class AgentManager:
    def __init__(self, conf, driver=None, relay=None, store=None,
                 clock=time.monotonic, wall_clock=time.time,
                 statvfs=os.statvfs):
        self.conf = conf
        self.host = conf.host
        self.driver = driver or drivers.load(conf.agent.backend, conf)
        self.store = store or store_mod.StateStore(conf.agent.state_path)
        self._clock = clock
        self._wall = wall_clock
        self._statvfs = statvfs
        # An RLock only so that tests can ask whether a thread holds it.
        self._map_lock = threading.RLock()
        # Serialises admission decisions (arithmetic over stat and statvfs
        # calls, never an eviction, RPC or subprocess): two new templates
        # never both get the same free space, and neither is refused for
        # the other's unadmitted need.
        self._admission_lock = threading.Lock()
        self.templates = {}
        self.snapshots = {}
        self.relay = relay
        if self.relay is None and conf.relay.enabled:
            self.relay = relay_mod.RelayMember(conf)
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=conf.agent.background_workers,
            thread_name_prefix='thunder-worker')
        self._stats_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=STATS_WORKERS, thread_name_prefix='thunder-stats')

    # -- lifecycle -------------------------------------------------------
    def start(self):
        """Load the records and bring the data plane in line with them.

        Returns once records are loaded: templates whose data plane needs
        rebuilding are repaired in the background (a prepare of such an
        image waits for its repair), so an agent with 50 templates behind
        a dead parent answers RPC at once.
        """
        self.store.prepare()
        self.driver.start()
        loaded = self.store.load()
        for image_id, record in loaded.templates.items():
            self.templates[image_id] = entry = _Entry(record)
            entry.admitted = True
        for instance_id, record in loaded.snapshots.items():
            self.snapshots[instance_id] = _SnapEntry(record)
            entry = self.templates.get(record.image_id)
            if entry is not None:
                entry.snapshots.add(instance_id)
        self._reconcile()
        if self.relay and self.conf.relay.rate_limit_mbit:
            from thunder_agent import ratelimit
            ratelimit.limit(self.conf.relay.interface,
                            self.conf.relay.rate_limit_mbit * 1000 * 1000,
                            list(range(self.conf.relay.port_min,
                                       self.conf.relay.port_max + 1)))

    def stop(self):
        """Flush caches and save records; the data plane keeps running.

        The flushes run side by side, STOP_FLUSH_WAIT for all of them.
        """
        views = []
        for entry in self._entries():
            if entry.prefetcher is not None:
                entry.prefetcher.cancel()
            with entry.cond:
                if entry.record.state == READY and not entry.gone:
                    views.append(entry.view())
        self._flush_all(views, STOP_FLUSH_WAIT)
        for entry in self._entries():
            self._save_if_dirty(entry)
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._stats_pool.shutdown(wait=False, cancel_futures=True)
        self.driver.stop()

    def _flush_all(self, views, seconds):
        """Flush the templates of *views* at once, waiting *seconds* at
        most for all of them."""
        if not views:
            return
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(16, len(views)), thread_name_prefix='thunder-stop')
        try:
            futures = {pool.submit(self.driver.flush_template, view,
                                   self._tdir(view)): view.image_id
                       for view in views}
            done, late = concurrent.futures.wait(futures, timeout=seconds)
        finally:
            # A hung flush ends by the driver's own timeout, unwaited.
            pool.shutdown(wait=False, cancel_futures=True)
        for future in done:
            error = future.exception()
            if isinstance(error, exception.ThunderException):
                LOG.warning('Template %s not flushed: %s', futures[future],
                            error)
            elif error is not None:
                LOG.error('Template %s not flushed', futures[future],
                          exc_info=error)
        for future in late:
            LOG.warning('Template %s not flushed within %.0f s: blocks it '
                        'cached since its last flush are fetched again if '
                        'its data plane crashes', futures[future], seconds)

    def _reconcile(self):
        for entry in self._entries():
            record = entry.record
            if record.state == CREATING:
                # Never handed out: Nova got no answer for it.
                LOG.warning('Template %s was being created when the agent '
                            'stopped; removing what was built',
                            record.image_id)
                self._discard_build(entry)
            elif record.state == DELETING:
                self._submit(entry, 'delete', self._finish_delete, entry)
            else:
                self._submit(entry, 'restore', self._repair, entry,
                             'restore')
        for snap in list(self.snapshots.values()):
            self._reconcile_snapshot(snap)
        LOG.info('Loaded %d templates and %d snapshots',
                 len(self.templates), len(self.snapshots))

    def _reconcile_snapshot(self, snap):
        record = snap.record
        entry = self.templates.get(record.image_id)
        if record.state in (CREATING, DELETING):
            # CREATING: never handed out, so it holds no VM write.
            # DELETING: its delete was asked for.
            LOG.warning('Finishing the %s of snapshot %s', 'deletion'
                        if record.state == DELETING else 'undoing',
                        record.instance_id)
            if entry is not None:
                with contextlib.suppress(exception.ThunderException):
                    self.driver.delete_snapshot(
                        entry.view(), self._tdir(entry.record), record,
                        self._sdir(record.instance_id))
                entry.snapshots.discard(record.instance_id)
            self.store.remove_snapshot(record.instance_id)
            del self.snapshots[record.instance_id]
            return
        if entry is None:
            LOG.error('Snapshot %s has no template %s on this host; its '
                      'overlay is kept', record.instance_id, record.image_id)
            return
        # Restored once its template is: the repair job does it.

    def _restore_snapshots(self, entry):
        for instance_id in sorted(entry.snapshots):
            snap = self.snapshots.get(instance_id)
            if snap is None or snap.record.state != READY:
                continue
            try:
                info = self.driver.ensure_snapshot(
                    entry.view(), self._tdir(entry.record), snap.record,
                    self._sdir(instance_id))
            except exception.ThunderException as e:
                LOG.error('Snapshot %s not restored: %s', instance_id, e)
                continue
            if info != snap.record.connection_info:
                snap.record.connection_info = info
                try:
                    self.store.save_snapshot(snap.record)
                except OSError as e:
                    # The VM runs on what ensure_snapshot restored; the
                    # record is written again at the next restore.
                    LOG.warning('Record of snapshot %s not saved: %s',
                                instance_id, e)

    # -- helpers ---------------------------------------------------------
    def _tdir(self, record):
        return self.store.template_dir(record.image_id)

    def _sdir(self, instance_id):
        return self.store.snapshot_dir(instance_id)

    def _entries(self):
        with self._map_lock:
            return list(self.templates.values())

    def _deadline(self, seconds=None):
        return self._clock() + (self.conf.agent.prepare_timeout
                                if seconds is None else seconds)

    def _wait(self, entry, predicate, deadline, what):
        """Wait on *entry*'s condition (held) until *predicate*; raise
        TemplateBusy at *deadline*."""
        while not predicate():
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise exception.TemplateBusy(
                    image_id=entry.record.image_id,
                    operation=entry.exclusive or entry.record.state,
                    waited=what)
            entry.cond.wait(min(remaining, 1.0))

    @contextlib.contextmanager
    def _exclusive(self, entry, operation, deadline=None):
        """Run *operation* alone on the template. With no *deadline* it is
        taken only if free at once (periodic work skips busy templates:
        raises _Busy)."""
        with entry.cond:
            if entry.gone:
                raise exception.TemplateNotFound(
                    image_id=entry.record.image_id)
            if deadline is None:
                if entry.exclusive or entry.shared:
                    raise _Busy()
            else:
                entry.exclusive_waiting += 1
                try:
                    self._wait(entry, lambda: entry.gone or not (
                        entry.exclusive or entry.shared), deadline,
                        operation)
                finally:
                    entry.exclusive_waiting -= 1
                if entry.gone:
                    raise exception.TemplateNotFound(
                        image_id=entry.record.image_id)
            entry.exclusive = operation
        try:
            yield
        finally:
            with entry.cond:
                entry.exclusive = None
                entry.cond.notify_all()

    @contextlib.contextmanager
    def _shared(self, entry, operation, deadline):
        """Use the template alongside other shared operations, once it is
        READY and no exclusive operation runs or waits."""
        with entry.cond:
            self._wait(entry, lambda: entry.gone or (
                entry.record.state != CREATING and not entry.exclusive
                and not entry.exclusive_waiting), deadline, operation)
            if entry.gone or entry.record.state != READY:
                raise exception.TemplateNotFound(
                    image_id=entry.record.image_id)
            entry.shared += 1
        try:
            yield
        finally:
            with entry.cond:
                entry.shared -= 1
                entry.cond.notify_all()

    def _submit(self, entry, job, fn, *args):
        """Queue background work on a template once (skipped while the
        same job is queued or running)."""
        with entry.cond:
            if job in entry.in_flight or entry.gone:
                return None
            entry.in_flight.add(job)

        def run():
            try:
                fn(*args)
            except _Busy:
                pass
            except Exception:
                LOG.exception('%s of template %s failed', job,
                              entry.record.image_id)
            finally:
                with entry.cond:
                    entry.in_flight.discard(job)
        try:
            return self._workers.submit(run)
        except RuntimeError:
            # Shutting down.
            with entry.cond:
                entry.in_flight.discard(job)
            return None

    def _save(self, entry):
        """Save the record (entry.cond held).

        Raises RecordNotSaved when it cannot be written (a full disk): the
        record on disk stays the previous one, and the entry stays dirty
        so that housekeeping tries again.
        """
        entry.dirty = True
        try:
            self.store.save_template(entry.record)
        except OSError as e:
            raise exception.RecordNotSaved(
                kind='template', name=entry.record.image_id,
                reason=e.strerror or str(e)) from e
        entry.dirty = False

    def _save_or_defer(self, entry):
        """Save the record, or leave it to housekeeping when the disk
        refuses (entry.cond held): for changes the data plane has made
        already, which a failed save must not undo."""
        try:
            self._save(entry)
        except exception.RecordNotSaved as e:
            LOG.warning('%s; it is saved once the disk takes it', e)

    def _save_if_dirty(self, entry):
        with entry.cond:
            if entry.dirty and not entry.gone:
                self._save_or_defer(entry)

    def _save_snapshot(self, record):
        """Save a snapshot's record; RecordNotSaved when it cannot be
        written (the previous one stays on disk)."""
        try:
            self.store.save_snapshot(record)
        except OSError as e:
            raise exception.RecordNotSaved(
                kind='snapshot', name=record.instance_id,
                reason=e.strerror or str(e)) from e

    def _touch(self, entry):
        with entry.cond:
            entry.record.last_used_at = self._wall()
            entry.dirty = True

    # -- templates -------------------------------------------------------
    def prepare_template(self, image_id, origin, size, image_format,
                         deadline=None):
        """Ensure the template of *image_id* exists and is READY; returns
        its status. Concurrent calls for one image share one build."""
        image_id = validation.image_id(image_id)
        origin = records.Endpoint.from_dict(validation.origin(
            origin, image_id, validation.OriginPolicy.from_conf(self.conf)))
        size = validation.size(size)
        image_format = validation.image_format(image_format)
        self.driver.check_origin(origin)
        deadline = deadline or self._deadline()
        while True:
            with self._map_lock:
                entry = self.templates.get(image_id)
                build = entry is None
                if build:
                    entry = _Entry(records.Template(
                        image_id=image_id, origin=origin, size=size,
                        image_format=image_format, driver=self.driver.name,
                        sources=[records.Source.origin(origin)]))
                    entry.exclusive = 'create'
                    self.templates[image_id] = entry
            if build:
                self._build(entry, deadline)
            with entry.cond:
                self._wait(entry, lambda: entry.gone or (
                    entry.record.state == READY
                    and entry.exclusive != 'create'), deadline, 'prepare')
                if entry.gone:
                    if entry.error is not None:
                        raise _copy_error(entry.error)
                    continue        # deleted meanwhile: build anew
                record = entry.record
                for field, asked in (('origin', origin), ('size', size),
                                     ('image_format', image_format)):
                    existing = getattr(record, field)
                    if existing != asked:
                        raise exception.TemplateMismatch(
                            image_id=image_id, field=field,
                            existing=_describe(existing),
                            asked=_describe(asked))
            self._touch(entry)
            return self._status(entry)

    def _build(self, entry, deadline):
        """Build a new template (entry.exclusive == 'create', no lock)."""
        record = entry.record
        image_id = record.image_id
        started = self._clock()
        try:
            info = self.driver.probe_source(record.source, record.image_format)
            if record.size > info.size:
                raise exception.InvalidSize(
                    size=record.size,
                    reason='larger than the origin (%d bytes)' % info.size)
            # Before anything of it exists: a refusal leaves nothing.
            self._make_room(entry)
            relaying = bool(self.relay) and self.driver.can_relay(
                image_id, record.origin)
            if relaying:
                address = self._reserve_address(entry)
            with entry.cond:
                self._save(entry)       # CREATING, before any data plane
            if relaying:
                self._place(entry, address, deadline)
            with entry.cond:
                self._save(entry)
                view = entry.view()
            built = self.driver.create_template(view, self._tdir(view))
            with entry.cond:
                record.export = built.export
                if built.driver_state is not None:
                    record.driver_state = built.driver_state
                record.state = READY
                # A record left CREATING would be undone at the next start
                # under the VMs using it: no answer to Nova without it.
                self._save(entry)
                # A new relay export admits nobody until told.
                entry.applied_children = None
            self._submit(entry, 'children', self._admit_children, entry)
        except BaseException as e:
            with excutils.save_and_reraise_exception():
                LOG.error('Template %s not created: %s', image_id, e)
                entry.error = e
                self._discard_build(entry)
        with entry.cond:
            entry.exclusive = None
            entry.cond.notify_all()
        LOG.info('Template %s ready in %.1f s (%d bytes, %s origin, '
                 'reading from %s)', image_id, self._clock() - started,
                 record.size, record.origin.driver_volume_type,
                 record.source.node)
        self._start_prefetch(entry, automatic=True)

    def _discard_build(self, entry):
        """Undo a build that failed or was interrupted by a crash."""
        record = entry.record
        tdir = self._tdir(record)
        with contextlib.suppress(exception.ThunderException):
            self.driver.delete_template(copy.deepcopy(record), tdir)
        if record.relay is not None and self.relay is not None:
            try:
                self.relay.leave(record.image_id)
            except (relay_mod.CoordinatorUnavailable,
                    exception.ThunderException) as e:
                # Its heartbeats stop listing the image: the coordinator
                # drops it within a heartbeat interval.
                LOG.info('Template %s not taken out of its tree now: %s',
                         record.image_id, e)
        self.store.remove_template(record.image_id)
        with self._map_lock:
            if self.templates.get(record.image_id) is entry:
                del self.templates[record.image_id]
        with entry.cond:
            entry.gone = True
            entry.exclusive = None
            entry.cond.notify_all()

    def _reserve_address(self, entry):
        """Give a new relaying template its export address. Under the map
        lock (a bind test per port, no wait) so that two builds never get
        the same port."""
        with self._map_lock:
            taken = {e.record.export.relay for e in self.templates.values()
                     if e.record.export is not None
                     and e.record.export.relay is not None}
            address = self.driver.relay_address(entry.record.image_id, taken)
            with entry.cond:
                entry.record.export = records.Export(self.driver.name, {},
                                                     address)
                entry.record.relay = records.RelayState()
            return address

    def _place(self, entry, address, deadline):
        """Join the image's tree and settle the first source: the parent
        the coordinator names once it serves, else the origin."""
        record = entry.record
        try:
            placement = self.relay.join(record.image_id, address,
                                        record.origin)
        except relay_mod.CoordinatorUnavailable as e:
            # Booting matters more than relaying: read from the origin;
            # the next heartbeat enters the tree.
            LOG.warning('Template %s reads from its origin: no '
                        'coordinator (%s)', record.image_id, e)
            return
        except exception.InvalidInput as e:
            LOG.error('Template %s reads from its origin: the coordinator '
                      'answered nonsense (%s)', record.image_id, e)
            return
        with entry.cond:
            record.relay.children = list(placement.children)
        if placement.parent == ORIGIN or not placement.known:
            return
        try:
            source = self.driver.parent_source(placement.parent,
                                               placement.address,
                                               record.image_id)
        except exception.InvalidInput as e:
            # A parent address this host must not use (outside [relay]
            # peer_networks, a port off the relay range, a forged export):
            # read from the origin and have the coordinator move us.
            LOG.error('Template %s reads from its origin: parent %s has an '
                      'address this host refuses (%s)', record.image_id,
                      placement.parent, e)
            self._submit(entry, 'report', self._report_failure, entry,
                         placement.parent)
            return
        wait = min(self.conf.relay.parent_ready_timeout,
                   max(0.0, deadline - self._clock() - ANSWER_MARGIN))
        if self._wait_ready(source, wait):
            with entry.cond:
                record.sources = [source]
                record.relay.parent = placement.parent
            LOG.info('Template %s joins the tree of its image under %s',
                     record.image_id, placement.parent)
            return
        LOG.warning('Parent %s of template %s does not serve after %.1f s; '
                    'reading from the origin and reporting it',
                    placement.parent, record.image_id, wait)
        self._submit(entry, 'report', self._report_failure, entry,
                     placement.parent)

    def _wait_ready(self, source, seconds):
        """Poll the driver until *source* serves; False after *seconds*
        (plus PROBE_MARGIN for a poll that hangs in the driver)."""
        deadline = self._clock() + seconds
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix='thunder-ready')
        try:
            while True:
                poll = pool.submit(self.driver.source_ready, source)
                try:
                    if poll.result(timeout=max(0.0, deadline - self._clock())
                                   + PROBE_MARGIN):
                        return True
                except concurrent.futures.TimeoutError:
                    LOG.warning('Readiness probe of source %s did not '
                                'return by its deadline', source.node)
                    return False
                except exception.ThunderException as e:
                    LOG.debug('Source %s not ready: %s', source.node, e)
                if self._clock() >= deadline:
                    return False
                time.sleep(self.driver.ready_poll_interval)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def release_template(self, image_id):
        """Remove the template now; refused while it is in use."""
        image_id = validation.image_id(image_id)
        entry = self._get(image_id)
        self._delete(entry, wait=True)
        return {'image_id': image_id, 'deleted': True}

    def collect_garbage(self, max_idle=None):
        """Remove templates idle (no snapshot, no child) for *max_idle*
        seconds (default [agent] template_grace_period)."""
        if max_idle is None:
            max_idle = self.conf.agent.template_grace_period
        if isinstance(max_idle, bool) or not isinstance(
                max_idle, (int, float)) or max_idle < 0:
            raise exception.InvalidInput(
                reason='max_idle must be a number of seconds >= 0')
        now = self._wall()
        collected = []
        for entry in sorted(self._entries(),
                            key=lambda e: e.record.last_used_at):
            if now - entry.record.last_used_at < max_idle:
                continue
            try:
                self._delete(entry, wait=False)
            except (exception.TemplateInUse, exception.TemplateNotFound,
                    _Busy) as e:
                LOG.debug('Not collected: %s', e)
                continue
            except exception.ThunderException as e:
                # Half torn down (logged): housekeeping finishes it.
                LOG.debug('Not collected now: %s', e)
                continue
            collected.append(entry.record.image_id)
        if collected:
            LOG.info('Collected idle templates %s', collected)
        return collected

    def _get(self, image_id):
        with self._map_lock:
            entry = self.templates.get(image_id)
        if entry is None:
            raise exception.TemplateNotFound(image_id=image_id)
        return entry

    @staticmethod
    def _busy_reason(entry):
        """Why the template must stay (entry.cond held), or None."""
        if entry.snapshots:
            return '%d snapshot(s)' % len(entry.snapshots)
        if entry.record.relay and entry.record.relay.children:
            return 'child node(s) %s' % ', '.join(
                entry.record.relay.children)
        if entry.record.state != READY:
            return 'it is %s' % entry.record.state
        return None

    def _delete(self, entry, wait):
        """Delete an unused template: coordinator first (its children move
        away), then the data plane, then the record."""
        image_id = entry.record.image_id
        deadline = self._deadline(SHARED_WAIT) if wait else None
        with self._exclusive(entry, 'delete', deadline):
            with entry.cond:
                reason = self._busy_reason(entry)
                if reason:
                    raise exception.TemplateInUse(image_id=image_id,
                                                  reason=reason)
                entry.record.state = DELETING
                # Deleting is what frees a full disk: it goes on without
                # its DELETING record. A crash midway then leaves the READY
                # record, and the next start restores the template from
                # what is left (or finishes a removal the store began).
                self._save_or_defer(entry)
            try:
                self._leave_tree(entry)
                self._stop_prefetch(entry)
                self.driver.delete_template(entry.view(),
                                            self._tdir(entry.record))
            except exception.TemplateInUse:
                with excutils.save_and_reraise_exception():
                    with entry.cond:
                        entry.record.state = READY
                        self._save_or_defer(entry)
            except exception.ThunderException:
                with excutils.save_and_reraise_exception():
                    # Half torn down: housekeeping finishes the delete.
                    LOG.error('Deleting template %s failed; will retry',
                              image_id)
            self._forget(entry)
        LOG.info('Template %s deleted', image_id)

    def _finish_delete(self, entry):
        """Retry an interrupted delete (a DELETING record)."""
        with self._exclusive(entry, 'delete'):
            self._leave_tree(entry)
            self._stop_prefetch(entry)
            self.driver.delete_template(entry.view(),
                                        self._tdir(entry.record))
            self._forget(entry)
        LOG.info('Template %s deleted', entry.record.image_id)

    def _leave_tree(self, entry):
        record = entry.record
        if record.relay is None or self.relay is None:
            return
        try:
            pending = self.relay.leave(record.image_id)
        except relay_mod.CoordinatorUnavailable as e:
            raise exception.TemplateInUse(
                image_id=record.image_id,
                reason='the coordinator cannot be asked to move its '
                       'children away (%s)' % e)
        if pending:
            with entry.cond:
                record.relay.children = pending
            raise exception.TemplateInUse(
                image_id=record.image_id,
                reason='children %s are still being moved' % pending)

    def _forget(self, entry):
        self.store.remove_template(entry.record.image_id)
        with self._map_lock:
            if self.templates.get(entry.record.image_id) is entry:
                del self.templates[entry.record.image_id]
        with entry.cond:
            entry.gone = True
            entry.cond.notify_all()

    def _footprint(self, view):
        """``(capacity, usage)`` of a template's cache in bytes: what it
        may grow to and what it takes now."""
        tdir = self._tdir(view)
        # What a driver's files may make it raise (the kernel driver reads
        # a JSON layout): the template is counted, never skipped.
        errors = (OSError, ValueError, KeyError, exception.ThunderException)
        try:
            usage = self.driver.disk_usage(view, tdir)
        except errors as e:
            # Counted as empty, so at full capacity still to come.
            LOG.warning('Disk usage of template %s unknown: %s',
                        view.image_id, e)
            usage = 0
        try:
            capacity = self.driver.cache_capacity(view, tdir)
        except errors as e:
            # The contract's conservative default.
            capacity = drivers_base.Driver.cache_capacity(self.driver, view,
                                                          tdir)
            LOG.warning('Cache capacity of template %s unknown (%s); '
                        'counting %d bytes', view.image_id, e, capacity)
        return capacity, usage

    def _commitments(self, exclude=None):
        """``(committed, uncached)`` bytes over every admitted template
        but *exclude* (an entry): the sum of what their caches may grow to
        (or take now, when more), and of what they may still grow by."""
        committed = uncached = 0
        for entry in self._entries():
            if entry is exclude:
                continue
            with entry.cond:
                if entry.gone or not entry.admitted:
                    continue
                view = entry.view()
            capacity, usage = self._footprint(view)
            committed += max(capacity, usage)
            uncached += max(0, capacity - usage)
        return committed, uncached

    def _free_space(self):
        """``(free, reserve)`` bytes of the file system under [agent]
        state_path: what unprivileged users may still write there
        (``f_bavail``: the file system's root reserve is not ours), and
        what template caches must leave of it."""
        try:
            st = self._statvfs(self.conf.agent.state_path)
        except OSError as e:
            raise exception.BackendError(
                reason='statvfs of [agent] state_path failed: %s' % e)
        total = st.f_blocks * st.f_frsize
        reserve = max(self.conf.cache.reserve_mb * MIB,
                      total * self.conf.cache.reserve_percent // 100)
        return st.f_bavail * st.f_frsize, reserve

    def _shortfall(self, entry, needed):
        """The error a template (*entry*, its cache *needed* bytes at
        full size) is refused with now, or None when it fits. Without
        *entry*: whether the templates there are fit."""
        image_id = entry.record.image_id if entry is not None else None
        committed, uncached = self._commitments(exclude=entry)
        limit = self.conf.cache.size_limit_mb * MIB
        if committed + needed > limit:
            return exception.CacheLimitExceeded(
                image_id=image_id, needed_mb=_mib(needed),
                committed_mb=_mib(committed), limit_mb=_mib(limit))
        free, reserve = self._free_space()
        if uncached + needed > free - reserve:
            return exception.InsufficientDiskSpace(
                image_id=image_id, needed_mb=_mib(needed),
                uncached_mb=_mib(uncached), free_mb=free // MIB,
                reserve_mb=_mib(reserve))
        return None

    def _make_room(self, entry=None):
        """Admit a new template (*entry*), evicting idle templates, least
        recently used first, until its cache at full size fits; raise the
        refusal (a CacheFull) when no idle template is left. Without
        *entry* (housekeeping): evict until the templates there fit, as
        when a VM's overlay grew into the space they were promised.

        Only READY templates without snapshots are candidates, and a
        delete refuses those with children or running operations: a
        template in use and a VM's data are never touched.
        """
        needed = 0
        refused = set()
        if entry is not None:
            with entry.cond:
                view = entry.view()
            needed, _ = self._footprint(view)
            refused.add(view.image_id)
        while True:
            with self._admission_lock:
                error = self._shortfall(entry, needed)
                if error is None:
                    if entry is not None:
                        with entry.cond:
                            entry.admitted = True
                    return
            idle = [e for e in self._entries()
                    if e.record.image_id not in refused
                    and e.record.state == READY and not e.snapshots]
            if not idle:
                raise error
            victim = min(idle, key=lambda e: e.record.last_used_at)
            refused.add(victim.record.image_id)
            LOG.info('Evicting idle template %s to make room (%s)',
                     victim.record.image_id, error)
            try:
                self._delete(victim, wait=False)
            except (exception.TemplateInUse, exception.TemplateNotFound,
                    _Busy) as e:
                LOG.info('Not evicted: %s', e)
            except exception.ThunderException as e:
                # Half torn down (logged by _delete): housekeeping
                # finishes it; the next candidate is tried meanwhile.
                LOG.info('Not evicted now: %s', e)

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
        entry = self._get(image_id)
        if entry.record.state != READY:
            raise exception.TemplateBusy(image_id=image_id,
                                         operation=entry.record.state,
                                         waited='prefetch')
        if mode == 'trace' and self._trace_of(image_id) is None:
            raise exception.InvalidInput(
                reason='no boot trace for image %s in %s'
                       % (image_id, self._trace_dir()))
        return self._start_prefetch(entry, mode=mode, rate_mb=rate_mb)

    def _trace_dir(self):
        return self.conf.prefetch.trace_dir or os.path.join(
            self.conf.agent.state_path, 'traces')

    def _trace_of(self, image_id):
        path = os.path.join(self._trace_dir(), image_id + '.trace')
        if not os.path.exists(path):
            return None
        try:
            return trace_mod.load(path)
        except exception.ThunderException as e:
            LOG.error('Ignoring the boot trace of %s: %s', image_id, e)
            return None

    def _start_prefetch(self, entry, mode=None, rate_mb=None,
                        automatic=False):
        with entry.cond:
            view = entry.view()
        image_id = view.image_id
        try:
            target = self.driver.prefetch_target(view, self._tdir(view))
        except exception.ThunderException as e:
            if automatic:
                LOG.warning('No prefetch of %s: %s', image_id, e)
                return None
            raise
        jobs = []
        if mode in (None, 'trace'):
            trace = self._trace_of(image_id)
            if trace is not None:
                jobs.append(prefetch_mod.TracePrefetcher(
                    target, trace, granularity=self.conf.cache.cluster_size,
                    concurrency=self.conf.prefetch.concurrency))
        if mode == 'full' or (automatic and self.conf.prefetch.full_rate_mb):
            rate = rate_mb or self.conf.prefetch.full_rate_mb or 1 << 20
            jobs.append(prefetch_mod.FullPrefetcher(
                target, view.size, int(rate * MIB),
                max_rate=self.conf.prefetch.max_rate_mb * MIB))
        if not jobs:
            return None
        runner = _PrefetchChain(jobs)
        with entry.cond:
            old, entry.prefetcher = entry.prefetcher, runner
        if old is not None:
            old.cancel()
        runner.start()
        LOG.info('Prefetching template %s: %s', image_id,
                 ', '.join(j.kind for j in jobs))
        return runner.status()

    def _stop_prefetch(self, entry):
        with entry.cond:
            prefetcher, entry.prefetcher = entry.prefetcher, None
        if prefetcher is not None:
            prefetcher.cancel()
            prefetcher.wait(10)

    # -- snapshots -------------------------------------------------------
    def create_snapshot(self, image_id, instance_id, deadline=None):
        image_id = validation.image_id(image_id)
        instance_id = validation.instance_id(instance_id)
        deadline = deadline or self._deadline(SHARED_WAIT)
        with self._map_lock:
            if instance_id in self.snapshots:
                raise exception.SnapshotExists(instance_id=instance_id)
            entry = self.templates.get(image_id)
            if entry is None:
                raise exception.TemplateNotFound(image_id=image_id)
            snap = _SnapEntry(records.Snapshot(instance_id=instance_id,
                                               image_id=image_id))
            snap.busy = True
            self.snapshots[instance_id] = snap
        sdir = self._sdir(instance_id)
        try:
            with self._shared(entry, 'snapshot', deadline):
                with entry.cond:
                    entry.snapshots.add(instance_id)
                    view = entry.view()
                self._save_snapshot(snap.record)        # CREATING
                info = self.driver.create_snapshot(
                    view, self._tdir(view), instance_id, sdir)
                snap.record.connection_info = info
                snap.record.state = READY
                self._save_snapshot(snap.record)
        except BaseException as e:
            with excutils.save_and_reraise_exception():
                LOG.error('Snapshot %s not created: %s', instance_id, e)
                if os.path.isdir(sdir):
                    with contextlib.suppress(exception.ThunderException):
                        self.driver.delete_snapshot(
                            entry.view(), self._tdir(entry.record),
                            snap.record, sdir)
                    self.store.remove_snapshot(instance_id)
                with entry.cond:
                    entry.snapshots.discard(instance_id)
                with self._map_lock:
                    del self.snapshots[instance_id]
        snap.busy = False
        self._touch(entry)
        LOG.info('Snapshot %s created on template %s', instance_id,
                 image_id)
        return copy.deepcopy(info)

    def prepare(self, image_id, origin, size, image_format, instance_id):
        """Template and snapshot in one call; returns connection_info."""
        validation.instance_id(instance_id)
        deadline = self._deadline()
        self.prepare_template(image_id, origin, size, image_format,
                              deadline=deadline)
        return self.create_snapshot(image_id, instance_id, deadline=deadline)

    def delete_snapshot(self, instance_id):
        instance_id = validation.instance_id(instance_id)
        with self._map_lock:
            snap = self.snapshots.get(instance_id)
            if snap is None:
                raise exception.SnapshotNotFound(instance_id=instance_id)
            if snap.busy:
                raise exception.SnapshotInUse(
                    instance_id=instance_id,
                    reason='it is being created or deleted')
            snap.busy = True
            entry = self.templates.get(snap.record.image_id)
        try:
            if entry is not None:
                with self._shared(entry, 'snapshot', self._deadline(
                        SHARED_WAIT)):
                    self._delete_snapshot(entry, snap)
            else:
                # Its template record was lost: the layer is a file (or
                # device) only this request still names.
                sdir = self._sdir(instance_id)
                users = self.driver.snapshot_users(None, snap.record, sdir)
                if users:
                    raise exception.SnapshotInUse(instance_id=instance_id,
                                                  reason=users)
                self.driver.delete_snapshot(None, None, snap.record, sdir)
                self.store.remove_snapshot(instance_id)
        except BaseException:
            with excutils.save_and_reraise_exception():
                snap.busy = False
        with self._map_lock:
            del self.snapshots[instance_id]
        if entry is not None:
            with entry.cond:
                entry.snapshots.discard(instance_id)
            self._touch(entry)
        LOG.info('Snapshot %s deleted', instance_id)
        return {'instance_id': instance_id, 'deleted': True}

    def _delete_snapshot(self, entry, snap):
        view = entry.view()
        sdir = self._sdir(snap.record.instance_id)
        users = self.driver.snapshot_users(view, snap.record, sdir)
        if users:
            raise exception.SnapshotInUse(
                instance_id=snap.record.instance_id, reason=users)
        snap.record.state = DELETING
        try:
            self._save_snapshot(snap.record)
        except exception.RecordNotSaved as e:
            # Deleting frees space; a crash midway leaves a READY record
            # whose overlay is gone, and the next delete finishes it.
            LOG.warning('%s; deleting it all the same', e)
        self.driver.delete_snapshot(view, self._tdir(view), snap.record,
                                    sdir)
        self.store.remove_snapshot(snap.record.instance_id)

    # -- status ----------------------------------------------------------
    def _status(self, entry):
        """What the template's record and markers say (no driver call)."""
        with entry.cond:
            record = entry.view()
            busy = entry.exclusive
            snapshots = sorted(entry.snapshots)
            prefetcher = entry.prefetcher
        status = {
            'image_id': record.image_id,
            'state': record.state,
            'busy': busy,
            'size': record.size,
            'image_format': record.image_format,
            'backend': record.driver,
            # Never the origin's secret: status goes to operators' tools.
            'origin': validation.describe_origin(record.origin.to_dict()),
            'source': record.source.node,
            'export': record.export.to_dict() if record.export else None,
            'children': list(record.relay.children) if record.relay
            else [],
            'snapshots': snapshots,
            'created_at': record.created_at,
            'last_used_at': record.last_used_at,
        }
        if prefetcher is not None:
            status['prefetch'] = prefetcher.status()
        return status

    def _add_all_stats(self, pairs):
        """Add the driver's figures to the status of each READY template
        of *pairs* (``(entry, status)``) that no exclusive operation
        holds, STATUS_WAIT for all of them together. A template whose
        figures are late gets an error; its call goes on in its thread
        and is the one the next status waits for, never a second one."""
        deadline = self._clock() + STATUS_WAIT
        jobs = []
        for entry, status in pairs:
            if status['state'] != READY or status['busy']:
                continue
            with entry.cond:
                job = entry.stats_job
                if job is None or job.done():
                    try:
                        job = self._stats_pool.submit(self._stats, entry)
                    except RuntimeError:
                        continue        # stopping
                    entry.stats_job = job
            jobs.append((job, status))
        if not jobs:
            return
        concurrent.futures.wait([job for job, _ in jobs],
                                timeout=max(0.0, deadline - self._clock()))
        for job, status in jobs:
            if job.done():
                status.update(job.result())
            else:
                status['error'] = ('its figures did not come within %g s'
                                   % STATUS_WAIT)

    def _stats(self, entry):
        """The template's figures for its status (a stats thread)."""
        status = {}
        try:
            with self._shared(entry, 'status', self._clock() + 2):
                with entry.cond:
                    record = entry.view()
                self._add_stats(entry, record, status)
        except (exception.TemplateBusy, exception.TemplateNotFound):
            pass
        return status

    def _add_stats(self, entry, record, status):
        tdir = self._tdir(record)
        try:
            status['healthy'] = self.driver.is_healthy(record, tdir)
            figures, driver_state = self.driver.template_stats(record, tdir)
        except (OSError, exception.ThunderException) as e:
            status['error'] = str(e)
            return
        status.update(figures.to_dict())
        if driver_state is not None:
            with entry.cond:
                entry.record.driver_state = driver_state
                entry.dirty = True

    def _cache_status(self, templates):
        """The cache section of get_status: what caches take, may take,
        and what the state file system has."""
        committed, uncached = self._commitments()
        cache = {
            'used_bytes': sum(t.get('disk_bytes', 0) for t in templates),
            'limit_bytes': self.conf.cache.size_limit_mb * MIB,
            'committed_bytes': committed,
            'uncached_bytes': uncached,
        }
        try:
            cache['free_bytes'], cache['reserve_bytes'] = self._free_space()
        except exception.BackendError as e:
            cache['error'] = str(e)
        return cache

    def get_status(self):
        """Read-only (it writes nothing: a full disk does not fail it), and
        bounded by STATUS_WAIT whatever the data planes do."""
        entries = self._entries()
        templates = [self._status(e) for e in entries]
        self._add_all_stats(list(zip(entries, templates)))
        with self._map_lock:
            snapshots = [s.record.to_dict() for s in self.snapshots.values()]
        return {
            'host': self.host,
            'backend': self.driver.name,
            'templates': templates,
            'snapshots': snapshots,
            'relay': {
                'enabled': self.relay is not None,
                'coordinator_down': bool(self.relay
                                         and self.relay.coordinator_down)},
            'cache': self._cache_status(templates),
        }

    # -- periodic work (one job per cadence, see service.py) -------------
    def housekeeping(self):
        """Supervise data planes, finish deletes, collect and evict, save
        changed records. Every [agent] housekeeping_interval."""
        for entry in self._entries():
            with entry.cond:
                state = entry.record.state
                busy = entry.exclusive is not None
                view = entry.view()
            if busy:
                continue
            if state == DELETING:
                self._submit(entry, 'delete', self._finish_delete, entry)
            elif state == READY:
                try:
                    healthy = self.driver.is_healthy(view, self._tdir(view))
                except exception.ThunderException as e:
                    LOG.warning('Health of template %s unknown: %s',
                                view.image_id, e)
                    continue
                if not healthy:
                    LOG.warning('Data plane of template %s is down; '
                                'restoring it', view.image_id)
                    self._submit(entry, 'repair', self._repair, entry,
                                 'repair')
        self.collect_garbage()
        try:
            self._make_room()
        except exception.CacheFull as e:
            # Every template is in use: VM overlays took what the caches
            # were promised, or [cache] size_limit_mb was lowered.
            LOG.warning('Templates on this host may outgrow their space and '
                        'none is idle: %s', e)
        except exception.BackendError as e:
            LOG.warning('Cache space not checked: %s', e)
        for entry in self._entries():
            self._save_if_dirty(entry)

    def _repair(self, entry, operation):
        with self._exclusive(entry, operation, self._deadline(SHARED_WAIT)):
            with entry.cond:
                view = entry.view()
            try:
                built = self.driver.ensure_template(view, self._tdir(view))
            except exception.BackendError as e:
                # A parent that still answers is not to blame (this
                # host's own export may be what failed, e.g. its tgtd
                # died): moving would cost the origin a copy and the
                # parent its place in the tree. The next housekeeping
                # tries again. (The same probe as probe_parents: a TCP
                # connect, which a loaded host still answers in time.)
                if view.source.is_origin or self._probe(
                        [view.source])[view.source]:
                    raise
                # The parent is gone as well (a host reboot takes both):
                # rebuild on the origin, which always serves, and tell the
                # coordinator.
                LOG.warning('Template %s cannot be rebuilt on parent %s '
                            '(%s); rebuilding it on its origin',
                            view.image_id, view.source.node, e)
                parent = view.source.node
                with entry.cond:
                    entry.record.sources = [
                        records.Source.origin(entry.record.origin)]
                    if entry.record.relay is not None:
                        entry.record.relay.parent = ORIGIN
                        entry.record.relay.failures = 0
                    self._save_or_defer(entry)
                    view = entry.view()
                built = self.driver.ensure_template(view, self._tdir(view))
                if self.relay is not None and view.relay is not None:
                    self._submit(entry, 'report', self._report_failure,
                                 entry, parent)
            with entry.cond:
                entry.record.export = built.export
                if built.driver_state is not None:
                    entry.record.driver_state = built.driver_state
                self._save_or_defer(entry)
                # A rebuilt relay export admits nobody until told.
                entry.applied_children = None
            self._submit(entry, 'children', self._admit_children, entry)
            self._restore_snapshots(entry)
        LOG.info('Template %s: data plane %s', view.image_id,
                 'restored' if operation == 'restore' else 'repaired')

    def flush(self):
        """Flush every template's cache (each in the background, bounded by
        the driver's flush timeout). Every [cache] flush_interval."""
        for entry in self._entries():
            if entry.record.state == READY and entry.exclusive is None:
                self._submit(entry, 'flush', self._flush, entry)

    def _flush(self, entry):
        try:
            with self._shared(entry, 'flush', self._clock()):
                view = entry.view()
                self.driver.flush_template(view, self._tdir(view))
        except (exception.TemplateBusy, exception.TemplateNotFound):
            # A repair or re-parent runs or waits, or the template went
            # away: nothing to flush now; the next flush comes within
            # [cache] flush_interval. (The driver raises neither.)
            raise _Busy()

    def heartbeat(self):
        """Report every relaying template to the coordinator and follow
        its answers. Every [coordinator] heartbeat_interval (jittered)."""
        if self.relay is None:
            return
        members = []
        for entry in self._entries():
            with entry.cond:
                record = entry.record
                if record.relay is None or record.export is None or (
                        record.export.relay is None) or entry.gone:
                    continue
                members.append((record.image_id, record.export.relay,
                                record.origin, record.relay.parent,
                                record.state))
        try:
            placements = self.relay.heartbeat(members)
        except relay_mod.CoordinatorUnavailable as e:
            LOG.warning('Heartbeat not answered (%s); templates keep their '
                        'parents', e)
            return
        for image_id, placement in placements.items():
            with self._map_lock:
                entry = self.templates.get(image_id)
            if entry is not None:
                self._follow(entry, placement)
        # Former children whose grace ended leave the relay exports.
        now = self._clock()
        for entry in self._entries():
            with entry.cond:
                expired = any(t <= now for t in
                              entry.former_children.values())
            if expired:
                self._submit(entry, 'children', self._admit_children, entry)

    def probe_parents(self):
        """Probe each distinct parent of this host's templates once; report
        those that failed [relay] parent_failures times in a row. Every
        [relay] parent_probe_interval."""
        if self.relay is None:
            return
        by_source = {}
        for entry in self._entries():
            with entry.cond:
                record = entry.record
                if (record.state != READY or record.relay is None
                        or record.source.is_origin):
                    continue
                by_source.setdefault(record.source, []).append(entry)
        reported = self._report_mismatches(by_source)
        by_source = {source: [e for e in entries if id(e) not in reported]
                     for source, entries in by_source.items()}
        by_source = {source: entries for source, entries in by_source.items()
                     if entries}
        if not by_source:
            return
        answers = self._probe(list(by_source))
        for source, entries in by_source.items():
            for entry in entries:
                self._count_probe(entry, source, answers[source])

    def _report_mismatches(self, by_source):
        """Report at once each parent whose bytes the driver rejected (a
        block whose digest is not the manifest's: no second chance, the
        template reads from the origin meanwhile); the ids of the entries
        reported."""
        reported = set()
        for source, entries in by_source.items():
            for entry in entries:
                record = entry.record
                try:
                    mismatch = self.driver.source_mismatch(
                        record, self._tdir(record))
                except exception.ThunderException as e:
                    LOG.warning('Template %s: cannot read its source '
                                'check: %s', record.image_id, e)
                    continue
                if mismatch is None:
                    continue
                with entry.cond:
                    if entry.record.source != source:
                        continue        # moved meanwhile
                    parent = entry.record.relay.parent
                LOG.error('Template %s: parent %s (%s) sent %d block(s) '
                          'that do not match the image\'s manifest (first '
                          'block %d): reporting it; reading from the origin '
                          'meanwhile', record.image_id, parent,
                          mismatch.parent, len(mismatch.bad_blocks),
                          mismatch.bad_blocks[0] if mismatch.bad_blocks
                          else -1)
                self._submit(entry, 'report', self._report_failure, entry,
                             parent)
                reported.add(id(entry))
        return reported

    def _probe(self, sources):
        """``{source: answered}`` for *sources*, probed in parallel, by
        [relay] parent_probe_timeout plus PROBE_MARGIN: a probe still in
        the driver then counts as no answer (and ends in its thread by
        the driver's own timeout, unwaited)."""
        timeout = self.conf.relay.parent_probe_timeout
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(16, len(sources)),
            thread_name_prefix='thunder-probe')
        try:
            futures = {pool.submit(self._answers, source, timeout): source
                       for source in sources}
            concurrent.futures.wait(futures, timeout=timeout + PROBE_MARGIN)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        answers = {}
        for future, source in futures.items():
            if future.done() and not future.cancelled():
                answers[source] = future.result()
            else:
                LOG.warning('Probe of source %s did not return within '
                            '%.0f s', source.node, timeout + PROBE_MARGIN)
                answers[source] = False
        return answers

    def _answers(self, source, timeout):
        try:
            return self.driver.source_answers(source, timeout)
        except exception.ThunderException:
            return False

    def _count_probe(self, entry, source, answered):
        with entry.cond:
            relay = entry.record.relay
            if entry.record.source != source:
                return          # moved meanwhile
            if answered:
                relay.failures = 0
                return
            relay.failures += 1
            failures = relay.failures
            parent = relay.parent
        LOG.warning('Template %s: parent %s does not answer (%d)',
                    entry.record.image_id, parent, failures)
        if failures >= self.conf.relay.parent_failures:
            self._submit(entry, 'report', self._report_failure, entry,
                         parent)

    def _report_failure(self, entry, parent):
        image_id = entry.record.image_id
        try:
            placement = self.relay.report_failure(image_id, parent)
        except (relay_mod.CoordinatorUnavailable,
                exception.ImageTreeNotFound, exception.NodeNotInTree,
                exception.InvalidInput) as e:
            # Nobody to ask: the origin always serves. The next answered
            # heartbeat puts the template back in its tree.
            LOG.warning('Parent %s of %s failed and the coordinator cannot '
                        'place it (%s): reading from the origin', parent,
                        image_id, e)
            placement = relay_mod.Placement(ORIGIN)
        self._follow(entry, placement)

    def _follow(self, entry, placement):
        """Apply a coordinator answer: children now, parent switch in the
        background."""
        with entry.cond:
            record = entry.record
            if record.relay is None or entry.gone:
                return
            if list(placement.children) != record.relay.children:
                record.relay.children = list(placement.children)
                entry.dirty = True
                self._submit(entry, 'children', self._admit_children, entry)
            current = record.relay.parent
            if record.state != READY or not placement.known:
                return
            source = records.Source.origin(record.origin)
            if placement.parent != ORIGIN:
                try:
                    source = self.driver.parent_source(
                        placement.parent, placement.address,
                        record.image_id)
                except exception.InvalidInput as e:
                    LOG.error('Template %s stays on %s: the coordinator '
                              'names parent %s at an address this host '
                              'refuses (%s)', record.image_id, current,
                              placement.parent, e)
                    return
            if placement.parent == current and record.source == source:
                return
        self._submit(entry, 'reparent', self._reparent, entry, placement,
                     source)

    def _admitted_children(self, entry, now):
        """The children the relay export admits (under entry.cond): the
        current ones, and for [coordinator] node_timeout those the
        coordinator stopped listing. A restarted coordinator answers with
        few or no children until every child's heartbeat has reached it
        (one heartbeat_interval); dropping them at once refused their next
        connection and probe, and re-shaped the tree it was rebuilding.
        A node removed from the tree keeps access that long (it was a
        member a moment ago and read the same image)."""
        current = set(entry.record.relay.children)
        former = entry.former_children
        for child in entry.applied_children or ():
            if child not in current:
                former.setdefault(child, now + self.conf.coordinator.
                                  node_timeout)
        for child in list(former):
            if child in current or former[child] <= now:
                del former[child]
        return sorted(current | set(former))

    def _admit_children(self, entry):
        """Have the driver admit the template's children to its relay
        export (:meth:`_admitted_children`); again while they changed
        meanwhile (a change during the call found this job running and was
        not queued)."""
        while True:
            with entry.cond:
                record = entry.record
                if (entry.gone or record.state != READY
                        or record.relay is None or record.export is None
                        or record.export.relay is None):
                    return
                children = self._admitted_children(entry, self._clock())
                if children == entry.applied_children:
                    return
                view = entry.view()
            self.driver.set_children(view, self._tdir(view), children)
            with entry.cond:
                entry.applied_children = children

    def refresh_placement(self, image_id):
        """Ask the coordinator for this node's placement of *image_id* now
        (its ``tree_changed`` hint), at most once per REFRESH_INTERVAL per
        image, hints meanwhile coalesced. The hint is untrusted (anyone on
        the bus may send it): it only makes the agent ask, and the
        coordinator's answer is the truth. An image without a template or
        relay is ignored."""
        image_id = validation.image_id(image_id)
        if self.relay is None:
            return
        with self._map_lock:
            entry = self.templates.get(image_id)
        if entry is None:
            return
        with entry.cond:
            if entry.record.relay is None:
                return
            entry.refresh_wanted = True
        # One job per image: a hint while it runs is taken by its loop.
        self._submit(entry, 'refresh', self._refresh, entry)

    def _refresh(self, entry):
        placement_of = getattr(self.relay, 'placement_of', None)
        if placement_of is None:
            return
        while True:
            with entry.cond:
                if not entry.refresh_wanted or entry.gone:
                    return
                last = entry.refreshed_at
            wait = 0.0 if last is None else (
                last + REFRESH_INTERVAL - self._clock())
            if wait > 0:
                # No lock held; the wait is at most REFRESH_INTERVAL.
                time.sleep(min(wait, REFRESH_INTERVAL))
                continue
            with entry.cond:
                entry.refresh_wanted = False
                entry.refreshed_at = self._clock()
            try:
                placement = placement_of(entry.record.image_id)
            except (relay_mod.CoordinatorUnavailable,
                    exception.ImageTreeNotFound, exception.NodeNotInTree,
                    exception.InvalidInput) as e:
                LOG.info('Template %s: placement not refreshed: %s',
                         entry.record.image_id, e)
                continue
            self._follow(entry, placement)

    def _reparent(self, entry, placement, source):
        with self._exclusive(entry, 'reparent', self._deadline(SHARED_WAIT)):
            with entry.cond:
                record = entry.record
                if entry.gone or record.state != READY:
                    return
                old = record.relay.parent
                view = entry.view()
            started = self._clock()
            driver_state = self.driver.set_sources(view, self._tdir(view),
                                                   [source])
            with entry.cond:
                record.sources = [source]
                record.relay.parent = placement.parent
                record.relay.failures = 0
                if driver_state is not None:
                    record.driver_state = driver_state
                self._save_or_defer(entry)
        LOG.info('Template %s: parent %s -> %s in %.1f s', view.image_id,
                 old, placement.parent, self._clock() - started)


class _Busy(Exception):
    """Periodic work found the template busy; it tries again next time."""


def _mib(value):
    """Bytes in MiB, rounded up (a need is never shown smaller)."""
    return -(-value // MIB)


def _describe(value):
    """A record field for an error message, without its secrets."""
    if isinstance(value, records.Endpoint):
        return validation.describe_origin(value.to_dict())
    return value


def _copy_error(error):
    """The error another request's build failed with, for a waiter."""
    if isinstance(error, exception.ThunderException):
        return type(error)(error.message, **error.kwargs)
    return exception.BackendError(reason=str(error))


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
