"""Deterministic synthetic images for tests, the demo and benchmarks."""

import hashlib

BLOCK = 1 << 20


def make_image(path, size, seed=b'thunder'):
    """Pseudo-random 1 MiB blocks with every fourth block zero."""
    with open(path, 'wb') as f:
        for i in range(size // BLOCK):
            if i % 4 == 3:
                f.write(b'\0' * BLOCK)
            else:
                chunk = hashlib.sha256(seed + b'%d' % i).digest()
                f.write(chunk * (BLOCK // len(chunk)))
    return path


def sha256_file(path, length=None):
    h = hashlib.sha256()
    left = length
    with open(path, 'rb') as f:
        while left is None or left > 0:
            chunk = f.read(BLOCK if left is None else min(BLOCK, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()
