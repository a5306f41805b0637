"""Image safety checks: what an image is before anything opens it.

Image content is the tenant's. A qcow2 header can name a *backing file*
or an *external data file*, host paths that QEMU opens and serves as the
guest's disk (``/etc/shadow`` as a VM disk, OSSA-2024-001); a file that
says "raw" but holds a qcow2 or VMDK header turns into such an image for
the next tool that probes formats; a qcow2 with incompatible feature bits
QEMU does not know is a parser QEMU was never tested against. Nova refuses
all of these since OSSA-2024-001 with oslo.utils' ``format_inspector``
(``nova.virt.images.do_image_deep_inspection``), and these checks are the
same:

* the declared format must be one the inspector knows (raw, qcow2);
* the format detected from the content must be the declared one; a raw
  image detected as ``gpt`` is a whole-disk image and allowed, as in Nova;
* the detected format's safety checks must pass (for qcow2: no backing
  file, no data file, version 2 or 3, no incompatible feature bit beyond
  dirty, corrupt, external data file and compression type: the inspector
  refuses extended L2 too, as Nova does);
* ``qemu-img info`` (:func:`check_qemu_info`), run after, must agree on
  the format and name no backing or data file: it sees what QEMU itself
  would make of the image.

The inspector does not know every format QEMU probes: a VMDK *text*
descriptor (``# Disk DescriptorFile`` ... ``RW 2048 FLAT "/etc/shadow"
0``), bochs, cloop and parallels images pass it as raw. So an image
claimed raw is also probed by QEMU itself (:func:`probe_with_qemu`, as
Nova's ``qemu_img_info`` without a format does): ``qemu-img info`` without
a format, on a copy of the first :data:`HEAD_SIZE` bytes (QEMU probes
2 KiB), as user ``nobody`` when the agent is root and within Nova's limits
of qemu-img (1 GiB of address space, 30 s of CPU): a descriptor's extents
are opened, if at all, by a process that can read nothing of the host's.
It must say raw.

A file origin is inspected whole (:func:`check_file`: the inspector reads
what its formats need, 256 KiB for a raw image). A remote source (an NBD
origin) is inspected on its first :data:`HEAD_SIZE` bytes
(:func:`check_head`): every format signature the inspector knows and every
qcow2 safety field lies there, and a longer read would cost the origin that
much more per host (every host probes the origin once per template). Formats
whose signature lies further (ISO 9660 at 32 KiB) pass as raw, which they
are to QEMU's raw driver.
"""

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

from oslo_concurrency import processutils
from oslo_log import log as logging
from oslo_utils.imageutils import format_inspector

from thunder_agent import exception

LOG = logging.getLogger(__name__)

# The first bytes of a remote source that are inspected: a page holds the
# qcow2 header (104 bytes checked), the VMDK, VHD, VHDX, VDI, QED and LUKS
# signatures and the GPT header (LBA 1).
HEAD_SIZE = 4096
# How the inspector is fed: the chunk size of oslo.utils' own
# detect_file_format.
_CHUNK = 4096
# The longest a file inspection may read before it must have decided (the
# VHDX inspector wants its region table at 192 KiB; 256 KiB decides a raw
# image). Past this the inspectors still undecided count as no match.
_MAX_FILE_READ = 1 << 20
# nova.virt.images.QEMU_IMG_LIMITS: a hostile header must cost qemu-img
# neither the host's memory nor its CPU.
QEMU_IMG_LIMITS = processutils.ProcessLimits(cpu_time=30,
                                             address_space=1 << 30)
# The user a probe runs as when the agent is root.
NOBODY = 65534


def _refuse(label, reason):
    LOG.warning('Image %s refused: %s', label, reason)
    return exception.UnsafeImage(image_id=label, reason=reason)


def check_file(path, image_format, label=None, qemu_probe=None):
    """Inspect the image file *path* claimed to be *image_format*.

    The file is opened without following a symbolic link in its last
    component and must be a regular file (a FIFO or a device would be read
    as something else than what QEMU opens). A raw image's first bytes are
    then given to *qemu_probe* (``qemu_probe(head, label)``, e.g.
    :func:`probe_with_qemu`). Returns the detected format name; raises
    :class:`~thunder_agent.exception.UnsafeImage`.
    """
    label = label or os.path.basename(path)
    _check_declared(label, image_format)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except OSError as e:
        raise _refuse(label, 'cannot open the image file: %s' % e.strerror)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise _refuse(label, 'the image is not a regular file')
    with os.fdopen(fd, 'rb', buffering=0) as f:
        try:
            head = os.pread(f.fileno(), HEAD_SIZE, 0)
        except OSError as e:
            raise _refuse(label, 'reading it failed: %s' % e.strerror)
        # (The inspector closes the file when it is done.)
        detected = _inspect(label, f, image_format, _MAX_FILE_READ)
    if image_format == 'raw' and qemu_probe is not None:
        qemu_probe(head, label)
    return detected


