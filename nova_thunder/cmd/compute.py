"""nova-compute with nova-thunder wired in: ``nova-compute-thunder``.

Takes exactly nova-compute's arguments. It checks that the installed Nova
still has the internals :mod:`nova_thunder.wiring` relies on, applies the
wiring, then runs Nova's own ``nova.cmd.compute.main``. Against a Nova that
does not match it exits with status 2 and says why, before connecting to
anything.
"""
# autopep8: off
# The same concurrency set-up as nova-compute, before any other import.
from nova import monkey_patch; monkey_patch.patch(backend='threading')  # noqa
# autopep8: on

import sys

from oslo_config import cfg

from nova.cmd import compute as nova_compute

from nova_thunder import conf as thunder_conf
from nova_thunder import exception
from nova_thunder import wiring

EXIT_INCOMPATIBLE = 2


def _early_conf(argv):
    """Read [thunder] from nova's config files before Nova parses them.

    Only --config-file/--config-dir are passed on (Nova's monkey_patch does
    the same), so arguments meant for Nova cannot trip this parser.
    """
    conf = cfg.ConfigOpts()
    thunder_conf.register_opts(conf)
    conf(_config_file_args(argv[1:]), project='nova', use_env=False)
    return conf


def _config_file_args(args):
    kept = []
    args = iter(args)
    for arg in args:
        if arg in ('--config-file', '--config-dir'):
            kept += [arg, next(args, '')]
        elif arg.startswith(('--config-file=', '--config-dir=')):
            kept.append(arg)
    return kept


def main():
    try:
        early = _early_conf(sys.argv)
        wiring.apply(allow_untested_nova=early.thunder.allow_untested_nova)
    except exception.NovaIncompatible as e:
        sys.stderr.write('nova-compute-thunder: refusing to start: %s\n'
                         % e.format_message())
        return EXIT_INCOMPATIBLE
    return nova_compute.main()


if __name__ == '__main__':
    sys.exit(main())
