"""Fakes of the agent's collaborators for fast unit tests.

:class:`FakeDriver` implements the whole driver contract in memory. Each
call is recorded, can be made to block (``gate``) or fail (``fail``), and
checks the contract's rules from the driver's side: the record it gets is
a copy it could not have been given under a lock (no lock of the manager is
held by the calling thread), and it never changes that record.
"""

import collections
import copy
import os
import threading

from thunder_agent.drivers import base
from thunder_agent import exception
from thunder_agent import records

ORIGIN = {'driver_volume_type': 'nbd',
          'data': {'host': '192.0.2.1', 'port': 10809, 'export': None}}
SIZE = 1 << 20


def origin_for(image_id):
    value = copy.deepcopy(ORIGIN)
    value['data']['export'] = image_id
    return value


class FakeDriver(base.Driver):
    name = 'fake'
    ready_poll_interval = 0.01

    def __init__(self, conf=None, manager=None):
        super().__init__(conf)
        self.manager = manager
        self.calls = collections.Counter()
        self.log = []
        self.lock = threading.Lock()
        # image id -> the children set_children was last given
        self.admitted = {}
        # method name -> threading.Event the call waits for
        self.gates = {}
        # method name -> exception to raise (once per call)
        self.fail = {}
        self.in_flight = collections.Counter()
        self.max_in_flight = collections.Counter()
        self.origin_size = SIZE
        self.ready = {}          # source node -> bool
        self.answers = {}        # source node -> bool
        self.mismatches = {}     # image id -> base.SourceMismatch
        self.healthy = {}        # image id -> bool
        self.usage = {}          # image id -> bytes
        self.capacity = {}       # image id -> bytes (default: its size)
        self.users = {}          # instance id -> sentence
        self.refused_hosts = set()   # parent hosts parent_source refuses
        self.templates = {}      # image id -> sources (the "data plane")
        self.snapshot_layers = {}
        self.next_port = 10810

    # -- bookkeeping -------------------------------------------------------
    def _enter(self, method, record=None):
        self._check_no_lock_held()
        with self.lock:
            self.calls[method] += 1
            self.log.append((method, getattr(record, 'image_id', None)))
            self.in_flight[method] += 1
            self.max_in_flight[method] = max(self.max_in_flight[method],
                                             self.in_flight[method])
        gate = self.gates.get(method)
        try:
            if gate is not None:
                assert gate.wait(30), 'gate of %s never opened' % method
            error = self.fail.get(method)
            if error is not None:
                raise error
        finally:
            with self.lock:
                self.in_flight[method] -= 1

    def _check_no_lock_held(self):
        manager = self.manager
        if manager is None:
            return
        assert not manager._map_lock._is_owned(), (
            'map lock held across a driver call')
        for entry in list(manager.templates.values()):
            assert not entry.cond._is_owned(), (
                'template lock held across a driver call')

    # -- transport --------------------------------------------------------
    def check_origin(self, origin):
        if origin.driver_volume_type not in ('nbd', 'file'):
            raise exception.InvalidOrigin(reason='fake reads nbd and file')

    def can_relay(self, image_id, origin):
        return origin.driver_volume_type == 'nbd'

    def relay_address(self, image_id, taken):
        with self.lock:
            while True:
                address = records.RelayAddress('192.0.2.10', self.next_port,
                                               image_id)
                self.next_port += 1
                if address not in taken:
                    return address

    def parent_source(self, node, address, image_id):
        if address.host in self.refused_hosts:
            raise exception.InvalidAddress(address=address.to_dict(),
                                           reason='outside peer_networks')
        return records.Source(node, records.Endpoint(
            'nbd', {'host': address.host, 'port': address.port,
                    'export': address.export}))

    def probe_source(self, source, image_format):
        self._enter('probe_source')
        return base.OriginInfo(self.origin_size, image_format)

    def source_ready(self, source):
        self._enter('source_ready')
        return self.ready.get(source.node, True)

    def source_answers(self, source, timeout):
        self._enter('source_answers')
        return self.answers.get(source.node, True)

    def source_mismatch(self, template, template_dir):
        self._enter('source_mismatch', template)
        return self.mismatches.get(template.image_id)

    # -- templates --------------------------------------------------------
    def _export(self, template):
        relay = template.export.relay if template.export else None
        return records.Export(self.name, {'fake': template.image_id}, relay)

    def create_template(self, template, template_dir):
        before = copy.deepcopy(template)
        self._enter('create_template', template)
        assert template == before, 'driver got a record that changed'
        self.templates[template.image_id] = list(template.sources)
        return base.TemplateBuild(self._export(template),
                                  {'generation': 1})

    def ensure_template(self, template, template_dir):
        self._enter('ensure_template', template)
        self.templates[template.image_id] = list(template.sources)
        state = dict(template.driver_state)
        state['generation'] = state.get('generation', 0) + 1
        return base.TemplateBuild(self._export(template), state)

    def set_sources(self, template, template_dir, sources):
        self._enter('set_sources', template)
        self.templates[template.image_id] = list(sources)
        return None

    def set_children(self, template, template_dir, children):
        self._enter('set_children', template)
        with self.lock:
            self.admitted[template.image_id] = list(children)
        return None

    def delete_template(self, template, template_dir):
        self._enter('delete_template', template)
        self.templates.pop(template.image_id, None)
        self.usage.pop(template.image_id, None)

    def is_healthy(self, template, template_dir):
        self._enter('is_healthy', template)
        return self.healthy.get(template.image_id, True)

    def flush_template(self, template, template_dir):
        self._enter('flush_template', template)

    def template_stats(self, template, template_dir):
        self._enter('template_stats', template)
        return base.TemplateStats(bytes_fetched=7, disk_bytes=self.usage.get(
            template.image_id, 0)), None

    def disk_usage(self, template, template_dir):
        return self.usage.get(template.image_id, 0)

    def cache_capacity(self, template, template_dir):
        return self.capacity.get(template.image_id, template.size)

    def prefetch_target(self, template, template_dir):
        raise exception.BackendError(reason='the fake has no data')

    # -- snapshots --------------------------------------------------------
    def create_snapshot(self, template, template_dir, instance_id,
                        snapshot_dir):
        self._enter('create_snapshot', template)
        self.snapshot_layers[instance_id] = template.image_id
        return {'driver_volume_type': 'thunder',
                'data': {'backend': self.name, 'instance_id': instance_id,
                         'image_id': template.image_id}}

    def ensure_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        self._enter('ensure_snapshot', template)
        self.snapshot_layers[snapshot.instance_id] = template.image_id
        return snapshot.connection_info

    def snapshot_users(self, template, snapshot, snapshot_dir):
        return self.users.get(snapshot.instance_id)

    def delete_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        self._enter('delete_snapshot', template)
        self.snapshot_layers.pop(snapshot.instance_id, None)


