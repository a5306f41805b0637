import pytest

from tests.unit.nova_thunder import nova_env

CONF = nova_env.load()


@pytest.fixture
def flags():
    """Set nova.conf options for one test: flags(name=value, group=...)."""
    overridden = []

    def set_flags(group='thunder', **kwargs):
        for name, value in kwargs.items():
            CONF.set_override(name, value, group=group)
            overridden.append((name, group))

    yield set_flags
    for name, group in overridden:
        CONF.clear_override(name, group=group)


@pytest.fixture
def wired():
    """nova-thunder wired into the real, installed Nova for one test."""
    from nova_thunder import wiring
    wiring.apply()
    yield
    wiring.restore()


@pytest.fixture(autouse=True)
def _fresh_volume_type_cache():
    from nova_thunder import marking
    marking._volume_types.forget()
    yield
    marking._volume_types.forget()
