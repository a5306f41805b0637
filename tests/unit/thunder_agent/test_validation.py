import ipaddress
import os
import pathlib
import shutil
import socket
import tempfile
import traceback
import uuid

from oslo_config import cfg
import pytest

from thunder_agent import conf as agent_conf
from thunder_agent import exception
from thunder_agent import validation

IMAGE = str(uuid.uuid4())


def test_ids_must_be_canonical_uuids():
    value = str(uuid.uuid4())
    assert validation.image_id(value) == value
    for bad in (None, 5, '', 'x', value.upper(), '{%s}' % value,
                value.replace('-', ''), '../' + value, value + '/..'):
        with pytest.raises(exception.InvalidImageId):
            validation.image_id(bad)
        with pytest.raises(exception.InvalidInstanceId):
            validation.instance_id(bad)


@pytest.mark.parametrize('bad', [0, -1, 511, 1.5, True, '1024', None])
def test_bad_sizes(bad):
    with pytest.raises(exception.InvalidSize):
        validation.size(bad)


def test_formats():
    assert validation.image_format('qcow2') == 'qcow2'
    with pytest.raises(exception.UnsupportedFormat) as e:
        validation.image_format('vmdk')
    assert 'raw, qcow2' in str(e.value)


# -- origins: the allow-lists ----------------------------------------------

def _file(path):
    return {'driver_volume_type': 'file', 'data': {'path': str(path)}}


def _nbd(**data):
    data.setdefault('export', IMAGE)
    return {'driver_volume_type': 'nbd', 'data': data}


def _private_dir(path):
    path.mkdir()
    path.chmod(0o755)
    return path


@pytest.fixture
def store(tmp_path):
    """A Glance-like file store: one image file named by its id, another
    image's file, and a private file outside."""
    store = _private_dir(tmp_path / 'images')
    (store / IMAGE).write_bytes(b'image')
    (store / 'other-tenant.raw').write_bytes(b'theirs')
    (tmp_path / 'shadow').write_bytes(b'secret')
    return store


@pytest.fixture
def short_tmp():
    # Unix socket paths are limited to 107 bytes: not below pytest's.
    path = tempfile.mkdtemp(prefix='tv-', dir='/tmp')
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sockets(short_tmp):
    """An origin socket directory with a listening socket in it, and the
    agent's run_path with a template's socket."""
    tmp_path = short_tmp
    made = []

    def listen(path):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.listen(1)
        made.append(s)
        return path

    origins = _private_dir(tmp_path / 'origins')
    run = _private_dir(tmp_path / 'run')
    listen(origins / 'origin.sock')
    listen(run / (IMAGE + '.nbd'))
    yield origins, run
    for s in made:
        s.close()


@pytest.fixture
def policy(store, sockets):
    origins, run = sockets
    return validation.OriginPolicy(
        file_dirs=(str(store),), socket_dirs=(str(origins),),
        networks=(ipaddress.ip_network('10.1.0.0/16'),
                  ipaddress.ip_network('fd00:1::/64')),
        ports=(10809, 10812), run_path=str(run))


def refused(value, policy, image=IMAGE):
    with pytest.raises(exception.OriginNotAllowed) as e:
        validation.origin(value, image, policy)
    # The message names the image and nothing else.
    assert str(e.value) == ('Origin of image %s is not allowed on this '
                            'host.' % image)
    assert e.value.kwargs == {'image_id': image}
    return e.value.detail


def test_file_origin_is_exactly_dir_slash_image_id(store, policy):
    ok = validation.origin(_file(store / IMAGE), IMAGE, policy)
    assert ok == _file(store / IMAGE)
    # A trailing slash in the option changes nothing.
    slash = validation.OriginPolicy(file_dirs=(str(store) + '/',))
    assert validation.origin(_file(store / IMAGE), IMAGE, slash) == ok


@pytest.mark.parametrize('path, words', [
    # Another image's file in the same store.
    ('{store}/other-tenant.raw', 'is not <dir>/'),
    ('{store}/../shadow', 'is not <dir>/'),
    ('{store}/./{image}', 'is not <dir>/'),
    ('{store}//{image}', 'is not <dir>/'),
    ('{store}/sub/{image}', 'is not <dir>/'),
    ('/etc/shadow', 'is not <dir>/'),
    ('{store}', 'is not <dir>/'),
])
def test_file_origins_elsewhere_are_refused(store, policy, path, words):
    path = path.format(store=store, image=IMAGE)
    detail = refused(_file(path), policy)
    assert words in detail and path in detail


