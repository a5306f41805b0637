import copy

import pytest

from thunder_agent import exception
from thunder_agent import records
from thunder_agent.drivers.kernel import chap
from thunder_agent.drivers.kernel import iscsi

DATA = {'target_portal': '10.99.2.1:3260',
        'target_iqn': 'iqn.2010-10.org.openstack.thunder:a:img',
        'target_lun': 1, 'auth_method': 'CHAP',
        'auth_username': 'thunder-img',
        'auth_password': 'Abcdefgh12345678',
        'target_discovered': False, 'access_mode': 'ro'}
SOURCE = records.Endpoint('iscsi', DATA)


def test_check_source_returns_os_brick_properties():
    assert iscsi.check_source(SOURCE) == {
        'target_portal': '10.99.2.1:3260',
        'target_iqn': 'iqn.2010-10.org.openstack.thunder:a:img',
        'target_lun': 1, 'auth_method': 'CHAP',
        'auth_username': 'thunder-img', 'auth_password': 'Abcdefgh12345678',
        'target_discovered': False}


def test_a_relay_parent_endpoint_takes_the_secret_given():
    data = dict(DATA)
    del data['auth_password']
    endpoint = records.Endpoint('iscsi', data)
    props = iscsi.check_source(endpoint, 'Derived123456789')
    assert props['auth_password'] == 'Derived123456789'
    # Without one it is refused, and it never needs one to log out.
    with pytest.raises(exception.InvalidSource):
        iscsi.check_source(endpoint)
    assert iscsi.logout_properties(endpoint) == {
        'target_portal': '10.99.2.1:3260', 'target_iqn': data['target_iqn'],
        'target_lun': 1, 'target_discovered': False}


def _with(path, value):
    if path == 'driver_volume_type':
        return records.Endpoint(value, copy.deepcopy(DATA))
    data = copy.deepcopy(DATA)
    if value is KeyError:
        del data[path]
    else:
        data[path] = value
    return records.Endpoint('iscsi', data)


@pytest.mark.parametrize('source', [
    None, [], {'driver_volume_type': 'iscsi', 'data': DATA},
    records.Endpoint('iscsi', None),
    _with('driver_volume_type', 'nbd'),
    _with('target_portal', ''), _with('target_portal', '10.0.0.1 :3260'),
    _with('target_portal', '10.0.0.1'), _with('target_portal', '-x:3260'),
    _with('target_portal', '[zz::1]:3260'),
    _with('target_portal', '10.0.0.1:99999'),
    _with('target_iqn', KeyError), _with('target_lun', -1),
    _with('target_lun', True), _with('target_lun', '1'),
    # CHAP on every login.
    _with('auth_method', KeyError), _with('auth_method', 'None'),
    _with('auth_username', ''), _with('auth_username', 'a b'),
    _with('auth_password', 'short'), _with('auth_password', 'x' * 300),
    _with('auth_password', 'with space 123'), _with('auth_password', None),
])
def test_check_source_refuses(source):
    with pytest.raises(exception.InvalidSource) as info:
        iscsi.check_source(source, secret='Derived123456789')
    # Secrets never appear in errors.
    assert 'Abcdefgh12345678' not in str(info.value)
    assert 'Derived123456789' not in str(info.value)


def test_same_source_compares_the_lun_only():
    other_secret = _with('auth_password', 'Zyxwvuts98765432')
    assert iscsi.same_source(SOURCE, other_secret)
    assert not iscsi.same_source(SOURCE, _with('target_lun', 2))
    assert not iscsi.same_source(SOURCE,
                                 _with('target_portal', '10.99.1.2:3260'))


def test_portals_split_with_and_without_brackets():
    assert iscsi.split_portal('10.99.2.1:3260') == ('10.99.2.1', 3260)
    assert iscsi.split_portal('[2001:db8::7]:3261') == ('2001:db8::7', 3261)


def test_new_secrets_are_plain_and_distinct():
    secrets = {chap.new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert len(secret) == chap.SECRET_LENGTH and secret.isalnum()
    assert chap.username('img') == 'thunder-img'
