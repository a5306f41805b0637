import pytest

from oslo_config import cfg

from thunder_agent import conf as agent_conf
from thunder_agent import exception
from thunder_agent.drivers.kernel import cache

MIB = 1024 * 1024
IMAGE = '0f2b1a3c-5d4e-4f60-8a7b-9c8d7e6f5a4b'


@pytest.fixture
def conf():
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    return conf


@pytest.mark.parametrize('text,value', [
    ('31.0M', 31 * MIB), ('0.5k', 512), ('316.0k', 316 * 1024),
    ('1.2G', int(1.2 * 1024 ** 3)), ('0', 0), ('17\n', 17)])
def test_parse_bcache_size(text, value):
    assert cache.parse_bcache_size(text) == value


def test_parse_bcache_size_refuses_garbage():
    with pytest.raises(exception.BackendError):
        cache.parse_bcache_size('lots')


def test_cache_file_size_has_a_floor_and_rounds_to_blocks():
    assert cache.cache_file_size(32 * MIB, 1024, 2.0, 65536) == 1024 * MIB
    assert cache.cache_file_size(1000 * MIB + 1, 16, 2.0, 65536) == \
        2000 * MIB + 65536


def test_make_picks_the_configured_cache(conf, tmp_path):
    made = cache.make('bcache', 'thunder', IMAGE, str(tmp_path), 32 * MIB,
                      conf)
    assert isinstance(made, cache.Bcache)
    assert made.backing_name == 'thunder-%s-bk' % IMAGE
    assert made.file_size == 1024 * MIB
    assert made.block_size == 65536
    conf.set_override('dm_cache_mode', 'passthrough', group='kernel')
    made = cache.make('dm-cache', 'thunder', IMAGE, str(tmp_path), 32 * MIB,
                      conf)
    assert isinstance(made, cache.DmCache)
    assert (made.name, made.mode) == ('thunder-%s-dmc' % IMAGE,
                                      'passthrough')


def test_make_refuses_bad_settings(conf, tmp_path):
    with pytest.raises(exception.InvalidInput):
        cache.make('flashcache', 'thunder', IMAGE, str(tmp_path), MIB, conf)
    conf.set_override('cache_block_size', 3 * 65536, group='kernel')
    with pytest.raises(exception.InvalidInput):
        cache.make('bcache', 'thunder', IMAGE, str(tmp_path), MIB, conf)


def test_default_cache_is_bcache(conf):
    assert conf.kernel.cache_type == 'bcache'
    with pytest.raises(ValueError):
        conf.set_override('cache_type', 'flashcache', group='kernel')
