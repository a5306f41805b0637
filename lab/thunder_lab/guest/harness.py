"""Run a pytest selection inside a QEMU guest with a stock Debian kernel.

The kernel backend needs device-mapper, bcache, the SCSI disk driver and
the iSCSI initiator, which the build host's kernel may lack. This harness
boots Debian's ``linux-image-amd64`` kernel under QEMU (TCG) with
virtme-ng, sharing this host's filesystem read-only (writes land in a
throw-away overlay), so the project, its virtualenv, tgt, open-iscsi and
dmsetup run for real inside. One host directory is shared writable: the
results directory, which receives the pytest log, a JUnit report, the
guest's kernel log and whatever the tests record there
(``THUNDER_GUEST_RESULTS``).

Usage: ``tools/guest-run [options] [pytest selection and options]``.
The guest run is bounded by ``--timeout``; on expiry the whole QEMU process
group is killed and the run reported as timed out.
"""

import argparse
import contextlib
import dataclasses
import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import xml.etree.ElementTree as ElementTree

from thunder_lab import exception as lab_exception

DEFAULT_SELECTION = ('tests/guest',)
DEFAULT_TIMEOUT = 900
DEFAULT_MEMORY = '2G'
# What the guest needs from Debian; installed when missing (as root).
APT_PACKAGES = ('linux-image-amd64', 'kmod', 'busybox-static',
                'qemu-system-x86', 'tgt', 'open-iscsi', 'dmsetup',
                'bcache-tools')
TOOLS = {'qemu-system-x86_64': 'qemu-system-x86', 'busybox':
         'busybox-static', 'modprobe': 'kmod', 'tgtd': 'tgt',
         'iscsid': 'open-iscsi', 'iscsiadm': 'open-iscsi',
         'dmsetup': 'dmsetup', 'make-bcache': 'bcache-tools'}
PIP_PACKAGE = 'virtme-ng'
ENV_IN_GUEST = 'THUNDER_GUEST'
ENV_RESULTS = 'THUNDER_GUEST_RESULTS'
# oslo.messaging URL of the broker the guest's agents and coordinator use:
# a RabbitMQ on this host's loopback, which the guest reaches through
# QEMU's user-mode network as 10.0.2.2 (its alias of the host's 127.0.0.1).
ENV_TRANSPORT_URL = 'THUNDER_GUEST_TRANSPORT_URL'
HOST_FROM_GUEST = '10.0.2.2'


@dataclasses.dataclass
class GuestResult:
    returncode: int
    timed_out: bool
    duration: float
    results_dir: str
    tests: int = 0
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0

    @property
    def ok(self):
        return (self.returncode == 0 and not self.timed_out
                and self.failed == 0 and self.errors == 0)

    def summary(self):
        state = 'timed out' if self.timed_out else (
            'passed' if self.ok else 'FAILED')
        return ('guest run %s in %.0f s: %d tests, %d passed, %d failed, '
                '%d errors, %d skipped (results in %s)'
                % (state, self.duration, self.tests, self.passed,
                   self.failed, self.errors, self.skipped,
                   self.results_dir))


def project_root():
    # <root>/lab/thunder_lab/guest/harness.py: the checkout holding
    # tests/guest and tools/guest-run.
    return os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))))


def _venv_bin():
    return os.path.dirname(sys.executable)


def _search_path():
    return os.pathsep.join([_venv_bin(), '/usr/sbin', '/sbin',
                            os.environ.get('PATH', '/usr/bin:/bin')])


def find_kernel():
    """Newest ``/boot/vmlinuz-*`` of a Debian kernel whose modules are
    installed; None when there is none."""
    found = []
    for path in glob.glob('/boot/vmlinuz-*-amd64'):
        version = os.path.basename(path)[len('vmlinuz-'):]
        if os.path.isdir('/lib/modules/%s/kernel' % version):
            found.append((os.stat(path).st_mtime, path))
    return max(found)[1] if found else None


def _missing():
    """Debian packages and the PyPI package still missing."""
    packages = set()
    if find_kernel() is None:
        packages.add('linux-image-amd64')
    for tool, package in TOOLS.items():
        if shutil.which(tool, path=_search_path()) is None:
            packages.add(package)
    vng = shutil.which('vng', path=_search_path())
    return sorted(packages), vng is None


