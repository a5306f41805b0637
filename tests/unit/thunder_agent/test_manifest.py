"""The digest manifest: layout, checks, and refusal of damaged input."""

import hashlib
import os

import pytest

from thunder_agent import exception
from thunder_agent import manifest

BS = manifest.MIN_BLOCK_SIZE


def _image(size):
    return bytes((i * 7 + i // 4096) % 251 for i in range(size))


def _built(data, block_size=BS):
    return manifest.build(lambda off, n: data[off:off + n], len(data),
                          block_size, chunk_blocks=3)


def test_build_digests_every_block_including_a_short_tail():
    data = _image(5 * BS + 100)
    m = _built(data)
    assert m.count == 6
    for i in range(6):
        assert m.digest(i) == hashlib.sha256(
            data[i * BS:(i + 1) * BS]).digest()
    assert m.block_span(5, 6) == (5 * BS, 100)


def test_round_trip_is_padded_to_sectors_and_equal():
    data = _image(3 * BS)
    blob = _built(data).to_bytes()
    assert len(blob) % manifest.PAD == 0
    again = manifest.Manifest.from_bytes(blob, image_size=len(data))
    assert [again.digest(i) for i in range(3)] == [
        _built(data).digest(i) for i in range(3)]


def test_bad_blocks_names_exactly_the_changed_blocks():
    data = bytearray(_image(8 * BS))
    m = _built(bytes(data))
    data[2 * BS + 5] ^= 0xFF
    data[7 * BS] ^= 0x01
    assert m.bad_blocks(0, bytes(data)) == [2, 7]
    assert m.bad_blocks(2, bytes(data[2 * BS:4 * BS])) == [2]
    assert m.bad_blocks(3, bytes(data[3 * BS:5 * BS])) == []


def test_bad_blocks_refuses_partial_blocks():
    m = _built(_image(4 * BS))
    with pytest.raises(ValueError):
        m.bad_blocks(0, b'x' * (BS + 1))


def test_block_range_rounds_out_and_refuses_outside():
    m = _built(_image(4 * BS))
    assert m.block_range(BS - 1, 2) == (0, 2)
    assert m.block_range(BS, BS) == (1, 2)
    with pytest.raises(ValueError):
        m.block_range(3 * BS, BS + 1)


@pytest.mark.parametrize('damage', [
    lambda b: b[:40],                                  # truncated header
    lambda b: b'XXXXXXXX' + b[8:],                     # magic
    lambda b: b[:64] + bytes([b[64] ^ 1]) + b[65:],    # a digest flipped
    lambda b: b[:8] + (3000).to_bytes(4, 'little') + b[12:],  # block size
    lambda b: b[:-1] + b'\x01',                        # padding not zero
    lambda b: b[:24] + (10 ** 6).to_bytes(8, 'little') + b[32:],  # count
])
def test_damaged_manifests_are_refused(damage):
    blob = _built(_image(3 * BS)).to_bytes()
    with pytest.raises(exception.InvalidManifest):
        manifest.Manifest.from_bytes(damage(blob))


def test_a_manifest_of_another_size_is_refused():
    blob = _built(_image(3 * BS)).to_bytes()
    with pytest.raises(exception.InvalidManifest):
        manifest.Manifest.from_bytes(blob, image_size=3 * BS + 1)


def test_write_is_atomic_and_readable(tmp_path):
    data = _image(2 * BS)
    path = str(tmp_path / 'manifest')
    _built(data).write(path)
    assert not os.path.exists(path + '.tmp')
    assert manifest.Manifest.from_file(path, len(data)).count == 2


def test_export_name():
    assert manifest.export_name('img') == 'img.manifest'
