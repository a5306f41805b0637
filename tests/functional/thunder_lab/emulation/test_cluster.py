"""The emulated cluster: namespaces, shaped links, counters, teardown."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from thunder_lab.emulation import cluster as cluster_mod
from thunder_lab.emulation import coordinator as coordinator_mod

pytestmark = pytest.mark.functional

MBIT = 1000 * 1000


@pytest.fixture(autouse=True)
def needs_root():
    if os.geteuid() != 0:
        pytest.skip('the emulated cluster needs root')
    for tool in ('ip', 'socat'):
        if shutil.which(tool) is None:
            pytest.skip('%s is not installed: run tools/bootstrap.sh' % tool)


def netns_names():
    out = subprocess.run(['ip', 'netns', 'list'], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links():
    out = subprocess.run(['ip', '-o', 'link', 'show'], capture_output=True,
                         text=True, check=True).stdout
    return {line.split(':')[1].strip().split('@')[0]
            for line in out.splitlines()}


def pids_in_netns(names):
    inodes = set()
    for name in names:
        try:
            inodes.add(os.stat('/run/netns/' + name).st_ino)
        except FileNotFoundError:
            pass
    return cluster_mod._pids_in(inodes) if inodes else []


def wait_in_netns(names, pids, timeout=10):
    """The pids of *names* once all of *pids* are among them: a process
    started with "ip netns exec" enters its namespace a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        inside = pids_in_netns(names)
        if set(pids) <= set(inside) or time.monotonic() > deadline:
            return inside
        time.sleep(0.05)


def alive(pid):
    return cluster_mod._start_time(pid) is not None and not (
        cluster_mod._is_zombie(pid))


def test_shaped_transfer_and_byte_counters():
    width = 40 * MBIT
    with cluster_mod.Cluster(hosts=3, bandwidth_bps=width) as cluster:
        assert [h.name for h in cluster.all_hosts] == [
            'origin', 'h1', 'h2', 'h3']
        assert {h.netns for h in cluster.all_hosts} <= netns_names()
        assert cluster.origin.address == '198.18.0.1'
        assert cluster.hosts[2].address == '198.18.0.4'
        h1, h2, h3 = cluster.hosts
        out = h2.run(['ip', '-o', '-4', 'addr', 'show', 'dev', 'eth0'],
                     capture_output=True, text=True).stdout
        assert '198.18.0.3/15' in out

        size = 8 * 1000 * 1000
        before = cluster.counters()
        result = cluster.transfer(h1, h2, size)
        delta = {name: c - before[name]
                 for name, c in cluster.counters().items()}
        print('\nshaped at %.1f Mbit/s: %d bytes in %.2f s = %.1f Mbit/s; '
              'h1 sent %d bytes on its link, h2 received %d'
              % (width / MBIT, result['bytes'], result['seconds'],
                 result['bps'] / MBIT, delta['h1'].tx_bytes,
                 delta['h2'].rx_bytes))
        assert result['bytes'] == size
        assert 0.80 * width <= result['bps'] <= 1.03 * width
        # Payload plus TCP/IP headers (a few percent), nothing else.
        assert size <= delta['h1'].tx_bytes <= 1.06 * size
        assert abs(delta['h2'].rx_bytes - delta['h1'].tx_bytes) <= (
            0.01 * size)
        # Acknowledgements only in the other direction.
        assert delta['h2'].tx_bytes < 0.05 * size
        for idle in ('h3', 'origin'):
            assert delta[idle].tx_bytes < 10000
            assert delta[idle].rx_bytes < 10000

        # Per-host, per-direction rates: h3 uploads at 16 Mbit/s.
        h3.set_bandwidth(uplink_bps=16 * MBIT, downlink_bps=width)
        result = cluster.transfer(h3, h1, 4 * 1000 * 1000)
        print('uplink shaped at 16 Mbit/s: %.1f Mbit/s'
              % (result['bps'] / MBIT))
        assert 0.80 * 16 * MBIT <= result['bps'] <= 1.03 * 16 * MBIT


def test_unshaped_links_and_cut():
    with cluster_mod.Cluster(hosts=2) as cluster:
        h1, h2 = cluster.hosts
        result = cluster.transfer(h1, h2, 50 * 1000 * 1000)
        print('\nunshaped: %.0f Mbit/s' % (result['bps'] / MBIT))
        assert result['bps'] > 200 * MBIT
        connect = [sys.executable, '-c', textwrap.dedent('''
            import socket, sys
            try:
                socket.create_connection((sys.argv[1], 9), timeout=2)
            except ConnectionRefusedError:
                print('reachable')      # a RST came back
            except OSError as e:
                print('unreachable')
        '''), h1.address]
        assert h2.run(connect, capture_output=True,
                      text=True).stdout.strip() == 'reachable'
        h1.cut()
        assert h2.run(connect, capture_output=True,
                      text=True).stdout.strip() == 'unreachable'
        h1.heal()
        assert h2.run(connect, capture_output=True,
                      text=True).stdout.strip() == 'reachable'


