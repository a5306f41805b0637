"""One qemu-storage-daemon process, driven over QMP with ``qemu.qmp``.

The daemon is started with ``--daemonize`` so that it is not a child of the
agent: the data plane keeps serving while the agent restarts. Its pid file
and sockets live under the run directory; a later agent finds and re-adopts
it from there.
"""

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time

from pyroute2 import netns as pyroute2_netns

from qemu.qmp import legacy as qmp_legacy
from qemu.qmp import ExecuteError

from thunder_agent import exception

LOG = logging.getLogger(__name__)


def listening_socket(host, port, netns=None, backlog=128):
    """A TCP socket listening on *host*:*port* with TCP_NODELAY set, made in
    network namespace *netns* when given."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM,
            flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)[0]
    except socket.gaierror as exc:
        raise exception.BackendError(
            reason='cannot listen on %s:%s: %s' % (host, port, exc))
    if netns:
        sock = pyroute2_netns.create_socket(
            netns, family, socket.SOCK_STREAM, flags=0)
    else:
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise exception.BackendError(
            reason='cannot listen on %s:%s: %s' % (host, port, exc))
    return sock


class StorageDaemon:
    """A qemu-storage-daemon identified by *name* under *run_path*."""

    def __init__(self, name, run_path, executable='qemu-storage-daemon',
                 start_timeout=30, netns=None):
        self.name = name
        # Run inside this network namespace (test clusters, origins).
        self.netns = netns
        self.executable = executable
        self.start_timeout = start_timeout
        self.qmp_path = os.path.join(run_path, name + '.qmp')
        self.pid_path = os.path.join(run_path, name + '.pid')
        self.log_path = os.path.join(run_path, name + '.log')
        for path in (self.qmp_path,):
            if len(path.encode()) > 107:
                raise exception.BackendError(
                    reason='socket path %s is too long; use a shorter '
                           '[agent] run_path' % path)

    # -- process ---------------------------------------------------------
    @property
    def pid(self):
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        # The pid must still be a storage daemon with our monitor socket:
        # pids are reused.
        try:
            with open('/proc/%d/cmdline' % pid, 'rb') as f:
                cmdline = f.read().split(b'\0')
        except OSError:
            return None
        if not any(self.qmp_path.encode() in arg for arg in cmdline):
            return None
        return pid

    def is_running(self):
        return self.pid is not None

    def start(self, nbd_server=None, extra_args=()):
        """Start the daemon; *nbd_server* is a SocketAddress dict."""
        if self.is_running():
            return
        os.makedirs(os.path.dirname(self.qmp_path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pid_path)
        cmd = [self.executable,
               '--chardev', 'socket,id=qmp,path=%s,server=on,wait=off'
               % self.qmp_path,
               '--monitor', 'chardev=qmp',
               '--pidfile', self.pid_path,
               '--daemonize']
        listener = None
        if nbd_server is not None and nbd_server.get('type') == 'inet':
            # QEMU 7.2's NBD server leaves Nagle on, so the last small
            # chunk of every structured reply waits for the client's
            # delayed ACK (~40 ms per read). Accepted sockets inherit
            # TCP_NODELAY from the listener, so the daemon gets a
            # listening socket made here.
            listener = listening_socket(nbd_server['host'],
                                        int(nbd_server['port']), self.netns)
            nbd_server = {'type': 'fd', 'str': str(listener.fileno())}
        if nbd_server is not None:
            cmd += ['--nbd-server', json.dumps({'addr': nbd_server})]
        cmd += list(extra_args)
        if self.netns:
            cmd = ['ip', 'netns', 'exec', self.netns] + cmd
        LOG.debug('Starting %s', ' '.join(cmd))
        try:
            with open(self.log_path, 'ab') as log:
                proc = subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    timeout=self.start_timeout,
                    pass_fds=(listener.fileno(),) if listener else ())
        finally:
            if listener is not None:
                listener.close()
        if proc.returncode != 0 or not self.is_running():
            raise exception.BackendError(
                reason='qemu-storage-daemon %s failed to start: %s'
                       % (self.name, self.log_tail()))

    def log_tail(self, size=1000):
        try:
            with open(self.log_path, 'rb') as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode(errors='replace').strip()
        except OSError:
            return ''

    def stop(self, timeout=10):
        """Ask the daemon to quit; kill it if it does not."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(Exception):
            self.command('quit')
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._alive(pid):
            time.sleep(0.05)
        if self._alive(pid):
            LOG.warning('qemu-storage-daemon %s ignored quit; killing', pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while self._alive(pid):
                time.sleep(0.05)
        for path in (self.pid_path, self.qmp_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @staticmethod
    def _alive(pid):
        try:
            with open('/proc/%d/stat' % pid) as f:
                # A zombie has exited already.
                return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
        except OSError:
            return False

    def io_counters(self):
        """The daemon's /proc I/O counters (rchar, wchar, ...) or None."""
        pid = self.pid
        if pid is None:
            return None
        try:
            with open('/proc/%d/io' % pid) as f:
                return {k: int(v) for k, v in
                        (line.split(':') for line in f if ':' in line)}
        except OSError:
            return None

    # -- QMP -------------------------------------------------------------
    @contextlib.contextmanager
    def monitor(self, timeout=30):
        qmp = qmp_legacy.QEMUMonitorProtocol(self.qmp_path)
        try:
            qmp.connect()
        except Exception as e:
            raise exception.BackendError(
                reason='cannot reach QMP of %s: %s' % (self.name, e))
        qmp.settimeout(timeout)
        try:
            yield qmp
        finally:
            qmp.close()

    def command(self, name, **args):
        with self.monitor() as qmp:
            return self._execute(qmp, name, args)

    def commands(self, *calls):
        """Run (name, args) pairs on one QMP connection, in order."""
        with self.monitor() as qmp:
            return [self._execute(qmp, name, args) for name, args in calls]

    def _execute(self, qmp, name, args):
        try:
            return qmp.cmd(name, **args)
        except ExecuteError as e:
            raise exception.BackendError(
                reason='%s on %s: %s' % (name, self.name, e))
