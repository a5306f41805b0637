"""Kernel backend behaviour that needs no kernel: refusals of bad input
(before anything is touched), names and export descriptions."""

import copy
import os

import pytest

from oslo_config import cfg

from thunder_agent import drivers
from thunder_agent.drivers.kernel import driver as kernel
from thunder_agent import conf as agent_conf
from thunder_agent import exception
from thunder_agent import state

IMAGE = '0f2b1a3c-5d4e-4f60-8a7b-9c8d7e6f5a4b'
SOURCE = {'driver_volume_type': 'iscsi',
          'data': {'target_portal': '10.99.2.1:3260',
                   'target_iqn': 'iqn.2010-10.org.openstack.thunder:a:img',
                   'target_lun': 1, 'auth_method': 'CHAP',
                   'auth_username': 'thunder-img',
                   'auth_password': 'Abcdefgh12345678'}}


@pytest.fixture
def conf(tmp_path):
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    conf.set_override('host', 'Compute-7.EXAMPLE')
    conf.set_override('state_path', str(tmp_path / 'state'), group='agent')
    conf.set_override('export_address', '192.0.2.7', group='kernel')
    return conf


def _template(sources):
    return state.Template(image_id=IMAGE, origin=SOURCE, size=32 << 20,
                          image_format='raw', backend='kernel',
                          sources=sources)


def test_entry_point_loads_the_kernel_backend(conf):
    backend = drivers.load('kernel', conf)
    assert isinstance(backend, kernel.KernelDriver)
    assert backend.name == 'kernel'


def test_export_description(conf):
    backend = kernel.KernelDriver(conf)
    export = backend._export(_template([SOURCE]), 'Secret1234567890')
    assert export == {
        'driver_volume_type': 'iscsi',
        'data': {'target_portal': '192.0.2.7:3260',
                 'target_iqn': 'iqn.2010-10.org.openstack.thunder:'
                               'compute-7.example:' + IMAGE,
                 'target_lun': 1, 'target_discovered': False,
                 'auth_method': 'CHAP', 'auth_username': 'thunder-' + IMAGE,
                 'auth_password': 'Secret1234567890', 'access_mode': 'ro'}}
    conf.set_override('export_address', '2001:db8::7', group='kernel')
    assert backend._portal() == '[2001:db8::7]:3260'


def test_start_needs_an_export_address(conf):
    conf.clear_override('export_address', group='kernel')
    with pytest.raises(exception.BackendError) as info:
        kernel.KernelDriver(conf).start()
    assert 'export_address' in str(info.value)


def _bad(**changes):
    source = copy.deepcopy(SOURCE)
    for key, value in changes.items():
        if value is None:
            del source['data'][key]
        else:
            source['data'][key] = value
    return source


@pytest.mark.parametrize('sources', [
    [_bad(auth_method=None)], [_bad(auth_password='short')],
    [SOURCE, {'driver_volume_type': 'nbd', 'data': {}}],
    [_bad(target_lun=-1)], ['iqn.x'],
])
def test_bad_sources_are_refused_before_anything_is_touched(conf, tmp_path,
                                                            sources):
    backend = kernel.KernelDriver(conf)
    tdir = tmp_path / 'template'
    tdir.mkdir()
    with pytest.raises(exception.InvalidSource):
        backend.create_template(_template(sources), str(tdir))
    assert os.listdir(tdir) == []


@pytest.mark.parametrize('sources', [[], [_bad(auth_method='None')],
                                     [SOURCE, _bad(target_iqn='')]])
def test_set_sources_refuses_bad_sources_before_anything(conf, tmp_path,
                                                         sources):
    backend = kernel.KernelDriver(conf)
    tdir = tmp_path / 'template'
    tdir.mkdir()
    with pytest.raises(exception.InvalidSource):
        backend.set_sources(_template([SOURCE]), str(tdir), sources)
    assert os.listdir(tdir) == []


def test_probe_refuses_non_raw_images_and_bad_origins(conf):
    backend = kernel.KernelDriver(conf)
    with pytest.raises(exception.OriginUnavailable):
        backend.probe_origin(SOURCE, 'qcow2')
    with pytest.raises(exception.InvalidSource):
        backend.probe_origin({'driver_volume_type': 'file',
                              'data': {'path': '/tmp/x'}}, 'raw')


def test_ensure_template_without_layout_is_a_clear_error(conf, tmp_path):
    with pytest.raises(exception.BackendError) as info:
        kernel.KernelDriver(conf).ensure_template(_template([SOURCE]),
                                                  str(tmp_path))
    assert 'no kernel layout' in str(info.value)


def test_leftover_teardown_accepts_the_managers_stub(conf, tmp_path,
                                                     monkeypatch):
    # The manager removes a half-created template with a stub record
    # (image id only); nothing of it exists any more.
    from thunder_agent import manager
    from thunder_agent.drivers.kernel import devmapper
    from thunder_agent.drivers.kernel import target
    calls = []
    monkeypatch.setattr(target.Tgt, 'sessions', lambda self, iqn: 0)
    monkeypatch.setattr(target.Tgt, 'unexport',
                        lambda self, iqn, user: calls.append(('tgt', iqn)))
    monkeypatch.setattr(devmapper, 'exists', lambda name: False)
    monkeypatch.setattr(devmapper, 'remove',
                        lambda name, timeout=30: calls.append(('dm', name)))
    kernel.KernelDriver(conf).delete_template(manager._Stub(IMAGE),
                                              str(tmp_path / 'gone'))
    assert [c[0] for c in calls] == ['tgt', 'dm', 'dm', 'dm']
    assert calls[1:] == [('dm', 'thunder-%s-%s' % (IMAGE, role))
                         for role in ('tpl', 'bk', 'src')]
