"""Relay trees on an emulated cluster: hosts as network namespaces with
shaped links, one thunder-agent per host, a real coordinator and RabbitMQ.
"""

import os
import shutil
import time

import pytest

from thunder_lab.emulation import images

pytestmark = [pytest.mark.functional]

MIB = 1 << 20


@pytest.fixture
def relay_image(workdir):
    if os.geteuid() != 0 or not shutil.which('socat'):
        pytest.skip('needs root (network namespaces) and socat')
    path = images.make_image(os.path.join(workdir, 'relay.raw'), 32 * MIB)
    return path, images.sha256_file(path)


def _cluster(rabbit, image, **kwargs):
    from thunder_lab.emulation import thunder_cluster
    return thunder_cluster.ThunderCluster(image=image, rabbit=rabbit,
                                          **kwargs)


def _storm(tc, hosts, conns):
    procs = {h: tc.start_reader(h, conns[h]) for h in hosts}
    return {h: tc.finish_reader(p) for h, p in procs.items()}


def _link_bytes(before, after):
    return {name: (after[name].tx_bytes - before[name].tx_bytes,
                   after[name].rx_bytes - before[name].rx_bytes)
            for name in after}


def test_six_hosts_fan_out_two_each_block_crosses_each_link_once(
        rabbit, relay_image):
    image, digest = relay_image
    size = os.path.getsize(image)
    with _cluster(rabbit, image, hosts=6, bandwidth_mbit=200,
                  fan_out=2) as tc:
        hosts = sorted(tc.agents)
        conns = {h: tc.prepare(h) for h in hosts}
        tree = tc.tree()
        assert tree['height'] == 3, tree
        assert len(tree['origin_children']) == 1
        before = tc.cluster.counters()
        results = _storm(tc, hosts, conns)
        links = _link_bytes(before, tc.cluster.counters())
        for host, result in results.items():
            assert result['error'] is None, (host, result)
            assert result['sha256'] == digest, host
        origin_sent = links['origin'][0]
        print('\norigin sent %d bytes for a %d-byte image'
              % (origin_sent, size))
        for host in hosts:
            parent = tree['nodes'][host]['parents'][0]
            print('link %s -> %s: %d bytes' % (parent, host,
                                               links[host][1]))
        # The origin sent the image once, not once per host...
        assert size <= origin_sent <= 1.05 * size
        # ...and every host received it once from its parent.
        for host in hosts:
            assert links[host][1] <= 1.05 * size, (host, links[host])
        for host in hosts:
            status = tc.agents[host].client.get_status()['templates'][0]
            # A quarter of the image is zeros. The first level caches them
            # as zero clusters; below it a parent reports them as holes,
            # which cost no data on the wire and are not copied.
            assert 0.75 * size <= status['bytes_fetched'] <= size, host
            assert status['healthy']
        cluster_id, workdir = tc.cluster.id, tc.workdir
    _assert_nothing_left(cluster_id, workdir)


def _assert_nothing_left(cluster_id, workdir):
    import subprocess
    netns = subprocess.run(['ip', 'netns', 'list'], capture_output=True,
                           text=True).stdout
    assert cluster_id not in netns
    procs = subprocess.run(['ps', '-eo', 'args'], capture_output=True,
                           text=True).stdout
    assert workdir not in procs and cluster_id not in procs
    assert not os.path.exists(workdir)


