"""Relay rate limiting on a host's interface, through the privsep daemon."""

import json
import os
import shutil
import sys
import textwrap

import pytest

from thunder_lab.emulation import cluster as cluster_mod

pytestmark = pytest.mark.functional

MBIT = 1000 * 1000
RELAY_PORT = 10809
OTHER_PORT = 5201

# Runs inside a host namespace, as the agent would: the privsep daemon it
# starts inherits the namespace.
TOOL = textwrap.dedent('''
    import json, os, sys
    from oslo_config import cfg
    from thunder_agent import exception, privileged, ratelimit
    cfg.CONF([], project='thunder-agent', default_config_files=[])
    # As root there is no sudo/rootwrap in the way: run the helper itself.
    cfg.CONF.set_override(
        'helper_command',
        os.path.join(os.path.dirname(sys.executable), 'privsep-helper'),
        group='thunder_agent_privileged')
    op, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        if op == 'limit':
            ratelimit.limit(*args)
        elif op == 'clear':
            ratelimit.clear(*args)
        print(json.dumps({'status': ratelimit.status('eth0')}))
    except exception.ThunderException as e:
        print(json.dumps({'error': type(e).__name__,
                          'status': ratelimit.status('eth0')}))
''')


@pytest.fixture(scope='module')
def cluster():
    if os.geteuid() != 0:
        pytest.skip('the emulated cluster needs root')
    for tool in ('ip', 'socat'):
        if shutil.which(tool) is None:
            pytest.skip('%s is not installed: run tools/bootstrap.sh' % tool)
    with cluster_mod.Cluster(hosts=2) as c:
        yield c


def tool(host, op, *args):
    out = host.run([sys.executable, '-c', TOOL, op, json.dumps(args)],
                   capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_only_relay_traffic_is_capped(cluster):
    h1, h2 = cluster.hosts
    rate = 24 * MBIT
    assert tool(h1, 'status') == {'status': None}
    assert tool(h1, 'limit', 'eth0', rate, [RELAY_PORT]) == {
        'status': {'rate_bps': rate, 'sent_bytes': 0}}

    size = 6 * 1000 * 1000
    relay = cluster.transfer(h1, h2, size, port=RELAY_PORT)
    other = cluster.transfer(h1, h2, size, port=OTHER_PORT)
    # Traffic to h1's relay port (h1 receiving) is not capped either.
    inbound = cluster.transfer(h2, h1, size, port=RELAY_PORT)
    print('\nrelay capped at %d Mbit/s: relay %.1f Mbit/s, other port '
          '%.0f Mbit/s, inbound %.0f Mbit/s' % (
              rate / MBIT, relay['bps'] / MBIT, other['bps'] / MBIT,
              inbound['bps'] / MBIT))
    assert 0.75 * rate <= relay['bps'] <= 1.05 * rate
    assert other['bps'] > 3 * rate
    assert inbound['bps'] > 3 * rate
    status = tool(h1, 'status')['status']
    assert status['rate_bps'] == rate
    # Every relay byte went through the class, nothing else did.
    assert size <= status['sent_bytes'] <= 1.1 * size

    assert tool(h1, 'clear', 'eth0') == {'status': None}
    after = cluster.transfer(h1, h2, size, port=RELAY_PORT)
    assert after['bps'] > 3 * rate


def test_bad_requests_change_nothing(cluster):
    h1 = cluster.hosts[0]
    tool(h1, 'limit', 'eth0', 8 * MBIT, [RELAY_PORT])
    try:
        # More argument checks in tests/unit/test_ratelimit.py.
        result = tool(h1, 'limit', 'eth0', 0, [RELAY_PORT])
        assert result['error'] == 'InvalidInput'
        assert result['status']['rate_bps'] == 8 * MBIT
        # The interface check happens in the daemon.
        result = tool(h1, 'limit', 'eth9', 8 * MBIT, [RELAY_PORT])
        assert result['error'] == 'InvalidInput'
        assert result['status']['rate_bps'] == 8 * MBIT
    finally:
        assert tool(h1, 'clear', 'eth0') == {'status': None}
