"""Run a real ``thunder-agent`` process against a given broker."""

import os
import signal
import subprocess
import sys
import time

from oslo_config import cfg

from thunder_agent import rpc
from thunder_agent.rpc import api


class AgentProcess:
    """A thunder-agent subprocess with its own config, state and run dirs.

    ``workdir`` should be short (unix socket paths are limited to 107
    bytes). Extra options go in ``options`` as {group: {name: value}}.
    """

    def __init__(self, transport_url, workdir, host='thunder-test-host',
                 file_origin_dirs=(), backend='qemu', options=None,
                 netns=None):
        self.transport_url = transport_url
        self.workdir = workdir
        self.host = host
        self.netns = netns
        self.state_path = os.path.join(workdir, 'state')
        self.run_path = os.path.join(workdir, 'run')
        self.log_file = os.path.join(workdir, 'agent.log')
        self.conf_file = os.path.join(workdir, 'thunder-agent.conf')
        groups = {
            'DEFAULT': {'host': host, 'transport_url': transport_url,
                        'log_file': self.log_file, 'debug': 'true'},
            'agent': {'state_path': self.state_path,
                      'run_path': self.run_path, 'backend': backend,
                      'file_origin_dirs': ','.join(file_origin_dirs),
                      'housekeeping_interval': 2},
            'cache': {'flush_interval': 2},
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

    @property
    def client(self):
        if self._client is None:
            transport = rpc.get_transport(cfg.CONF, self.transport_url)
            self._client = _BoundClient(api.AgentAPI(transport, timeout=120),
                                        self.host)
        return self._client

    def start(self, timeout=60):
        cmd = [sys.executable, '-m', 'thunder_agent.cmd.agent',
               '--config-file', self.conf_file]
        if self.netns:
            cmd = ['ip', 'netns', 'exec', self.netns] + cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_file + '.stderr',
                                                 'ab'))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError('thunder-agent exited with %s: %s' % (
                    self.proc.returncode, self.log_tail()))
            try:
                self.client.get_status(timeout=2)
                return self
            except Exception:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError('thunder-agent did not answer: %s'
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

    def kill(self):
        """SIGKILL, as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def data_plane_pids(self):
        pids = []
        if os.path.isdir(self.run_path):
            for name in os.listdir(self.run_path):
                if name.endswith('.pid'):
                    try:
                        with open(os.path.join(self.run_path, name)) as f:
                            pids.append(int(f.read().strip()))
                    except (OSError, ValueError):
                        pass
        return pids

    def teardown(self):
        """Stop the agent and every data-plane daemon it left running."""
        self.stop()
        if self._client is not None:
            self._client._api.client.transport.cleanup()
            self._client = None
        for pid in self.data_plane_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.teardown()


class _BoundClient:
    """AgentAPI with the host filled in."""

    def __init__(self, api_client, host):
        self._api = api_client
        self._host = host

    def __getattr__(self, name):
        method = getattr(self._api, name)
        return lambda *a, **kw: method(self._host, *a, **kw)