def ensure_prerequisites(install=True, log=print):
    """Return ``(kernel, vng)``, installing what is missing if allowed.

    Raises GuestHarnessError naming what is missing and how to get it.
    """
    packages, need_vng = _missing()
    if packages and install:
        if os.geteuid() != 0:
            raise lab_exception.GuestHarnessError(
                reason='missing Debian packages %s; run as root or '
                       '"apt-get install -y %s"'
                       % (', '.join(packages), ' '.join(packages)))
        log('guest-run: installing %s' % ' '.join(packages))
        env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
        proc = subprocess.run(['apt-get', 'install', '-y', '-q']
                              + packages, env=env, capture_output=True,
                              text=True, timeout=1800)
        if proc.returncode != 0:
            raise lab_exception.GuestHarnessError(
                reason='apt-get install %s failed: %s'
                       % (' '.join(packages),
                          proc.stderr.strip()[-2000:]))
    if need_vng and install:
        log('guest-run: installing %s into %s' % (PIP_PACKAGE, _venv_bin()))
        proc = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q',
                               PIP_PACKAGE], capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0:
            raise lab_exception.GuestHarnessError(
                reason='pip install %s failed: %s'
                       % (PIP_PACKAGE, proc.stderr.strip()[-2000:]))
    packages, need_vng = _missing()
    if packages:
        raise lab_exception.GuestHarnessError(
            reason='missing Debian packages %s (apt-get install -y %s)'
                   % (', '.join(packages), ' '.join(packages)))
    if need_vng:
        raise lab_exception.GuestHarnessError(
            reason='virtme-ng is not installed (%s -m pip install %s)'
                   % (sys.executable, PIP_PACKAGE))
    return find_kernel(), shutil.which('vng', path=_search_path())


# virtme-ng shares the host's root over 9p without caching, so every file
# access is a round trip through the emulated virtio device; importing
# the agent's dependencies took over a minute. A second, read-only 9p
# share of the host's root with cache=loose is mounted in the guest and
# the Python trees are bind-mounted from it.
CACHED_SHARE_TAG = 'thunderhost'
CACHED_SHARE_MOUNT = '/run/thunder-host'


def _cached_trees(results_dir):
    """Host directories to serve from the cached share: the project, the
    virtualenv and the Python installation, minus the results directory
    (which must stay the writable share)."""
    paths = sysconfig.get_paths()
    trees = sorted({os.path.realpath(p) for p in (
        project_root(), sys.prefix, paths['stdlib'], paths['platstdlib'])})
    trees = [t for t in trees
             if not any(t != o and t.startswith(o + os.sep) for o in trees)]
    return [t for t in trees
            if not (results_dir + os.sep).startswith(t + os.sep)]


def guest_script(results_dir, selection, pytest_args, test_timeout,
                 transport_url=None):
    """The shell script the guest runs (written into the results dir)."""
    root = project_root()
    mounts = ['mkdir -p %s' % CACHED_SHARE_MOUNT,
              'if mount -t 9p -o trans=virtio,version=9p2000.L,ro,'
              'cache=loose,msize=524288 %s %s; then'
              % (CACHED_SHARE_TAG, CACHED_SHARE_MOUNT)]
    for tree in _cached_trees(results_dir):
        mounts.append('    mount --bind %s %s' % (
            shlex.quote(CACHED_SHARE_MOUNT + tree), shlex.quote(tree)))
    mounts.append('fi')
    pytest = [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider',
              '-rA', '--junitxml=%s' % os.path.join(results_dir,
                                                    'junit.xml'),
              '--timeout=%d' % test_timeout]
    pytest += list(pytest_args) + list(selection)
    results = shlex.quote(results_dir)
    return '\n'.join([
        '#!/bin/bash',
        '# Generated by thunder_lab.guest.harness; runs in the '
        'guest.',
        'set -u',
    ] + mounts + [
        'cd %s || exit 90' % shlex.quote(root),
        'export %s=1 %s=%s PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1'
        % (ENV_IN_GUEST, ENV_RESULTS, results),
        'export PATH=%s' % shlex.quote(_search_path()),
    ] + (['export %s=%s' % (ENV_TRANSPORT_URL, shlex.quote(transport_url))]
         if transport_url else []) + [
        'uname -r > %s/kernel-release' % results,
        '%s > %s/pytest.log 2>&1' % (' '.join(shlex.quote(a)
                                              for a in pytest), results),
        'echo $? > %s/exit_code' % results,
        'dmesg > %s/dmesg.log 2>&1' % results,
        '',
    ])


def parse_junit(path):
    counts = {'tests': 0, 'failed': 0, 'errors': 0, 'skipped': 0}
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == 'testsuite' else root.findall(
        'testsuite')
    for suite in suites:
        counts['tests'] += int(suite.get('tests', 0))
        counts['failed'] += int(suite.get('failures', 0))
        counts['errors'] += int(suite.get('errors', 0))
        counts['skipped'] += int(suite.get('skipped', 0))
    counts['passed'] = (counts['tests'] - counts['failed']
                        - counts['errors'] - counts['skipped'])
    return counts


