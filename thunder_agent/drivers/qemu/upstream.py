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
"""

import contextlib
import os
import signal
import subprocess
import time

from thunder_agent import exception

SOCAT = 'socat'


class Upstream:
    def __init__(self, image_id, run_path, connect_timeout=5):
        self.image_id = image_id
        self.socket = os.path.join(run_path, image_id + '.up')
        self.pid_path = os.path.join(run_path, image_id + '.up.pid')
        self.log_path = os.path.join(run_path, image_id + '.up.log')
        self.connect_timeout = connect_timeout

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
        try:
            with open(self.pid_path) as f:
                return f.read().split(None, 1)[1].strip()
        except (OSError, IndexError):
            return None

    @staticmethod
    def describe(source):
        data = source['data']
        if 'socket' in data:
            return 'UNIX-CONNECT:%s' % data['socket']
        return 'TCP:%s:%d' % (data['host'], data['port'])

    def start(self, source):
        """Forward to *source* (an NBD connection dict), replacing any
        forwarder running now."""
        self.stop()
        target = self.describe(source)
        if target.startswith('TCP:'):
            target += ',connect-timeout=%d,nodelay' % self.connect_timeout
        cmd = [SOCAT, '-lf', self.log_path,
               'UNIX-LISTEN:%s,fork,unlink-early,mode=600' % self.socket,
               target]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        except FileNotFoundError:
            raise exception.BackendError(
                reason='socat is not installed (Debian package socat)')
        with open(self.pid_path + '.tmp', 'w') as f:
            f.write('%d %s\n' % (proc.pid, self.describe(source)))
        os.replace(self.pid_path + '.tmp', self.pid_path)
        deadline = time.monotonic() + 5
        while not os.path.exists(self.socket):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise exception.BackendError(
                    reason='upstream forwarder for %s did not start'
                           % self.image_id)
            time.sleep(0.02)

    def stop(self):
        pid = self.pid
        if pid is not None:
            # The whole session: the listener and its open connections.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and os.path.exists(
                    '/proc/%d' % pid):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.02)
        for path in (self.pid_path, self.socket):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
