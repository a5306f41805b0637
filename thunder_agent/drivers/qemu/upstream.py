"""The upstream link of a relaying template: a local forwarder to its parent.

A template's NBD client connects to ``<run_path>/<image_id>.up``, a unix
socket served by ``socat``, which forwards each connection to the template's
current parent (or the origin). Re-parenting replaces the forwarder and
drops its connections: QEMU's NBD client then reconnects (within
``[qemu] reconnect_delay``) to the same socket and so to the new parent,
re-sending the requests that were in flight. Reads block and resume;
nothing fails and the block graph never changes. (QEMU cannot re-point an
NBD node at another server, and replacing the node would drain requests
that wait for a dead parent.)

The forwarder runs in its own session, so it survives agent restarts and is
re-adopted from its pid file like the template daemon.

Addresses reach socat as address strings, whose syntax gives ``:``, ``,``
and ``!!`` meanings of their own. A parent's host comes from another node
(through the coordinator), so it is never pasted in as given: only an IP
address (written back in canonical form) or a plain DNS name is accepted,
and unix socket paths are limited to a safe character set.
"""

import contextlib
import ipaddress
import os
import re
import signal
import subprocess
import time

from oslo_log import log as logging

from thunder_agent import exception

LOG = logging.getLogger(__name__)

SOCAT = 'socat'
_HOST_NAME = re.compile(
    r'(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
    r'(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z')
_SOCKET_PATH = re.compile(r'/[A-Za-z0-9._/+-]{0,106}\Z')


def socat_host(host):
    """*host* as it may appear in a socat address, or BackendError."""
    if not isinstance(host, str):
        raise exception.BackendError(reason='host %r is not a string'
                                     % (host,))
    try:
        address = ipaddress.ip_address(host.strip('[]'))
    except ValueError:
        if _HOST_NAME.match(host):
            return host
        raise exception.BackendError(
            reason='host %r is neither an IP address nor a DNS name'
                   % (host,))
    return '[%s]' % address if address.version == 6 else str(address)


def socat_path(path):
    """*path* (a unix socket) as it may appear in a socat address."""
    if not isinstance(path, str) or not _SOCKET_PATH.match(path):
        raise exception.BackendError(
            reason='socket path %r has characters the forwarder cannot '
                   'take (letters, digits and ._/+- only)' % (path,))
    return path


def describe(endpoint):
    """The socat address reaching an NBD *endpoint* (a
    :class:`~thunder_agent.records.Endpoint`)."""
    data = endpoint.data
    if 'socket' in data:
        return 'UNIX-CONNECT:%s' % socat_path(data['socket'])
    port = data.get('port')
    if isinstance(port, bool) or not isinstance(port, int) or not (
            0 < port < 65536):
        raise exception.BackendError(reason='port %r is not valid'
                                     % (port,))
    return 'TCP:%s:%d' % (socat_host(data.get('host')), port)


class Upstream:
    """The forwarder of template *image_id* under *run_path*.

    :param connect_timeout: seconds socat tries to reach the source for
        each connection; QEMU's NBD client sees the failure and tries again
        after its own reconnect logic.
    :param start_timeout: seconds to wait for the forwarder's socket.
    """

    def __init__(self, image_id, run_path, connect_timeout=5,
                 start_timeout=5):
        self.image_id = image_id
        self.socket = os.path.join(run_path, image_id + '.up')
        self.pid_path = os.path.join(run_path, image_id + '.up.pid')
        self.log_path = os.path.join(run_path, image_id + '.up.log')
        self.connect_timeout = connect_timeout
        self.start_timeout = start_timeout

    @property
    def pid(self):
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().split()[0])
            with open('/proc/%d/cmdline' % pid, 'rb') as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            return None
        return pid if self.socket.encode() in cmdline else None

    def target(self):
        """The address the running forwarder points at, or None."""
        if self.pid is None:
            return None
        try:
            with open(self.pid_path) as f:
                return f.read().split(None, 1)[1].strip()
        except (OSError, IndexError):
            return None

    describe = staticmethod(describe)

    def points_at(self, endpoint):
        """True when a forwarder runs and forwards to *endpoint*."""
        return self.target() == describe(endpoint)

    def start(self, endpoint):
        """Forward to *endpoint* (an NBD
        :class:`~thunder_agent.records.Endpoint`), replacing any forwarder
        running now."""
        target = describe(endpoint)
        listen = 'UNIX-LISTEN:%s,fork,unlink-early,mode=600' % socat_path(
            self.socket)
        self.stop()
        address = target
        if target.startswith('TCP:'):
            address += ',connect-timeout=%d,nodelay' % self.connect_timeout
        cmd = [SOCAT, '-lf', self.log_path, listen, address]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        except FileNotFoundError:
            raise exception.BackendError(
                reason='socat is not installed (Debian package socat)')
        with open(self.pid_path + '.tmp', 'w') as f:
            f.write('%d %s\n' % (proc.pid, target))
        os.replace(self.pid_path + '.tmp', self.pid_path)
        deadline = time.monotonic() + self.start_timeout
        while not os.path.exists(self.socket):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise exception.BackendError(
                    reason='upstream forwarder for %s did not start'
                           % self.image_id)
            time.sleep(0.02)
        LOG.info('Template %s reads through %s', self.image_id, target)

    def stop(self):
        pid = self.pid
        if pid is not None:
            # The whole session: the listener and its open connections.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and os.path.exists(
                    '/proc/%d' % pid):
                # Reaped here when this process started it.
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.02)
        for path in (self.pid_path, self.socket):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def remove_log(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log_path)
