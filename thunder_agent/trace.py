"""Boot traces: which bytes of an image a guest reads while it boots.

A trace is what prefetch and the boot-storm benchmark work from: the reads
of one real boot, in order, with their timing, tied to the image (virtual
size and sha256 of its contents) they were recorded on.

File format (JSON lines, UTF-8)::

    {"format": "thunder-boot-trace", "version": 1, "image_size": N,
     "image_sha256": "<hex>", "duration_s": D, ...}
    {"t": 0.0123, "off": 0, "len": 512, "lat": 0.00008}
    ...

The first line is the header; every other line is one read, in issue
order: ``t`` seconds from boot start (QEMU's start) to the guest issuing
the read, ``off``/``len`` the byte range of the image, ``lat`` seconds the
read took in the recording (absent when unknown). Think times, the guest's
own work between I/O, follow from these (:meth:`Trace.replay_plan`).

Recording a trace is lab work: see ``thunder_lab.trace_recorder``.
"""

import bisect
import dataclasses
import json
import math
import os
import re
import tempfile

from thunder_agent import exception

FORMAT = 'thunder-boot-trace'
VERSION = 1
SECTOR = 512
MIB = 1 << 20
SUPPORTED_FORMATS = ('raw', 'qcow2')

_SHA_RE = re.compile(r'^[0-9a-f]{64}$')


@dataclasses.dataclass(frozen=True)
class Read:
    t: float
    offset: int
    length: int
    # Seconds the read took when recorded; None if unknown.
    latency: float | None = None

    @property
    def end(self):
        return self.offset + self.length


@dataclasses.dataclass(frozen=True)
class ReplayStep:
    """How to replay one read (see :meth:`Trace.replay_plan`)."""
    read: Read
    # Reads (indexes) that must have completed before this one is issued,
    # beyond those the previous step already waited for.
    waits_for: tuple
    # Guest work between the last I/O event it saw and this read.
    think_s: float


class Trace:
    """An ordered list of :class:`Read` of one image."""

    def __init__(self, image_size, image_sha256, reads, meta=None):
        self.image_size = image_size
        self.image_sha256 = image_sha256
        self.reads = list(reads)
        self.meta = dict(meta or {})

    def __repr__(self):
        return '<Trace %d reads, %d unique bytes of %d>' % (
            len(self.reads), self.unique_bytes(), self.image_size)

    def __eq__(self, other):
        return isinstance(other, Trace) and self.to_lines() == \
            other.to_lines()

    # -- figures --

    @property
    def duration_s(self):
        """Boot start to the end of the last read."""
        if 'duration_s' in self.meta:
            return self.meta['duration_s']
        return max((r.t + (r.latency or 0) for r in self.reads), default=0)

    def total_bytes(self):
        return sum(r.length for r in self.reads)

    def extents(self, granularity=1):
        """The union of all reads as sorted, disjoint ``(offset, length)``,
        each widened to *granularity* (a cache's block size)."""
        return merge_extents(
            ((r.offset, r.length) for r in self.reads), granularity,
            self.image_size)

    def unique_bytes(self, granularity=1):
        """Bytes of the image the boot needs: its working set."""
        return sum(length for _, length in self.extents(granularity))

    def think_s(self):
        return sum(step.think_s for step in self.replay_plan())

    def summary(self, granularity=65536):
        return {
            'reads': len(self.reads),
            'bytes': self.total_bytes(),
            'unique_bytes': self.unique_bytes(),
            'working_set_bytes': self.unique_bytes(granularity),
            'granularity': granularity,
            'image_size': self.image_size,
            'working_set_fraction': (self.unique_bytes(granularity)
                                     / self.image_size),
            'duration_s': self.duration_s,
            'think_s': self.think_s(),
        }

    # -- replay --

    def replay_plan(self):
        """Steps that replay the boot with its original causality.

        A guest issues a read after some work ("think time") that started
        at the last I/O event it saw: its previous read being issued or an
        earlier read completing. So read *i* waits for every read that had
        completed before *i* was issued in the recording, then for its
        think time. Reads issued together stay concurrent; reads that
        depended on others wait for them. Without latencies every read
        waits for all earlier ones (a sequential replay).
        """
        order = sorted(range(len(self.reads)),
                       key=lambda j: self._completion(j))
        done_times = [self._completion(j) for j in order]
        steps = []
        waited = 0
        previous_issue = 0.0
        for i, read in enumerate(self.reads):
            # Reads completed before i was issued (all issued before i, as
            # issue times do not decrease).
            upto = max(waited, bisect.bisect_left(done_times, read.t))
            new = tuple(sorted(order[waited:upto]))
            waited = upto
            last_event = previous_issue
            if upto:
                last_event = max(last_event, done_times[upto - 1])
            steps.append(ReplayStep(read, new,
                                    max(0.0, read.t - last_event)))
            previous_issue = read.t
        return steps

    def _completion(self, j):
        read = self.reads[j]
        return read.t + (read.latency or 0.0)

    # -- (de)serialization --

    def header(self):
        header = {'format': FORMAT, 'version': VERSION,
                  'image_size': self.image_size,
                  'image_sha256': self.image_sha256,
                  'duration_s': round(self.duration_s, 6),
                  'reads': len(self.reads)}
        for key, value in sorted(self.meta.items()):
            header.setdefault(key, value)
        return header

    def to_lines(self):
        lines = [json.dumps(self.header(), sort_keys=True)]
        for read in self.reads:
            entry = {'t': round(read.t, 6), 'off': read.offset,
                     'len': read.length}
            if read.latency is not None:
                entry['lat'] = round(read.latency, 6)
            lines.append(json.dumps(entry, sort_keys=True))
        return lines

    def save(self, path):
        """Write the trace atomically (a reader never sees half a file)."""
        validate(self, path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix='.trace-')
        try:
            with os.fdopen(fd, 'w') as f:
                f.write('\n'.join(self.to_lines()) + '\n')
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path


