"""Full-copy distribution over HTTP: nginx on the origin host, curl on the
hosts, as an image service (Glance, Swift) would hand images to
nova-compute."""

import os
import shutil
import subprocess
import time

from thunder_lab import exception as lab_exception

PORT = 8080

NGINX_CONF = '''\
daemon off;
user root;
worker_processes 1;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path %(dir)s/body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    server {
        listen %(address)s:%(port)d;
        root %(docroot)s;
        location / { }
    }
}
'''


def check_tools():
    for program, package in (('nginx', 'nginx-light'), ('curl', 'curl')):
        if not shutil.which(program) and not os.path.exists(
                '/usr/sbin/' + program):
            raise lab_exception.ToolNotFound(program=program, package=package)


class HttpOrigin:
    """nginx serving one image file from the origin host."""

    def __init__(self, host, image_path, workdir, port=PORT):
        self.host = host
        self.image_path = os.path.abspath(image_path)
        self.name = os.path.basename(self.image_path)
        self.dir = os.path.join(workdir, 'nginx')
        self.docroot = os.path.join(self.dir, 'www')
        self.port = port
        self.proc = None

    @property
    def url(self):
        return 'http://%s:%d/%s' % (self.host.address, self.port, self.name)

    def start(self, timeout=20):
        check_tools()
        os.makedirs(self.docroot, exist_ok=True)
        link = os.path.join(self.docroot, self.name)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(self.image_path, link)
        conf = os.path.join(self.dir, 'nginx.conf')
        with open(conf, 'w') as f:
            f.write(NGINX_CONF % {'dir': self.dir, 'docroot': self.docroot,
                                  'address': self.host.address,
                                  'port': self.port})
        self.proc = self.host.popen(['nginx', '-p', self.dir, '-c', conf],
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            probe = self.host.run(['curl', '-sf', '-o', '/dev/null', '-I',
                                   self.url], check=False,
                                  capture_output=True)
            if probe.returncode == 0:
                return self
            time.sleep(0.2)
        raise lab_exception.BenchmarkFailed(
            reason='nginx on the origin host did not start: %s'
                   % self._error_log())

    def _error_log(self):
        try:
            with open(os.path.join(self.dir, 'error.log')) as f:
                return f.read()[-1000:]
        except OSError:
            return '(no log)'

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def download(host, url, dest, timeout=3600):
    """Fetch *url* into *dest* from inside *host*; returns seconds."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    start = time.monotonic()
    proc = host.run(['curl', '-sS', '--fail', '-o', dest, url], check=False,
                    capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise lab_exception.BenchmarkFailed(
            reason='download on %s failed: %s' % (host.name,
                                                  proc.stderr.strip()))
    return time.monotonic() - start
