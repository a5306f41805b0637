"""Boot a disk in QEMU (TCG) and read the test guest's verdict.

The test image of :mod:`thunder_lab.guest.image` prints
``THUNDER-BOOT-OK count=<n> data=<sha256>`` on its serial console and powers
off. :func:`boot` runs one guest to the end; :func:`start` returns a running
:class:`Guest` so that many can boot at once (:func:`wait_all`).

TCG, not KVM: this host's /dev/kvm does not boot stock kernels, and TCG
makes boot times comparable between machines.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

from thunder_agent import exception
from thunder_lab import exception as lab_exception
from thunder_lab.guest import image as guest_image
from thunder_lab.trace_recorder import image_info

QEMU = 'qemu-system-x86_64'
QEMU_IMG = 'qemu-img'
DEFAULT_TIMEOUT = 180
SUPPORTED_FORMATS = ('raw', 'qcow2')

_MARKER_RE = re.compile(
    re.escape(guest_image.MARKER) + r' count=(\d+) data=([0-9a-f]{64})')
_FAIL_RE = re.compile(re.escape(guest_image.FAIL_MARKER) + r' ([^\r\n]*)')
_POLL_INTERVAL = 0.1


def expected_data_sha(image=None):
    """The ``data=`` value a healthy boot of the test image prints."""
    return guest_image.expected_data_sha(image)


@dataclasses.dataclass
class BootResult:
    marker_seen: bool
    boot_count: int | None
    data_sha: str | None
    # From QEMU's start to its exit (or to the kill after a timeout).
    elapsed_s: float
    # From QEMU's start until the marker appeared in the console log, as
    # seen by the polling waiter (resolution about 0.1 s); None if never.
    marker_s: float | None
    console_log: str
    returncode: int | None
    timed_out: bool
    # The guest's own failure line, or QEMU's error output.
    failure: str | None = None

    @property
    def ok(self):
        return self.marker_seen and not self.timed_out and \
            self.returncode == 0


def detect_format(path):
    return image_info(path)['format']


def _drive_args(disk):
    """QEMU arguments attaching ``disk`` as the guest's virtio disk.

    ``disk`` is a path (format detected), a dict ``{'path', 'format'}``
    with optional ``'options'`` (extra ``-drive`` options such as
    ``{'cache': 'unsafe'}``), or ``{'blockdev': [node, ...]}``:
    ``-blockdev`` JSON definitions, later ones referring to earlier ones by
    node-name; the last one is attached. That is for block graphs -drive
    cannot express (filters, NBD children, ...).
    """
    if isinstance(disk, (str, os.PathLike)):
        disk = {'path': os.fspath(disk)}
    if not isinstance(disk, dict):
        raise exception.InvalidInput(
            reason='disk must be a path or a dict, got %r' % (disk,))
    if 'blockdev' in disk:
        nodes = disk['blockdev']
        if isinstance(nodes, dict):
            nodes = [nodes]
        if not isinstance(nodes, list) or not nodes or not all(
                isinstance(n, dict) and n.get('node-name') for n in nodes):
            raise exception.InvalidInput(
                reason='disk["blockdev"] must be a node dict or a list of '
                       'them, each with a node-name')
        args = []
        for node in nodes:
            args += ['-blockdev', json.dumps(node)]
        return args + ['-device',
                       'virtio-blk-pci,drive=%s' % nodes[-1]['node-name']]
    path = disk.get('path')
    if not isinstance(path, str) or not os.path.isfile(path):
        raise exception.InvalidInput(
            reason='disk image %r does not exist' % (path,))
    fmt = disk.get('format') or detect_format(path)
    if fmt not in SUPPORTED_FORMATS:
        raise exception.UnsupportedFormat(
            image_format=fmt, supported=', '.join(SUPPORTED_FORMATS))
    options = dict(disk.get('options') or {})
    for key, value in options.items():
        if ',' in '%s%s' % (key, value) or '=' in str(key):
            raise exception.InvalidInput(
                reason='bad drive option %r=%r' % (key, value))
    # QEMU's own option syntax doubles commas in values.
    spec = 'file=%s,format=%s,if=virtio' % (path.replace(',', ',,'), fmt)
    spec += ''.join(',%s=%s' % item for item in sorted(options.items()))
    return ['-drive', spec]


def qemu_command(disk, console_log, memory_mb=256, extra_args=(),
                 name='thunder-guest'):
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or \
            memory_mb < 64:
        raise exception.InvalidInput(
            reason='memory_mb must be an integer >= 64, got %r'
                   % (memory_mb,))
    return [QEMU, '-name', name,
            '-machine', 'pc,accel=tcg', '-m', str(memory_mb), '-smp', '1',
            '-nodefaults', '-no-user-config', '-nographic', '-no-reboot',
            '-monitor', 'none',
            '-serial', 'file:%s' % console_log.replace(',', ',,')] + \
        _drive_args(disk) + list(extra_args)


class Guest:
    """One QEMU process booting a disk; created by :func:`start`."""

    def __init__(self, cmd, console_log, timeout):
        self.cmd = cmd
        self.console_log = console_log
        self.timeout = timeout
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.marker_s = None
        self.result = None
        self._stderr_path = console_log + '.qemu-stderr'
        with open(self._stderr_path, 'wb') as stderr:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def _read_console(self):
        try:
            with open(self.console_log, 'rb') as f:
                return f.read().decode('utf-8', errors='replace')
        except FileNotFoundError:
            return ''

    def poll(self):
        """Advance the guest's state; return its result once it ended."""
        if self.result is not None:
            return self.result
        if self.marker_s is None and \
                _MARKER_RE.search(self._read_console()):
            self.marker_s = time.monotonic() - self.started
        if self.proc.poll() is not None:
            return self._finish(timed_out=False)
        if time.monotonic() >= self.deadline:
            self.kill()
            return self._finish(timed_out=True)
        return None

    def wait(self):
        """Block until the guest powered off or its timeout passed."""
        while self.poll() is None:
            time.sleep(_POLL_INTERVAL)
        return self.result

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _finish(self, timed_out):
        elapsed = time.monotonic() - self.started
        console = self._read_console()
        match = _MARKER_RE.search(console)
        if match and self.marker_s is None:
            self.marker_s = elapsed
        failure = None
        fail = _FAIL_RE.search(console)
        if fail:
            failure = fail.group(0).strip()
        elif self.proc.returncode:
            with open(self._stderr_path, errors='replace') as f:
                failure = f.read().strip()[-2000:] or None
        self.result = BootResult(
            marker_seen=bool(match),
            boot_count=int(match.group(1)) if match else None,
            data_sha=match.group(2) if match else None,
            elapsed_s=elapsed,
            marker_s=self.marker_s,
            console_log=self.console_log,
            returncode=None if timed_out else self.proc.returncode,
            timed_out=timed_out,
            failure=failure)
        return self.result

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.result is None:
            self.kill()
            self.poll()


