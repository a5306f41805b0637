"""A private RabbitMQ broker on a loopback port.

Runs Debian's ``rabbitmq-server`` with its own node name, data directory,
distribution port and epmd port, so it neither needs nor disturbs a system
broker. As root the broker runs as the ``rabbitmq`` user, which must own its
data directory.
"""

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

from thunder_lab.emulation import netutil

SERVER = '/usr/lib/rabbitmq/bin/rabbitmq-server'
CTL = '/usr/lib/rabbitmq/bin/rabbitmqctl'


def epmd_pids(port):
    """Pids of the epmd daemons started with ERL_EPMD_PORT=*port*."""
    wanted = b'ERL_EPMD_PORT=%d' % port
    found = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/cmdline' % name, 'rb') as f:
                if b'epmd' not in f.read().split(b'\0')[0]:
                    continue
            with open('/proc/%s/environ' % name, 'rb') as f:
                if wanted in f.read().split(b'\0'):
                    found.append(int(name))
        except OSError:
            continue
    return found


class RabbitMQUnavailable(RuntimeError):
    pass


class RabbitMQ:
    def __init__(self, base_dir=None, start_timeout=90):
        self.base_dir = base_dir
        self.start_timeout = start_timeout
        self.proc = None
        self.port = None

    @property
    def transport_url(self):
        return 'rabbit://guest:guest@127.0.0.1:%d/' % self.port

    def start(self):
        if not os.path.exists(SERVER):
            raise RabbitMQUnavailable(
                '%s not found: install the rabbitmq-server package' % SERVER)
        self.dir = tempfile.mkdtemp(prefix='thunder-rabbit-',
                                    dir=self.base_dir)
        self.port = netutil.free_port()
        self.epmd_port = netutil.free_port()
        dist_port = netutil.free_port()
        with open(os.path.join(self.dir, 'enabled_plugins'), 'w') as f:
            f.write('[].\n')
        with open(os.path.join(self.dir, 'rabbitmq.conf'), 'w') as f:
            f.write('listeners.tcp.default = 127.0.0.1:%d\n'
                    'loopback_users.guest = true\n'
                    'disk_free_limit.absolute = 50MB\n' % self.port)
        with open(os.path.join(self.dir, '.erlang.cookie'), 'w') as f:
            f.write('THUNDERTEST%d' % self.port)
        os.chmod(os.path.join(self.dir, '.erlang.cookie'), 0o400)
        env = dict(
            os.environ,
            HOME=self.dir,
            RABBITMQ_NODENAME='thunder%d@localhost' % self.port,
            RABBITMQ_NODE_IP_ADDRESS='127.0.0.1',
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS='127.0.0.1',
            RABBITMQ_MNESIA_BASE=os.path.join(self.dir, 'mnesia'),
            RABBITMQ_LOG_BASE=os.path.join(self.dir, 'log'),
            RABBITMQ_LOGS=os.path.join(self.dir, 'rabbit.log'),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.dir,
                                                       'enabled_plugins'),
            RABBITMQ_CONFIG_FILE=os.path.join(self.dir, 'rabbitmq'),
            RABBITMQ_PID_FILE=os.path.join(self.dir, 'rabbit.pid'),
        )
        self.env = env
        self._as = []
        if os.geteuid() == 0:
            user = pwd.getpwnam('rabbitmq')
            for root, dirs, files in os.walk(self.dir):
                for name in dirs + files + ['.']:
                    os.chown(os.path.join(root, name), user.pw_uid,
                             user.pw_gid)
            self._as = ['runuser', '-u', 'rabbitmq', '--']
        cmd = self._as + [SERVER]
        self.log = open(os.path.join(self.dir, 'console.log'), 'wb')
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        if not netutil.wait_for_port('127.0.0.1', self.port,
                                     self.start_timeout, self.proc):
            tail = self.console_tail()
            self.stop()
            raise RabbitMQUnavailable('RabbitMQ did not start: %s' % tail)
        return self

    def ctl_command(self):
        """The command line of ``rabbitmqctl`` for this broker (to be run
        with :attr:`env`, as the broker itself runs: same user, same
        Erlang cookie, same epmd)."""
        return self._as + [CTL, '-n', self.env['RABBITMQ_NODENAME']]

    def ctl(self, *args, input=None, timeout=120):
        """Run ``rabbitmqctl ARGS`` against this broker; its output.

        Raises RuntimeError with rabbitmqctl's words when it fails.
        """
        proc = subprocess.run(self.ctl_command() + list(args), env=self.env,
                              input=input, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode:
            raise RuntimeError('rabbitmqctl %s: %s' % (
                ' '.join(args), (proc.stderr or proc.stdout).strip()))
        return proc.stdout

    def console_tail(self, n=2000):
        try:
            with open(os.path.join(self.dir, 'console.log'), 'rb') as f:
                return f.read()[-n:].decode(errors='replace')
        except OSError:
            return ''

    def stop(self):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
            self.proc = None
            # The broker's private epmd outlives it; stop it too. It runs
            # as "epmd -daemon": its port is only in its environment.
            for pid in epmd_pids(self.epmd_port):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and epmd_pids(self.epmd_port):
                time.sleep(0.1)
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
