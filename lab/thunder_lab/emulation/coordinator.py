"""Run a real ``thunder-coordinator`` process against a given broker."""

from oslo_config import cfg

from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent import identity
from thunder_agent import rpc
from thunder_lab.emulation import service_process


class CoordinatorProcess(service_process.ServiceProcess):
    """A thunder-coordinator subprocess with its own config and log.

    Options go in ``options`` as {group: {name: value}}, e.g.
    ``{'coordinator': {'fan_out': 2, 'node_timeout': 3}}``. Without a
    ``tls`` group the coordinator runs with ``[tls] enabled = false``
    (unsigned calls believed); give ``{'tls': {'enabled': 'true',
    'certificates_dir': ...}}`` to have it check signed calls.
    """

    module = 'thunder_agent.cmd.coordinator'
    name = 'thunder-coordinator'

    def __init__(self, transport_url, workdir, host='thunder-coordinator',
                 topic=None, options=None, log_dir=None):
        self.transport_url = transport_url
        self.host = host
        self.topic = topic or 'thunder-coordinator'
        groups = {
            'DEFAULT': {'host': host, 'transport_url': transport_url},
            'coordinator': {'topic': self.topic},
            'tls': {'enabled': 'false'},
        }
        for group, values in (options or {}).items():
            groups.setdefault(group, {}).update(values)
        super().__init__(workdir, groups, log_dir=log_dir)
        # With TLS the coordinator takes signed calls only: the client
        # signs with the coordinator's own certificate (good for the
        # read-only calls; a node's calls need that node's).
        tls = groups['tls']
        self.certificates_dir = (
            tls.get('certificates_dir')
            if str(tls.get('enabled')).lower() == 'true' else None)
        self._client = None
        self._transport = None

    @property
    def client(self):
        if self._client is None:
            self._transport = rpc.get_transport(cfg.CONF,
                                                self.transport_url)
            self._client = coordinator_rpc.CoordinatorAPI(
                self._transport, topic=self.topic, timeout=60,
                signer=self.signer())
        return self._client

    def signer(self, certificates_dir=None):
        """A signer of calls with the credentials in *certificates_dir*
        (default the coordinator's own); None without TLS."""
        path = certificates_dir or self.certificates_dir
        return identity.Signer.from_dir(path) if path else None

    def ping(self):
        self.client.list_trees(timeout=2)

    def stop(self):
        super().stop()
        if self._transport is not None:
            self._transport.cleanup()
            self._transport = self._client = None
