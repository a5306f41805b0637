"""Relay addresses as the coordinator takes them from heartbeats and joins:
what it hands to children must be a plain literal or host name."""

import pytest

from thunder_agent.coordinator import validation
from thunder_agent import exception


def _address(host):
    return {'host': host, 'port': 10810, 'export': 'e'}


@pytest.mark.parametrize('host', [
    'fe80::1%eth0',                      # scope id: local to the sender
    'fe80::1%eth0:x',                    # ':' is socat's separator
    'fe80::1%eth0!!SYSTEM:touch /tmp/x',
    '::ffff:10.0.0.1',                   # IPv4-mapped: a second spelling
    '0.0.0.0', '::', '224.0.0.1',
    '10.0.0.1 ', '-oProxyCommand', 'a..b', '1.2.3', '',
])
def test_hostile_hosts_are_refused(host):
    with pytest.raises(exception.InvalidAddress):
        validation.address(_address(host))


@pytest.mark.parametrize('host, normalised', [
    ('2001:DB8:0:0::1', '2001:db8::1'),
    ('10.0.0.1', '10.0.0.1'),
    ('compute-1.example.org', 'compute-1.example.org'),
])
def test_good_hosts_are_normalised(host, normalised):
    assert validation.address(_address(host)) == _address(normalised)
