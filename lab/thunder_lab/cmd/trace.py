"""``thunder-trace``: record and inspect boot traces.

``thunder-trace record --image PATH --output TRACE`` boots the image once
under QEMU (TCG) and writes which blocks the boot read, in order, with
their timing. ``thunder-trace record --test-image`` does it for the
project's own test image (built or reused first). ``thunder-trace show
TRACE`` prints a summary: reads, bytes, unique bytes, working set and
duration.
"""

import argparse
import json
import sys
import time

from thunder_agent import exception
from thunder_agent import trace as trace_mod
from thunder_lab import trace_recorder

MIB = 1 << 20


def _say(message):
    print('[%s] %s' % (time.strftime('%H:%M:%S'), message), flush=True)


def _record(args):
    if args.test_image:
        from thunder_lab.bench import workload
        if args.image:
            raise exception.InvalidInput(
                reason='give either --image or --test-image')
        trace, path = workload.test_image_trace(
            filler_mib=args.filler_mib, output=args.output,
            force=True, progress=_say)
        _say('trace of the test image %s written to %s'
             % (path, args.output or workload.trace_path(path)))
    else:
        if not args.image:
            raise exception.InvalidInput(
                reason='--image (or --test-image) is required')
        if not args.output:
            raise exception.InvalidInput(reason='--output is required')
        trace = trace_recorder.record(
            args.image, output=args.output, image_format=args.format,
            timeout=args.timeout, idle_timeout=args.idle_timeout,
            until=args.until, memory_mb=args.memory, accel=args.accel,
            progress=_say)
        _say('trace written to %s (stopped by %s)'
             % (args.output, trace.meta.get('stop')))
    _print_summary(trace, args.granularity)
    return 0


def _show(args):
    trace = trace_mod.load(args.trace)
    if args.json:
        summary = trace.summary(args.granularity)
        summary.update(image_sha256=trace.image_sha256,
                       meta=trace.meta)
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_summary(trace, args.granularity)
    return 0


def _print_summary(trace, granularity):
    s = trace.summary(granularity)
    print('image:        %s bytes (%.1f MiB), sha256 %s' % (
        s['image_size'], s['image_size'] / MIB, trace.image_sha256))
    print('reads:        %d' % s['reads'])
    print('bytes read:   %d (%.1f MiB)' % (s['bytes'], s['bytes'] / MIB))
    print('unique bytes: %d (%.1f MiB)' % (s['unique_bytes'],
                                           s['unique_bytes'] / MIB))
    print('working set:  %d bytes in %d-byte blocks (%.1f MiB, %.1f %% of '
          'the image)' % (s['working_set_bytes'], granularity,
                          s['working_set_bytes'] / MIB,
                          100 * s['working_set_fraction']))
    print('duration:     %.2f s (think time %.2f s)' % (s['duration_s'],
                                                        s['think_s']))


def _parser():
    parser = argparse.ArgumentParser(
        prog='thunder-trace', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    rec = sub.add_parser('record', help='boot an image and record its reads')
    rec.add_argument('--image', help='image file (raw or qcow2)')
    rec.add_argument('--format', choices=trace_mod.SUPPORTED_FORMATS,
                     help='expected image format (default: detected)')
    rec.add_argument('--output', '-o', help='trace file to write')
    rec.add_argument('--test-image', action='store_true',
                     help='record the project\'s test image (built or '
                          'reused first)')
    rec.add_argument('--filler-mib', type=int, default=0,
                     help='with --test-image: MiB of filler the boot does '
                          'not read')
    rec.add_argument('--timeout', type=float, default=600,
                     help='stop recording after this many seconds')
    rec.add_argument('--idle-timeout', type=float, default=20,
                     help='stop after this many seconds without disk I/O')
    rec.add_argument('--until', metavar='REGEX',
                     help='stop once the serial console shows REGEX '
                          '(e.g. "login:")')
    rec.add_argument('--memory', type=int, default=512,
                     help='guest memory in MiB')
    rec.add_argument('--accel', choices=('tcg', 'kvm'), default='tcg')
    rec.add_argument('--granularity', type=int, default=65536,
                     help='block size for the working-set figure')
    rec.set_defaults(func=_record)
    show = sub.add_parser('show', help='summarize a trace')
    show.add_argument('trace')
    show.add_argument('--granularity', type=int, default=65536,
                      help='block size for the working-set figure')
    show.add_argument('--json', action='store_true',
                      help='machine-readable output')
    show.set_defaults(func=_show)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.granularity < 1:
        print('Error: --granularity must be positive', file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except exception.ThunderException as e:
        print('Error: %s' % e, file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
