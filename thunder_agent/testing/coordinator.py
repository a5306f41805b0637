"""Run a real ``thunder-coordinator`` process against a given broker."""

import os
import signal
import subprocess
import sys
import time

from thunder_agent import conf as agent_conf
from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent import rpc


class CoordinatorProcess:
    """A thunder-coordinator subprocess with its own config and log.

    Options go in ``options`` as {group: {name: value}}, e.g.
    ``{'coordinator': {'fan_out': 2, 'node_timeout': 3}}``. The process
    runs in its own session, so :meth:`kill` takes its worker with it, as a
    crash of the host would.
    """

    def __init__(self, transport_url, workdir, host='thunder-coordinator',
                 topic=None, options=None):
        self.transport_url = transport_url
        self.workdir = workdir
        self.host = host
        self.topic = topic or 'thunder-coordinator'
        self.log_file = os.path.join(workdir, 'coordinator.log')
        self.conf_file = os.path.join(workdir, 'thunder-coordinator.conf')
        groups = {
            'DEFAULT': {'host': host, 'transport_url': transport_url,
                        'log_file': self.log_file, 'debug': 'true'},
            'coordinator': {'topic': self.topic},
        }
        for group, values in (options or {}).items():
            groups.setdefault(group, {}).update(values)
        os.makedirs(workdir, exist_ok=True)
        with open(self.conf_file, 'w') as f:
            for group, values in groups.items():
                f.write('[%s]\n' % group)
                for key, value in values.items():
                    f.write('%s = %s\n' % (key, value))
        self.proc = None
        self._client = None
        self._transport = None

    @property
    def client(self):
        if self._client is None:
            # The global config object: oslo.messaging registers some of
            # its client options (tracing) there only.
            self._transport = rpc.get_transport(agent_conf.CONF,
                                                self.transport_url)
            self._client = coordinator_rpc.CoordinatorAPI(
                self._transport, topic=self.topic, timeout=60)
        return self._client

    def start(self, timeout=60):
        cmd = [sys.executable, '-m', 'thunder_agent.cmd.coordinator',
               '--config-file', self.conf_file]
        with open(self.log_file + '.stderr', 'ab') as stderr:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL,
                                         stderr=stderr,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError('thunder-coordinator exited with %s: %s'
                                   % (self.proc.returncode, self.log_tail()))
            try:
                self.client.list_trees(timeout=2)
                return self
            except Exception:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError('thunder-coordinator did not answer: %s'
                           % self.log_tail())

    def log_tail(self, size=3000):
        out = b''
        for path in (self.log_file + '.stderr', self.log_file):
            try:
                with open(path, 'rb') as f:
                    out += f.read()[-size:]
            except OSError:
                pass
        return out.decode(errors='replace')

    def _signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self):
        """SIGKILL to the whole process group, as a crash would."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            # The worker may outlive a master that died first.
            self.kill()
        if self._transport is not None:
            self._transport.cleanup()
            self._transport = self._client = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