def test_teardown_leaves_nothing():
    links_before = root_links()
    cluster = cluster_mod.Cluster(hosts=3, bandwidth_bps=100 * MBIT,
                                  expose_ports=[_free_root_port()])
    cluster.start()
    names = {h.netns for h in cluster.all_hosts} | {cluster.switch_netns}
    assert names <= netns_names()
    sleeper = cluster.hosts[0].popen(['sleep', '600'])
    # A process the cluster did not start, as an agent's daemon would be.
    orphan = subprocess.Popen(cluster.hosts[1].exec_prefix + ['sleep', '600'],
                              start_new_session=True)
    relays = [p.pid for p in cluster._relays]
    inside = wait_in_netns(names, [sleeper.pid, orphan.pid])
    assert sleeper.pid in inside and orphan.pid in inside
    assert len(inside) >= 2 + 4      # the sleeps and a socat per host
    state_dir = cluster.state_dir
    assert os.path.exists(os.path.join(
        state_dir, 'port-%d.sock' % cluster.expose_ports[0]))

    cluster.stop()
    orphan.wait(10)
    assert not names & netns_names()
    assert root_links() == links_before
    assert not any(alive(pid) for pid in relays + [sleeper.pid, orphan.pid])
    assert not os.path.exists(state_dir)
    cluster.stop()   # idempotent


def test_cleanup_stale_after_a_crash():
    prefix = 'thcrash-'
    port = _free_root_port()
    script = textwrap.dedent('''
        import sys, time
        from thunder_lab.emulation import cluster
        c = cluster.Cluster(hosts=2, bandwidth_bps=50_000_000,
                            expose_ports=[%d], prefix=%r).start()
        c.hosts[0].popen(['sleep', '600'])
        print(c.id, ' '.join(str(p.pid) for p in c._relays), flush=True)
        time.sleep(600)
    ''' % (port, prefix))
    owner = subprocess.Popen([sys.executable, '-c', script],
                             stdout=subprocess.PIPE, text=True)
    line = owner.stdout.readline().split()
    crashed_id, relay_pids = line[0], [int(p) for p in line[1:]]
    # A live cluster with the same prefix must survive the cleanup.
    with cluster_mod.Cluster(hosts=1, prefix=prefix) as live:
        crashed = {n for n in netns_names() if n.startswith(crashed_id)}
        assert len(crashed) == 4
        inside = pids_in_netns(crashed)
        assert inside and all(map(alive, relay_pids))

        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        owner.stdout.close()
        # The crash left everything behind.
        assert crashed <= netns_names()
        assert all(map(alive, inside))

        assert cluster_mod.cleanup_stale(prefix) == [crashed_id]
        assert not crashed & netns_names()
        assert not any(map(alive, inside + relay_pids))
        assert not os.path.exists(os.path.join(cluster_mod.STATE_ROOT,
                                               crashed_id))
        assert live.switch_netns in netns_names()
        assert cluster_mod.cleanup_stale(prefix) == []
    assert not any(n.startswith(prefix) for n in netns_names())


def test_agent_side_rpc_reaches_the_broker_through_loopback(rabbit, workdir):
    """A process inside a host talks to RabbitMQ and the coordinator at
    127.0.0.1, and none of it crosses the shaped links."""
    topic = 'coordinator-%s' % uuid.uuid4().hex[:8]
    coordinator = coordinator_mod.CoordinatorProcess(
        rabbit.transport_url, os.path.join(workdir, 'coordinator'),
        topic=topic)
    image = str(uuid.uuid4())
    client = textwrap.dedent('''
        import json, sys
        from thunder_lab.emulation import coordinator
        c = coordinator.CoordinatorProcess(sys.argv[1], sys.argv[2],
                                           topic=sys.argv[3])
        print(json.dumps(c.client.join(
            sys.argv[4], 'h1', {'host': '198.18.0.2', 'port': 10809,
                                'export': sys.argv[4]},
            {'driver_volume_type': 'nbd', 'data': {
                'host': '198.18.0.1', 'port': 10809,
                'export': sys.argv[4]}})))
    ''')
    with coordinator, cluster_mod.Cluster(
            hosts=1, bandwidth_bps=10 * MBIT,
            expose_ports=[rabbit.port]) as cluster:
        h1 = cluster.hosts[0]
        before = cluster.counters()['h1']
        out = h1.run([sys.executable, '-c', client, rabbit.transport_url,
                      os.path.join(workdir, 'client'), topic, image],
                     capture_output=True, text=True, timeout=120)
        assert '"depth": 1' in out.stdout, out.stderr[-2000:]
        used = cluster.counters()['h1'] - before
        assert used.tx_bytes < 2000 and used.rx_bytes < 2000
        assert sorted(coordinator.client.get_tree(image)['nodes']) == ['h1']


def _free_root_port():
    from thunder_lab.emulation import netutil
    return netutil.free_port()


def test_bad_arguments():
    with pytest.raises(ValueError):
        cluster_mod.Cluster(hosts=0)
    with pytest.raises(ValueError):
        cluster_mod.Cluster(hosts=2, bandwidth_bps=-5)
    with pytest.raises(ValueError):
        cluster_mod.Cluster(hosts=2, host_bandwidth={'h9': 10 * MBIT})
    with pytest.raises(ValueError):
        cluster_mod.Cluster(prefix='Bad Prefix')


def test_concurrent_clusters_do_not_collide():
    with cluster_mod.Cluster(hosts=1) as a, cluster_mod.Cluster(
            hosts=1) as b:
        assert a.id != b.id
        assert a.hosts[0].address == b.hosts[0].address
        result = a.transfer(a.origin, a.hosts[0], 1000 * 1000)
        assert result['bytes'] == 1000 * 1000
        assert b.counters()['h1'].rx_bytes < 2000
    # Nothing left of either.
    assert not any(n.startswith((a.id, b.id)) for n in netns_names())
