"""Durable agent state: one JSON record per template and per snapshot.

Layout under ``[agent] state_path``::

    templates/<image id>/record.json      and the driver's cache files
    snapshots/<instance id>/record.json   and the VM's writable layer
    lost+found/<kind>-<name>-<UTC time>/  what the agent could not read

Records are written atomically (write, fsync, rename, fsync the directory)
so that a ``kill -9`` at any point leaves either the old or the new record.
A write that fails (ENOSPC on a full disk, EDQUOT, EROFS) raises OSError and
leaves the old record as it was, and no temporary file behind: the new one
is written next to it and only renamed over it once it is on disk whole.
They are mode 0600: an origin's connection info may carry its CHAP
credentials.

Loading never deletes anything and never stops the agent: a directory
whose record is missing, truncated, of another shape or of another name is
moved, whole, to ``lost+found/`` with a line saying why, and logged as an
error. A snapshot directory holds a VM's writes: only an explicit delete
removes it.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import time

from oslo_log import log as logging
from oslo_utils import excutils

from thunder_agent import records
from thunder_agent import validation

LOG = logging.getLogger(__name__)

RECORD = 'record.json'
LOST_FOUND = 'lost+found'
REASON = 'REASON'
DELETED = '.deleted'


@dataclasses.dataclass
class Loaded:
    templates: dict
    snapshots: dict
    # Directories moved to lost+found, as (path, reason).
    quarantined: list


class StateStore:
    def __init__(self, state_path):
        self.root = state_path
        self.templates_dir = os.path.join(state_path, 'templates')
        self.snapshots_dir = os.path.join(state_path, 'snapshots')
        self.lost_found_dir = os.path.join(state_path, LOST_FOUND)

    def prepare(self):
        """Create the directories (the agent's start, not its import)."""
        for d in (self.root, self.templates_dir, self.snapshots_dir):
            os.makedirs(d, mode=0o750, exist_ok=True)

    def template_dir(self, image_id):
        return os.path.join(self.templates_dir, image_id)

    def snapshot_dir(self, instance_id):
        return os.path.join(self.snapshots_dir, instance_id)

    # -- writing ---------------------------------------------------------
    def save_template(self, template):
        _write_json(os.path.join(self.template_dir(template.image_id),
                                 RECORD), template.to_dict())

    def save_snapshot(self, snapshot):
        _write_json(os.path.join(self.snapshot_dir(snapshot.instance_id),
                                 RECORD), snapshot.to_dict())

    def remove_template(self, image_id):
        _remove_dir(self.template_dir(image_id))

    def remove_snapshot(self, instance_id):
        _remove_dir(self.snapshot_dir(instance_id))

    # -- loading ---------------------------------------------------------
    def load(self):
        """Every readable record; the rest goes to lost+found."""
        quarantined = []
        templates = self._load_kind(
            'template', self.templates_dir, records.Template,
            validation.image_id, lambda t: t.image_id, quarantined)
        snapshots = self._load_kind(
            'snapshot', self.snapshots_dir, records.Snapshot,
            validation.instance_id, lambda s: s.instance_id, quarantined)
        return Loaded(templates, snapshots, quarantined)

    def _load_kind(self, kind, directory, cls, check_name, key,
                   quarantined):
        found = {}
        if not os.path.isdir(directory):
            return found
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if name.startswith('.') and name.endswith(DELETED):
                # An explicit delete that a crash interrupted.
                shutil.rmtree(path, ignore_errors=True)
                continue
            if name.endswith('.tmp') or not os.path.isdir(path):
                # A record write interrupted before its rename, or a stray
                # file: nothing of a template or a VM.
                continue
            try:
                check_name(name)
                record = self._read(path, cls)
                if key(record) != name:
                    raise ValueError('the record names %s' % key(record))
            except FileNotFoundError:
                reason = 'no %s' % RECORD
            except (ValueError, KeyError, TypeError,
                    UnicodeDecodeError, OSError) as e:
                reason = 'unreadable %s: %s' % (RECORD, e)
            except Exception as e:
                # Includes the validation errors of a bad directory name.
                reason = str(e)
            else:
                found[name] = record
                continue
            moved = self.quarantine(kind, path, reason)
            quarantined.append((moved, reason))
        return found

    @staticmethod
    def _read(path, cls):
        with open(os.path.join(path, RECORD), encoding='utf-8') as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError('not a JSON object')
        return cls.from_dict(data)

    def quarantine(self, kind, path, reason):
        """Move *path* to lost+found (same file system: a rename, so open
        files keep working) and say why; returns the new path."""
        os.makedirs(self.lost_found_dir, mode=0o700, exist_ok=True)
        stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
        base = '%s-%s-%s' % (kind, os.path.basename(path), stamp)
        target = os.path.join(self.lost_found_dir, base)
        n = 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(self.lost_found_dir, '%s.%d' % (base, n))
        os.rename(path, target)
        fsync_dir(os.path.dirname(path))
        try:
            with open(os.path.join(target, REASON), 'w') as f:
                f.write('%s %s moved here by thunder-agent at %s: %s\n'
                        % (kind, os.path.basename(path), stamp, reason))
            fsync_dir(self.lost_found_dir)
        except OSError as e:
            # A full disk: the rename needed no space, the note does. The
            # reason is in the log below; the agent starts all the same.
            LOG.warning('No %s note in %s: %s', REASON, target, e)
        LOG.error('%s %s cannot be loaded (%s); moved to %s. Nothing in it '
                  'was deleted; a data plane that still uses it keeps '
                  'running.', kind.capitalize(), os.path.basename(path),
                  reason, target)
        return target


def _write_json(path, obj):
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o750, exist_ok=True)
    tmp = path + '.tmp'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            # A delayed-allocation file system (ext4, xfs) may report
            # ENOSPC only here: before the rename, so the old record stays.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with excutils.save_and_reraise_exception():
            # What was written of the new record would hold the space a
            # full disk lacks, for nothing.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    fsync_dir(directory)


def fsync_dir(directory):
    """Make the entries of *directory* (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dir(path):
    """Delete a record's directory (an explicit delete only).

    It is renamed out of the way first: a crash midway leaves a
    ``.<name>.deleted`` directory that the next load finishes removing,
    never a record pointing at half-deleted data nor a directory without a
    record (which would go to lost+found).
    """
    if not os.path.exists(path):
        return
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, '.%s%s' % (name, DELETED))
    # Left by an earlier interrupted delete of the same name.
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    fsync_dir(parent)
    shutil.rmtree(doomed, ignore_errors=True)
