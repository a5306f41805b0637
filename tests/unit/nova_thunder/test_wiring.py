import functools
import subprocess
import sys
import textwrap

import pytest

from nova import version as nova_version
from nova.virt import block_device as nova_bd
from nova.virt.libvirt import driver as libvirt_driver

from nova_thunder import block_device
from nova_thunder import exception
from nova_thunder import wiring


@pytest.fixture(autouse=True)
def _unwired():
    wiring.restore()
    yield
    wiring.restore()


def snapshot():
    return (nova_bd.convert_volumes, nova_bd.convert_images,
            libvirt_driver.LibvirtDriver.cleanup,
            dict(libvirt_driver.VOLUME_DRIVERS))


def test_installed_nova_matches():
    assert wiring.check() == []
    assert nova_version.version_info.release_string().startswith('34.')


def test_apply_and_restore():
    before = snapshot()
    wiring.apply()
    assert wiring.is_applied()
    assert libvirt_driver.VOLUME_DRIVERS['thunder'] == wiring.VOLUME_DRIVER
    assert nova_bd.convert_volumes is block_device.convert_volumes
    assert nova_bd.convert_images is block_device.convert_images
    assert libvirt_driver.LibvirtDriver.cleanup.__nova_thunder_wrapped__
    # Idempotent: a second apply wraps nothing twice.
    wrapped = libvirt_driver.LibvirtDriver.cleanup
    wiring.apply()
    assert libvirt_driver.LibvirtDriver.cleanup is wrapped
    wiring.restore()
    assert snapshot() == before


def test_volume_driver_is_importable_the_way_nova_loads_it():
    from oslo_utils import importutils
    cls = importutils.import_class(wiring.VOLUME_DRIVER)
    assert cls.__name__ == 'LibvirtThunderVolumeDriver'


def _refused(monkeypatch_action, *words):
    before = snapshot()
    with pytest.raises(exception.NovaIncompatible) as e:
        wiring.apply()
    message = e.value.format_message()
    for word in words:
        assert word in message
    assert not wiring.is_applied()
    assert snapshot() == before
    return message


def test_changed_signature(monkeypatch):
    def detach(self, context, instance, volume_api, virt_driver,
               attachment_id=None, destroy_bdm=False, force=False):
        pass

    monkeypatch.setattr(nova_bd.DriverVolumeBlockDevice, 'detach', detach)
    message = _refused(None, 'nova.virt.block_device.'
                       'DriverVolumeBlockDevice.detach(', 'changed',
                       'force=False')
    assert message.startswith('nova-thunder cannot wire itself into Nova 34.')


def test_missing_internal(monkeypatch):
    monkeypatch.delattr(nova_bd, '_convert_block_devices')
    _refused(None, '_convert_block_devices is missing')


def test_converter_no_longer_a_partial(monkeypatch):
    monkeypatch.setattr(nova_bd, 'convert_images',
                        lambda bdms: [nova_bd.DriverVolImageBlockDevice(b)
                                      for b in bdms])
    _refused(None, 'convert_images is no longer _convert_block_devices '
             'bound to DriverVolImageBlockDevice')


def test_converter_bound_to_another_class(monkeypatch):
    monkeypatch.setattr(nova_bd, 'convert_volumes', functools.partial(
        nova_bd._convert_block_devices, nova_bd.DriverVolBlankBlockDevice))
    _refused(None, 'convert_volumes is no longer')


def test_callers_stopped_looking_names_up(monkeypatch):
    def convert_all_volumes(*volume_bdms):
        return []

    monkeypatch.setattr(nova_bd, 'convert_all_volumes', convert_all_volumes)
    _refused(None, 'convert_all_volumes no longer looks up convert_volumes')


def test_volume_driver_name_taken(monkeypatch):
    monkeypatch.setitem(libvirt_driver.VOLUME_DRIVERS, 'thunder',
                        'somebody.else.Driver')
    _refused(None, "VOLUME_DRIVERS['thunder'] is already "
             "'somebody.else.Driver'")


def test_untested_release(monkeypatch, flags):
    monkeypatch.setattr(wiring, '_nova_version', lambda: '35.1.0')
    _refused(None, 'Nova 35.1.0 is not a tested release (tested: 34.x)',
             'allow_untested_nova')
    assert wiring.check(allow_untested_nova=True) == []
    flags(allow_untested_nova=True)
    wiring.apply()
    assert wiring.is_applied()


def test_every_problem_is_reported(monkeypatch):
    monkeypatch.setattr(wiring, '_nova_version', lambda: '40.0.0')
    monkeypatch.delattr(libvirt_driver.LibvirtDriver, '_get_volume_driver')
    problems = wiring.check()
    assert len(problems) == 2
    assert 'LibvirtDriver._get_volume_driver is missing' in problems[1]


@pytest.mark.timeout(120)
def test_nova_compute_thunder_refuses_to_start(tmp_path):
    """The console script, in its own process, against a Nova whose
    internals were changed: exit status 2, a clear message, no start."""
    conf = tmp_path / 'nova.conf'
    conf.write_text('[DEFAULT]\ntransport_url = rabbit://nobody@127.0.0.1:1/'
                    '\n[thunder]\nallow_untested_nova = false\n')
    script = textwrap.dedent('''
        import sys
        from nova_thunder.cmd import compute
        from nova.virt import block_device
        def attach(self, context, instance, volume_api, virt_driver):
            pass
        block_device.DriverVolumeBlockDevice.attach = attach
        sys.argv = ['nova-compute-thunder', '--config-file', sys.argv[1]]
        sys.exit(compute.main())
    ''')
    proc = subprocess.run([sys.executable, '-W', 'ignore', '-c', script,
                           str(conf)], capture_output=True, text=True,
                          timeout=100)
    assert proc.returncode == 2, proc.stderr
    assert ('nova-compute-thunder: refusing to start: nova-thunder cannot '
            'wire itself into Nova 34.0.0: nova.virt.block_device.'
            'DriverVolumeBlockDevice.attach(self, context, instance, '
            'volume_api, virt_driver) changed') in proc.stderr