def _wait_for(predicate, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def test_killed_middle_relay_is_repaired_without_read_errors(
        rabbit, relay_image):
    image, digest = relay_image
    # A chain origin -> h1 -> h2 -> h3 -> h4, on links slow enough that
    # the reads are in flight when h2's data plane dies.
    with _cluster(rabbit, image, hosts=4, bandwidth_mbit=40,
                  fan_out=1) as tc:
        hosts = sorted(tc.agents)
        conns = {h: tc.prepare(h) for h in hosts}
        tree = tc.tree()
        assert [tree['nodes'][h]['parents'] for h in hosts] == [
            ['@origin'], ['h1'], ['h2'], ['h3']]
        procs = {h: tc.start_reader(h, conns[h]) for h in hosts}
        time.sleep(2)
        victim, = tc.agents['h2'].template_daemon_pids()
        os.kill(victim, 9)
        killed = time.monotonic()
        restored = _wait_for(
            lambda: tc.agents['h2'].template_daemon_pids() not in (
                [], [victim]),
            60)
        assert restored, tc.agents['h2'].log_tail()
        print('\nh2 data plane back after %.1fs'
              % (time.monotonic() - killed))
        results = {h: tc.finish_reader(p) for h, p in procs.items()}
        done = time.monotonic()
        for host, result in results.items():
            assert result['error'] is None, (host, result)
            assert result['sha256'] == digest, host
        print('all readers done %.1fs after the kill; read times %s'
              % (done - killed, {h: round(r['seconds'], 1)
                                 for h, r in results.items()}))


def test_cut_parent_host_children_are_reparented(rabbit, relay_image):
    image, digest = relay_image
    with _cluster(rabbit, image, hosts=4, bandwidth_mbit=40,
                  fan_out=1) as tc:
        hosts = sorted(tc.agents)
        conns = {h: tc.prepare(h) for h in hosts}
        # h3 and h4 read while h2, their upstream, is cut off the network.
        procs = {h: tc.start_reader(h, conns[h]) for h in ('h3', 'h4')}
        time.sleep(2)
        tc.cluster.host('h2').cut()
        cut = time.monotonic()
        moved = _wait_for(
            lambda: tc.tree()['nodes']['h3']['parents'] != ['h2'], 60, 0.5)
        assert moved, tc.agents['h3'].log_tail()
        repair = time.monotonic() - cut
        results = {h: tc.finish_reader(p) for h, p in procs.items()}
        for host, result in results.items():
            assert result['error'] is None, (host, result)
            assert result['sha256'] == digest, host
        tree = tc.tree()
        print('\nh3 re-parented to %s %.1fs after the cut; readers done '
              '%.1fs after it' % (tree['nodes']['h3']['parents'], repair,
                                  time.monotonic() - cut))
        assert 'h2' not in tree['nodes']['h3']['parents']
        tc.cluster.host('h2').heal()


def test_parent_that_does_not_serve_costs_a_bounded_wait(rabbit,
                                                         relay_image):
    """A parent whose daemon hangs (SIGSTOP: connections are accepted, no
    NBD handshake) must not hold the child's prepare: after [relay]
    parent_ready_timeout the child reads from the origin, and the parent
    is reported to the coordinator."""
    import signal
    image, digest = relay_image
    with _cluster(rabbit, image, hosts=2, fan_out=1, agent_options={
            'relay': {'parent_ready_timeout': 3}}) as tc:
        tc.prepare('h1')
        victim, = tc.agents['h1'].template_daemon_pids()
        os.kill(victim, signal.SIGSTOP)
        try:
            started = time.monotonic()
            conn = tc.prepare('h2')
            took = time.monotonic() - started
            status, = tc.agents['h2'].client.get_status()['templates']
            result = tc.finish_reader(tc.start_reader('h2', conn))
            tree = _wait_for(lambda: (lambda t: t if 'h1' not in t['nodes']
                                      or t['nodes']['h1']['quarantined']
                                      else None)(tc.tree()), 30, 0.5)
        finally:
            os.kill(victim, signal.SIGCONT)
        print('\nprepare under a hung parent answered in %.1f s '
              '(parent_ready_timeout 3 s); h2 reads from %s'
              % (took, status['source']))
        assert status['source'] == '@origin'
        assert result['error'] is None and result['sha256'] == digest
        assert tree, 'the hung parent was never reported'


def test_coordinator_restart_during_reads(rabbit, relay_image):
    image, digest = relay_image
    with _cluster(rabbit, image, hosts=6, bandwidth_mbit=80,
                  fan_out=2) as tc:
        hosts = sorted(tc.agents)
        conns = {h: tc.prepare(h) for h in hosts}
        parents = {h: v['parents'] for h, v in tc.tree()['nodes'].items()}
        procs = {h: tc.start_reader(h, conns[h]) for h in hosts}
        time.sleep(1)
        tc.coordinator.kill()
        tc.coordinator.start()
        restarted = time.monotonic()
        results = {h: tc.finish_reader(p) for h, p in procs.items()}
        for host, result in results.items():
            assert result['error'] is None, (host, result)
            assert result['sha256'] == digest, host
        # Soft state: the tree comes back from heartbeats, unchanged.
        rebuilt = _wait_for(
            lambda: {h: v['parents'] for h, v in
                     tc.tree()['nodes'].items()} == parents
            if _has_tree(tc) else False, 30, 0.5)
        if not rebuilt:
            # Reads above stayed correct; what is open is the shape.
            pytest.xfail('known defect: with TLS exporters and signed calls '
                         'a child can be re-parented while a restarted '
                         'coordinator rebuilds the tree (%r, %r)' % (
                             parents, _has_tree(tc) and tc.tree()))
        print('\ntree rebuilt %.1fs after the coordinator restart'
              % (time.monotonic() - restarted))


def _has_tree(tc):
    try:
        return len(tc.tree()['nodes']) == len(tc.agents)
    except Exception:
        return False


def test_relay_rate_limit_caps_what_a_parent_sends(rabbit, relay_image):
    import sys
    image, digest = relay_image
    size = os.path.getsize(image)
    cap_mbit = 40
    options = {'relay': {'rate_limit_mbit': cap_mbit, 'interface': 'eth0'},
               # As root there is no sudo or rootwrap in the way.
               'thunder_agent_privileged': {'helper_command': os.path.join(
                   os.path.dirname(sys.executable), 'privsep-helper')}}
    with _cluster(rabbit, image, hosts=2, bandwidth_mbit=None, fan_out=1,
                  agent_options=options) as tc:
        conns = {h: tc.prepare(h) for h in ('h1', 'h2')}
        # h1 fills from the origin (which has no cap), then h2 reads from
        # h1 through h1's capped relay port.
        assert tc.finish_reader(tc.start_reader('h1', conns['h1']))[
            'sha256'] == digest
        before = tc.cluster.counters()
        result = tc.finish_reader(tc.start_reader('h2', conns['h2']))
        links = _link_bytes(before, tc.cluster.counters())
        assert result['error'] is None and result['sha256'] == digest
        rate = links['h2'][1] * 8 / result['seconds'] / 1e6
        print('\nh1 -> h2 relay: %d bytes in %.1fs = %.1f Mbit/s (cap %d)'
              % (links['h2'][1], result['seconds'], rate, cap_mbit))
        assert links['h2'][1] >= 0.7 * size
        assert rate <= cap_mbit * 1.1
