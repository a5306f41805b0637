"""A deployment CA and per-node credentials, made with GnuTLS's certtool.

The emulated cluster, the tests and devstack need what an operator gives
each node in production: a key and a certificate issued by the
deployment's CA, in the directory layout QEMU's ``tls-creds-x509`` and
libnbd's ``set_tls_certificates`` read (``[tls] certificates_dir``)::

    ca-cert.pem
    server-cert.pem  server-key.pem
    client-cert.pem  client-key.pem

One ECDSA P-256 key and one certificate per node serve both roles (TLS
server for its children, client of its parent, signer of its coordinator
messages): common name = the node id, DNS and IP subject alternative names
= the names and addresses it is reached at. P-256 keys are made in ~2 ms
and sign in ~50 us, so a 16-host cluster's PKI takes well under a second.
"""

import dataclasses
import os
import shutil
import subprocess
import tempfile

CERTTOOL = 'certtool'
DAYS = 30


class PKIError(Exception):
    pass


def _certtool(args, template=None, timeout=30):
    if shutil.which(CERTTOOL) is None:
        raise PKIError('certtool is not installed (Debian package gnutls-bin)')
    with tempfile.NamedTemporaryFile('w', suffix='.info') as info:
        if template is not None:
            info.write(template)
            info.flush()
            args = args + ['--template', info.name]
        proc = subprocess.run([CERTTOOL] + args, capture_output=True,
                              text=True, timeout=timeout)
    if proc.returncode:
        raise PKIError('certtool %s failed: %s' % (
            ' '.join(args[:2]), proc.stderr.strip()[-500:]))
    return proc.stdout


def _new_key(path):
    key = _certtool(['--generate-privkey', '--key-type=ecdsa',
                     '--curve=secp256r1'])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write(key)


@dataclasses.dataclass(frozen=True)
class CA:
    """A CA in *path*: ca-cert.pem and ca-key.pem."""

    path: str
    name: str = 'thunder-ca'

    @property
    def cert(self):
        return os.path.join(self.path, 'ca-cert.pem')

    @property
    def key(self):
        return os.path.join(self.path, 'ca-key.pem')

    @classmethod
    def create(cls, path, name='thunder-ca'):
        os.makedirs(path, mode=0o700, exist_ok=True)
        ca = cls(path, name)
        _new_key(ca.key)
        _certtool(['--generate-self-signed', '--load-privkey', ca.key,
                   '--outfile', ca.cert],
                  'cn = "%s"\nca\ncert_signing_key\nexpiration_days = %d\n'
                  % (name, DAYS))
        return ca

    def issue(self, node, out_dir, ips=(), dns_names=(), days=DAYS):
        """Credentials of *node* in *out_dir* (the ``[tls]
        certificates_dir`` layout); returns *out_dir*."""
        os.makedirs(out_dir, mode=0o700, exist_ok=True)
        key = os.path.join(out_dir, 'server-key.pem')
        cert = os.path.join(out_dir, 'server-cert.pem')
        _new_key(key)
        lines = ['cn = "%s"' % node, 'tls_www_server', 'tls_www_client',
                 'signing_key', 'encryption_key',
                 'expiration_days = %d' % days]
        lines += ['dns_name = "%s"' % n for n in (node,) + tuple(dns_names)]
        lines += ['ip_address = "%s"' % ip for ip in ips]
        _certtool(['--generate-certificate', '--load-privkey', key,
                   '--load-ca-certificate', self.cert,
                   '--load-ca-privkey', self.key, '--outfile', cert],
                  '\n'.join(lines) + '\n')
        shutil.copyfile(self.cert, os.path.join(out_dir, 'ca-cert.pem'))
        shutil.copyfile(cert, os.path.join(out_dir, 'client-cert.pem'))
        client_key = os.path.join(out_dir, 'client-key.pem')
        shutil.copyfile(key, client_key)
        os.chmod(client_key, 0o600)
        return out_dir
