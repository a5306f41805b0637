"""The TLS relay export of a relaying template, on real daemons and a
real certtool CA: only the template's children get in, the list follows
the tree over QMP, and a child reads the whole image right; end to end
through the driver, from a TLS origin over TCP to a parent and a child."""

import hashlib
import os
import shutil

import nbd
import pytest

from tests.functional.thunder_agent.drivers.qemu import test_driver as hosts_of
from thunder_agent.drivers.qemu import relay_export
from thunder_agent.drivers.qemu import storage_daemon
from thunder_agent import exception
from thunder_agent import origin as origin_mod
from thunder_agent import records
from thunder_agent import tls
from thunder_lab.emulation import reader
from thunder_lab import pki

pytestmark = [pytest.mark.functional,
              pytest.mark.skipif(shutil.which('certtool') is None,
                                 reason='certtool is not installed')]


@pytest.fixture(scope='module')
def creds(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('pki'))
    ca = pki.CA.create(os.path.join(root, 'ca'))
    rogue = pki.CA.create(os.path.join(root, 'rogue-ca'), 'rogue')
    out = {name: ca.issue(name, os.path.join(root, name),
                          ips=('127.0.0.1',))
           for name in ('relay-1', 'child-a', 'child-b', 'stranger',
                        'origin-1')}
    out['rogue'] = rogue.issue('child-a', os.path.join(root, 'rogue'))
    # A node of the deployment whose certificate names another address.
    out['elsewhere'] = ca.issue('elsewhere', os.path.join(root, 'elsewhere'),
                                ips=('192.0.2.99',))
    return out


@pytest.fixture
def exporter(workdir, image, creds, qemu_tools):
    """A template stand-in serving the image on <run>/<id>.nbd, and the
    relay export in front of it, for child-a."""
    run = os.path.join(workdir, 'run')
    template = origin_mod.OriginServer(
        image['path'], 'raw', image['id'],
        {'type': 'unix', 'path': os.path.join(run, image['id'] + '.nbd')},
        run, name='template').start()
    export = relay_export.RelayExport(image['id'], run, creds['relay-1'])
    export.start(['child-a'], max_connections=8, reconnect_delay=5,
                 open_timeout=5)
    yield export
    export.stop()
    template.stop()


def _connect(export, certificates=None):
    handle = nbd.NBD()
    if certificates is not None:
        tls.secure_handle(handle, certificates)
    handle.set_export_name(export.image_id)
    handle.connect_unix(export.socket)
    return handle


def _sha(handle):
    size, digest = handle.get_size(), hashlib.sha256()
    for offset in range(0, size, 4 << 20):
        digest.update(handle.pread(min(4 << 20, size - offset), offset))
    return digest.hexdigest()


def test_a_child_reads_the_whole_image(exporter, image, creds):
    handle = _connect(exporter, creds['child-a'])
    assert handle.get_size() == image['size']
    assert _sha(handle) == image['sha256']
    assert exporter.children() == ['child-a']
    assert exporter.is_healthy()


@pytest.mark.parametrize('who', [None, 'rogue', 'stranger', 'child-b'])
def test_others_are_refused(exporter, creds, who):
    """No TLS, a certificate of another CA naming a child, a node of the
    deployment that is not a child: no export for any."""
    with pytest.raises(nbd.Error):
        _connect(exporter, creds[who] if who else None)


def test_set_children_follows_the_tree(exporter, image, creds):
    kept = _connect(exporter, creds['child-a'])
    exporter.set_children(['child-b'])
    assert exporter.children() == ['child-b']
    assert _connect(exporter, creds['child-b']).get_size() == image['size']
    # Refused on its next connection; the one it holds is not cut.
    with pytest.raises(nbd.Error):
        _connect(exporter, creds['child-a'])
    assert len(kept.pread(4096, 0)) == 4096
    exporter.set_children([])
    with pytest.raises(nbd.Error):
        _connect(exporter, creds['child-b'])


def test_a_bad_child_id_changes_nothing(exporter, creds):
    with pytest.raises(exception.InvalidNodeId):
        exporter.set_children(['child-b', 'CN=*'])
    assert exporter.children() == ['child-a']


