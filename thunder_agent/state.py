"""Durable agent state: one JSON record per template and per snapshot.

Records are written atomically (write, fsync, rename, fsync the directory) so
that a ``kill -9`` at any point leaves either the old or the new record.
After a restart the agent reloads them and reconciles the data plane with
them (see :meth:`thunder_agent.manager.AgentManager.reconcile`).
"""

import dataclasses
import json
import os
import shutil
import time

RECORD = 'record.json'


@dataclasses.dataclass
class Template:
    image_id: str
    origin: dict
    size: int
    image_format: str
    backend: str
    created_at: float = dataclasses.field(default_factory=time.time)
    last_used_at: float = dataclasses.field(default_factory=time.time)
    # What the template fetches misses from: the origin or parent exports.
    sources: list = dataclasses.field(default_factory=list)
    # Backend-specific description of the template's export.
    export: dict = dataclasses.field(default_factory=dict)
    # Node ids of children currently relaying from this template.
    children: list = dataclasses.field(default_factory=list)
    # Relay tree membership: {'parent': node id or '@origin', 'failures':
    # consecutive failed probes of the parent}; empty when not relaying.
    relay: dict = dataclasses.field(default_factory=dict)
    # Counters carried over data-plane restarts.
    counters: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Snapshot:
    instance_id: str
    image_id: str
    created_at: float = dataclasses.field(default_factory=time.time)
    connection_info: dict = dataclasses.field(default_factory=dict)


class StateStore:
    def __init__(self, state_path):
        self.root = state_path
        self.templates_dir = os.path.join(state_path, 'templates')
        self.snapshots_dir = os.path.join(state_path, 'snapshots')
        for d in (self.root, self.templates_dir, self.snapshots_dir):
            os.makedirs(d, mode=0o750, exist_ok=True)

    def template_dir(self, image_id):
        return os.path.join(self.templates_dir, image_id)

    def snapshot_dir(self, instance_id):
        return os.path.join(self.snapshots_dir, instance_id)

    def save_template(self, template):
        _write_json(os.path.join(self.template_dir(template.image_id), RECORD),
                    dataclasses.asdict(template))

    def save_snapshot(self, snapshot):
        _write_json(
            os.path.join(self.snapshot_dir(snapshot.instance_id), RECORD),
            dataclasses.asdict(snapshot))

    def load_templates(self):
        return {t.image_id: t
                for t in _load_all(self.templates_dir, Template)}

    def load_snapshots(self):
        return {s.instance_id: s
                for s in _load_all(self.snapshots_dir, Snapshot)}

    def remove_template(self, image_id):
        _remove_dir(self.template_dir(image_id))

    def remove_snapshot(self, instance_id):
        _remove_dir(self.snapshot_dir(instance_id))


def _write_json(path, obj):
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o750, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_all(directory, cls):
    records = []
    fields = {f.name for f in dataclasses.fields(cls)}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name, RECORD)
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            # A directory without a record is a creation that never
            # finished; the manager cleans it up.
            continue
        records.append(cls(**{k: v for k, v in data.items() if k in fields}))
    return records


def _remove_dir(path):
    # Drop the record first so a crash mid-way never leaves a record that
    # points at half-deleted data.
    try:
        os.unlink(os.path.join(path, RECORD))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)
    parent = os.path.dirname(path)
    if os.path.isdir(parent):
        _fsync_dir(parent)
