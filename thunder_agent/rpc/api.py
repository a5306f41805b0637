"""Client side of the agent RPC API (topic ``[agent] topic``, server = host).

Version history:

* 1.0 - prepare_template, create_snapshot, prepare, delete_snapshot,
  release_template, collect_garbage, get_status.
* 1.1 - prefetch.
* 1.2 - tree_changed (a cast: the coordinator's hint that the node's
  place in an image's tree changed).

Errors come back as the typed exceptions of :mod:`thunder_agent.exception`.
"""

import oslo_messaging as messaging

# The default of [agent] topic. This module reads no configuration: it is
# what nova-compute imports, and it must not add options to Nova's.
TOPIC = 'thunder-agent'


class AgentAPI:
    # What the server implements; calls ask for the version that brought
    # them (BASE_VERSION unless they pin one), so an agent of an older
    # release still serves what it knows.
    VERSION = '1.2'
    BASE_VERSION = '1.0'

    def __init__(self, transport, topic=TOPIC, timeout=None,
                 exchange=None):
        target = messaging.Target(exchange=exchange, topic=topic,
                                  version=self.BASE_VERSION)
        self.client = messaging.get_rpc_client(transport, target,
                                               timeout=timeout)

    def _call(self, host, method, ctxt=None, timeout=None, **kwargs):
        # prepare(timeout=None) would drop the client's own timeout.
        options = {'timeout': timeout} if timeout is not None else {}
        cctxt = self.client.prepare(server=host, **options)
        return cctxt.call(ctxt or {}, method, **kwargs)

    def prepare_template(self, host, image_id, origin, size, image_format,
                         ctxt=None, timeout=None):
        """Ensure the template of *image_id* exists on *host*.

        *origin* is a Cinder-style connection_info dict (see
        :func:`thunder_agent.validation.origin`). Returns the template's
        status dict.
        """
        return self._call(host, 'prepare_template', ctxt, timeout,
                          image_id=image_id, origin=origin, size=size,
                          image_format=image_format)

    def create_snapshot(self, host, image_id, instance_id, ctxt=None,
                        timeout=None):
        """Create the writable layer of *instance_id*; return its
        connection_info."""
        return self._call(host, 'create_snapshot', ctxt, timeout,
                          image_id=image_id, instance_id=instance_id)

    def prepare(self, host, image_id, origin, size, image_format,
                instance_id, ctxt=None, timeout=None):
        """Template and snapshot in one call; returns connection_info."""
        return self._call(host, 'prepare', ctxt, timeout, image_id=image_id,
                          origin=origin, size=size, image_format=image_format,
                          instance_id=instance_id)

    def delete_snapshot(self, host, instance_id, ctxt=None, timeout=None):
        return self._call(host, 'delete_snapshot', ctxt, timeout,
                          instance_id=instance_id)

    def release_template(self, host, image_id, ctxt=None, timeout=None):
        """Remove the template now; refused while it has snapshots or
        children."""
        return self._call(host, 'release_template', ctxt, timeout,
                          image_id=image_id)

    def collect_garbage(self, host, max_idle=None, ctxt=None, timeout=None):
        """Remove templates idle for more than *max_idle* seconds (default:
        the agent's grace period). Returns the removed image ids."""
        return self._call(host, 'collect_garbage', ctxt, timeout,
                          max_idle=max_idle)

    def get_status(self, host, ctxt=None, timeout=None):
        return self._call(host, 'get_status', ctxt, timeout)

    def prefetch(self, host, image_id, mode='full', rate_mb=None, ctxt=None,
                 timeout=None):
        """Warm the template of *image_id*: ``trace`` or ``full``.

        Returns at once with the prefetch status; progress shows in
        get_status under the template's ``prefetch``.
        """
        options = {'timeout': timeout} if timeout is not None else {}
        cctxt = self.client.prepare(server=host, version='1.1', **options)
        return cctxt.call(ctxt or {}, 'prefetch', image_id=image_id,
                          mode=mode, rate_mb=rate_mb)

    def tree_changed(self, host, image_id, ctxt=None):
        """Tell *host* that its place in the tree of *image_id* changed (a
        cast, no answer): it asks the coordinator for its placement at
        once, so a new child is admitted within a fraction of a second,
        not at the next heartbeat. The hint carries no tree: the
        coordinator's answer is what the agent applies."""
        cctxt = self.client.prepare(server=host, version='1.2')
        cctxt.cast(ctxt or {}, 'tree_changed', image_id=image_id)
