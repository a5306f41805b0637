"""One qemu-storage-daemon process, driven over QMP with ``qemu.qmp``.

The daemon is started with ``--daemonize`` so that it is not a child of the
agent: the data plane keeps serving while the agent restarts. Its pid file
and sockets live under the run directory; a later agent finds and re-adopts
it from there.

Every wait has a deadline: the start (``--daemonize`` returns once the
command line's block graph and exports are up) and every monitor step,
connecting and reading the greeting included, are bounded by
*start_timeout* (``[qemu] start_timeout``, 30 s by default). qemu.qmp's
synchronous shim waits for the greeting without a deadline, so a stopped
or wedged daemon would hold the caller for ever; this module drives the
asynchronous :class:`qemu.qmp.QMPClient` on a private event loop instead.
"""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time

from oslo_log import log as logging
from qemu.qmp import ExecuteError
from qemu.qmp import QMPClient
from qemu.qmp import QMPError

from thunder_agent import exception

LOG = logging.getLogger(__name__)

# Unix socket paths are limited to 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107


def listening_socket(host, port, backlog=128):
    """A TCP socket listening on numeric *host*:*port* with TCP_NODELAY
    set, for a daemon to inherit (see :meth:`StorageDaemon.start`).

    It is made in the caller's network namespace: a process that must
    listen inside another one runs there (``ip netns exec``).
    """
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM,
            flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)[0]
    except socket.gaierror as exc:
        raise exception.BackendError(
            reason='cannot listen on %s:%s: %s' % (host, port, exc))
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


class _QMPClient(QMPClient):
    """qemu.qmp logs every message at DEBUG; a secret object's data (an
    iSCSI CHAP password) is masked there."""

    def _cb_outbound(self, msg):
        args = msg.get('arguments') or {}
        if msg.get('execute') == 'object-add' and 'data' in args:
            shown = dict(msg, arguments=dict(args, data='***'))
            self.logger.debug('--> %s', json.dumps(shown))
            return msg
        return super()._cb_outbound(msg)


class Monitor:
    """One QMP connection; every step is bounded by *timeout* seconds."""

    def __init__(self, path, name, timeout):
        self.path = path
        self.name = name
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._qmp = _QMPClient(name)

    def _run(self, coro):
        return self._loop.run_until_complete(
            asyncio.wait_for(coro, self.timeout))

    def connect(self):
        try:
            self._run(self._qmp.connect(self.path))
        except (QMPError, OSError, asyncio.TimeoutError) as e:
            self.close()
            raise exception.BackendError(
                reason='cannot reach QMP of %s: %s'
                       % (self.name, str(e) or type(e).__name__))
        return self

    def cmd(self, name, /, **args):
        try:
            return self._run(self._qmp.execute(name, args or None))
        except ExecuteError as e:
            raise exception.BackendError(
                reason='%s on %s: %s' % (name, self.name, e))
        except asyncio.TimeoutError:
            raise exception.BackendError(
                reason='%s on %s: no answer within %s s'
                       % (name, self.name, self.timeout))
        except (QMPError, OSError) as e:
            raise exception.BackendError(
                reason='%s on %s: %s' % (name, self.name,
                                         str(e) or type(e).__name__))

    def close(self):
        if self._loop.is_closed():
            return
        # The daemon may have gone (quit) or wedged: neither is an error of
        # the commands that were answered.
        with contextlib.suppress(QMPError, OSError, EOFError,
                                 asyncio.TimeoutError):
            self._run(self._qmp.disconnect())
        self._loop.close()


def log_tail(path, size):
    """The last *size* bytes of the log at *path*, for an error message
    ('' when it cannot be read)."""
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors='replace').strip()
    except OSError:
        return ''


class StorageDaemon:
    """A qemu-storage-daemon identified by *name* under *run_path*."""

    def __init__(self, name, run_path, executable='qemu-storage-daemon',
                 start_timeout=30):
        self.name = name
        self.executable = executable
        self.start_timeout = start_timeout
        self.qmp_path = os.path.join(run_path, name + '.qmp')
        self.pid_path = os.path.join(run_path, name + '.pid')
        self.log_path = os.path.join(run_path, name + '.log')
        if len(self.qmp_path.encode()) > MAX_SOCKET_PATH:
            raise exception.BackendError(
                reason='socket path %s is too long; use a shorter '
                       '[agent] run_path' % self.qmp_path)

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

    def start(self, nbd_server=None, extra_args=(), max_connections=None,
              server_options=None, objects=()):
        """Start the daemon; *nbd_server* is a SocketAddress dict, and its
        NBD server takes at most *max_connections* clients at once (QEMU's
        ``max-connections``; None leaves QEMU's default, 100 in this QEMU,
        so every caller of the agent passes one). A client beyond it waits
        in the listening socket's queue, unanswered, until one leaves.
        *server_options* are more ``--nbd-server`` members (``tls-creds``,
        ``tls-authz``); the objects they name are *objects* (object-add
        dicts), made before the server."""
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
                                        int(nbd_server['port']))
            nbd_server = {'type': 'fd', 'str': str(listener.fileno())}
        for obj in objects:
            cmd += ['--object', json.dumps(obj)]
        if nbd_server is not None:
            server = {'addr': nbd_server}
            if max_connections is not None:
                server['max-connections'] = int(max_connections)
            server.update(server_options or {})
            cmd += ['--nbd-server', json.dumps(server)]
        cmd += list(extra_args)
        LOG.debug('Starting qemu-storage-daemon %s', self.name)
        try:
            with open(self.log_path, 'ab') as log:
                proc = subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    timeout=self.start_timeout,
                    pass_fds=(listener.fileno(),) if listener else ())
        except subprocess.TimeoutExpired:
            # The foreground half never reported; a daemonized half may
            # have written its pid file.
            self.stop()
            raise exception.BackendError(
                reason='qemu-storage-daemon %s did not start within %s s: %s'
                       % (self.name, self.start_timeout, self.log_tail()))
        except FileNotFoundError:
            raise exception.BackendError(
                reason='%s is not installed (Debian package qemu-system-'
                       'common)' % self.executable)
        finally:
            if listener is not None:
                listener.close()
        if proc.returncode != 0 or not self.is_running():
            raise exception.BackendError(
                reason='qemu-storage-daemon %s failed to start: %s'
                       % (self.name, self.log_tail()))

    def log_tail(self, size=1000):
        return log_tail(self.log_path, size)

    def stop(self, timeout=10):
        """Ask the daemon to quit; kill it if it does not."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(exception.BackendError):
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

    def remove_log(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log_path)

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
    def monitor(self):
        qmp = Monitor(self.qmp_path, self.name, self.start_timeout).connect()
        try:
            yield qmp
        finally:
            qmp.close()

    def command(self, name, /, **args):
        with self.monitor() as qmp:
            return qmp.cmd(name, **args)

    def commands(self, *calls):
        """Run (name, args) pairs on one QMP connection, in order."""
        with self.monitor() as qmp:
            return [qmp.cmd(name, **args) for name, args in calls]