def start(disk, timeout=DEFAULT_TIMEOUT, extra_args=(), memory_mb=256,
          console_log=None, name='thunder-guest'):
    """Start booting ``disk``; return a :class:`Guest` (see :func:`boot`)."""
    if not shutil.which(QEMU):
        raise lab_exception.ToolNotFound(program=QEMU,
                                         package='qemu-system-x86')
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise exception.InvalidInput(
            reason='timeout must be a positive number, got %r' % (timeout,))
    if console_log is None:
        console_log = os.path.join(
            tempfile.mkdtemp(prefix='thunder-guest-'), 'console.log')
    cmd = qemu_command(disk, console_log, memory_mb, extra_args, name)
    return Guest(cmd, console_log, timeout)


def boot(disk, timeout=DEFAULT_TIMEOUT, extra_args=(), memory_mb=256,
         console_log=None, name='thunder-guest'):
    """Boot ``disk`` with qemu-system-x86_64 (TCG) until it powers off.

    :param disk: image path (raw or qcow2, detected), or a dict, see
        :func:`_drive_args`.
    :param extra_args: more QEMU arguments, appended as given.
    :param console_log: file receiving ttyS0; default in a new temp dir.
    :returns: :class:`BootResult`.
    """
    with start(disk, timeout, extra_args, memory_mb, console_log,
               name) as guest:
        return guest.wait()


