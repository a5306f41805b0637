"""The [tls] credentials checks and the QEMU/libnbd settings made from
them, with certificates of a real certtool CA."""

import ipaddress
import os
import shutil

import nbd
import pytest

from thunder_agent import conf as conf_mod
from thunder_agent import exception
from thunder_agent import tls
from thunder_lab import pki

pytestmark = pytest.mark.skipif(shutil.which('certtool') is None,
                                reason='certtool is not installed')


@pytest.fixture(scope='module')
def ca(tmp_path_factory):
    return pki.CA.create(str(tmp_path_factory.mktemp('ca')))


@pytest.fixture
def creds_dir(ca, tmp_path):
    return ca.issue('hosta', str(tmp_path / 'pki'),
                    ips=('192.0.2.7', '2001:db8::7'))


def _conf(path, host='hosta', enabled=True):
    conf = conf_mod.cfg.ConfigOpts()
    conf_mod.register_opts(conf)
    conf([], project='thunder-agent', default_config_files=[])
    conf.set_override('host', host)
    conf.set_override('enabled', enabled, group='tls')
    conf.set_override('certificates_dir', path, group='tls')
    return conf


def test_the_node_and_its_addresses_are_read(creds_dir):
    creds = tls.Credentials.from_conf(_conf(creds_dir))
    assert creds.node == 'hosta'
    assert creds.path == creds_dir
    assert creds.ips == (ipaddress.ip_address('192.0.2.7'),
                         ipaddress.ip_address('2001:db8::7'))


def test_disabled_tls_has_no_credentials(tmp_path):
    assert tls.Credentials.from_conf(
        _conf(str(tmp_path / 'nowhere'), enabled=False)) is None


@pytest.mark.parametrize('name', tls.FILES)
def test_a_missing_file_is_named(creds_dir, name):
    os.unlink(os.path.join(creds_dir, name))
    with pytest.raises(tls.InvalidCredentials, match=name):
        tls.Credentials.from_conf(_conf(creds_dir))


@pytest.mark.parametrize('name', tls.KEYS)
@pytest.mark.parametrize('mode', [0o640, 0o604])
def test_a_key_others_can_read_is_refused_without_its_content(
        creds_dir, name, mode):
    path = os.path.join(creds_dir, name)
    os.chmod(path, mode)
    with open(path) as f:
        secret = f.read().splitlines()[1]
    with pytest.raises(tls.InvalidCredentials, match=name) as info:
        tls.Credentials.from_conf(_conf(creds_dir))
    assert '0600' in str(info.value)
    assert secret not in str(info.value)


def test_a_certificate_of_another_node_is_refused(creds_dir):
    with pytest.raises(tls.InvalidCredentials, match="'hostb'"):
        tls.Credentials.from_conf(_conf(creds_dir, host='hostb'))


def test_a_garbled_certificate_is_refused(creds_dir):
    with open(os.path.join(creds_dir, tls.SERVER_CERT), 'w') as f:
        f.write('not a certificate')
    with pytest.raises(tls.InvalidCredentials, match=tls.SERVER_CERT):
        tls.Credentials.from_dir(creds_dir)


def test_qemu_credentials_check_the_peer(creds_dir):
    creds = tls.Credentials.from_dir(creds_dir)
    assert creds.server_creds() == {
        'qom-type': 'tls-creds-x509', 'id': 'tls-server',
        'endpoint': 'server', 'dir': creds_dir, 'verify-peer': True}
    assert creds.client_creds('c')['endpoint'] == 'client'
    assert creds.client_creds('c')['verify-peer'] is True


def test_an_authz_list_admits_exactly_the_nodes():
    obj = tls.authz_list(['hostb', 'hosta', 'hostb', '10.0.0.3'])
    assert obj['policy'] == 'deny'
    assert obj['rules'] == [
        {'match': 'CN=10.0.0.3', 'policy': 'allow', 'format': 'exact'},
        {'match': 'CN=hosta', 'policy': 'allow', 'format': 'exact'},
        {'match': 'CN=hostb', 'policy': 'allow', 'format': 'exact'}]
    assert tls.authz_list([])['rules'] == []


@pytest.mark.parametrize('node', ['*', 'host*', 'a,CN=b', 'a b', '',
                                  'x' * 300, None, 7])
def test_a_node_id_that_would_widen_the_list_is_refused(node):
    with pytest.raises(exception.InvalidNodeId):
        tls.authz_list(['hosta', node])


@pytest.mark.parametrize('pattern', ['*', 'O=x', 'CN=a\n', 5])
def test_allow_globs_must_be_cn_globs(pattern):
    with pytest.raises(exception.InvalidInput):
        tls.authz_globs([pattern])
    assert tls.authz_globs(['CN=compute-*'])['rules'] == [
        {'match': 'CN=compute-*', 'policy': 'allow', 'format': 'glob'}]


def test_replacing_an_object_deletes_then_adds():
    obj = tls.authz_list(['hosta'])
    assert tls.replace_calls(obj) == [
        ('object-del', {'id': 'tls-authz'}), ('object-add', obj)]


def test_a_libnbd_handle_requires_tls(creds_dir):
    handle = tls.Credentials.from_dir(creds_dir).secure(nbd.NBD())
    assert handle.get_tls() == nbd.TLS_REQUIRE
    assert handle.get_tls_verify_peer() is True
