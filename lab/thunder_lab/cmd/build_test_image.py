"""``thunder-build-test-image``: build (or reuse) the bootable test image.

Prints the image path, size and sha256. The image and downloaded packages
are cached under ``$THUNDER_CACHE_DIR/test-image`` (default
``<repo>/.cache/test-image``); a rebuild happens only when the package
versions, the builder or the host tools changed, or with ``--force``.
"""

import sys

from oslo_config import cfg

from thunder_agent import exception
from thunder_lab.guest import image as guest_image

cli_opts = [
    cfg.StrOpt('output', short='o',
               help='Where to write the raw image (a JSON manifest is '
                    'written next to it). Default: the cache directory.'),
    cfg.BoolOpt('force', default=False,
                help='Rebuild even if an up-to-date image exists.'),
    cfg.IntOpt('filler-mib', default=0, min=0, max=65536,
               help='MiB of extra files the boot never reads, for a '
                    'realistic ratio of boot working set to image size.'),
]


def main(argv=None):
    conf = cfg.ConfigOpts()
    conf.register_cli_opts(cli_opts)
    conf(sys.argv[1:] if argv is None else argv,
         project='nova-thunder', prog='thunder-build-test-image',
         default_config_files=[])
    try:
        manifest = guest_image.build(output=conf.output, force=conf.force,
                                     filler_mib=conf.filler_mib)
    except exception.ThunderException as e:
        print('Error: %s' % e, file=sys.stderr)
        return 1
    print('path: %s' % manifest['path'])
    print('size: %d bytes (%.1f MiB)' % (manifest['size'],
                                         manifest['size'] / (1 << 20)))
    print('sha256: %s' % manifest['image_sha256'])
    print('data sha256: %s' % manifest['data_sha256'])
    print('kernel: %s' % manifest['kernel_version'])
    return 0


if __name__ == '__main__':
    sys.exit(main())
