"""The BitTorrent side of p2p-copy: a real .torrent from libtorrent."""

import pytest

from thunder_lab.bench import torrent


def test_make_torrent(tmp_path):
    lt = pytest.importorskip('libtorrent')
    image = tmp_path / 'image.raw'
    image.write_bytes(bytes(range(256)) * 4096 * 3)       # 3 MiB
    path = torrent.make_torrent(str(image), str(tmp_path / 'i.torrent'),
                                piece_size=256 * 1024)
    info = lt.torrent_info(path)
    assert info.name() == 'image.raw'
    assert info.total_size() == 3 << 20
    assert info.num_pieces() == 12
    assert info.piece_length() == 256 * 1024


def test_peer_address_parsing():
    assert torrent._address('198.18.0.2:6881') == ('198.18.0.2', 6881)