def test_the_exporter_outlives_its_owner_and_is_readopted(exporter,
                                                          image, creds):
    """A later agent (a new object over the same run path) finds the
    running exporter and keeps it; start gives it the new list."""
    pid = exporter.daemon.pid
    again = relay_export.RelayExport(
        exporter.image_id, os.path.dirname(exporter.socket),
        exporter.certificates_dir)
    assert again.is_running()
    again.start(['child-a', 'child-b'], max_connections=8,
                reconnect_delay=5, open_timeout=5)
    assert again.daemon.pid == pid
    assert again.children() == ['child-a', 'child-b']
    assert _sha(_connect(again, creds['child-b'])) == image['sha256']


@pytest.fixture
def tls_hosts(workdir, creds):
    """Driver hosts (see test_driver.Host) with [tls] on, each with the
    credentials of its node."""
    made = []

    def make(name, port_min):
        host = hosts_of.Host(workdir, name, port_min)
        host.conf.set_override('host', name)
        host.conf.set_override('enabled', True, group='tls')
        host.conf.set_override('certificates_dir', creds[name], group='tls')
        made.append(host)
        return host

    yield make
    for host in made:
        host.teardown()


def test_a_child_reads_a_tls_tree_end_to_end(workdir, image, creds,
                                             tls_hosts, qemu_tools):
    origin = origin_mod.OriginServer(
        image['path'], 'raw', image['id'],
        {'type': 'inet', 'host': '127.0.0.1', 'port': hosts_of.
         _free_port_range(1)},
        os.path.join(workdir, 'origin-run'),
        tls_dir=creds['origin-1']).start()
    try:
        port_min = hosts_of._free_port_range()
        a = tls_hosts('relay-1', port_min)
        b = tls_hosts('child-a', port_min)
        stranger = tls_hosts('stranger', port_min)
        endpoint = records.Endpoint.from_dict(origin.connection())
        # The parent reads the origin through its forwarder, with TLS.
        parent = a.template(image, endpoint, relay=True)
        relay = parent.export.relay
        source = b.driver.parent_source('relay-1', relay, image['id'])
        # Not a child yet: refused at the handshake.
        assert not b.driver.source_ready(source)
        a.driver.set_children(parent, a.tdir(parent), ['child-a'])
        assert b.driver.source_ready(source)
        assert not stranger.driver.source_ready(source)
        # Inspection and qemu-img's probe over TLS, of the parent and of
        # the origin (which admits any node of the deployment).
        assert b.driver.probe_source(source, 'raw').size == image['size']
        assert stranger.driver.probe_source(
            records.Source.origin(endpoint), 'raw').size == image['size']
        child = b.template(image, endpoint, sources=[source])
        snap = b.snapshot(child, 'i-1')
        with reader.open_snapshot(snap.connection_info) as handle:
            assert _sha(handle) == image['sha256']
        assert a.stats(parent).bytes_fetched == image['size']
        assert b.stats(child).bytes_fetched == image['size']
        # Taken out of the tree: its next connection is refused.
        a.driver.set_children(parent, a.tdir(parent), [])
        assert not b.driver.source_ready(source)
        b.driver.delete_snapshot(child, b.tdir(child), snap,
                                 b.sdir('i-1'))
    finally:
        origin.stop()


def test_a_server_whose_certificate_names_another_address_is_refused(
        workdir, image, creds, tls_hosts, qemu_tools):
    """QEMU and libnbd check the server's certificate against the address
    connected to: a certified node cannot stand in for another's."""
    origin = origin_mod.OriginServer(
        image['path'], 'raw', image['id'],
        {'type': 'inet', 'host': '127.0.0.1', 'port': hosts_of.
         _free_port_range(1)},
        os.path.join(workdir, 'origin-run'),
        tls_dir=creds['elsewhere']).start()
    try:
        b = tls_hosts('child-a', hosts_of._free_port_range())
        # QEMU's NBD client retries a failed handshake until open-timeout.
        b.conf.set_override('open_timeout', 1, group='qemu')
        endpoint = records.Endpoint.from_dict(origin.connection())
        with pytest.raises(exception.OriginUnavailable):
            b.driver.probe_source(records.Source.origin(endpoint), 'raw')
        with pytest.raises(exception.BackendError):
            b.template(image, endpoint)
        assert not storage_daemon.StorageDaemon(
            image['id'], b.conf.agent.run_path).is_running()
    finally:
        origin.stop()
