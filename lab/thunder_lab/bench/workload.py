"""The image and boot trace a benchmark runs with.

By default that is the project's test image (optionally with filler the
boot never reads, for a realistic working-set fraction) and a trace of its
real boot, recorded once and kept next to the image.
"""

import os

from thunder_agent import trace as trace_mod
from thunder_lab.guest import image as guest_image
from thunder_lab import trace_recorder


def trace_path(image):
    return image + '.trace'


def test_image_trace(filler_mib=0, output=None, force=False, progress=None):
    """Build (or reuse) the test image and a trace of its boot.

    The trace is recorded again when missing, when it belongs to other
    image bytes, or with *force*. Returns (trace, image path).
    """
    manifest = guest_image.build(
        filler_mib=filler_mib,
        progress=progress or (lambda message: None))
    image = manifest['path']
    path = output or trace_path(image)
    if not force and os.path.exists(path):
        try:
            trace = trace_mod.load(path)
            trace_mod.check_image(trace, manifest['size'],
                                  manifest['image_sha256'])
            return trace, image
        except Exception:
            pass
    trace = trace_recorder.record(image, output=path, image_format='raw',
                                  until=None, progress=progress)
    return trace, image