def merge_extents(extents, granularity=1, limit=None):
    """Union of ``(offset, length)`` ranges, widened to *granularity* and
    clipped at *limit*; sorted and disjoint."""
    widened = []
    for offset, length in extents:
        if length <= 0:
            continue
        start = offset // granularity * granularity
        end = -(-(offset + length) // granularity) * granularity
        if limit is not None:
            end = min(end, limit)
        widened.append((start, end))
    widened.sort()
    merged = []
    for start, end in widened:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]


# -- loading and validation --

def _fail(path, reason):
    raise exception.InvalidTrace(path=path, reason=reason)


def _number(value, path, what, minimum=0.0):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value < minimum:
        _fail(path, '%s must be a finite number >= %s, got %r'
              % (what, minimum, value))
    return value


def _integer(value, path, what, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or \
            value < minimum:
        _fail(path, '%s must be an integer >= %d, got %r'
              % (what, minimum, value))
    return value


def validate(trace, path='<trace>'):
    """Check a :class:`Trace`; raise InvalidTrace naming the first fault."""
    _integer(trace.image_size, path, 'image_size', 1)
    if not isinstance(trace.image_sha256, str) or \
            not _SHA_RE.match(trace.image_sha256):
        _fail(path, 'image_sha256 must be 64 lower-case hex digits')
    if not trace.reads:
        _fail(path, 'it has no reads')
    previous = 0.0
    for n, read in enumerate(trace.reads, 1):
        what = 'read %d' % n
        _number(read.t, path, what + ' t')
        if read.t < previous:
            _fail(path, '%s is out of order (t=%s after t=%s)'
                  % (what, read.t, previous))
        previous = read.t
        _integer(read.offset, path, what + ' offset', 0)
        _integer(read.length, path, what + ' length', 1)
        if read.end > trace.image_size:
            _fail(path, '%s (%d+%d) ends beyond the image (%d bytes)'
                  % (what, read.offset, read.length, trace.image_size))
        if read.latency is not None:
            _number(read.latency, path, what + ' latency')
    return trace


def load(path):
    """Read and validate a trace file."""
    try:
        with open(path, encoding='utf-8') as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        _fail(path, 'cannot read it: %s' % e)
    if not lines:
        _fail(path, 'it is empty')
    entries = []
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError as e:
            _fail(path, 'line %d is not JSON: %s' % (n, e))
        if not isinstance(entry, dict):
            _fail(path, 'line %d is not a JSON object' % n)
        entries.append(entry)
    header = entries[0]
    if header.get('format') != FORMAT:
        _fail(path, 'not a %s file' % FORMAT)
    if header.get('version') != VERSION:
        _fail(path, 'unsupported version %r (this code reads %d)'
              % (header.get('version'), VERSION))
    reads = []
    for n, entry in enumerate(entries[1:], 2):
        unknown = set(entry) - {'t', 'off', 'len', 'lat'}
        if unknown or not {'t', 'off', 'len'} <= set(entry):
            _fail(path, 'line %d must have t, off, len (and optionally '
                        'lat), got %s' % (n, sorted(entry)))
        reads.append(Read(entry['t'], entry['off'], entry['len'],
                          entry.get('lat')))
    meta = {k: v for k, v in header.items()
            if k not in ('format', 'version', 'image_size', 'image_sha256',
                         'reads')}
    if 'reads' in header and header['reads'] != len(reads):
        _fail(path, 'header announces %r reads, file has %d'
              % (header['reads'], len(reads)))
    if 'duration_s' in meta:
        _number(meta['duration_s'], path, 'duration_s')
    return validate(Trace(header.get('image_size'),
                          header.get('image_sha256'), reads, meta), path)


def check_image(trace, size, sha256=None):
    """Refuse a trace recorded on another image."""
    if size != trace.image_size:
        raise exception.InvalidTrace(
            path=trace.meta.get('image', '<trace>'),
            reason='it belongs to an image of %d bytes, not %d'
                   % (trace.image_size, size))
    if sha256 is not None and sha256 != trace.image_sha256:
        raise exception.InvalidTrace(
            path=trace.meta.get('image', '<trace>'),
            reason='it belongs to image sha256 %s, not %s'
                   % (trace.image_sha256, sha256))