def test_file_origin_of_another_image_id_is_refused(store, policy):
    other = str(uuid.uuid4())
    # The file of IMAGE is not the origin of another image.
    assert 'is not <dir>/' in refused(_file(store / IMAGE), policy, other)


def test_symlinked_file_origins_are_refused(tmp_path, store, policy):
    for target in (tmp_path / 'shadow', store / 'other-tenant.raw',
                   store / IMAGE):
        link = store / IMAGE
        if link.exists():
            link.unlink()
        os.symlink(target, link)
        assert 'is a symlink' in refused(_file(link), policy)


def test_file_origins_that_are_no_regular_files_are_refused(store, policy):
    (store / IMAGE).unlink()
    os.mkfifo(store / IMAGE)
    assert 'not a regular file' in refused(_file(store / IMAGE), policy)
    (store / IMAGE).unlink()
    (store / IMAGE).mkdir()
    assert 'not a regular file' in refused(_file(store / IMAGE), policy)


def test_world_writable_file_dir_is_refused(store, policy):
    store.chmod(0o1777)
    assert 'writable by every user' in refused(_file(store / IMAGE), policy)


def test_missing_file_origin_cannot_be_read(store, policy):
    (store / IMAGE).unlink()
    with pytest.raises(exception.OriginUnreadable) as e:
        validation.origin(_file(store / IMAGE), IMAGE, policy)
    assert str(e.value) == ('Origin of image %s cannot be read on this '
                            'host.' % IMAGE)
    assert str(store) in e.value.detail
    # Still an OriginUnavailable for callers that know that one.
    assert isinstance(e.value, exception.OriginUnavailable)


def test_no_file_dirs_no_file_origins(store):
    detail = refused(_file(store / IMAGE), validation.OriginPolicy())
    assert 'file_origin_dirs is empty' in detail


def test_socket_origin_directly_in_an_origin_socket_dir(sockets, policy):
    origins, _ = sockets
    value = _nbd(socket=str(origins / 'origin.sock'))
    assert validation.origin(value, IMAGE, policy) == value


def test_sockets_in_the_agents_run_path_are_refused(short_tmp, sockets,
                                                    policy):
    origins, run = sockets
    template = str(run / (IMAGE + '.nbd'))
    # Listed by mistake, run_path still never serves as an origin.
    listed = validation.OriginPolicy(socket_dirs=(str(run), str(origins)),
                                     run_path=str(run))
    assert 'run_path' in refused(_nbd(socket=template), listed)
    # Nor a directory below it, nor one reaching it through a symlink.
    (run / 'sub').mkdir()
    os.symlink(run, short_tmp / 'alias')
    for directory in (run / 'sub', short_tmp / 'alias'):
        sneaky = validation.OriginPolicy(socket_dirs=(str(directory),),
                                         run_path=str(run))
        path = str(directory / (IMAGE + '.nbd'))
        assert 'run_path' in refused(_nbd(socket=path), sneaky)
    assert 'not directly in' in refused(_nbd(socket=template), policy)


@pytest.mark.parametrize('path, words', [
    ('{origins}/../run/{image}.nbd', 'not a normalised path'),
    ('{origins}/./origin.sock', 'not a normalised path'),
    ('{origins}/sub/origin.sock', 'not directly in'),
    ('/run/other-tenant/template.sock', 'not directly in'),
])
def test_socket_origins_elsewhere_are_refused(sockets, policy, path, words):
    origins, _ = sockets
    path = path.format(origins=origins, image=IMAGE)
    assert words in refused(_nbd(socket=path), policy)


def test_symlinked_or_non_socket_origins_are_refused(sockets, policy):
    origins, run = sockets
    os.symlink(run / (IMAGE + '.nbd'), origins / 'link.sock')
    assert 'is a symlink' in refused(
        _nbd(socket=str(origins / 'link.sock')), policy)
    (origins / 'file.sock').write_bytes(b'')
    assert 'not a socket' in refused(
        _nbd(socket=str(origins / 'file.sock')), policy)


def test_missing_socket_cannot_be_read(sockets, policy):
    origins, _ = sockets
    with pytest.raises(exception.OriginUnreadable):
        validation.origin(_nbd(socket=str(origins / 'gone.sock')), IMAGE,
                          policy)


def test_world_writable_socket_dir_is_refused(sockets, policy):
    origins, _ = sockets
    origins.chmod(0o777)
    assert 'writable by every user' in refused(
        _nbd(socket=str(origins / 'origin.sock')), policy)