class FakeFilesystem:
    """``os.statvfs`` of the state file system: *total* bytes, of which
    the fake driver's caches (its ``usage``) and *other* bytes are used.
    ``calls`` counts the look-ups."""

    BLOCK = 4096

    def __init__(self, driver, total, other=0):
        self.driver = driver
        self.total = total
        self.other = other
        self.calls = 0

    def free(self):
        return max(0, self.total - self.other - sum(
            self.driver.usage.values()))

    def __call__(self, path):
        self.calls += 1
        blocks, free = self.total // self.BLOCK, self.free() // self.BLOCK
        # f_bsize, f_frsize, f_blocks, f_bfree, f_bavail, f_files,
        # f_ffree, f_favail, f_flag, f_namemax
        return os.statvfs_result((self.BLOCK, self.BLOCK, blocks, free,
                                  free, 1 << 20, 1 << 19, 1 << 19, 0, 255))


class FakeCoordinatorAPI:
    """The coordinator's RPC client, answering from a script.

    ``parents`` maps image id -> (node, address dict) or None for the
    origin; ``down`` makes every call raise MessagingTimeout.
    """

    def __init__(self):
        self.calls = collections.Counter()
        self.log = []
        self.down = False
        self.parents = {}
        self.children = {}
        self.pending = {}
        self.after_failure = {}

    def _answer(self, image_id):
        parent = self.parents.get(image_id)
        answer = {'parents': [{'node': parent[0], 'address': parent[1]}]
                  if parent else [ORIGIN], 'depth': 1,
                  'children': self.children.get(image_id, [])}
        return answer

    def _call(self, name, *args):
        import oslo_messaging as messaging
        self.calls[name] += 1
        self.log.append((name,) + args)
        if self.down:
            raise messaging.MessagingTimeout('no coordinator')

    def join(self, image_id, node, address, origin, timeout=None):
        self._call('join', image_id, node, address)
        return self._answer(image_id)

    def heartbeat(self, node, templates, timeout=None):
        self._call('heartbeat', node, sorted(templates))
        return {image_id: self._answer(image_id) for image_id in templates}

    def report_parent_failure(self, image_id, node, parent, timeout=None):
        self._call('report_parent_failure', image_id, node, parent)
        self.parents[image_id] = self.after_failure.get(image_id)
        return self._answer(image_id)

    def get_placement(self, image_id, node, timeout=None):
        self._call('get_placement', image_id, node)
        return self._answer(image_id)

    def leave(self, image_id, node, timeout=None):
        self._call('leave', image_id, node)
        return {'pending_children': self.pending.get(image_id, [])}
