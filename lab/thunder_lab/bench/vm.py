"""The VMs of a storm: trace replayers or real QEMU guests.

A *replay* VM opens its disk exactly as a VM's QEMU would (``qemu-nbd``
over the qcow2 overlay, see :mod:`thunder_lab.emulation.reader`) and
issues the trace's reads with the trace's causality and think times
(:meth:`thunder_agent.trace.Trace.replay_plan`). It costs no guest CPU, so
many of them fit on a small machine, and its timing follows the I/O path.

A *real* VM boots the test image under QEMU (TCG) from the same overlay
and reports when the guest printed its marker.

Both return a :class:`VMResult`; ``ok`` means the VM got exactly the
image's bytes (sha256 of the bytes the trace reads, or the data file the
guest hashes itself).
"""

import dataclasses
import hashlib
import os
import subprocess
import time

from thunder_lab.emulation import reader

POLL_MS = 50


@dataclasses.dataclass
class VMResult:
    name: str
    ok: bool
    # Seconds from the VM's own start (disk attached) to boot complete.
    boot_s: float
    sha256: str | None = None
    bytes_read: int = 0
    error: str | None = None


def expected_digest(image_path, trace):
    """sha256 of the bytes a replay of *trace* reads from the raw image."""
    digest = hashlib.sha256()
    with open(image_path, 'rb') as f:
        for read in trace.reads:
            f.seek(read.offset)
            digest.update(f.read(read.length))
    return digest.hexdigest()


def replay_handle(handle, trace, clock=time.monotonic, sleep=time.sleep):
    """Replay *trace* on an open libnbd *handle*.

    Returns (sha256 of the data in trace order, bytes read). Raises
    nbd.Error if a read fails.
    """
    import nbd
    steps = trace.replay_plan()
    done_at = [None] * len(steps)
    buffers = [None] * len(steps)
    in_flight = {}

    def collect(timeout_ms):
        handle.poll(timeout_ms)
        while in_flight:
            cookie = handle.aio_peek_command_completed()
            if not cookie:
                break
            index = in_flight.pop(cookie)
            handle.aio_command_completed(cookie)
            done_at[index] = clock()

    start = clock()
    previous_issue = dependency_done = start
    for index, step in enumerate(steps):
        for j in step.waits_for:
            while done_at[j] is None:
                collect(POLL_MS)
            dependency_done = max(dependency_done, done_at[j])
        ready = max(previous_issue, dependency_done) + step.think_s
        while True:
            now = clock()
            if now >= ready:
                break
            if in_flight:
                collect(max(1, int((ready - now) * 1000)))
            else:
                sleep(ready - now)
        buffers[index] = nbd.Buffer(step.read.length)
        cookie = handle.aio_pread(buffers[index], step.read.offset)
        in_flight[cookie] = index
        previous_issue = clock()
    while in_flight:
        collect(POLL_MS)
    digest = hashlib.sha256()
    total = 0
    for buf in buffers:
        data = buf.to_bytearray()
        digest.update(data)
        total += len(data)
    return digest.hexdigest(), total


def run_replay(name, connection_info, trace, expected_sha):
    """One replay VM over a snapshot (or local overlay)."""
    start = time.monotonic()
    try:
        with reader.open_snapshot(connection_info) as handle:
            digest, total = replay_handle(handle, trace)
    except Exception as e:
        return VMResult(name, False, time.monotonic() - start,
                        error='%s: %s' % (type(e).__name__, e))
    return VMResult(name, digest == expected_sha, time.monotonic() - start,
                    sha256=digest, bytes_read=total,
                    error=None if digest == expected_sha else
                    'wrong data: sha256 %s' % digest)


def run_real(name, connection_info, expected_data_sha, timeout=600,
             memory_mb=256, workdir=None):
    """One QEMU guest booting the test image from its overlay."""
    from thunder_lab.guest import vm as guest
    data = connection_info['data']
    console = os.path.join(workdir, '%s.console.log' % name) \
        if workdir else None
    start = time.monotonic()
    try:
        result = guest.boot({'path': data['path'], 'format': data['format']},
                            timeout=timeout, memory_mb=memory_mb,
                            console_log=console, name=name)
    except Exception as e:
        return VMResult(name, False, time.monotonic() - start,
                        error='%s: %s' % (type(e).__name__, e))
    boot_s = (result.marker_s if result.marker_s is not None
              else result.elapsed_s)
    ok = result.ok and result.data_sha == expected_data_sha
    return VMResult(name, ok, boot_s, sha256=result.data_sha,
                    error=None if ok else (result.failure or 'no marker'))


def local_overlay(image_path, directory, name, image_format='raw'):
    """A qcow2 overlay over a local image copy, as connection_info that
    :func:`run_replay` and :func:`run_real` take; the copy stays
    untouched by the guest."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, '%s.qcow2' % name)
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F',
                    image_format, '-b', os.path.abspath(image_path), path],
                   check=True, capture_output=True)
    return {'driver_volume_type': 'local',
            'data': {'backend': 'qemu', 'format': 'qcow2', 'path': path}}