@pytest.mark.parametrize('host, normalised', [
    ('10.1.2.3', '10.1.2.3'),
    ('fd00:1::5', 'fd00:1::5'),
    ('FD00:0001:0000:0000:0000:0000:0000:0005', 'fd00:1::5'),
])
def test_tcp_origin_inside_the_networks_and_ports(policy, host, normalised):
    ok = validation.origin(_nbd(host=host, port=10810), IMAGE, policy)
    assert ok == _nbd(host=normalised, port=10810)


@pytest.mark.parametrize('host, port, words', [
    # The management network, the host itself, another storage host.
    ('10.2.0.1', 10809, 'outside [agent] nbd_origin_networks'),
    ('127.0.0.1', 10809, 'outside [agent] nbd_origin_networks'),
    ('fd00:2::1', 10809, 'outside [agent] nbd_origin_networks'),
    ('::1', 10809, 'outside [agent] nbd_origin_networks'),
    # A port scan of an allowed host.
    ('10.1.2.3', 22, 'outside [agent] nbd_origin_ports'),
    ('10.1.2.3', 10813, 'outside [agent] nbd_origin_ports'),
    # Names are not resolved (the check and the connection would resolve
    # apart), nor are numbers that only look like addresses.
    ('origin.example.org', 10809, 'not an IP address'),
    ('localhost', 10809, 'not an IP address'),
    ('10.1.2.3.nip.io', 10809, 'not an IP address'),
    ('0x0a010203', 10809, 'not an IP address'),
    ('010.001.002.003', 10809, 'not an IP address'),
    ('167838211', 10809, 'not an IP address'),
    ('[fd00:1::5]', 10809, 'not an IP address'),
    # Disguises of addresses inside the networks.
    ('fd00:1::5%eth0', 10809, 'scope id'),
    ('::ffff:10.1.2.3', 10809, 'IPv4-mapped'),
])
def test_tcp_origins_outside_are_refused(policy, host, port, words):
    assert words in refused(_nbd(host=host, port=port), policy)


def test_unspecified_and_multicast_hosts_are_refused():
    anything = validation.OriginPolicy(
        networks=(ipaddress.ip_network('0.0.0.0/0'),
                  ipaddress.ip_network('::/0')), ports=(1, 65535))
    for host in ('0.0.0.0', '::', '224.0.0.1', 'ff02::1'):
        assert 'unspecified or multicast' in refused(
            _nbd(host=host, port=10809), anything)
    assert validation.origin(_nbd(host='192.0.2.7', port=10809), IMAGE,
                             anything)


def test_no_networks_no_tcp_origins():
    detail = refused(_nbd(host='10.1.2.3', port=10809),
                     validation.OriginPolicy())
    assert 'nbd_origin_networks is empty' in detail


def test_iscsi_origins_have_no_allow_list(policy):
    ok = validation.origin({'driver_volume_type': 'iscsi', 'data': {
        'target_portal': '10.9.0.1:3260',
        'target_iqn': 'iqn.2010-10.org.openstack:volume-1'}}, IMAGE, policy)
    assert ok['data']['target_lun'] == 0


def test_refusals_keep_nothing_of_the_detail_in_the_traceback(store,
                                                              policy):
    # oslo.messaging sends the formatted traceback with the error: a
    # chained exception (the OSError of a missing file) would carry it.
    (store / IMAGE).unlink()
    for secret, error in ((str(store / IMAGE), exception.OriginUnreadable),
                          ('/etc/' + 'shadow', exception.OriginNotAllowed)):
        with pytest.raises(error) as e:
            validation.origin(_file(secret), IMAGE, policy)
        text = ''.join(traceback.format_exception(e.type, e.value, e.tb))
        assert str(store) not in text and 'shadow' not in text
        assert 'No such file' not in text
        assert 'During handling' not in text


