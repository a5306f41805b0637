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

The recorder boots the image under qemu-system-x86_64 with QEMU's own
trace events ``virtio_blk_handle_read``, ``virtio_blk_handle_write`` and
``virtio_blk_rw_complete`` (log backend, wall-clock timestamps from
``-msg timestamp=on``); the guest writes to a throw-away qcow2 overlay, so
the image is never modified. Reads entirely served by the guest's own
earlier writes are dropped: in a real deployment they hit the snapshot,
never the template.
"""

import bisect
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time

from thunder_agent import exception

FORMAT = 'thunder-boot-trace'
VERSION = 1
SECTOR = 512
MIB = 1 << 20
QEMU = 'qemu-system-x86_64'
QEMU_IMG = 'qemu-img'
TRACE_EVENTS = ('virtio_blk_handle_read', 'virtio_blk_handle_write',
                'virtio_blk_rw_complete')
SUPPORTED_FORMATS = ('raw', 'qcow2')

# "<tid>@<sec>.<usec>:<event> <args>" as QEMU's log trace backend writes it
# with -msg timestamp=on.
_EVENT_RE = re.compile(
    r'^\d+@(\d+)\.(\d{6}):(virtio_blk_handle_read|virtio_blk_handle_write|'
    r'virtio_blk_rw_complete) (.*)$')
_REQ_RE = re.compile(r'req (0x[0-9a-f]+|\(nil\))')
_RANGE_RE = re.compile(r'sector (\d+) nsectors (\d+)')
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


# -- images --

def image_info(path):
    if not shutil.which(QEMU_IMG):
        raise exception.ToolNotFound(program=QEMU_IMG, package='qemu-utils')
    proc = subprocess.run([QEMU_IMG, 'info', '-U', '--output=json', path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise exception.InvalidInput(
            reason='cannot read image %s: %s' % (path, proc.stderr.strip()))
    return json.loads(proc.stdout)


def image_digest(path, image_format='raw'):
    """(virtual size, sha256 of the virtual contents) of an image.

    That is what a template presents, whatever the file format: a raw
    file is hashed as it is, other formats through qemu-nbd.
    """
    digest = hashlib.sha256()
    if image_format == 'raw':
        with open(path, 'rb') as f:
            for chunk in iter(lambda: f.read(4 * MIB), b''):
                digest.update(chunk)
        return os.path.getsize(path), digest.hexdigest()
    import nbd
    handle = nbd.NBD()
    handle.connect_systemd_socket_activation(
        ['qemu-nbd', '--read-only', '-f', image_format, path])
    try:
        size = handle.get_size()
        for offset in range(0, size, 4 * MIB):
            digest.update(handle.pread(min(4 * MIB, size - offset), offset))
    finally:
        handle.shutdown()
    return size, digest.hexdigest()


# -- recording --

def parse_qemu_log(lines, boot_start):
    """Reads of a boot from QEMU trace-log lines.

    :param boot_start: wall-clock time (seconds) QEMU was started at; read
        times are relative to it.
    :returns: (list of :class:`Read`, number of reads dropped because the
        guest's own writes covered them, number of writes).
    """
    pending = {}
    reads = []
    written = []            # merged (offset, length) the guest wrote
    shadowed = writes = 0
    for line in lines:
        match = _EVENT_RE.match(line.strip())
        if not match:
            continue
        when = int(match.group(1)) + int(match.group(2)) / 1e6
        event, args = match.group(3), match.group(4)
        req = _REQ_RE.search(args)
        req = req.group(1) if req else None
        if event == 'virtio_blk_rw_complete':
            entry = pending.pop(req, None)
            if entry is not None and entry[0] == 'read':
                index = entry[1]
                if index is not None:
                    read = reads[index]
                    reads[index] = dataclasses.replace(
                        read, latency=max(0.0, when - boot_start - read.t))
            continue
        found = _RANGE_RE.search(args)
        if not found:
            continue
        offset = int(found.group(1)) * SECTOR
        length = int(found.group(2)) * SECTOR
        if length <= 0:
            continue
        if event == 'virtio_blk_handle_write':
            writes += 1
            written = merge_extents(written + [(offset, length)])
            pending[req] = ('write', None)
            continue
        if _covered(written, offset, offset + length):
            shadowed += 1
            pending[req] = ('read', None)
            continue
        pending[req] = ('read', len(reads))
        reads.append(Read(max(0.0, when - boot_start), offset, length))
    return reads, shadowed, writes


def _covered(extents, start, end):
    return any(offset <= start and end <= offset + length
               for offset, length in extents)


def record(image, output=None, image_format=None, timeout=600,
           idle_timeout=20, until=None, memory_mb=512, accel='tcg',
           extra_args=(), workdir=None, progress=None):
    """Boot *image* once under QEMU and return the :class:`Trace` of its
    reads (saved to *output* if given).

    The recording stops when the guest powers off, when *until* (a regular
    expression) appears on its serial console, when it has not read for
    *idle_timeout* seconds after its first read, or after *timeout*
    seconds.
    """
    say = progress or (lambda message: None)
    for program, package in ((QEMU, 'qemu-system-x86'),
                             (QEMU_IMG, 'qemu-utils')):
        if not shutil.which(program):
            raise exception.ToolNotFound(program=program, package=package)
    if not isinstance(image, str) or not os.path.isfile(image):
        raise exception.TraceRecordFailed(image=image,
                                          reason='no such image file')
    image = os.path.abspath(image)
    for name, value in (('timeout', timeout), ('idle_timeout', idle_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or value <= 0:
            raise exception.InvalidInput(
                reason='%s must be a positive number, got %r'
                       % (name, value))
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or \
            memory_mb < 64:
        raise exception.InvalidInput(
            reason='memory_mb must be an integer >= 64')
    if accel not in ('tcg', 'kvm'):
        raise exception.InvalidInput(reason='accel must be tcg or kvm')
    marker = re.compile(until) if until else None
    info = image_info(image)
    detected = info['format']
    if image_format is not None and image_format != detected:
        raise exception.TraceRecordFailed(
            image=image, reason='it is %s, not %s' % (detected, image_format))
    if detected not in SUPPORTED_FORMATS:
        raise exception.UnsupportedFormat(
            image_format=detected, supported=', '.join(SUPPORTED_FORMATS))
    own_workdir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix='thunder-trace-')
    os.makedirs(workdir, exist_ok=True)
    try:
        say('hashing %s' % image)
        size, sha = image_digest(image, detected)
        overlay = os.path.join(workdir, 'overlay.qcow2')
        if os.path.exists(overlay):
            os.unlink(overlay)
        subprocess.run([QEMU_IMG, 'create', '-q', '-f', 'qcow2', '-F',
                        detected, '-b', image, overlay], check=True,
                       capture_output=True)
        log_path = os.path.join(workdir, 'qemu-trace.log')
        console = os.path.join(workdir, 'console.log')
        for path in (log_path, console):
            if os.path.exists(path):
                os.unlink(path)
        cmd = [QEMU, '-name', 'thunder-trace',
               '-machine', 'pc,accel=%s' % accel, '-m', str(memory_mb),
               '-smp', '1', '-nodefaults', '-no-user-config', '-nographic',
               '-no-reboot', '-monitor', 'none',
               '-serial', 'file:%s' % console.replace(',', ',,'),
               '-drive', 'file=%s,format=qcow2,if=virtio'
               % overlay.replace(',', ',,'),
               '-msg', 'timestamp=on', '-D', log_path]
        for event in TRACE_EVENTS:
            cmd += ['-trace', 'enable=%s' % event]
        cmd += list(extra_args)
        say('booting it under QEMU (%s) with block tracing' % accel)
        boot_start = time.time()
        with open(os.path.join(workdir, 'qemu-stderr.log'), 'wb') as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err,
                                    start_new_session=True)
        stop_reason = _watch(proc, log_path, console, boot_start, timeout,
                             idle_timeout, marker)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif proc.returncode != 0 and stop_reason == 'poweroff':
            with open(os.path.join(workdir, 'qemu-stderr.log'),
                      errors='replace') as f:
                raise exception.TraceRecordFailed(
                    image=image, reason='QEMU exited with %d: %s'
                    % (proc.returncode, f.read().strip()[-1000:]))
        with open(log_path, errors='replace') as f:
            reads, shadowed, writes = parse_qemu_log(f, boot_start)
        if not reads:
            raise exception.TraceRecordFailed(
                image=image, reason='the guest read nothing (stopped by %s)'
                                    % stop_reason)
        meta = {'image': os.path.basename(image),
                'image_format': detected,
                'recorded_by': 'qemu %s trace events %s'
                               % (_qemu_version(), ','.join(TRACE_EVENTS)),
                'stop': stop_reason, 'accel': accel,
                'writes': writes, 'reads_shadowed_by_writes': shadowed}
        trace = Trace(size, sha, reads, meta)
        trace.meta['duration_s'] = round(
            max(r.t + (r.latency or 0) for r in reads), 6)
        validate(trace, image)
        if output:
            trace.save(output)
        return trace
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _watch(proc, log_path, console, boot_start, timeout, idle_timeout,
           marker):
    """Wait for the end of the boot; return why it ended."""
    last_size = 0
    last_growth = None
    while True:
        if proc.poll() is not None:
            return 'poweroff'
        now = time.time()
        if now - boot_start > timeout:
            return 'timeout'
        try:
            size = os.path.getsize(log_path)
        except OSError:
            size = 0
        if size != last_size:
            last_size, last_growth = size, now
        elif last_growth is not None and now - last_growth > idle_timeout:
            return 'idle'
        if marker is not None:
            try:
                with open(console, 'rb') as f:
                    text = f.read().decode('utf-8', errors='replace')
            except OSError:
                text = ''
            if marker.search(text):
                return 'marker'
        time.sleep(0.1)


def _qemu_version():
    try:
        out = subprocess.run([QEMU, '--version'], capture_output=True,
                             text=True).stdout
    except OSError:
        return '?'
    match = re.search(r'version (\S+)', out)
    return match.group(1) if match else '?'
