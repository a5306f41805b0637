"""The cache's clean-shutdown marker and its verification, with fakes for
qemu-img and the daemon. The "cache" is a plain file whose bytes the fake
map points into, as qemu-img map points into a qcow2 file."""

import hashlib
import json
import os
import subprocess

import pytest

from oslo_config import cfg

from thunder_agent import conf as agent_conf
from thunder_agent.drivers.qemu import driver as qemu_driver
from thunder_agent.drivers.qemu import recovery
from thunder_agent import exception
from thunder_agent import manifest as manifest_mod
from thunder_agent import records

IMAGE = '5b2e7c1a-9d3f-4e6a-8b1c-2f4a6d8e0c13'
CLUSTER = 65536
SIZE = 8 * CLUSTER


def _image():
    return b''.join(hashlib.sha256(b'%d' % n).digest() * (CLUSTER // 32)
                    for n in range(SIZE // CLUSTER))


class FakeQemuImg:
    """check/info/map answer what the test set; convert and create make
    their target file."""

    def __init__(self, extents=(), check_rc=0, size=SIZE):
        self.extents = list(extents)
        self.check_rc = check_rc
        self.size = size
        self.runs = []

    def __call__(self, args, timeout=None, pass_fds=()):
        if args and args[0] == 'qemu-img':
            args = args[1:]
        self.runs.append(list(args))
        verb, out, rc = args[0], '', 0
        if verb == 'check':
            rc = self.check_rc
            out = json.dumps({'leaks-fixed': 1})
        elif verb == 'info':
            out = json.dumps({'cluster-size': CLUSTER,
                              'virtual-size': self.size})
        elif verb == 'map':
            out = json.dumps(self.extents)
        elif verb in ('convert', 'create'):
            target = args[-1] if verb == 'convert' else args[-2]
            with open(target, 'wb') as f:
                f.write(b'converted')
        return subprocess.CompletedProcess(args, rc, out, 'fake error')

    def verbs(self):
        return [run[0] for run in self.runs]


@pytest.fixture
def tdir(tmp_path):
    path = tmp_path / 'template'
    path.mkdir()
    return str(path)


def _cache(tdir, data):
    path = os.path.join(tdir, qemu_driver.CACHE_FILE)
    with open(path, 'wb') as f:
        f.write(data)
    return path


def _manifest(tdir, image, block_size=CLUSTER):
    manifest_mod.build(lambda o, n: image[o:o + n], len(image),
                       block_size=block_size).write(
        os.path.join(tdir, qemu_driver.MANIFEST_FILE))


def _data(start, length, offset):
    return {'start': start, 'length': length, 'depth': 0, 'present': True,
            'zero': False, 'data': True, 'offset': offset}


# -- the marker -----------------------------------------------------------
def test_marker_life_cycle(tdir):
    cache = _cache(tdir, b'qcow2')
    assert not recovery.is_clean(tdir, cache)
    recovery.write_marker(tdir, cache)
    assert recovery.is_clean(tdir, cache)
    assert sorted(os.listdir(tdir)) == [qemu_driver.CACHE_FILE,
                                        recovery.MARKER_FILE]
    # A cache written after the marker is not the one it vouches for.
    with open(cache, 'ab') as f:
        f.write(b'more')
    assert not recovery.is_clean(tdir, cache)
    recovery.write_marker(tdir, cache)
    recovery.clear_marker(tdir)
    assert not os.path.exists(recovery.marker_path(tdir))
    recovery.clear_marker(tdir)     # absent: nothing to do
    with open(recovery.marker_path(tdir), 'w') as f:
        f.write('not json')
    assert not recovery.is_clean(tdir, cache)


@pytest.mark.parametrize('running,exists,clean,manifest,action', [
    (True, True, False, False, recovery.NOTHING),
    (False, False, False, False, recovery.NOTHING),
    (False, True, True, False, recovery.NOTHING),
    (False, True, False, True, recovery.VERIFY),
    (False, True, False, False, recovery.DISCARD),
])
def test_decision(running, exists, clean, manifest, action):
    assert recovery.decide(running, exists, clean, manifest) == action


class FakeDaemon:
    def __init__(self, quits=True, running=True):
        self.quits = quits
        self.running = running
        self.calls = []

    def is_running(self):
        return self.running

    def command(self, name, **args):
        self.calls.append(name)
        if name == 'quit' and self.quits:
            self.running = False

    def stop(self):
        self.calls.append('stop')
        self.running = False


def _flush_fails():
    raise exception.BackendError(reason='flush of template x failed')


@pytest.mark.parametrize('daemon,flush,marked,calls', [
    (FakeDaemon(), lambda: None, True, ['quit', 'stop']),
    (FakeDaemon(), _flush_fails, False, ['stop']),
    (FakeDaemon(quits=False), lambda: None, False, ['quit', 'stop']),
    (FakeDaemon(running=False), lambda: None, False, ['stop']),
])
def test_only_a_flushed_daemon_that_quits_marks_its_cache(
        tdir, daemon, flush, marked, calls):
    cache = _cache(tdir, b'qcow2')
    clock = iter(range(100)).__next__
    assert recovery.stop_cleanly(daemon, tdir, cache, flush, 5, clock=clock,
                                 sleep=lambda s: None) is marked
    assert recovery.is_clean(tdir, cache) is marked
    assert daemon.calls == calls
    assert not daemon.running


# -- verification -----------------------------------------------------------
def _recover(tdir, qemu_img):
    return recovery.CacheRecovery(qemu_img).recover(
        IMAGE, tdir, os.path.join(tdir, qemu_driver.CACHE_FILE), SIZE)


def test_no_manifest_discards_the_cache(tdir):
    _cache(tdir, b'qcow2')
    qemu_img = FakeQemuImg()
    result = _recover(tdir, qemu_img)
    assert result.action == recovery.DISCARD
    assert 'no manifest' in result.reason
    assert os.listdir(tdir) == []
    assert qemu_img.runs == []


def test_matching_clusters_are_kept(tdir):
    image = _image()
    _manifest(tdir, image)
    # Clusters 2-3 at file offset 4096, cluster 6 at 4096+2C; cluster 5 a
    # zero cluster where the image is not zero is caught too.
    data = bytes(4096) + image[2 * CLUSTER:4 * CLUSTER] + image[
        6 * CLUSTER:7 * CLUSTER]
    cache = _cache(tdir, data)
    qemu_img = FakeQemuImg([
        _data(2 * CLUSTER, 2 * CLUSTER, 4096),
        {'start': 4 * CLUSTER, 'length': 2 * CLUSTER, 'depth': 0,
         'present': False, 'zero': True, 'data': False},
        _data(6 * CLUSTER, CLUSTER, 4096 + 2 * CLUSTER)])
    result = _recover(tdir, qemu_img)
    assert (result.action, result.checked, result.dropped) == ('kept', 3, 0)
    assert qemu_img.verbs() == ['check', 'info', 'map']
    check = qemu_img.runs[0]
    assert check[:3] == ['check', '-r', 'all'] and check[-1] == cache
    # Only the cache's own layer is looked at.
    for run in qemu_img.runs[1:]:
        assert json.loads(run[-1][len('json:'):])['backing'] is None
    with open(cache, 'rb') as f:
        assert f.read() == data


def test_mismatching_clusters_are_zeroed_and_the_cache_rewritten(tdir):
    image = _image()
    _manifest(tdir, image)
    # Cluster 1 came back as zeros, cluster 3 stale; cluster 7 is a zero
    # cluster where the image holds data.
    data = image[:CLUSTER] + bytes(CLUSTER) + image[2 * CLUSTER:3 * CLUSTER]
    data += b'\xa5' * CLUSTER
    cache = _cache(tdir, data)
    zeroed = []
    real_pwrite = os.pwrite

    def pwrite(fd, buf, offset):
        zeroed.append((offset, len(buf), any(buf)))
        return real_pwrite(fd, buf, offset)

    qemu_img = FakeQemuImg([
        _data(0, 4 * CLUSTER, 0),
        {'start': 7 * CLUSTER, 'length': CLUSTER, 'depth': 0,
         'present': True, 'zero': True, 'data': False}])
    os_pwrite, os.pwrite = os.pwrite, pwrite
    try:
        result = _recover(tdir, qemu_img)
    finally:
        os.pwrite = os_pwrite
    assert (result.action, result.checked, result.dropped) == (
        'dropped', 5, 3)
    # Only the data clusters have file ranges to zero.
    assert zeroed == [(CLUSTER, CLUSTER, False), (3 * CLUSTER, CLUSTER,
                                                  False)]
    assert qemu_img.verbs() == ['check', 'info', 'map', 'convert']
    convert = qemu_img.runs[-1]
    assert convert[-1] == cache + recovery.RECOVERED_SUFFIX
    assert 'cluster_size=%d' % CLUSTER in convert
    # The rewritten file replaced the cache.
    with open(cache, 'rb') as f:
        assert f.read() == b'converted'
    assert sorted(os.listdir(tdir)) == [qemu_driver.CACHE_FILE,
                                        qemu_driver.MANIFEST_FILE]


def test_a_block_larger_than_a_cluster_held_in_part_is_dropped(tdir):
    image = _image()
    _manifest(tdir, image, block_size=4 * CLUSTER)
    # Clusters 0-4 held: block 0 whole and good, block 1 only in part.
    _cache(tdir, image[:5 * CLUSTER])
    qemu_img = FakeQemuImg([_data(0, 5 * CLUSTER, 0)])
    result = _recover(tdir, qemu_img)
    assert (result.action, result.dropped) == ('dropped', 1)


@pytest.mark.parametrize('qemu_img,reason', [
    (FakeQemuImg(check_rc=2), 'left it inconsistent'),
    (FakeQemuImg([dict(_data(0, CLUSTER, 0), compressed=True)]),
     'no plain file offset'),
    (FakeQemuImg(size=2 * SIZE), 'is not the image'),
])
def test_a_cache_that_cannot_be_checked_is_discarded(tdir, qemu_img,
                                                     reason):
    _manifest(tdir, _image())
    _cache(tdir, _image())
    result = _recover(tdir, qemu_img)
    assert result.action == recovery.DISCARD
    assert reason in result.reason
    assert os.listdir(tdir) == [qemu_driver.MANIFEST_FILE]


def test_a_manifest_of_another_image_discards_the_cache(tdir):
    manifest_mod.build(lambda o, n: bytes(n), SIZE // 2).write(
        os.path.join(tdir, qemu_driver.MANIFEST_FILE))
    _cache(tdir, _image())
    result = _recover(tdir, FakeQemuImg([_data(0, CLUSTER, 0)]))
    assert result.action == recovery.DISCARD
    assert not os.path.exists(os.path.join(tdir, qemu_driver.CACHE_FILE))


# -- the driver's hooks -----------------------------------------------------
class DriverDaemon(FakeDaemon):
    """What the driver asks of a StorageDaemon, one per template name."""

    made = {}

    def __init__(self, name, run_path, executable, start_timeout):
        super().__init__(running=False)
        self.name = name

    @classmethod
    def factory(cls, name, *args):
        if name not in cls.made:
            cls.made[name] = cls(name, *args)
        return cls.made[name]

    def start(self, **kwargs):
        self.calls.append('start')
        self.running = True

    def commands(self, *calls):
        self.calls.extend(name for name, _ in calls)

    def command(self, name, **args):
        if name == 'query-block-exports':
            return [{'id': qemu_driver.EXPORT_ID}]
        return super().command(name, **args)

    def log_tail(self):
        return ''

    def remove_log(self):
        pass


class FlushHandle:
    def set_export_name(self, name):
        pass

    def aio_connect_unix(self, path):
        pass

    def aio_is_connecting(self):
        return False

    def aio_is_ready(self):
        return True

    def aio_flush(self):
        return 1

    def aio_command_completed(self, cookie):
        return True


@pytest.fixture
def driver(tmp_path):
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    conf.set_override('run_path', str(tmp_path / 'run'), group='agent')
    conf.set_override('enabled', False, group='tls')
    DriverDaemon.made = {}
    qemu_img = FakeQemuImg()
    drv = qemu_driver.QemuDriver(conf, daemon_factory=DriverDaemon.factory,
                                 runner=qemu_img, nbd_factory=FlushHandle)
    drv.qemu_img_fake = qemu_img
    drv.start()
    return drv


def _template():
    origin = records.Endpoint('nbd', {'socket': '/run/origin.sock',
                                      'export': IMAGE})
    return records.Template(image_id=IMAGE, origin=origin, size=SIZE,
                            image_format='raw', driver='qemu',
                            sources=[records.Source.origin(origin)])


def _built(driver, tdir):
    template = _template()
    build = driver.create_template(template, tdir)
    template.export = build.export
    template.driver_state = build.driver_state
    return template, DriverDaemon.made[IMAGE]


def test_driver_marks_a_cleanly_deleted_cache_and_trusts_it(driver, tdir):
    template, daemon = _built(driver, tdir)
    assert not os.path.exists(recovery.marker_path(tdir))
    driver.delete_template(template, tdir)
    assert daemon.calls[-2:] == ['quit', 'stop']
    assert recovery.is_clean(tdir, os.path.join(tdir,
                                                qemu_driver.CACHE_FILE))
    runs = len(driver.qemu_img_fake.runs)
    driver.ensure_template(template, tdir)
    # Trusted: no check; the marker goes before the daemon opens it.
    assert [r[0] for r in driver.qemu_img_fake.runs[runs:]] == ['map']
    assert not os.path.exists(recovery.marker_path(tdir))
    assert daemon.running


def test_driver_verifies_an_unmarked_cache_before_the_daemon(driver, tdir):
    template, daemon = _built(driver, tdir)
    _manifest(tdir, _image())
    daemon.running = False          # killed, or the host lost power
    runs = len(driver.qemu_img_fake.runs)
    daemon.calls = []
    driver.ensure_template(template, tdir)
    assert [r[0] for r in driver.qemu_img_fake.runs[runs:]] == [
        'check', 'info', 'map', 'map']
    assert daemon.calls[:2] == ['stop', 'start']


def test_driver_discards_an_unmarked_cache_without_manifest(driver, tdir):
    template, daemon = _built(driver, tdir)
    daemon.running = False
    runs = len(driver.qemu_img_fake.runs)
    asked = []
    # The origin is asked for the manifest first; it serves none.
    driver._fetch_manifest = lambda t, d: asked.append(d) or False
    driver.ensure_template(template, tdir)
    assert asked == [tdir]
    # Made again, empty.
    assert [r[0] for r in driver.qemu_img_fake.runs[runs:]] == ['create']


def test_driver_adopts_a_running_daemon_as_it_is(driver, tdir):
    template, daemon = _built(driver, tdir)
    # A marker next to a daemon holding the cache open is stale.
    recovery.write_marker(tdir, os.path.join(tdir, qemu_driver.CACHE_FILE))
    runs = len(driver.qemu_img_fake.runs)
    driver.ensure_template(template, tdir)
    assert driver.qemu_img_fake.runs[runs:] == []
    assert daemon.calls.count('start') == 1
    assert not os.path.exists(recovery.marker_path(tdir))