def test_policy_from_the_agent_options(tmp_path):
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    default = validation.OriginPolicy.from_conf(conf)
    assert default == validation.OriginPolicy(
        run_path='/run/thunder-agent')
    conf.set_override('file_origin_dirs', ['/srv/images/', 'relative'],
                      group='agent')
    conf.set_override('origin_socket_dirs', ['/run/thunder-origin'],
                      group='agent')
    conf.set_override('nbd_origin_networks', ['10.1.0.0/16', 'fd00:1::/64'],
                      group='agent')
    conf.set_override('nbd_origin_ports', '10809-10812', group='agent')
    policy = validation.OriginPolicy.from_conf(conf)
    assert policy.file_dirs == ('/srv/images',)
    assert policy.socket_dirs == ('/run/thunder-origin',)
    assert policy.networks == (ipaddress.ip_network('10.1.0.0/16'),
                               ipaddress.ip_network('fd00:1::/64'))
    assert policy.ports == (10809, 10812)
    # A network with host bits set is a typo, not a network.
    with pytest.raises(ValueError):
        conf.set_override('nbd_origin_networks', ['10.1.0.5/16'],
                          group='agent')


# -- origins: their form ------------------------------------------------------

@pytest.mark.parametrize('data', [
    {'host': '127.0.0.1', 'port': 0},
    {'host': '127.0.0.1', 'port': '10809'},
    {'host': '', 'port': 10809},
    {'host': 'a b', 'port': 10809},
    {'host': 'h/../x', 'port': 10809},
    {'host': 'h\0', 'port': 10809},
    {'socket': 'relative.sock'},
    {'socket': '/' + 'x' * 200},
    {'socket': '/a\0b'},
    {'host': 'h', 'port': 10809, 'export': 5},
    {'host': 'h', 'port': 10809, 'export': 'e' * 4097},
    {'host': 'h', 'port': 10809, 'export': 'a\0b'},
])
def test_bad_nbd_origins(data, policy):
    value = {'driver_volume_type': 'nbd', 'data': data}
    for check in (validation.origin_shape,
                  lambda v: validation.origin(v, IMAGE, policy)):
        with pytest.raises(exception.InvalidOrigin):
            check(value)


@pytest.mark.parametrize('value', [
    None, 'nbd://h/x', {'driver_volume_type': 'ftp', 'data': {}},
    {'driver_volume_type': 'file', 'data': None},
    {'driver_volume_type': 'file', 'data': {'path': 'relative.raw'}},
    {'driver_volume_type': 'file', 'data': {'path': ''}},
])
def test_malformed_origins(value, policy):
    with pytest.raises(exception.InvalidOrigin) as e:
        validation.origin(value, IMAGE, policy)
    assert not isinstance(e.value, exception.OriginNotAllowed)


def test_shape_alone_opens_nothing():
    # The coordinator's check: any absolute path, any host name.
    assert validation.origin_shape(_file('/nowhere/x.raw')) == _file(
        '/nowhere/x.raw')
    assert validation.origin_shape(_nbd(host='origin', port=1))['data'][
        'host'] == 'origin'


def test_origin_needs_a_valid_image_id(store, policy):
    with pytest.raises(exception.InvalidImageId):
        validation.origin(_file(store / IMAGE), '../' + IMAGE, policy)


def test_iscsi_origin_needs_target():
    with pytest.raises(exception.InvalidOrigin):
        validation.origin_shape({'driver_volume_type': 'iscsi',
                                 'data': {'target_portal': '10.0.0.1:3260'}})
    ok = validation.origin_shape({'driver_volume_type': 'iscsi', 'data': {
        'target_portal': '10.0.0.1:3260',
        'target_iqn': 'iqn.2010-10.org.openstack:volume-1'}})
    assert ok['data']['target_lun'] == 0


def test_exception_messages_fill_templates():
    e = exception.CacheFull(used=10, limit=5)
    assert str(e) == ('Cache is full (10 of 5 bytes used) and no idle '
                      'template can be evicted.')
    # Rebuilt from message and kwargs, as oslo.messaging does remotely.
    again = exception.CacheFull(str(e), **e.kwargs)
    assert str(again) == str(e) and again.kwargs == e.kwargs


def test_describe_origin_masks_every_secret():
    origin = {'driver_volume_type': 'iscsi', 'data': {
        'target_portal': '192.0.2.1:3260', 'target_iqn': 'iqn.x:y',
        'auth_method': 'CHAP', 'auth_username': 'u',
        'auth_password': 'chap-secret-1',
        'discovery_auth_password': 'chap-secret-2',
        'encryption_key_id': 'key-3',
        'extra': {'secret': 'nested-secret-4'}}}
    described = validation.describe_origin(origin)
    text = repr(described)
    for secret in ('chap-secret-1', 'chap-secret-2', 'key-3',
                   'nested-secret-4'):
        assert secret not in text
    assert described['data']['target_iqn'] == 'iqn.x:y'
    assert described['data']['auth_username'] == 'u'
