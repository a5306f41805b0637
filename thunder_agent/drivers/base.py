"""The interface every data-plane backend implements.

A backend turns the agent's records into a running data plane and back:

* a **template** per image: a read-only device presenting the whole image,
  fetching missing blocks on demand from its *sources* (the origin or parent
  templates), keeping every block it fetched in a local cache, and exported
  so that local snapshots and child nodes can read it;
* a **snapshot** per instance: a writable copy-on-write layer over the
  local template.

The manager owns validation, records, reference counting and eviction; a
backend only acts on the data plane and never raises for bad input (the
manager has checked it). Methods are idempotent where noted so that
reconciliation after a restart can call them blindly.
"""

import abc
import dataclasses


@dataclasses.dataclass
class OriginInfo:
    size: int
    image_format: str


@dataclasses.dataclass
class TemplateStats:
    # Bytes copied from the sources into the local cache since creation.
    bytes_fetched: int = 0
    # Bytes handed out by the template's export to its readers (zeros the
    # cache keeps as zero clusters are not counted: they cost no I/O).
    bytes_served: int = 0
    # Bytes of the image present in the local cache.
    cached_bytes: int = 0
    # The same in cache blocks of ``block_size`` bytes.
    blocks_cached: int = 0
    block_size: int = 0
    # Disk space the cache takes on the host.
    disk_bytes: int = 0


class Backend(metaclass=abc.ABCMeta):
    """A data-plane backend. ``conf`` is the agent's ConfigOpts."""

    name = None

    def __init__(self, conf):
        self.conf = conf

    def start(self):
        """Called once when the agent starts, before reconciliation."""

    def stop(self):
        """Called when the agent stops. The data plane keeps running."""

    @abc.abstractmethod
    def probe_origin(self, origin, image_format):
        """Open *origin* read-only and return its :class:`OriginInfo`.

        Raises OriginUnavailable when it cannot be read or is not of
        *image_format*.
        """

    @abc.abstractmethod
    def create_template(self, template, template_dir):
        """Build the template's data plane; return its export description.

        *template_dir* is an empty directory owned by this template.
        """

    @abc.abstractmethod
    def ensure_template(self, template, template_dir):
        """Make the data plane match the record after a restart.

        Re-adopts what still runs, rebuilds what does not, reusing the cache
        on disk. Idempotent. Returns the (possibly new) export description.
        """

    @abc.abstractmethod
    def set_sources(self, template, template_dir, sources):
        """Switch the template to fetch misses from *sources* (re-parent).

        In-flight and later reads must block and resume, never fail.
        """

    @abc.abstractmethod
    def delete_template(self, template, template_dir):
        """Tear the template down; the manager removes the directory."""

    @abc.abstractmethod
    def template_stats(self, template, template_dir):
        """Return :class:`TemplateStats` for the template."""

    @abc.abstractmethod
    def disk_usage(self, template, template_dir):
        """Bytes of local disk the template's cache takes (for eviction)."""

    def flush_template(self, template, template_dir):
        """Persist cache metadata so cached blocks survive a crash."""

    @abc.abstractmethod
    def create_snapshot(self, template, template_dir, instance_id,
                        snapshot_dir):
        """Create the writable layer; return its connection_info dict.

        The dict has ``driver_volume_type`` ``'thunder'`` and a ``data``
        dict the libvirt volume driver understands.
        """

    @abc.abstractmethod
    def ensure_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        """Re-adopt or rebuild a snapshot after a restart. Idempotent.

        Returns the connection_info, which must not change for a running VM.
        """

    @abc.abstractmethod
    def delete_snapshot(self, template, template_dir, snapshot,
                        snapshot_dir):
        """Remove the writable layer and everything it wrote."""

    def is_healthy(self, template, template_dir):
        """True when the template's data plane is up."""
        return True
