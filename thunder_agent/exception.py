"""Typed errors of the thunder agent.

Every error carries a message template; callers over RPC get the same class
back (the client allows this module as a remote exception module), so Nova
and the CLI can tell a bad argument from a full cache from a broken backend.
"""


class ThunderException(Exception):
    msg_fmt = "An unknown error occurred."
    # Errors the caller caused; nothing was changed when one is raised.
    client_error = False

    def __init__(self, message=None, **kwargs):
        self.kwargs = kwargs
        if not message:
            try:
                message = self.msg_fmt % kwargs
            except (KeyError, TypeError):
                message = self.msg_fmt
        self.message = message
        super().__init__(message)


class InvalidInput(ThunderException):
    msg_fmt = "Invalid input: %(reason)s"
    client_error = True


class InvalidImageId(InvalidInput):
    msg_fmt = "Invalid image id %(image_id)r: must be a UUID."


class InvalidInstanceId(InvalidInput):
    msg_fmt = "Invalid instance id %(instance_id)r: must be a UUID."


class InvalidSize(InvalidInput):
    msg_fmt = "Invalid size %(size)r: %(reason)s"


class UnsupportedFormat(InvalidInput):
    msg_fmt = ("Unsupported image format %(image_format)r; supported: "
               "%(supported)s.")


class InvalidOrigin(InvalidInput):
    msg_fmt = "Invalid origin: %(reason)s"


class OriginNotAllowed(InvalidOrigin):
    """An origin outside the operator's allow-lists ([agent] options).

    The message names the image only: it reaches the instance fault a
    tenant reads. Why it was refused (path, address, which list) is in
    the agent's log and in :attr:`detail`, which does not cross RPC.
    """
    msg_fmt = "Origin of image %(image_id)s is not allowed on this host."
    detail = None


class OriginUnavailable(ThunderException):
    msg_fmt = "Origin of image %(image_id)s cannot be read: %(reason)s"


class UnsafeImage(OriginUnavailable):
    """Image content refused by the safety checks of
    :mod:`thunder_agent.image_check` (a backing or data file, a format
    other than the declared one): nothing was created."""
    msg_fmt = "Image %(image_id)s is refused: %(reason)s"
    client_error = True


class OriginUnreadable(OriginUnavailable):
    """What a caller is told when an origin cannot be read: the reason
    (a path, an address, what the peer answered) stays in the agent's log,
    as OriginNotAllowed's does."""
    msg_fmt = "Origin of image %(image_id)s cannot be read on this host."
    detail = None


class TemplateNotFound(ThunderException):
    msg_fmt = "No template for image %(image_id)s on this host."
    client_error = True


class TemplateMismatch(InvalidInput):
    msg_fmt = ("A template for image %(image_id)s already exists with a "
               "different %(field)s (%(existing)r, asked %(asked)r).")


class TemplateInUse(ThunderException):
    msg_fmt = "Template of image %(image_id)s is in use: %(reason)s"
    client_error = True


class TemplateBusy(ThunderException):
    msg_fmt = ("Template of image %(image_id)s is busy (%(operation)s); gave "
               "up waiting for it to %(waited)s.")


class SnapshotNotFound(ThunderException):
    msg_fmt = "No snapshot for instance %(instance_id)s on this host."
    client_error = True


class SnapshotExists(ThunderException):
    msg_fmt = "A snapshot for instance %(instance_id)s already exists."
    client_error = True


class CacheFull(ThunderException):
    msg_fmt = ("Cache is full (%(used)d of %(limit)d bytes used) and no idle "
               "template can be evicted.")


class BackendError(ThunderException):
    msg_fmt = "Data-plane operation failed: %(reason)s"


class BackendNotFound(ThunderException):
    msg_fmt = "Unknown backend %(name)r; installed: %(available)s."


class InvalidNodeId(InvalidInput):
    msg_fmt = "Invalid node id %(node)r: %(reason)s"


class InvalidAddress(InvalidInput):
    msg_fmt = "Invalid relay address %(address)r: %(reason)s"


class InvalidHeartbeat(InvalidInput):
    msg_fmt = "Invalid heartbeat from %(node)r: %(reason)s"


class ImageTreeNotFound(ThunderException):
    msg_fmt = "No relay tree for image %(image_id)s."
    client_error = True


class NodeNotInTree(ThunderException):
    msg_fmt = "Node %(node)s is not in the relay tree of image %(image_id)s."
    client_error = True


class TreePolicyNotFound(ThunderException):
    msg_fmt = "Unknown tree policy %(name)r; installed: %(available)s."


class NetworkSetupError(ThunderException):
    msg_fmt = "Network setup failed: %(reason)s"


class InvalidDeviceTable(InvalidInput):
    msg_fmt = "Invalid device-mapper table argument: %(reason)s"


class InvalidSource(InvalidInput):
    msg_fmt = "Invalid template source: %(reason)s"


class SourceUnavailable(BackendError):
    msg_fmt = ("Cannot attach source %(target)s at %(portal)s: %(reason)s")


class SnapshotInUse(ThunderException):
    msg_fmt = "Snapshot of instance %(instance_id)s is in use: %(reason)s"
    client_error = True


class PrivilegedOperationNotAllowed(ThunderException):
    msg_fmt = "Privileged operation refused: %(reason)s"


class InvalidTrace(InvalidInput):
    msg_fmt = "Invalid boot trace %(path)s: %(reason)s"


class PrefetchFailed(ThunderException):
    msg_fmt = "Prefetch from %(address)s failed: %(reason)s"


class CacheLimitExceeded(CacheFull):
    """A new template's cache could outgrow ``[cache] size_limit_mb``.

    Counted at full size (what every template's cache may grow to once
    VMs, children or NBD_CMD_CACHE read all of it), not at what it holds
    now. Raised before anything of the template is created; nova-compute
    shows the message in the instance fault.
    """
    msg_fmt = ("No room for the template of image %(image_id)s on this "
               "host: its cache may grow to %(needed_mb)d MiB and the other "
               "templates' caches to %(committed_mb)d MiB, over [cache] "
               "size_limit_mb (%(limit_mb)d MiB); no idle template is left "
               "to evict.")
    client_error = True


class InsufficientDiskSpace(CacheFull):
    """The file system of ``[agent] state_path`` cannot hold a new
    template's cache at full size on top of what the other caches may
    still grow by, with ``[cache] reserve_mb`` / ``reserve_percent`` left
    over. Raised before anything of the template is created."""
    msg_fmt = ("No room for the template of image %(image_id)s on this "
               "host: its cache may grow to %(needed_mb)d MiB and the other "
               "templates' caches by %(uncached_mb)d MiB more, but "
               "%(free_mb)d MiB of the state file system are free and "
               "%(reserve_mb)d MiB of it is kept in reserve; no idle "
               "template is left to evict.")
    client_error = True


class RecordNotSaved(ThunderException):
    """A record could not be written (a full disk, a read-only file
    system). The record on disk is the previous one, intact."""
    msg_fmt = "The record of %(kind)s %(name)s could not be saved: %(reason)s"


class InvalidManifest(ThunderException):
    msg_fmt = "Invalid digest manifest: %(reason)s"
