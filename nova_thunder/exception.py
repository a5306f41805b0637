"""Errors raised inside nova-compute.

They derive from Nova's own exception classes so that Nova records them as
instance faults with their message (a failed block-device setup becomes
``InvalidBDM`` carrying this text), and ``Invalid`` ones are the user's doing.
"""

from nova import exception as nova_exception


class ThunderError(nova_exception.NovaException):
    msg_fmt = "Thunder block device error: %(reason)s"


class ThunderImageUnsupported(nova_exception.Invalid):
    msg_fmt = "Image %(image_id)s cannot be a thunder origin: %(reason)s"


class ThunderVolumeUnsupported(nova_exception.Invalid):
    msg_fmt = "Volume %(volume_id)s cannot be a thunder origin: %(reason)s"


class InvalidOriginURL(nova_exception.Invalid):
    msg_fmt = "Invalid thunder origin URL %(url)r: %(reason)s"


class ThunderDisabled(nova_exception.Invalid):
    msg_fmt = ("Block device %(source)s is marked thunder but [thunder] "
               "enabled is false on host %(host)s.")


class ThunderDiskFailed(ThunderError):
    msg_fmt = ("The thunder agent on %(host)s could not prepare the disk of "
               "instance %(instance_uuid)s from %(source)s: %(reason)s")


class ThunderAgentUnavailable(ThunderError):
    msg_fmt = ("The thunder agent on %(host)s did not answer within "
               "%(timeout)d seconds (topic %(topic)s).")


class ThunderBackendMismatch(ThunderError):
    msg_fmt = ("The thunder agent on %(host)s returned a %(actual)s disk; "
               "[thunder] backend expects %(expected)s.")


class InvalidThunderDisk(ThunderError):
    msg_fmt = "Invalid thunder connection_info: %(reason)s"


class NovaIncompatible(ThunderError):
    msg_fmt = ("nova-thunder cannot wire itself into Nova %(version)s: "
               "%(reason)s")
