"""What the agent and the coordinator services share: an RPC server and
periodic jobs, in one process (oslo.service, no forked workers).

Periodic work follows ovn-bgp-agent: one oslo.service looping call per
cadence, each honouring its own option. Jobs that many hosts run together
are jittered: the first run comes at a random point of the first interval
and each later one within 10 % of the interval, so a fleet restarted at
once does not call the coordinator in lockstep.
"""

import random
import threading

from oslo_log import log as logging
from oslo_service import loopingcall
from oslo_service import service

from thunder_agent import rpc

LOG = logging.getLogger(__name__)

JITTER = 0.1


class PeriodicJob:
    """*fn* every *interval()* seconds (re-read at each run, so an option
    changed by a config reload takes effect), optionally jittered."""

    def __init__(self, name, fn, interval, jitter=False, rng=random):
        self.name = name
        self.fn = fn
        self.interval = interval
        self.jitter = jitter
        self.rng = rng
        self._call = None

    def first_delay(self):
        interval = self.interval()
        return self.rng.uniform(0, interval) if self.jitter else interval

    def next_delay(self):
        interval = self.interval()
        if self.jitter:
            return interval * self.rng.uniform(1 - JITTER, 1 + JITTER)
        return interval

    def run_once(self):
        """One run; an error is logged, never ends the job."""
        try:
            self.fn()
        except Exception:
            LOG.exception('Periodic job %s failed', self.name)
        return self.next_delay()

    def start(self):
        self._call = loopingcall.DynamicLoopingCall(self.run_once)
        self._call.start(initial_delay=self.first_delay(),
                         periodic_interval_max=None)
        return self

    def stop(self):
        if self._call is not None:
            self._call.stop()

    def wait(self):
        if self._call is not None:
            self._call.wait()


class RPCService(service.Service):
    """Subclasses build ``self.manager`` in :meth:`make_manager`, return
    their RPC server from :meth:`make_server` and their
    :class:`PeriodicJob` list from :meth:`periodic_jobs`."""

    name = 'service'

    def __init__(self, conf):
        super().__init__()
        self.conf = conf
        self.manager = None
        self.rpc_server = None
        self.jobs = []
        self._stopping = threading.Event()

    def make_manager(self):
        raise NotImplementedError

    def make_server(self, transport):
        raise NotImplementedError

    def periodic_jobs(self):
        raise NotImplementedError

    def start(self):
        super().start()
        self.manager = self.make_manager()
        self.rpc_server = self.make_server(rpc.get_transport(self.conf))
        self.rpc_server.start()
        self.jobs = [job.start() for job in self.periodic_jobs()]
        for job in self.jobs:
            LOG.debug('Periodic job %s started', job.name)

    def wait(self):
        # The launcher's wait: the service runs until stop() is asked for
        # (the RPC server and the looping calls run in their own threads).
        self._stopping.wait()

    def stop(self, graceful=False):
        self._stopping.set()
        for job in self.jobs:
            job.stop()
        if self.rpc_server is not None:
            self.rpc_server.stop()
            self.rpc_server.wait()
        for job in self.jobs:
            job.wait()
        super().stop(graceful)
