"""Run a real ``thunder-agent`` process against a given broker."""

import os
import re
import shlex
import signal

from oslo_config import cfg

from thunder_agent import rpc
from thunder_agent.rpc import api
from thunder_lab.emulation import service_process

PRIVSEP_SECTIONS = ('thunder_agent_privileged', 'privsep_osbrick')
_IMAGE_ID = re.compile(r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-'
                       r'[0-9a-f]{12}\Z')


class AgentProcess(service_process.ServiceProcess):
    """A thunder-agent subprocess with its own config, state and run dirs.

    ``workdir`` should be short (unix socket paths are limited to 107
    bytes). Extra options go in ``options`` as {group: {name: value}}.

    ``privsep_helper``: path of a ``privsep-helper`` to run directly
    instead of through sudo, for an agent that runs as root already (the
    QEMU guest). oslo.privsep appends ``--privsep_context`` and
    ``--privsep_sock_path`` to a configured helper_command but, unlike to
    its sudo default, no ``--config-file``: it is added here, so that the
    helper logs where the agent does.
    """

    module = 'thunder_agent.cmd.agent'
    name = 'thunder-agent'

    def __init__(self, transport_url, workdir, host='thunder-test-host',
                 file_origin_dirs=(), backend='qemu', options=None,
                 netns=None, log_dir=None, privsep_helper=None):
        self.transport_url = transport_url
        self.host = host
        self.privsep_helper = privsep_helper
        self.state_path = os.path.join(workdir, 'state')
        self.run_path = os.path.join(workdir, 'run')
        groups = {
            'DEFAULT': {'host': host, 'transport_url': transport_url},
            'agent': {'state_path': self.state_path,
                      'run_path': self.run_path, 'backend': backend,
                      'file_origin_dirs': ','.join(file_origin_dirs),
                      'housekeeping_interval': 2},
            'cache': {'flush_interval': 2},
        }
        for group, values in (options or {}).items():
            groups.setdefault(group, {}).update(values)
        super().__init__(workdir, groups, netns=netns, log_dir=log_dir)
        self._client = None

    def complete_groups(self, groups):
        if self.privsep_helper:
            # oslo.privsep splits it with shlex.
            command = ' '.join(shlex.quote(a) for a in (
                self.privsep_helper, '--config-file', self.conf_file))
            # The agent's own context and os-brick's.
            for section in PRIVSEP_SECTIONS:
                groups.setdefault(section, {})['helper_command'] = command

    @property
    def client(self):
        if self._client is None:
            transport = rpc.get_transport(cfg.CONF, self.transport_url)
            self._client = _BoundClient(api.AgentAPI(transport, timeout=120),
                                        self.host)
        return self._client

    def ping(self):
        self.client.get_status(timeout=2)

    def data_plane_pids(self):
        pids = []
        if os.path.isdir(self.run_path):
            for name in os.listdir(self.run_path):
                if name.endswith('.pid'):
                    try:
                        with open(os.path.join(self.run_path, name)) as f:
                            # "<pid>" or "<pid> <what it forwards>"
                            pids.append(int(f.read().split()[0]))
                    except (OSError, ValueError, IndexError):
                        pass
        return pids

    def template_daemon_pids(self):
        """The pids of the template daemons (pid files named by image id;
        not the relay listeners, TLS exporters and verifiers)."""
        pids = []
        if os.path.isdir(self.run_path):
            for name in os.listdir(self.run_path):
                stem = name[:-len('.pid')]
                if name.endswith('.pid') and _IMAGE_ID.match(stem):
                    try:
                        with open(os.path.join(self.run_path, name)) as f:
                            pids.append(int(f.read().split()[0]))
                    except (OSError, ValueError, IndexError):
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
