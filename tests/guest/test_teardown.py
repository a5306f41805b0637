"""Teardown order and in-use refusals of the kernel backend (guest)."""

import os

import pytest

from thunder_agent import exception
from tests.guest.conftest import iscsi_sessions
from tests.guest.conftest import leftovers
from tests.guest.conftest import MIB
from tests.guest.conftest import read_device
from tests.guest.conftest import sh

pytestmark = [pytest.mark.guest]


def test_teardown_refuses_while_used_and_then_leaves_nothing(
        agents, make_image, guest):
    image = make_image(8 * MIB)
    a, b = agents('a'), agents('b')
    ta = a.create_template(image, [image.export('10.99.1.1')])
    tb = b.create_template(image, [ta.export])
    snaps_b = [b.create_snapshot(tb), b.create_snapshot(tb)]
    snap_a = a.create_snapshot(ta)
    path = snaps_b[0].connection_info['data']['device_path']
    assert read_device(path, image.size) == image.sha256

    # A has a child (B's session) and a snapshot; B has snapshots.
    with pytest.raises(exception.TemplateInUse):
        a.backend.delete_template(ta, a.template_dir(image.image_id))
    with pytest.raises(exception.TemplateInUse):
        b.backend.delete_template(tb, b.template_dir(image.image_id))
    # A VM (here: an open file descriptor) uses the snapshot.
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(exception.SnapshotInUse):
            b.backend.delete_snapshot(tb, b.template_dir(image.image_id),
                                      snaps_b[0], b.snapshot_dir(
                                          snaps_b[0].instance_id))
    finally:
        os.close(fd)
    # Refusals changed nothing.
    assert read_device(path, image.size) == image.sha256

    for snap in snaps_b:
        b.delete_snapshot(tb, snap)
    b.delete_template(tb)
    # B's session to A is gone, so A may go once its snapshot is gone.
    with pytest.raises(exception.TemplateInUse):
        a.backend.delete_template(ta, a.template_dir(image.image_id))
    a.delete_snapshot(ta, snap_a)
    a.delete_template(ta)

    for agent in (a, b):
        assert leftovers(agent) == {'dm': [], 'loops': [], 'targets': []}
    portals = {'%s:3260' % address for host in guest.values()
               for address in host.addresses}
    assert [s for s in iscsi_sessions() if s[0] in portals] == []
    assert [line for line in sh('dmsetup', 'ls').splitlines()
            if line.startswith('th')] == []
    assert 'bcache' not in ' '.join(os.listdir('/sys/block'))
