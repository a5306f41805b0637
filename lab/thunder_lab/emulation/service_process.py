"""Run a real oslo.service daemon of the project as a subprocess."""

import os
import signal
import subprocess
import sys
import time


class ServiceProcess:
    """A daemon started as ``python -m MODULE --config-file F``.

    Subclasses set ``module``, ``name`` and :meth:`ping` (an RPC that
    answers once the daemon serves). ``groups`` is {group: {name: value}}
    for the config file. The process runs in its own session so that
    :meth:`kill` takes anything it forked with it, as a crash would.

    ``log_dir`` (default: ``workdir``) receives the log and the config
    file, e.g. a results directory kept after the run. Several daemons
    start in parallel with :meth:`spawn` on each, then :meth:`wait_ready`
    on each (Python's start-up is slow where the CPU is emulated).
    """

    module = None
    name = None

    def __init__(self, workdir, groups, netns=None, log_dir=None):
        self.workdir = workdir
        self.netns = netns
        log_dir = log_dir or workdir
        self.log_file = os.path.join(log_dir, self.name + '.log')
        self.conf_file = os.path.join(log_dir, self.name + '.conf')
        groups.setdefault('DEFAULT', {}).update(
            log_file=self.log_file, debug='true')
        self.complete_groups(groups)
        os.makedirs(workdir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
        with open(self.conf_file, 'w') as f:
            for group, values in groups.items():
                f.write('[%s]\n' % group)
                for key, value in values.items():
                    f.write('%s = %s\n' % (key, value))
        self.proc = None

    def complete_groups(self, groups):
        """Last changes to the options before they are written (the
        paths of the log and config file are known by then)."""

    def ping(self):
        raise NotImplementedError

    def start(self, timeout=60):
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self):
        """Start the process; returns at once (see :meth:`wait_ready`)."""
        cmd = [sys.executable, '-m', self.module,
               '--config-file', self.conf_file]
        if self.netns:
            cmd = ['ip', 'netns', 'exec', self.netns] + cmd
        with open(self.log_file + '.stderr', 'ab') as stderr:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL,
                                         stderr=stderr,
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout=60):
        """Wait until :meth:`ping` answers; kill the process and raise
        RuntimeError if it exits or does not answer within *timeout*."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError('%s exited with %s: %s' % (
                    self.name, self.proc.returncode, self.log_tail()))
            try:
                self.ping()
                return self
            except Exception:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError('%s did not answer: %s'
                           % (self.name, self.log_tail()))

    def log_tail(self, size=3000):
        out = b''
        for path in (self.log_file + '.stderr', self.log_file):
            try:
                with open(path, 'rb') as f:
                    out += f.read()[-size:]
            except OSError:
                pass
        return out.decode(errors='replace')

    def _signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self):
        """SIGKILL to the whole process group, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
