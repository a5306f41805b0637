"""The agent's records and the shapes that cross its boundaries, typed once.

Outside the agent these are dicts: origins and sources are Cinder-style
connection info (``{'driver_volume_type': ..., 'data': {...}}``) as Nova and
os-brick speak it, relay addresses are ``{'host', 'port', 'export'}`` as the
coordinator speaks it. :mod:`thunder_agent.validation` checks what arrives
from outside and the classes here are built from what it returns; inside,
the manager and the drivers pass these objects, and only
:class:`~thunder_agent.store.StateStore` (records on disk) and the RPC
answers turn them back into dicts.

A template is a small state machine, persisted at every transition::

    CREATING --build done--> READY --release, GC, eviction--> DELETING --> gone
        \\--build failed--> gone (the record goes with the directory)

A snapshot follows the same three states. After a crash the agent finishes
what a state says was under way: a CREATING template or snapshot was never
handed out (Nova gets its answer only after READY is on disk), so its data
plane is torn down; a DELETING one is deleted.
"""

import copy
import dataclasses
import json
import time

# The tree root as a parent reference, as the coordinator names it.
from thunder_agent.coordinator import ORIGIN  # noqa: F401

CREATING = 'creating'
READY = 'ready'
DELETING = 'deleting'
STATES = (CREATING, READY, DELETING)

RECORD_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A block device as Cinder-style connection info: an origin, or a
    parent's export a template reads from."""

    driver_volume_type: str
    data: dict

    def __hash__(self):
        # Equal endpoints hash alike, so that sources can key a dict (the
        # parent probes group templates by source).
        return hash((self.driver_volume_type,
                     json.dumps(self.data, sort_keys=True, default=str)))

    def to_dict(self):
        return {'driver_volume_type': self.driver_volume_type,
                'data': copy.deepcopy(self.data)}

    @classmethod
    def from_dict(cls, value):
        return cls(value['driver_volume_type'], copy.deepcopy(value['data']))


# The image's origin, as the operator (or Nova) names it.
Origin = Endpoint


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a template fetches the blocks it misses: the origin or the
    export of a parent node (``node`` is :data:`ORIGIN` or its node id)."""

    node: str
    endpoint: Endpoint

    @classmethod
    def origin(cls, origin):
        return cls(ORIGIN, origin)

    @property
    def is_origin(self):
        return self.node == ORIGIN

    def to_dict(self):
        return {'node': self.node, 'endpoint': self.endpoint.to_dict()}

    @classmethod
    def from_dict(cls, value):
        return cls(value['node'], Endpoint.from_dict(value['endpoint']))


@dataclasses.dataclass(frozen=True)
class RelayAddress:
    """Where a node's template is exported to its children, as the
    coordinator passes it around: a host, a port and an export name (the
    NBD export or the iSCSI target name). Each driver maps it to and from
    its own transport."""

    host: str
    port: int
    export: str

    def to_dict(self):
        return {'host': self.host, 'port': self.port, 'export': self.export}

    @classmethod
    def from_dict(cls, value):
        return cls(value['host'], int(value['port']), value['export'])


@dataclasses.dataclass(frozen=True)
class Export:
    """How a template is reached. ``local`` is what local readers use (the
    driver's own description: an NBD socket, a device path); ``relay`` is
    the address children use, None when the template does not relay."""

    driver: str
    local: dict
    relay: RelayAddress = None

    def to_dict(self):
        return {'driver': self.driver, 'local': copy.deepcopy(self.local),
                'relay': self.relay.to_dict() if self.relay else None}

    @classmethod
    def from_dict(cls, value):
        relay = value.get('relay')
        return cls(value['driver'], copy.deepcopy(value['local']),
                   RelayAddress.from_dict(relay) if relay else None)


@dataclasses.dataclass
class RelayState:
    """A template's place in its relay tree, as this node last learnt it."""

    # The parent the template reads from (ORIGIN or a node id).
    parent: str = ORIGIN
    # Consecutive failed probes of that parent.
    failures: int = 0
    # Nodes reading from this template, from the coordinator's answers.
    children: list = dataclasses.field(default_factory=list)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, value):
        return cls(value.get('parent', ORIGIN), int(value.get('failures', 0)),
                   list(value.get('children', [])))


