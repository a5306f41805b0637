"""The verifier plugin's logic with fake sources (no nbdkit, no NBD)."""

import hashlib
import json
import os

import pytest

from thunder_agent.drivers.qemu import verifier_plugin as vp
from thunder_agent import manifest as manifest_mod

BS = 4096
IMAGE = bytes(range(256)) * (BS * 10 // 256) + b'tail' * 100   # 10 blocks+


def _manifest(data=IMAGE, bs=BS):
    return manifest_mod.build(lambda o, n: data[o:o + n], len(data), bs)


class FakeSource:
    """Serves *data*, with bytes flipped in the *flip* blocks; *fail*
    reads raise SourceFailed first."""

    def __init__(self, data, flip=(), fail=0, name='192.0.2.7:10809/img'):
        self.data = bytearray(data)
        for block in flip:
            self.data[block * BS] ^= 0xff
        self.fail = fail
        self.reads = []
        self.name = name

    def label(self):
        return self.name

    def read(self, offset, length, deadline):
        self.reads.append((offset, length))
        if self.fail:
            self.fail -= 1
            raise vp.SourceFailed('refused')
        return bytearray(self.data[offset:offset + length])


class Clock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def paths(tmp_path):
    return str(tmp_path / 'report'), str(tmp_path / 'stats')


def _verifier(paths, parent, origin=None, wait=5, clock=None):
    clock = clock or Clock()
    return vp.Verifier(
        vp.parse_manifest(_manifest().to_bytes()),
        origin or FakeSource(IMAGE, name='unix:/o/img'), parent, paths[0],
        paths[1], wait, clock=clock, sleep=clock.sleep, wall=lambda: 1234.5)


def test_parse_agrees_with_the_agents_manifest():
    for data, bs in ((IMAGE, BS), (b'', BS), (os.urandom(3 * 65536 + 1),
                                              65536)):
        made = _manifest(data, bs)
        parsed = vp.parse_manifest(made.to_bytes(), len(data))
        assert (parsed.image_size, parsed.block_size, parsed.count,
                parsed.digests) == (made.image_size, made.block_size,
                                    made.count, made.to_bytes()[64:64 + 32
                                                                * made.count])
        for first, end in ((0, made.count), (0, 0)):
            assert parsed.block_span(first, end) == made.block_span(first,
                                                                    end)


@pytest.mark.parametrize('mangle', [
    lambda b: b[:63],                               # shorter than header
    lambda b: b'X' + b[1:],                         # magic
    lambda b: b[:70] + bytes([b[70] ^ 1]) + b[71:],  # a digest
    lambda b: b + b'\1',                            # trailing garbage
    lambda b: b[:8] + (3000).to_bytes(4, 'little') + b[12:],  # block size
])
def test_parse_refuses_what_the_agent_refuses(mangle):
    data = mangle(_manifest().to_bytes())
    with pytest.raises(ValueError):
        vp.parse_manifest(data)
    with pytest.raises(manifest_mod.InvalidManifest):
        manifest_mod.Manifest.from_bytes(data)


def test_parse_refuses_a_manifest_of_another_size():
    with pytest.raises(ValueError):
        vp.parse_manifest(_manifest().to_bytes(), len(IMAGE) + 1)


def test_reads_are_rounded_out_to_blocks_and_checked(paths):
    parent = FakeSource(IMAGE)
    v = _verifier(paths, parent)
    assert bytes(v.read(BS + 10, 2 * BS)) == IMAGE[BS + 10:3 * BS + 10]
    assert parent.reads == [(BS, 3 * BS)]
    # The tail block is short, not padded.
    tail = len(IMAGE) - 10 * BS
    assert bytes(v.read(len(IMAGE) - 5, 5)) == IMAGE[-5:]
    assert parent.reads[-1] == (10 * BS, tail)
    v.write_stats()
    with open(paths[1]) as f:
        stats = json.load(f)
    assert stats['parent_bytes'] == 3 * BS + tail
    assert stats['origin_bytes'] == 0
    assert stats['blocks_checked'] == 4
    assert stats['bypass'] is None
    assert not os.path.exists(paths[0])


def test_bad_blocks_come_from_the_origin_and_are_reported(paths):
    parent = FakeSource(IMAGE, flip=(2, 3, 6))
    origin = FakeSource(IMAGE, name='unix:/o/img')
    v = _verifier(paths, parent, origin)
    assert bytes(v.read(0, 8 * BS)) == IMAGE[:8 * BS]
    # Runs of bad blocks are read together.
    assert origin.reads == [(2 * BS, 2 * BS), (6 * BS, BS)]
    with open(paths[0]) as f:
        report = json.load(f)
    assert report == {'parent': '192.0.2.7:10809/img', 'bad_blocks': [2, 3, 6],
                      'blocks_rejected': 3, 'blocks_checked': 8,
                      'block_size': BS, 'time': 1234.5}
    # From now on the parent is bypassed.
    assert bytes(v.read(9 * BS, BS)) == IMAGE[9 * BS:10 * BS]
    assert len(parent.reads) == 1
    assert origin.reads[-1] == (9 * BS, BS)
    stats = v.stats()
    assert stats['bypass'] == 'mismatch'
    assert stats['origin_bytes'] == 4 * BS
    assert stats['blocks_rejected'] == 3


def test_an_origin_that_does_not_match_is_an_image_change(paths):
    parent = FakeSource(IMAGE, flip=(1,))
    origin = FakeSource(IMAGE, flip=(1,), name='unix:/o/img')
    v = _verifier(paths, parent, origin)
    with pytest.raises(vp.ImageChanged):
        v.read(0, 2 * BS)
    with pytest.raises(vp.ImageChanged):
        v.read(BS, BS)                      # bypassed: the origin again


def test_a_parent_that_does_not_answer_is_retried_then_bypassed(paths):
    clock = Clock()
    parent = FakeSource(IMAGE, fail=3)
    v = _verifier(paths, parent, wait=5, clock=clock)
    # Answers at the 4th attempt: retried with backoff, no origin read.
    assert bytes(v.read(0, BS)) == IMAGE[:BS]
    assert clock.sleeps == [0.05, 0.1, 0.2]
    assert v.stats()['origin_bytes'] == 0
    assert v.stats()['parent_retries'] == 3
    # Never answers: the request waits about parent_wait, then the origin.
    parent.fail = 10 ** 6
    clock.sleeps.clear()
    origin_before = v.stats()['origin_bytes']
    assert bytes(v.read(BS, BS)) == IMAGE[BS:2 * BS]
    assert 4 <= sum(clock.sleeps) <= 5
    assert all(s <= vp.RETRY_MAX for s in clock.sleeps)
    assert v.stats()['origin_bytes'] == origin_before + BS
    assert v.stats()['bypass'] == 'unreachable'
    # No report: nothing was rejected; later reads skip the parent.
    assert not os.path.exists(paths[0])
    reads = len(parent.reads)
    v.read(2 * BS, BS)
    assert len(parent.reads) == reads
    # For parent_wait; then it is tried again, briefly: still dead, the
    # read goes to the origin after RETRY_AGAIN, not parent_wait.
    clock.now += 5
    clock.sleeps.clear()
    assert bytes(v.read(4 * BS, BS)) == IMAGE[4 * BS:5 * BS]
    assert sum(clock.sleeps) <= vp.RETRY_AGAIN
    assert v.stats()['bypass'] == 'unreachable'
    # Back (a short outage is over): read from it again.
    parent.fail = 0
    clock.now += 5
    assert bytes(v.read(3 * BS, BS)) == IMAGE[3 * BS:4 * BS]
    assert parent.reads[-1] == (3 * BS, BS)
    assert v.stats()['bypass'] is None


def test_without_parent_the_origin_is_read_and_checked(paths):
    origin = FakeSource(IMAGE, name='unix:/o/img')
    v = _verifier(paths, None, origin)
    assert bytes(v.read(0, 3 * BS)) == IMAGE[:3 * BS]
    assert origin.reads == [(0, 3 * BS)]
    assert v.stats()['bypass'] == 'no parent'


def test_reads_outside_the_image_are_refused(paths):
    v = _verifier(paths, FakeSource(IMAGE))
    with pytest.raises(ValueError):
        v.read(len(IMAGE) - 1, 2)


GOOD = [('origin_socket', '/run/o.sock'), ('origin_export', 'img-1'),
        ('parent_host', '192.0.2.7'), ('parent_port', '10809'),
        ('parent_export', 'img-1'), ('manifest', '/var/lib/t/manifest'),
        ('report', '/run/t.mismatch'), ('stats', '/run/t.verify'),
        ('parent_wait', '30'), ('tls_dir', '/etc/thunder-agent/pki')]


def test_settings_are_parsed():
    settings = vp.parse_settings(GOOD)
    assert settings['parent_host'] == '192.0.2.7'
    assert settings['parent_port'] == 10809
    assert settings['parent_wait'] == 30.0
    assert settings['connections'] == 4


@pytest.mark.parametrize('key,value', [
    ('parent_host', 'example.com'),          # parents are IP literals
    ('parent_host', 'fe80::1%eth0'),         # no free-text scope id
    ('parent_host', '192.0.2.7 -v'),
    ('parent_port', '0'), ('parent_port', '70000'), ('parent_port', '1e3'),
    ('parent_export', '../x'), ('parent_export', 'a b'),
    ('parent_export', ''),
    ('manifest', 'relative'), ('manifest', '/a/../etc/shadow'),
    ('report', '/tmp/x;rm'), ('parent_wait', '-1'),
    ('parent_wait', 'inf'), ('connections', '0'), ('connections', '99'),
])
def test_hostile_settings_are_refused(key, value):
    pairs = [(k, value if k == key else v) for k, v in GOOD]
    if key not in dict(GOOD):
        pairs.append((key, value))
    with pytest.raises(vp.ConfigError):
        vp.parse_settings(pairs)


@pytest.mark.parametrize('pairs', [
    GOOD + [('nbd', 'x')],                                   # unknown
    GOOD + [('parent_port', '10810')],                       # twice
    [p for p in GOOD if p[0] != 'parent_port'],              # half parent
    [p for p in GOOD if p[0] != 'origin_socket'],            # no origin
    GOOD + [('origin_host', '192.0.2.1'), ('origin_port', '1')],  # two
    [p for p in GOOD if p[0] != 'manifest'],
])
def test_incomplete_settings_are_refused(pairs):
    with pytest.raises(vp.ConfigError):
        vp.parse_settings(pairs)


def test_digests_are_sha256():
    m = vp.parse_manifest(_manifest().to_bytes())
    assert m.digest(0) == hashlib.sha256(IMAGE[:BS]).digest()


class FakeNbd:
    """The parts of the nbd module NbdSource uses."""

    TLS_REQUIRE = 2

    class Error(Exception):
        pass

    def __init__(self, data, refuse=0):
        self.data = data
        self.refuse = refuse
        self.handles = []

    def NBD(self):
        module = self

        class Handle:
            def __init__(self):
                self.tls = {}
                self.broken = False
                module.handles.append(self)

            def set_export_name(self, name):
                self.export = name

            def set_tls(self, level):
                self.tls['level'] = level

            def set_tls_certificates(self, path):
                self.tls['dir'] = path

            def set_tls_verify_peer(self, verify):
                self.tls['verify'] = verify

            def aio_connect_tcp(self, host, port):
                self.address = (host, port)
                if module.refuse:
                    module.refuse -= 1
                    raise module.Error('connection refused')

            def aio_connect_unix(self, path):
                self.address = path

            def aio_is_connecting(self):
                return False

            def aio_is_ready(self):
                return True

            def aio_get_fd(self):
                return None

            def get_size(self):
                return len(module.data)

            def pread(self, count, offset):
                if self.broken:
                    raise module.Error('connection dropped')
                return bytes(module.data[offset:offset + count])

            def shutdown(self):
                pass

        return Handle()


def test_nbd_source_reuses_handles_and_drops_broken_ones():
    fake = FakeNbd(IMAGE, refuse=1)
    src = vp.NbdSource({'host': '192.0.2.7', 'port': 10809}, 'img',
                       '/etc/thunder-agent/pki', 2, nbd_module=fake)
    assert src.label() == '192.0.2.7:10809/img'
    deadline = vp.time.monotonic() + 5
    with pytest.raises(vp.SourceFailed, match='refused'):
        src.read(0, BS, deadline)
    assert src.read(0, BS, deadline) == IMAGE[:BS]
    assert src.read(BS, BS, deadline) == IMAGE[BS:2 * BS]
    assert len(fake.handles) == 2               # one refused, one reused
    handle = fake.handles[-1]
    # TCP: TLS required, the peer's certificate checked.
    assert handle.tls == {'level': FakeNbd.TLS_REQUIRE,
                          'dir': '/etc/thunder-agent/pki', 'verify': True}
    assert handle.address == ('192.0.2.7', '10809')
    handle.broken = True
    with pytest.raises(vp.SourceFailed, match='dropped'):
        src.read(0, BS, deadline)
    # The broken handle is gone; the next read connects again, and no
    # connection slot leaked (2 of 2 free: two reads at once would pass).
    assert src.read(0, BS, deadline) == IMAGE[:BS]
    assert len(fake.handles) == 3
    assert src.size(deadline) == len(IMAGE)
    assert src._slots._value == 2


def test_nbd_source_on_a_unix_socket_is_plain():
    fake = FakeNbd(IMAGE)
    src = vp.NbdSource({'socket': '/run/o.sock'}, 'img', '/pki', 1,
                       nbd_module=fake)
    assert src.read(0, 10, vp.time.monotonic() + 5) == IMAGE[:10]
    assert fake.handles[0].tls == {}
    assert src.label() == 'unix:/run/o.sock/img'


def test_the_watchdog_cuts_a_read_past_its_deadline():
    import socket as socket_mod
    import threading
    a, b = socket_mod.socketpair()
    fake = FakeNbd(IMAGE)
    released = threading.Event()

    class Hanging:
        # A read that blocks on a socket until the watchdog shuts it.
        def pread(self, count, offset):
            a.recv(1)               # returns b'' once shut down
            released.set()
            raise fake.Error('connection closed')

        def aio_get_fd(self):
            return a.fileno()

    src = vp.NbdSource({'host': '192.0.2.7', 'port': 1}, 'img', None, 1,
                       nbd_module=fake)
    src._idle.put(Hanging())
    started = vp.time.monotonic()
    with pytest.raises(vp.SourceFailed):
        src.read(0, BS, started + 0.3)
    assert released.is_set()
    assert vp.time.monotonic() - started < 2
    a.close()
    b.close()
