"""What the agent and the coordinator services share: an RPC server and
one periodic task, in one process (oslo.service, no forked workers)."""

import logging
import threading

from oslo_service import service

from thunder_agent import rpc

LOG = logging.getLogger(__name__)


class RPCService(service.Service):
    """Subclasses build ``self.manager`` in :meth:`make_manager`, return
    their RPC server from :meth:`make_server` and name the periodic work in
    :meth:`periodic` (every :meth:`interval` seconds)."""

    name = 'service'

    def __init__(self, conf):
        super().__init__()
        self.conf = conf
        self.manager = None
        self.rpc_server = None
        self._stopping = threading.Event()
        self._ticker = None

    def make_manager(self):
        raise NotImplementedError

    def make_server(self, transport):
        raise NotImplementedError

    def interval(self):
        raise NotImplementedError

    def periodic(self):
        raise NotImplementedError

    def start(self):
        super().start()
        self.manager = self.make_manager()
        self.rpc_server = self.make_server(rpc.get_transport(self.conf))
        self.rpc_server.start()
        self._ticker = threading.Thread(target=self._loop, daemon=True,
                                        name=self.name + '-periodic')
        self._ticker.start()

    def _loop(self):
        while not self._stopping.wait(self.interval()):
            try:
                self.periodic()
            except Exception:
                LOG.exception('Periodic task of %s failed', self.name)

    def wait(self):
        while not self._stopping.wait(1):
            pass

    def stop(self, graceful=False):
        self._stopping.set()
        if self.rpc_server is not None:
            self.rpc_server.stop()
            self.rpc_server.wait()
        super().stop(graceful)
