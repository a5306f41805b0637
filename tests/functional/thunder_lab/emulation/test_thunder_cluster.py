"""The cluster's origin: the real thunder-origin command inside the origin
host's network namespace."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.conftest import sha256_file
from tests.functional.thunder_agent.drivers.qemu.test_storage_daemon import (
    tcp_sockets_of)
from thunder_lab.emulation import cluster as cluster_mod
from thunder_lab.emulation import thunder_cluster

pytestmark = pytest.mark.functional


@pytest.fixture(autouse=True)
def needs_root():
    if os.geteuid() != 0:
        pytest.skip('the emulated cluster needs root')
    for tool in ('ip', 'nbdcopy'):
        if shutil.which(tool) is None:
            pytest.skip('%s is not installed: run tools/bootstrap.sh' % tool)


def test_origin_serves_inside_its_namespace(workdir, image, qemu_tools):
    run_path = os.path.join(workdir, 'origin')
    with cluster_mod.Cluster(hosts=1) as cluster:
        host = cluster.origin
        origin = thunder_cluster.OriginProcess(
            host, image['path'], 'raw', image['id'], 10809, run_path)
        with origin:
            assert origin.connection() == {
                'driver_volume_type': 'nbd',
                'data': {'host': host.address, 'port': 10809,
                         'export': image['id']}}
            pid = origin.daemon.pid
            assert pid is not None
            # The daemon and its listener live in the origin's namespace.
            assert os.stat('/proc/%d/ns/net' % pid).st_ino == os.stat(
                '/run/netns/' + host.netns).st_ino
            listener, = tcp_sockets_of(pid)
            try:
                assert listener.getsockname() == (host.address, 10809)
                assert listener.getsockopt(socket.IPPROTO_TCP,
                                           socket.TCP_NODELAY)
            finally:
                listener.close()

            before = origin.bytes_read()
            copy = os.path.join(workdir, 'copy.raw')
            h1 = cluster.hosts[0]
            h1.run(['nbdcopy', 'nbd://%s:10809/%s' % (host.address,
                                                      image['id']), copy],
                   capture_output=True)
            assert sha256_file(copy) == image['sha256']
            read = origin.bytes_read() - before
            # Every byte once, plus a little protocol.
            assert image['size'] <= read <= 1.01 * image['size']
        # SIGTERM: the command stopped its daemon and exited cleanly.
        assert origin.proc.returncode == 0
        assert origin.daemon.pid is None
        assert not os.path.exists(origin.daemon.qmp_path)


def test_origin_that_cannot_listen_reports_why(workdir, image, qemu_tools):
    with cluster_mod.Cluster(hosts=1) as cluster:
        # An address the origin host does not have.
        host = _Elsewhere(cluster.origin, '192.0.2.1')
        origin = thunder_cluster.OriginProcess(
            host, image['path'], 'raw', image['id'], 10809,
            os.path.join(workdir, 'origin'))
        with pytest.raises(RuntimeError, match='cannot listen on 192.0.2.1'):
            origin.start()
        assert origin.proc.returncode == 2
        assert origin.daemon.pid is None


class _Elsewhere:
    """*host*'s namespace with another address."""

    def __init__(self, host, address):
        self._host = host
        self.address = address

    def popen(self, argv, **kwargs):
        return self._host.popen(argv, **kwargs)


def test_thunder_origin_command_needs_a_tcp_or_unix_listen(image):
    proc = subprocess.run(
        [sys.executable, '-m', 'thunder_agent.cmd.origin', '--image',
         image['path'], '--export', 'x', '--listen', 'udp:1'],
        capture_output=True, text=True)
    assert proc.returncode == 2
    assert 'expected unix:PATH or tcp:HOST:PORT' in proc.stderr
