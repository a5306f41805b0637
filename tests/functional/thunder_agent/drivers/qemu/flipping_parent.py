"""A wrong parent for the verifier's tests: an nbdkit python plugin serving
an image file with one byte flipped in each of some blocks.

``nbdkit python flipping_parent.py file=PATH flip=3,17 block_size=65536
[count=PATH] [stall=N stall_seconds=S]``; *count* names a file where
the bytes served are written; a read touching block *stall* waits *S*
seconds first.
"""

import builtins
import os
import time

import nbdkit

API_VERSION = 2
_args = {}


def config(key, value):
    _args[key] = value


def config_complete():
    _args['flip'] = {int(b) for b in _args.get('flip', '').split(',') if b}
    _args['block_size'] = int(_args.get('block_size', 65536))
    _args['served'] = 0
    _args['stall'] = int(_args.get('stall', -1))
    _args['stall_seconds'] = float(_args.get('stall_seconds', 0))


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS


def open(readonly):
    return os.open(_args['file'], os.O_RDONLY)


def get_size(fd):
    return os.fstat(fd).st_size


def close(fd):
    os.close(fd)


def pread(fd, buf, offset, flags):
    data = bytearray(os.pread(fd, len(buf), offset))
    bs = _args['block_size']
    if offset // bs <= _args['stall'] < -(-(offset + len(buf)) // bs):
        time.sleep(_args['stall_seconds'])
    for block in _args['flip']:
        at = block * bs + 100
        if offset <= at < offset + len(data):
            data[at - offset] ^= 0xff
    buf[:] = data
    _args['served'] += len(data)
    if 'count' in _args:
        with builtins.open(_args['count'], 'w') as f:
            f.write(str(_args['served']))
