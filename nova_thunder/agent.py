"""nova-compute's side of the agent RPC: prepare and release thunder disks.

Wraps :class:`thunder_agent.rpc.api.AgentAPI` with the ``[thunder]``
options, turns the agent's typed errors into Nova exceptions (recorded as
the instance fault) and makes release idempotent.
"""

import threading

import oslo_messaging as messaging
from oslo_log import log as logging

import nova.conf

from nova_thunder import exception
# Imported after nova.conf: Nova owns [DEFAULT] host in this process.
from thunder_agent import exception as agent_exception
from thunder_agent import rpc as agent_rpc
from thunder_agent.rpc import api as agent_api

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

_lock = threading.Lock()
_client = None


def agent_host():
    return CONF.thunder.agent_host or CONF.host


class AgentClient:
    def __init__(self, transport):
        # The timeout is passed on every call: [thunder] timeout may change
        # while the client lives.
        # The exchange is explicit: nova-compute's own control_exchange is
        # Nova's ("nova"), not the agents'.
        self.api = agent_api.AgentAPI(
            transport, topic=CONF.thunder.topic,
            exchange=CONF.thunder.control_exchange)

    def prepare(self, image_id, origin, size, image_format, instance_uuid,
                source):
        """Template (if needed) and snapshot in one call -> connection_info.

        *source* names what the disk comes from, for error messages.
        """
        host = agent_host()
        LOG.info('Asking the thunder agent on %(host)s for a disk of '
                 '%(size)d bytes from %(source)s (%(kind)s origin)',
                 {'host': host, 'size': size, 'source': source,
                  'kind': origin.get('driver_volume_type')},
                 instance_uuid=instance_uuid)
        try:
            return self.api.prepare(host, image_id, origin, size,
                                    image_format, instance_uuid,
                                    timeout=CONF.thunder.timeout)
        except messaging.MessagingTimeout:
            raise exception.ThunderAgentUnavailable(
                host=host, timeout=CONF.thunder.timeout,
                topic=CONF.thunder.topic)
        except agent_exception.ThunderException as e:
            raise exception.ThunderDiskFailed(
                host=host, instance_uuid=instance_uuid, source=source,
                reason=e.message)

    def release(self, instance_uuid, host=None):
        """Delete the snapshot of *instance_uuid*; False if there was none."""
        host = host or agent_host()
        try:
            self.api.delete_snapshot(host, instance_uuid,
                                     timeout=CONF.thunder.timeout)
        except agent_exception.SnapshotNotFound:
            LOG.debug('No thunder snapshot to release on %s', host,
                      instance_uuid=instance_uuid)
            return False
        except messaging.MessagingTimeout:
            raise exception.ThunderAgentUnavailable(
                host=host, timeout=CONF.thunder.timeout,
                topic=CONF.thunder.topic)
        LOG.info('Released the thunder snapshot on %s', host,
                 instance_uuid=instance_uuid)
        return True


def get_client():
    """The process-wide client (one transport per nova-compute)."""
    global _client
    with _lock:
        if _client is None:
            transport = agent_rpc.get_transport(
                CONF, url=CONF.thunder.transport_url)
            _client = AgentClient(transport)
        return _client


def reset_client():
    """Forget the client (tests, or after the options changed)."""
    global _client
    with _lock:
        if _client is not None:
            _client.api.client.transport.cleanup()
        _client = None
