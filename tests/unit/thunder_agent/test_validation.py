import os
import uuid

import pytest

from thunder_agent import exception
from thunder_agent import validation


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


def test_file_origin_must_stay_in_allowed_dirs(tmp_path):
    allowed = tmp_path / 'images'
    allowed.mkdir()
    (allowed / 'a.raw').write_bytes(b'x')
    (tmp_path / 'secret').write_bytes(b'x')
    os.symlink(tmp_path / 'secret', allowed / 'link.raw')
    ok = validation.origin({'driver_volume_type': 'file',
                            'data': {'path': str(allowed / 'a.raw')}},
                           [str(allowed)])
    assert ok['data']['path'] == str(allowed / 'a.raw')
    for path in (str(allowed / '..' / 'secret'), str(allowed / 'link.raw'),
                 '/etc/shadow'):
        with pytest.raises(exception.PathNotAllowed):
            validation.origin({'driver_volume_type': 'file',
                               'data': {'path': path}}, [str(allowed)])
    with pytest.raises(exception.PathNotAllowed):
        validation.origin({'driver_volume_type': 'file',
                           'data': {'path': str(allowed / 'a.raw')}}, [])


@pytest.mark.parametrize('data', [
    {'host': '127.0.0.1', 'port': 0},
    {'host': '127.0.0.1', 'port': '10809'},
    {'host': '', 'port': 10809},
    {'host': 'a b', 'port': 10809},
    {'host': 'h/../x', 'port': 10809},
    {'socket': 'relative.sock'},
    {'socket': '/' + 'x' * 200},
    {'host': 'h', 'port': 10809, 'export': 5},
])
def test_bad_nbd_origins(data):
    with pytest.raises(exception.InvalidOrigin):
        validation.origin({'driver_volume_type': 'nbd', 'data': data})


def test_iscsi_origin_needs_target():
    with pytest.raises(exception.InvalidOrigin):
        validation.origin({'driver_volume_type': 'iscsi',
                           'data': {'target_portal': '10.0.0.1:3260'}})
    ok = validation.origin({'driver_volume_type': 'iscsi', 'data': {
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
