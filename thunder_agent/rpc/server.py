"""Server side of the agent RPC API: a thin endpoint over the manager."""

import oslo_messaging as messaging

from thunder_agent.rpc import api


class AgentEndpoint:
    target = messaging.Target(version=api.AgentAPI.VERSION)

    def __init__(self, manager):
        self.manager = manager

    def prepare_template(self, ctxt, image_id, origin, size, image_format):
        return self.manager.prepare_template(image_id, origin, size,
                                             image_format)

    def create_snapshot(self, ctxt, image_id, instance_id):
        return self.manager.create_snapshot(image_id, instance_id)

    def prepare(self, ctxt, image_id, origin, size, image_format,
                instance_id):
        return self.manager.prepare(image_id, origin, size, image_format,
                                    instance_id)

    def delete_snapshot(self, ctxt, instance_id):
        return self.manager.delete_snapshot(instance_id)

    def release_template(self, ctxt, image_id):
        return self.manager.release_template(image_id)

    def collect_garbage(self, ctxt, max_idle=None):
        return self.manager.collect_garbage(max_idle)

    def get_status(self, ctxt):
        return self.manager.get_status()

    def prefetch(self, ctxt, image_id, mode='full', rate_mb=None):
        return self.manager.prefetch(image_id, mode, rate_mb)


def get_server(transport, manager, topic, host):
    target = messaging.Target(topic=topic, server=host)
    # oslo.messaging's threading executor: up to executor_thread_pool_size
    # (64) calls run at once; the manager never serialises them.
    return messaging.get_rpc_server(transport, target,
                                    [AgentEndpoint(manager)],
                                    executor='threading')