def wait_all(guests):
    """Wait for all guests at once (their timeouts still apply)."""
    pending = list(guests)
    while any(g.poll() is None for g in pending):
        time.sleep(_POLL_INTERVAL)
    return [g.result for g in pending]


def measure_boot_reads(image, workdir, cluster_size=65536,
                       timeout=DEFAULT_TIMEOUT, memory_mb=256):
    """Boot ``image`` once and return which of its bytes the boot read.

    The block graph is the one a thunder template uses: the guest's writes
    go to a qcow2 overlay whose backing is a copy-on-read filter over a
    qcow2 cache file backed by ``image``. Every read that reaches the image
    is copied into the cache file, so afterwards the cache's allocated
    extents are the boot's read set, at ``cluster_size`` granularity. The
    image itself is opened read-only.

    :returns: dict with ``result`` (:class:`BootResult`), ``image_size``,
        ``read_bytes`` (data copied), ``zero_bytes`` (read ranges that were
        zeros), ``extents`` (list of ``[offset, length]`` with data) and
        ``cache_path``.
    """
    if not shutil.which(QEMU_IMG):
        raise lab_exception.ToolNotFound(program=QEMU_IMG,
                                         package='qemu-utils')
    image = os.path.abspath(image)
    info = image_info(image)
    fmt = info['format']
    if fmt not in SUPPORTED_FORMATS:
        raise exception.UnsupportedFormat(
            image_format=fmt, supported=', '.join(SUPPORTED_FORMATS))
    os.makedirs(workdir, exist_ok=True)
    cache = os.path.join(workdir, 'read-cache.qcow2')
    top = os.path.join(workdir, 'overlay.qcow2')
    for path, backing in ((cache, image), (top, cache)):
        subprocess.run(
            [QEMU_IMG, 'create', '-q', '-f', 'qcow2',
             '-o', 'cluster_size=%d' % cluster_size,
             '-b', backing, '-F', 'qcow2' if backing == cache else fmt,
             path], check=True, capture_output=True)
    # Nodes by reference: inline backing definitions would clash with the
    # backing file names recorded in the qcow2 headers.
    nodes = [
        {'driver': fmt, 'node-name': 'image', 'read-only': True,
         'file': {'driver': 'file', 'filename': image, 'read-only': True}},
        {'driver': 'qcow2', 'node-name': 'cache', 'backing': 'image',
         'file': {'driver': 'file', 'filename': cache}},
        {'driver': 'copy-on-read', 'node-name': 'cor', 'file': 'cache'},
        {'driver': 'qcow2', 'node-name': 'overlay', 'backing': 'cor',
         'file': {'driver': 'file', 'filename': top}},
    ]
    result = boot({'blockdev': nodes}, timeout=timeout, memory_mb=memory_mb,
                  console_log=os.path.join(workdir, 'console.log'))
    proc = subprocess.run([QEMU_IMG, 'map', '--output=json', cache],
                          check=True, capture_output=True, text=True)
    read_bytes = zero_bytes = 0
    extents = []
    for entry in json.loads(proc.stdout):
        if entry['depth'] != 0:
            continue
        if entry['data']:
            read_bytes += entry['length']
            extents.append([entry['start'], entry['length']])
        elif entry.get('zero'):
            zero_bytes += entry['length']
    return {'result': result, 'image_size': info['virtual-size'],
            'read_bytes': read_bytes, 'zero_bytes': zero_bytes,
            'extents': extents, 'cache_path': cache}