@dataclasses.dataclass
class Template:
    image_id: str
    origin: Endpoint
    size: int
    image_format: str
    driver: str
    state: str = CREATING
    created_at: float = dataclasses.field(default_factory=time.time)
    last_used_at: float = dataclasses.field(default_factory=time.time)
    # What the template fetches misses from, in preference order.
    sources: list = dataclasses.field(default_factory=list)
    export: Export = None
    # Relay tree membership; None when the template does not relay.
    relay: RelayState = None
    # What the driver asked to keep (e.g. counters carried over data-plane
    # restarts); opaque to the manager, returned by the driver's calls.
    driver_state: dict = dataclasses.field(default_factory=dict)

    @property
    def source(self):
        return self.sources[0] if self.sources else Source.origin(
            self.origin)

    def to_dict(self):
        return {
            'version': RECORD_VERSION,
            'image_id': self.image_id, 'origin': self.origin.to_dict(),
            'size': self.size, 'image_format': self.image_format,
            'driver': self.driver, 'state': self.state,
            'created_at': self.created_at,
            'last_used_at': self.last_used_at,
            'sources': [s.to_dict() for s in self.sources],
            'export': self.export.to_dict() if self.export else None,
            'relay': self.relay.to_dict() if self.relay else None,
            'driver_state': copy.deepcopy(self.driver_state),
        }

    @classmethod
    def from_dict(cls, value):
        if value.get('version') != RECORD_VERSION:
            value = _template_from_v1(value)
        state = value['state']
        if state not in STATES:
            raise ValueError('unknown template state %r' % (state,))
        return cls(
            image_id=value['image_id'],
            origin=Endpoint.from_dict(value['origin']),
            size=int(value['size']), image_format=value['image_format'],
            driver=value['driver'], state=state,
            created_at=float(value['created_at']),
            last_used_at=float(value['last_used_at']),
            sources=[Source.from_dict(s) for s in value['sources']],
            export=(Export.from_dict(value['export'])
                    if value.get('export') else None),
            relay=(RelayState.from_dict(value['relay'])
                   if value.get('relay') else None),
            driver_state=dict(value.get('driver_state') or {}))


@dataclasses.dataclass
class Snapshot:
    instance_id: str
    image_id: str
    state: str = CREATING
    created_at: float = dataclasses.field(default_factory=time.time)
    connection_info: dict = dataclasses.field(default_factory=dict)

    def to_dict(self):
        return {'version': RECORD_VERSION, 'instance_id': self.instance_id,
                'image_id': self.image_id, 'state': self.state,
                'created_at': self.created_at,
                'connection_info': copy.deepcopy(self.connection_info)}

    @classmethod
    def from_dict(cls, value):
        # Version 1 records were written once the snapshot existed.
        state = value.get('state', READY)
        if state not in STATES:
            raise ValueError('unknown snapshot state %r' % (state,))
        return cls(instance_id=value['instance_id'],
                   image_id=value['image_id'], state=state,
                   created_at=float(value['created_at']),
                   connection_info=dict(value.get('connection_info') or {}))


def _template_from_v1(value):
    """A template record of the first layout (written before the agent had
    per-image states): it was written once the template was ready."""
    relay = value.get('relay') or None
    parent = relay.get('parent', ORIGIN) if relay else ORIGIN
    driver = value['backend']
    old_export = value.get('export') or {}
    if driver == 'qemu':
        local = {k: v for k, v in old_export.items()
                 if k in ('socket', 'host', 'port', 'export')}
        relay_address = (RelayAddress(old_export['host'],
                                      int(old_export['port']),
                                      value['image_id'])
                         if 'port' in old_export else None)
    else:
        data = old_export.get('data', {})
        local = {}
        relay_address = None
        if data.get('target_portal'):
            host, _, port = data['target_portal'].rpartition(':')
            relay_address = RelayAddress(host.strip('[]'), int(port),
                                         data['target_iqn'])
    return {
        'version': RECORD_VERSION, 'image_id': value['image_id'],
        'origin': value['origin'], 'size': value['size'],
        'image_format': value['image_format'], 'driver': driver,
        'state': READY, 'created_at': value['created_at'],
        'last_used_at': value['last_used_at'],
        'sources': [{'node': parent if i == 0 else ORIGIN, 'endpoint': s}
                    for i, s in enumerate(value.get('sources') or [])],
        'export': {'driver': driver, 'local': local,
                   'relay': relay_address.to_dict() if relay_address
                   else None} if old_export else None,
        'relay': ({'parent': parent, 'failures': relay.get('failures', 0),
                   'children': value.get('children', [])}
                  if relay else None),
        'driver_state': value.get('counters') or {},
    }
