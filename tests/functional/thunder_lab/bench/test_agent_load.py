"""thunder-bench-agent in a bounded form against the agent of this tree.

Real everything: a private RabbitMQ, a qemu-storage-daemon origin with one
export per image id, one thunder-agent process with the qemu driver and
relay enabled towards a coordinator topic nobody serves. N = 10 distinct
images and 10 VMs of one shared image, 16 MiB. The figures are printed;
what is asserted is behaviour: every call answered, one template (and one
daemon) per image, the shared image's template with all its snapshots,
the bytes of a snapshot of each scenario equal to the image's, and nothing
left behind.
"""

import os
import shutil

import pytest

from thunder_lab.bench import agent_load
from thunder_lab.emulation import rabbitmq

pytestmark = [pytest.mark.functional, pytest.mark.bench]

N = 10


def _skip(reason):
    print('skipped: %s' % reason)
    pytest.skip(reason)


@pytest.fixture
def tools():
    if not os.path.exists(rabbitmq.SERVER):
        _skip('RabbitMQ is not installed (%s; Debian rabbitmq-server)'
              % rabbitmq.SERVER)
    for tool, package in (('qemu-storage-daemon', 'qemu-system-common'),
                          ('qemu-img', 'qemu-utils'),
                          ('qemu-nbd', 'qemu-utils'), ('socat', 'socat')):
        if not shutil.which(tool):
            _skip('%s is not installed (Debian %s)' % (tool, package))


def test_concurrent_prepares_bounded(tools):
    bench = agent_load.Bench(images=N, image_mib=16, say=print)
    try:
        result = bench.run()
    except rabbitmq.RabbitMQUnavailable as e:
        _skip('RabbitMQ cannot run here: %s' % e)
    print(agent_load.format_table(result))

    scenarios = result['scenarios']
    assert list(scenarios) == ['alone', 'distinct', 'shared']
    for name, figures in scenarios.items():
        assert figures['errors'] == 0, (name, figures['error_kinds'])
        assert figures['problems'] == [], name
        assert figures['checks']['data_ok'] is True, name
        assert figures['orphans'] == 0, name
    assert scenarios['alone']['calls'] == 1
    assert scenarios['alone']['checks'] == {
        'templates': 1, 'snapshots': 1, 'daemons': 1, 'data_ok': True}
    assert scenarios['distinct']['calls'] == N
    assert scenarios['distinct']['checks'] == {
        'templates': N, 'snapshots': N, 'daemons': N, 'data_ok': True}
    # N prepares of one image: exactly one template built, N snapshots.
    assert scenarios['shared']['calls'] == N
    assert scenarios['shared']['checks'] == {
        'templates': 1, 'snapshots': N, 'daemons': 1, 'data_ok': True}
    assert result['coordinator_wait']['option'] == 'relay.join_timeout'
    # The agent told the first scenario's join went unanswered.
    assert scenarios['distinct']['coordinator_down_before'] is True

    # Nothing left: agent, its daemons and forwarders, origin, broker.
    workdir = bench.last_workdir
    assert not os.path.exists(workdir)
    assert agent_load.processes_under(workdir) == []
    port, epmd_port = bench.last_broker
    assert agent_load.private_epmd(epmd_port,
                                   'thunder%d@localhost' % port) == []
