"""A private libvirtd for one test, invisible to the rest of the machine.

libvirtd runs as root in its own mount namespace where /etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt are
directories of the test. Its qemu.conf keeps QEMU as root without cgroups,
namespaces, security labels or virtlogd, which a container lacks. Clients
reach it at ``qemu+unix:///system?socket=<dir>/run/libvirt-sock``.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time

QEMU_CONF = '''
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
'''

MOUNTS = ('etc:/etc/libvirt', 'run:/run/libvirt', 'lib:/var/lib/libvirt',
          'cache:/var/cache/libvirt', 'log:/var/log/libvirt')


class LibvirtdUnavailable(RuntimeError):
    pass


class PrivateLibvirtd:
    def __init__(self, base_dir=None):
        self.base_dir = base_dir
        self.proc = None
        self.created = []

    @property
    def uri(self):
        return 'qemu+unix:///system?socket=%s' % self.socket

    def start(self, timeout=30):
        for tool in ('libvirtd', 'unshare', 'qemu-system-x86_64'):
            if not shutil.which(tool):
                raise LibvirtdUnavailable('%s not installed' % tool)
        if os.geteuid() != 0:
            raise LibvirtdUnavailable('a private system libvirtd needs root')
        self.dir = tempfile.mkdtemp(prefix='lv-', dir=self.base_dir)
        for name in ('run', 'lib', 'cache', 'log'):
            os.makedirs(os.path.join(self.dir, name))
        shutil.copytree('/etc/libvirt', os.path.join(self.dir, 'etc'))
        with open(os.path.join(self.dir, 'etc', 'qemu.conf'), 'a') as f:
            f.write(QEMU_CONF)
        self.socket = os.path.join(self.dir, 'run', 'libvirt-sock')
        # Mount points are shared with the host: remember which one this
        # test had to create, to remove it afterwards.
        self.created = [m.split(':')[1] for m in MOUNTS
                        if not os.path.exists(m.split(':')[1])]
        script = ['set -e']
        for mount in MOUNTS:
            source, target = mount.split(':')
            script.append('mkdir -p %s' % target)
            script.append('mount --bind %s %s'
                          % (os.path.join(self.dir, source), target))
        script.append('exec libvirtd -p %s' % os.path.join(self.dir, 'pid'))
        self.log = open(os.path.join(self.dir, 'libvirtd.log'), 'wb')
        self.proc = subprocess.Popen(
            ['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
             '\n'.join(script)],
            stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise LibvirtdUnavailable('libvirtd did not start: %s'
                                          % tail)
            time.sleep(0.2)
        return self

    def log_tail(self, size=2000):
        try:
            with open(os.path.join(self.dir, 'libvirtd.log'), 'rb') as f:
                return f.read()[-size:].decode(errors='replace')
        except OSError:
            return ''

    def qemu_log(self, name):
        try:
            with open(os.path.join(self.dir, 'log', 'qemu',
                                   name + '.log')) as f:
                return f.read()
        except OSError:
            return ''

    def stop(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        for path in self.created:
            try:
                os.rmdir(path)
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