def check_head(data, image_format, label, qemu_probe=None):
    """Inspect *data*, the first bytes (at most :data:`HEAD_SIZE`) of a
    source claimed to be *image_format* (and, when raw, give them to
    *qemu_probe* as :func:`check_file` does). Returns the detected format
    name; raises :class:`~thunder_agent.exception.UnsafeImage`."""
    _check_declared(label, image_format)
    head = bytes(data[:HEAD_SIZE])
    detected = _inspect(label, io.BytesIO(head), image_format, HEAD_SIZE)
    if image_format == 'raw' and qemu_probe is not None:
        qemu_probe(head, label)
    return detected


def probe_with_qemu(head, label, qemu_img='qemu-img', timeout=60,
                    run=None):
    """Refuse *head* (an image's first bytes, claimed raw) unless QEMU's
    own format probing says raw.

    ``qemu-img info`` without a format runs on a private copy of *head*,
    unprivileged and limited (see the module docstring); *run* replaces
    :func:`run_unprivileged` in tests.
    """
    run = run or run_unprivileged
    with tempfile.TemporaryDirectory(prefix='thunder-probe-') as tmp:
        # The probe's user reaches the copy and nothing else of ours.
        os.chmod(tmp, 0o711)
        path = os.path.join(tmp, 'head')
        with open(path, 'wb') as f:
            f.write(bytes(head[:HEAD_SIZE]))
        os.chmod(path, 0o644)
        try:
            proc = run([qemu_img, 'info', '--output=json', path], timeout)
        except subprocess.TimeoutExpired:
            raise _refuse(label, 'qemu-img did not probe its first bytes '
                                 'within %s s' % timeout)
    try:
        probed = json.loads(proc.stdout).get('format') if (
            proc.returncode == 0) else None
    except (ValueError, AttributeError):
        probed = None
    if probed is None:
        raise _refuse(label, 'qemu-img cannot open its first bytes as an '
                             'image (it may name files of its own)')
    if probed != 'raw':
        raise _refuse(label, 'qemu-img probes it as %s, not raw' % probed)


def run_unprivileged(args, timeout):
    """Run *args* (a command and its arguments) as user ``nobody`` when
    this process is root, within :data:`QEMU_IMG_LIMITS`; a
    CompletedProcess with text output. Raises TimeoutExpired."""
    program = shutil.which(args[0]) or args[0]
    cmd = ([sys.executable, '-m', 'oslo_concurrency.prlimit']
           + QEMU_IMG_LIMITS.prlimit_args() + ['--', program]
           + list(args[1:]))
    drop = {'user': NOBODY, 'group': NOBODY, 'extra_groups': []} if (
        os.geteuid() == 0) else {}
    try:
        return subprocess.run(cmd, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL,
                              env={'LC_ALL': 'C', 'PATH': os.defpath},
                              cwd='/', **drop)
    except FileNotFoundError:
        raise exception.BackendError(
            reason='%s is not installed (Debian package qemu-utils)'
                   % args[0])


def check_qemu_info(info, image_format, label):
    """Check ``qemu-img info --output=json`` of a source opened as
    *image_format*: QEMU must see that format and no backing or external
    data file (Nova's ``fetch_to_raw`` checks)."""
    if info.get('format') != image_format:
        raise _refuse(label, 'qemu-img sees %s, not %s'
                      % (info.get('format'), image_format))
    if info.get('backing-filename') or info.get('full-backing-filename'):
        raise _refuse(label, 'the image names a backing file')
    specific = (info.get('format-specific') or {}).get('data') or {}
    if specific.get('data-file'):
        raise _refuse(label, 'the image names an external data file')


def _check_declared(label, image_format):
    if image_format in ('raw', 'qcow2') and format_inspector.get_inspector(
            image_format):
        return
    raise _refuse(label, 'format %r cannot be inspected' % (image_format,))


def _inspect(label, source, image_format, limit):
    """Feed *source* to every inspector until they decide (or *limit*
    bytes were read, or the data ends), then judge the result."""
    wrapper = format_inspector.InspectWrapper(source)
    read = 0
    try:
        while read < limit:
            chunk = wrapper.read(min(_CHUNK, limit - read))
            if not chunk:
                break
            read += len(chunk)
            if wrapper.format is not None:
                break
        wrapper.close()
        inspector = wrapper.format
        detected = str(inspector)
        if detected != image_format and not (image_format == 'raw'
                                             and detected == 'gpt'):
            raise _refuse(label, 'its content is %s, not %s'
                          % (detected, image_format))
        inspector.safety_check()
    except format_inspector.SafetyCheckFailed as e:
        raise _refuse(label, 'it fails the safety checks (%s)'
                      % ', '.join(sorted(
                          '%s: %s' % (name, failure)
                          for name, failure in e.failures.items())))
    except format_inspector.ImageFormatError as e:
        raise _refuse(label, 'its format cannot be told safely: %s' % e)
    except OSError as e:
        raise _refuse(label, 'reading it failed: %s' % e.strerror)
    return detected
