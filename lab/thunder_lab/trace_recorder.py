"""Recording boot traces (lab tool behind ``thunder-trace record``).

The recorder boots the image under qemu-system-x86_64 with QEMU's own
trace events ``virtio_blk_handle_read``, ``virtio_blk_handle_write`` and
``virtio_blk_rw_complete`` (log backend, wall-clock timestamps from
``-msg timestamp=on``); the guest writes to a throw-away qcow2 overlay, so
the image is never modified. Reads entirely served by the guest's own
earlier writes are dropped: in a real deployment they hit the snapshot,
never the template. The file format is :mod:`thunder_agent.trace`'s.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

from thunder_agent import exception
from thunder_agent.trace import merge_extents
from thunder_agent.trace import Read
from thunder_agent.trace import SECTOR
from thunder_agent.trace import SUPPORTED_FORMATS
from thunder_agent.trace import Trace
from thunder_agent.trace import validate
from thunder_lab import exception as lab_exception

MIB = 1 << 20
QEMU = 'qemu-system-x86_64'
QEMU_IMG = 'qemu-img'
TRACE_EVENTS = ('virtio_blk_handle_read', 'virtio_blk_handle_write',
                'virtio_blk_rw_complete')

# "<tid>@<sec>.<usec>:<event> <args>" as QEMU's log trace backend writes it
# with -msg timestamp=on.
_EVENT_RE = re.compile(
    r'^\d+@(\d+)\.(\d{6}):(virtio_blk_handle_read|virtio_blk_handle_write|'
    r'virtio_blk_rw_complete) (.*)$')
_REQ_RE = re.compile(r'req (0x[0-9a-f]+|\(nil\))')
_RANGE_RE = re.compile(r'sector (\d+) nsectors (\d+)')


# -- images --

def image_info(path):
    if not shutil.which(QEMU_IMG):
        raise lab_exception.ToolNotFound(program=QEMU_IMG,
                                         package='qemu-utils')
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
            raise lab_exception.ToolNotFound(program=program, package=package)
    if not isinstance(image, str) or not os.path.isfile(image):
        raise lab_exception.TraceRecordFailed(image=image,
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
        raise lab_exception.TraceRecordFailed(
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
                raise lab_exception.TraceRecordFailed(
                    image=image, reason='QEMU exited with %d: %s'
                    % (proc.returncode, f.read().strip()[-1000:]))
        with open(log_path, errors='replace') as f:
            reads, shadowed, writes = parse_qemu_log(f, boot_start)
        if not reads:
            raise lab_exception.TraceRecordFailed(
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
