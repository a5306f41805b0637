"""Server side of the agent RPC API: a thin endpoint over the manager.

The endpoint is where the agent's answers leave for the caller, and what
nova-compute gets back from a prepare becomes the instance fault the
tenant reads. So an origin's detail never goes out here: an origin probe
that failed (its message holds qemu-img's or os-brick's words: the
origin's path or address, and what the peer sent, e.g. the first bytes of
whatever service answered) and a template that exists with another origin
(its message describes both origins) are logged with their detail and
answered with a message naming the image only. The manager's own checks
before that (:func:`thunder_agent.validation.origin`) answer the same way.
An image refused for its content (UnsafeImage) keeps its message: that is
the image owner's to know.
"""

import oslo_messaging as messaging
from oslo_log import log as logging

from thunder_agent import exception
from thunder_agent.rpc import api
from thunder_agent import validation

LOG = logging.getLogger(__name__)


def _without_origin_detail(image_id, call):
    try:
        return call()
    except (exception.OriginNotAllowed, exception.UnsafeImage):
        # Generic already, and logged; or about the image's own content,
        # which its owner is to be told (image_check builds no address or
        # path into it).
        raise
    except exception.OriginUnavailable as e:
        if isinstance(e, exception.OriginUnreadable) and not e.kwargs.get(
                'reason'):
            raise               # generic already, and logged
        LOG.warning('Origin of image %(image)s cannot be read: %(error)s',
                    {'image': image_id, 'error': e.message})
        # "from None": the remote traceback must not carry the original.
        raise exception.OriginUnreadable(image_id=image_id) from None
    except exception.TemplateMismatch as e:
        if e.kwargs.get('field') != 'origin':
            raise               # sizes and formats: the caller's own values
        LOG.warning('Prepare of image %(image)s refused: %(error)s',
                    {'image': image_id, 'error': e.message})
        raise exception.TemplateMismatch(
            'A template for image %s already exists on this host with a '
            'different origin.' % image_id,
            image_id=image_id, field='origin') from None


def _image(image_id):
    """The image id for a message: only once it is a valid id (an error of
    the calls below can only come after the manager validated it)."""
    try:
        return validation.image_id(image_id)
    except exception.InvalidImageId:
        return '(invalid image id)'


class AgentEndpoint:
    target = messaging.Target(version=api.AgentAPI.VERSION)

    def __init__(self, manager):
        self.manager = manager

    def prepare_template(self, ctxt, image_id, origin, size, image_format):
        return _without_origin_detail(
            _image(image_id), lambda: self.manager.prepare_template(
                image_id, origin, size, image_format))

    def create_snapshot(self, ctxt, image_id, instance_id):
        return self.manager.create_snapshot(image_id, instance_id)

    def prepare(self, ctxt, image_id, origin, size, image_format,
                instance_id):
        return _without_origin_detail(
            _image(image_id), lambda: self.manager.prepare(
                image_id, origin, size, image_format, instance_id))

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

    def tree_changed(self, ctxt, image_id):
        """A hint from anyone on the bus: the manager only asks the
        coordinator (rate-limited per image) and applies its answer."""
        self.manager.refresh_placement(image_id)


def get_server(transport, manager, topic, host):
    target = messaging.Target(topic=topic, server=host)
    # oslo.messaging's threading executor: up to executor_thread_pool_size
    # (64) calls run at once; the manager never serialises them.
    return messaging.get_rpc_server(transport, target,
                                    [AgentEndpoint(manager)],
                                    executor='threading')
