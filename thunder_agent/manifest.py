"""Digest manifests: SHA-256 of every block of an image, made at the origin.

A relaying template reads its misses from a parent, another host that may
be wrong or hostile. Every block it takes from a parent is checked against
the image's manifest before it reaches the cache or a reader; the manifest
itself comes from the origin only (over TLS, the origin's certificate
checked), never through the tree.

Layout (all integers little-endian)::

    0   8  magic b'THNDRMF1'
    8   4  block size (bytes; a power of two, 4 KiB..4 MiB)
    12  4  reserved, 0
    16  8  image size (bytes)
    24  8  number of digests: ceil(image size / block size)
    32 32  SHA-256 of bytes 0..31 and of the digests (the manifest's own
           check: a torn or truncated fetch is refused, not trusted)
    64 ..  32-byte SHA-256 digests, one per block; the last block is the
           image's tail, not padded
    ...    zero padding to a multiple of 512 bytes (NBD exports are sized
           in sectors)

The block size is the cache's cluster size by default (64 KiB): a
copy-on-read fill is one cluster, so one fill is one digest check. 32 bytes
per 64 KiB block is 0.05 % of the image: 512 KiB for 1 GiB, fetched once
per template. SHA-256 runs at about 1.5 GB/s per core here (OpenSSL through
hashlib), so checking a 100 Mbit/s link's blocks costs under 1 % of a core.
"""

import hashlib
import os
import struct

from thunder_agent import exception

MAGIC = b'THNDRMF1'
DIGEST_SIZE = 32
HEADER_SIZE = 64
DEFAULT_BLOCK_SIZE = 65536
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 4 * 1024 * 1024
# The NBD export of an image's manifest, next to the image's own.
EXPORT_SUFFIX = '.manifest'
_FIXED = struct.Struct('<8sIIQQ')
PAD = 512


InvalidManifest = exception.InvalidManifest


def export_name(image_export):
    """The NBD export name of the manifest of *image_export*."""
    return image_export + EXPORT_SUFFIX


def block_count(image_size, block_size):
    return -(-image_size // block_size)


class Manifest:
    """The digests of an image of *image_size* bytes in blocks of
    *block_size*."""

    def __init__(self, image_size, block_size, digests):
        if (isinstance(block_size, bool) or not isinstance(block_size, int)
                or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
                or block_size & (block_size - 1)):
            raise InvalidManifest(reason='block size %r is not a power of '
                                         'two of %d..%d' % (
                                             block_size, MIN_BLOCK_SIZE,
                                             MAX_BLOCK_SIZE))
        if (isinstance(image_size, bool) or not isinstance(image_size, int)
                or image_size < 0):
            raise InvalidManifest(reason='image size %r' % (image_size,))
        digests = bytes(digests)
        if len(digests) != block_count(image_size, block_size) * DIGEST_SIZE:
            raise InvalidManifest(reason='%d digest bytes for %d blocks' % (
                len(digests), block_count(image_size, block_size)))
        self.image_size = image_size
        self.block_size = block_size
        self._digests = digests

    @property
    def count(self):
        return len(self._digests) // DIGEST_SIZE

    def digest(self, index):
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self._digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]

    def block_range(self, offset, length):
        """The blocks covering bytes [offset, offset+length): (first block,
        end block), end exclusive."""
        if offset < 0 or length < 0 or offset + length > self.image_size:
            raise ValueError('range %d+%d outside the image of %d bytes'
                             % (offset, length, self.image_size))
        if length == 0:
            return offset // self.block_size, offset // self.block_size
        return (offset // self.block_size,
                (offset + length - 1) // self.block_size + 1)

    def block_span(self, first, end):
        """Byte offset and length of blocks [first, end)."""
        start = first * self.block_size
        return start, min(end * self.block_size, self.image_size) - start

    def bad_blocks(self, first, data):
        """Indexes of the blocks of *data* (blocks first, first+1, ... as
        :meth:`block_span` gives them) whose digest is not the manifest's.
        """
        start, length = self.block_span(
            first, first + block_count(len(data), self.block_size))
        if len(data) != length:
            raise ValueError('%d bytes are not whole blocks from block %d'
                             % (len(data), first))
        bad = []
        view = memoryview(data)
        bs = self.block_size
        for n in range(block_count(len(data), bs)):
            chunk = view[n * bs:(n + 1) * bs]
            if hashlib.sha256(chunk).digest() != self.digest(first + n):
                bad.append(first + n)
        return bad

    def to_bytes(self):
        fixed = _FIXED.pack(MAGIC, self.block_size, 0, self.image_size,
                            self.count)
        check = hashlib.sha256(fixed + self._digests).digest()
        body = fixed + check + self._digests
        return body + b'\0' * (-len(body) % PAD)

    @classmethod
    def from_bytes(cls, data, image_size=None):
        """Parse *data* (untrusted until checked); *image_size*, when
        given, is the size the image's export reports."""
        data = bytes(data)
        if len(data) < HEADER_SIZE:
            raise InvalidManifest(reason='%d bytes, shorter than its header'
                                         % len(data))
        magic, block_size, reserved, size, count = _FIXED.unpack_from(data)
        if magic != MAGIC or reserved:
            raise InvalidManifest(reason='not a thunder manifest')
        if image_size is not None and size != image_size:
            raise InvalidManifest(reason='made for %d bytes, the image has '
                                         '%d' % (size, image_size))
        end = HEADER_SIZE + count * DIGEST_SIZE
        if end > len(data) or any(data[end:]):
            raise InvalidManifest(reason='%d digests do not fit %d bytes'
                                         % (count, len(data)))
        digests = data[HEADER_SIZE:end]
        fixed = data[:_FIXED.size]
        if hashlib.sha256(fixed + digests).digest() != data[32:64]:
            raise InvalidManifest(reason='its own digest does not match')
        return cls(size, block_size, digests)

    @classmethod
    def from_file(cls, path, image_size=None):
        with open(path, 'rb') as f:
            return cls.from_bytes(f.read(), image_size)

    def write(self, path):
        """Write to *path* atomically (a reader sees the old or the new)."""
        tmp = path + '.tmp'
        with open(tmp, 'wb') as f:
            f.write(self.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def build(read, image_size, block_size=DEFAULT_BLOCK_SIZE,
          chunk_blocks=64, progress=None):
    """The manifest of an image of *image_size* bytes read by
    ``read(offset, length) -> bytes``, *chunk_blocks* blocks per read
    (4 MiB at 64 KiB). *progress(done_bytes)* is called after each read.
    """
    digests = bytearray()
    offset = 0
    step = block_size * chunk_blocks
    while offset < image_size:
        length = min(step, image_size - offset)
        data = read(offset, length)
        if len(data) != length:
            raise InvalidManifest(reason='short read at %d' % offset)
        view = memoryview(data)
        for start in range(0, length, block_size):
            digests += hashlib.sha256(view[start:start + block_size]).digest()
        offset += length
        if progress is not None:
            progress(offset)
    return Manifest(image_size, block_size, bytes(digests))
