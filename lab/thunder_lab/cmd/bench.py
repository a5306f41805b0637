"""``thunder-bench``: boot storms on an emulated cluster, modes side by side.

Runs, for each number of hosts H given, every mode (full-copy, p2p-copy,
direct, thunder, thunder-prefetch, and thunder-plain: thunder with relay
security off, for its cost) on a fresh emulated cluster of H hosts
plus an origin host with links shaped to W, V VMs per host booting at once
(trace replayers or real QEMU guests), and prints storm time, per-VM
latency p50/p99, origin bytes, busiest link and the physical bound.

By default the image is the project's test image with some filler (built
on first use) and the trace a recording of its real boot. Needs root (the
cluster uses network namespaces).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

from thunder_lab.bench import metrics
from thunder_lab.bench import report
from thunder_lab.bench import runner
from thunder_lab.bench import workload
from thunder_agent import exception
from thunder_agent import trace as trace_mod
from thunder_lab import trace_recorder

DEFAULT_HOSTS = '1,2,4'
DEFAULT_FILLER_MIB = 64


def _say(message):
    print('[%s] %s' % (time.strftime('%H:%M:%S'), message), file=sys.stderr,
          flush=True)


def _int_list(text):
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError('a comma-separated list of '
                                         'integers, e.g. 1,2,4')
    if not values:
        raise argparse.ArgumentTypeError('at least one value')
    return values


def _modes(text):
    if text == 'all':
        return metrics.MODES
    modes = tuple(m.strip() for m in text.split(',') if m.strip())
    unknown = [m for m in modes if m not in metrics.MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(
            'modes are %s (or all)' % ', '.join(metrics.MODES))
    return modes


def _parser():
    parser = argparse.ArgumentParser(
        prog='thunder-bench', description=__doc__.splitlines()[0])
    parser.add_argument('--hosts', type=_int_list, default=DEFAULT_HOSTS,
                        help='numbers of hosts to run, e.g. 1,2,4,8,16 '
                             '(default %s)' % DEFAULT_HOSTS)
    parser.add_argument('--vms', type=int, default=1,
                        help='VMs per host (default 1)')
    parser.add_argument('--bandwidth-mbit', type=float, default=100.0,
                        help='link rate W of every host and the origin, '
                             'Mbit/s (default 100)')
    parser.add_argument('--modes', type=_modes, default=metrics.MODES,
                        help='comma-separated modes or "all" (default)')
    parser.add_argument('--vm', choices=('replay', 'real'),
                        default='replay',
                        help='trace replayers (default) or real QEMU '
                             'guests (test image only)')
    parser.add_argument('--fan-out', type=int, default=2,
                        help='relay tree fan-out k (default 2)')
    parser.add_argument('--image', help='raw image (default: the test '
                                        'image with filler)')
    parser.add_argument('--trace', help='boot trace of --image (thunder-'
                                        'trace record); default: recorded')
    parser.add_argument('--filler-mib', type=int, default=DEFAULT_FILLER_MIB,
                        help='filler of the default test image, MiB '
                             '(default %d)' % DEFAULT_FILLER_MIB)
    parser.add_argument('--chunk', type=int, default=65536,
                        help='cache block size in bytes (default 65536)')
    parser.add_argument('--prefetch-concurrency', type=int, default=4)
    parser.add_argument('--vm-timeout', type=float, default=900)
    parser.add_argument('--json', metavar='FILE', help='write the records')
    parser.add_argument('--plot', metavar='FILE.png',
                        help='plot storm time and origin bytes vs hosts')
    parser.add_argument('--check', action='store_true',
                        help='exit with 3 if the results are inconsistent '
                             '(wrong data, thunder origin bytes growing '
                             'with hosts, ...)')
    parser.add_argument('--workdir', help='scratch directory (default: a '
                                          'new one under /tmp)')
    return parser


def _workload(args):
    if args.image:
        if not args.trace:
            raise exception.InvalidInput(
                reason='--image needs --trace (record one with '
                       '"thunder-trace record --image %s -o FILE")'
                       % args.image)
        info = trace_recorder.image_info(args.image)
        if info['format'] != 'raw':
            raise exception.InvalidInput(
                reason='the benchmark serves raw images; convert with '
                       'qemu-img convert -O raw')
        return args.image, trace_mod.load(args.trace), args.trace
    if args.trace:
        raise exception.InvalidInput(reason='--trace needs --image')
    _say('building (or reusing) the test image with %d MiB filler and a '
         'trace of its boot' % args.filler_mib)
    trace, image = workload.test_image_trace(filler_mib=args.filler_mib,
                                             progress=_say)
    return image, trace, workload.trace_path(image)


def main(argv=None):
    args = _parser().parse_args(argv)
    # The agents' libraries warn about their own dependencies on import;
    # that is noise between the progress lines.
    warnings.simplefilter('ignore', DeprecationWarning)
    warnings.filterwarnings('ignore', message='(?s).*eventlet is deprecated')
    if os.geteuid() != 0:
        print('Error: thunder-bench needs root (network namespaces)',
              file=sys.stderr)
        return 2
    if args.vm == 'real' and args.image:
        print('Error: --vm real boots the test image only', file=sys.stderr)
        return 2
    # Short: unix socket paths under it (an origin's QMP socket names the
    # image id) must stay within sun_path's 107 bytes.
    workdir = args.workdir or tempfile.mkdtemp(prefix='thb-',
                                               dir='/tmp')
    os.makedirs(workdir, exist_ok=True)
    try:
        image, trace, trace_path = _workload(args)
        config = runner.BenchConfig(
            image=image, trace=trace, hosts=args.hosts,
            vms_per_host=args.vms, bandwidth_mbit=args.bandwidth_mbit,
            modes=args.modes, vm=args.vm, fan_out=args.fan_out,
            chunk_bytes=args.chunk,
            prefetch_concurrency=args.prefetch_concurrency,
            vm_timeout=args.vm_timeout, workdir=workdir, progress=_say)
        bench = runner.Bench(config)
        records = bench.run()
    except exception.ThunderException as e:
        print('Error: %s' % e, file=sys.stderr)
        return 1
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.table(records))
    problems = metrics.check(records)
    for problem in problems:
        print('inconsistent: %s' % problem)
    meta = {'argv': sys.argv[1:] if argv is None else argv,
            'image': image, 'trace': os.path.abspath(trace_path),
            'trace_summary': trace.summary(args.chunk),
            'problems': problems}
    if args.json:
        report.write_json(records, args.json, meta)
        print('records written to %s' % args.json)
    if args.plot:
        report.plot(records, args.plot, title='thunder-bench: %s Mbit/s '
                    'links, %d VM(s)/host' % (args.bandwidth_mbit, args.vms))
        print('plot written to %s' % args.plot)
    if args.check and problems:
        return 3
    return 0


if __name__ == '__main__':
    sys.exit(main())
