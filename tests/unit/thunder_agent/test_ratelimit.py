"""Argument checks of the relay rate limiter (no root, no tc)."""

import pytest

from thunder_agent import exception
from thunder_agent.privileged import network as priv_network
from thunder_agent import ratelimit


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(priv_network, 'set_relay_rate_limit',
                        lambda *a: seen.append(('set',) + a))
    monkeypatch.setattr(priv_network, 'clear_relay_rate_limit',
                        lambda *a: seen.append(('clear',) + a))
    return seen


def test_good_request_reaches_the_daemon_normalised(calls):
    ratelimit.limit('eth0', 80 * 1000 * 1000, [10810, 10809, 10810])
    ratelimit.clear('eth0')
    assert calls == [('set', 'eth0', 10 * 1000 * 1000, [10809, 10810]),
                     ('clear', 'eth0')]


@pytest.mark.parametrize('interface,rate,ports', [
    ('', 8000, [1]),
    ('eth0 ', 8000, [1]),
    ('../eth0', 8000, [1]),
    ('a' * 16, 8000, [1]),
    (None, 8000, [1]),
    ('eth0', 7999, [1]),
    ('eth0', 8 * 2 ** 32, [1]),
    ('eth0', True, [1]),
    ('eth0', 8000.5, [1]),
    ('eth0', 8000, []),
    ('eth0', 8000, '10809'),
    ('eth0', 8000, [0]),
    ('eth0', 8000, [65536]),
    ('eth0', 8000, [True]),
    ('eth0', 8000, list(range(1, 100))),
])
def test_bad_requests_never_reach_the_daemon(calls, interface, rate, ports):
    with pytest.raises(exception.InvalidInput):
        ratelimit.limit(interface, rate, ports)
    assert calls == []


def test_daemon_errors_are_typed(monkeypatch):
    def missing(*args):
        raise ValueError('no interface eth7')
    monkeypatch.setattr(priv_network, 'clear_relay_rate_limit', missing)
    with pytest.raises(exception.InvalidInput) as info:
        ratelimit.clear('eth7')
    assert 'eth7' in str(info.value)