def run(selection=DEFAULT_SELECTION, results_dir=None, pytest_args=(),
        timeout=DEFAULT_TIMEOUT, memory=DEFAULT_MEMORY, cpus=2,
        install=True, log=print, broker=True):
    """Boot the guest, run pytest on *selection* inside, return a
    :class:`GuestResult`. Raises GuestHarnessError when the guest cannot
    be started at all.

    With *broker* (the default) a private RabbitMQ runs on this host's
    loopback for the run, and the guest gets its URL in
    ``THUNDER_GUEST_TRANSPORT_URL``: the agents and the coordinator inside
    talk over real oslo.messaging RPC (RabbitMQ under TCG would take
    minutes to start).
    """
    kernel, vng = ensure_prerequisites(install=install, log=log)
    rabbit = None
    if broker:
        from thunder_lab.emulation import rabbitmq
        try:
            rabbit = rabbitmq.RabbitMQ().start()
        except rabbitmq.RabbitMQUnavailable as e:
            raise lab_exception.GuestHarnessError(
                reason='no broker for the guest: %s' % e)
    try:
        return _run(kernel, vng, selection, results_dir, pytest_args,
                    timeout, memory, cpus, log, rabbit)
    finally:
        if rabbit is not None:
            rabbit.stop()


def _run(kernel, vng, selection, results_dir, pytest_args, timeout, memory,
         cpus, log, rabbit):
    if results_dir is None:
        results_dir = tempfile.mkdtemp(prefix='thunder-guest-')
    results_dir = os.path.realpath(results_dir)
    os.makedirs(results_dir, exist_ok=True)
    for stale in ('exit_code', 'junit.xml', 'pytest.log'):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(results_dir, stale))
    script = os.path.join(results_dir, 'guest.sh')
    with open(script, 'w') as f:
        # Leave the guest a minute to collect logs and power off.
        f.write(guest_script(
            results_dir, selection, pytest_args,
            test_timeout=max(60, timeout - 120),
            transport_url=(rabbit.transport_url.replace(
                '127.0.0.1', HOST_FROM_GUEST) if rabbit else None)))
    os.chmod(script, 0o755)
    argv = [vng, '--run', kernel, '--disable-kvm', '--memory', memory,
            '--cpus', str(cpus), '--cwd', project_root(),
            '--rwdir', results_dir,
            '--network', 'user',
            '--qemu-opts=-virtfs local,path=/,mount_tag=%s,'
            'security_model=none,readonly=on' % CACHED_SHARE_TAG,
            '--exec', 'bash ' + script]
    log('guest-run: booting %s (timeout %d s)' % (kernel, timeout))
    env = dict(os.environ, PATH=_search_path())
    start = time.monotonic()
    timed_out = False
    with open(os.path.join(results_dir, 'console.log'), 'wb') as console:
        # Own process group: on timeout QEMU and its helpers go together.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=console, stderr=subprocess.STDOUT,
                                env=env, cwd=project_root(),
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    duration = time.monotonic() - start
    try:
        with open(os.path.join(results_dir, 'exit_code')) as f:
            returncode = int(f.read().strip())
    except (OSError, ValueError):
        # pytest never finished: the guest did not boot or was killed.
        returncode = -1
    result = GuestResult(returncode=returncode, timed_out=timed_out,
                         duration=duration, results_dir=results_dir)
    counts = parse_junit(os.path.join(results_dir, 'junit.xml'))
    if counts:
        for key, value in counts.items():
            setattr(result, key, value)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='guest-run',
        description='Boot a Debian kernel under QEMU and run pytest inside '
                    '(default selection: %s).' % ' '.join(DEFAULT_SELECTION))
    parser.add_argument('--timeout', type=int, default=DEFAULT_TIMEOUT,
                        help='seconds before the guest is killed '
                             '(default %(default)s)')
    parser.add_argument('--results', help='directory for logs and reports '
                                          '(default: a new temp dir)')
    parser.add_argument('--memory', default=DEFAULT_MEMORY,
                        help='guest memory (default %(default)s)')
    parser.add_argument('--cpus', type=int, default=2)
    parser.add_argument('--no-install', action='store_true',
                        help='fail instead of installing missing packages')
    parser.add_argument('--no-broker', action='store_true',
                        help='no RabbitMQ for the guest (the tests that run '
                             'agents over RPC then fail)')
    parser.epilog = ('Other arguments go to pytest inside the guest; '
                     'put them after "--" if they clash with the above.')
    args, rest = parser.parse_known_args(argv)
    pytest_args = [a for a in rest if a != '--']
    # Paths or node ids among the arguments replace the default selection;
    # everything is passed on to pytest in order.
    selects = any(os.path.exists(os.path.join(project_root(),
                                              a.split('::')[0]))
                  for a in pytest_args if not a.startswith('-'))
    selection = () if selects else DEFAULT_SELECTION
    try:
        result = run(selection, args.results, pytest_args,
                     timeout=args.timeout, memory=args.memory,
                     cpus=args.cpus, install=not args.no_install,
                     broker=not args.no_broker)
    except lab_exception.GuestHarnessError as e:
        print('guest-run: %s' % e, file=sys.stderr)
        return 2
    log = os.path.join(result.results_dir, 'pytest.log')
    if os.path.exists(log):
        with open(log) as f:
            sys.stdout.write(f.read())
    print('guest-run: %s' % result.summary())
    if result.timed_out:
        return 124
    return 0 if result.ok else (result.returncode if result.returncode > 0
                                else 1)


if __name__ == '__main__':
    sys.exit(main())
