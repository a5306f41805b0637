"""This node's TLS credentials (``[tls]``), as QEMU and libnbd take them.

Every TCP NBD link (origin to template, parent to child) is TLS with X.509
certificates checked both ways. The operator gives each node one key and
one certificate issued by the deployment's CA, in the directory layout
QEMU's ``tls-creds-x509`` ``dir=`` and libnbd's ``set_tls_certificates``
read (:data:`FILES`). The certificate's common name is the node id
(``[DEFAULT] host``), its IP-address SANs the addresses the node relays
from: a client connecting to a parent by IP address checks the parent's
certificate against that address, and a relay admits a child by the
``CN=<node id>`` of its client certificate (QEMU's ``tls-authz``).

QEMU matches an authz rule against the client certificate's whole
distinguished name as it formats it (``CN=hosta`` for a certificate whose
subject is its common name only, as ``thunder_lab.pki`` issues them): a
subject with more attributes (``O=...,CN=hosta``) matches neither the
exact ``CN=<node id>`` rules of a relay nor the origin's default ``CN=*``.

Nothing here reads a key: the files are checked for presence and
permissions (a key readable by group or others is refused: anyone on the
host could then pose as this node), and only the certificate is parsed.
"""

import ipaddress
import os
import stat

from cryptography import x509
from cryptography.x509.oid import NameOID
import nbd

from thunder_agent.coordinator import validation
from thunder_agent import exception

CA_CERT = 'ca-cert.pem'
SERVER_CERT = 'server-cert.pem'
SERVER_KEY = 'server-key.pem'
CLIENT_CERT = 'client-cert.pem'
CLIENT_KEY = 'client-key.pem'
FILES = (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)
KEYS = (SERVER_KEY, CLIENT_KEY)

# QOM ids of the objects the agent adds to its daemons.
SERVER_CREDS_ID = 'tls-server'
CLIENT_CREDS_ID = 'tls-client'
AUTHZ_ID = 'tls-authz'


class InvalidCredentials(exception.InvalidInput):
    msg_fmt = "Invalid TLS credentials in %(path)s: %(reason)s"


def server_creds(certificates_dir, object_id=SERVER_CREDS_ID):
    """A QMP ``object-add`` argument dict: QEMU's x509 credentials as the
    TLS server of an NBD server, asking every client for a certificate of
    the CA (verify-peer)."""
    return {'qom-type': 'tls-creds-x509', 'id': object_id,
            'endpoint': 'server', 'dir': certificates_dir,
            'verify-peer': True}


def client_creds(certificates_dir, object_id=CLIENT_CREDS_ID):
    """The same for QEMU's NBD client: the server's certificate must be of
    the CA and name the host or IP address connected to."""
    return {'qom-type': 'tls-creds-x509', 'id': object_id,
            'endpoint': 'client', 'dir': certificates_dir,
            'verify-peer': True}


def dn_of(node):
    """The distinguished name QEMU's tls-authz matches for *node*'s
    client certificate (validated again here: it becomes a match rule)."""
    validation.node_id(node)
    return 'CN=%s' % node


def authz_list(nodes, object_id=AUTHZ_ID):
    """A QMP ``object-add`` argument dict: an ``authz-list`` admitting
    exactly the client certificates of *nodes* (node ids), everyone else
    denied. The rules are exact matches: a node id is a host name or an
    IP address, never a glob."""
    rules = [{'match': dn, 'policy': 'allow', 'format': 'exact'}
             for dn in sorted({dn_of(n) for n in nodes})]
    return {'qom-type': 'authz-list', 'id': object_id, 'policy': 'deny',
            'rules': rules}


def authz_globs(patterns, object_id=AUTHZ_ID):
    """An ``authz-list`` admitting the client DNs matching the glob
    *patterns* (``CN=*``: any certificate of the CA), for the origin,
    whose operator writes them."""
    rules = []
    for pattern in patterns:
        if (not isinstance(pattern, str) or not pattern.startswith('CN=')
                or not pattern.isprintable() or len(pattern) > 256):
            raise exception.InvalidInput(
                reason='TLS allow pattern %r is not CN=<glob>' % (pattern,))
        rules.append({'match': pattern, 'policy': 'allow', 'format': 'glob'})
    return {'qom-type': 'authz-list', 'id': object_id, 'policy': 'deny',
            'rules': rules}


def replace_calls(obj):
    """QMP calls replacing the object *obj* (an object-add dict) in place.
    A running NBD server looks its tls-authz object up by id at each
    handshake, so the next connection meets the new rules; connections
    already admitted are not cut."""
    return [('object-del', {'id': obj['id']}), ('object-add', obj)]


class Credentials:
    """The checked contents of a certificates directory."""

    def __init__(self, path, node, ips):
        self.path = path
        self.node = node
        self.ips = tuple(ips)

    @classmethod
    def from_dir(cls, path):
        """Check *path* holds the five files (InvalidCredentials naming
        the file otherwise) and read the node certificate's CN and SANs.
        """
        path = os.path.abspath(path)
        for name in FILES:
            full = os.path.join(path, name)
            try:
                st = os.stat(full)
            except OSError as e:
                raise InvalidCredentials(path=path, reason='%s: %s' % (
                    name, e.strerror))
            if not stat.S_ISREG(st.st_mode):
                raise InvalidCredentials(path=path,
                                         reason='%s is not a file' % name)
            if name in KEYS and st.st_mode & 0o077:
                raise InvalidCredentials(
                    path=path, reason='%s is readable by group or others '
                                      '(mode %o): make it 0600' % (
                                          name, stat.S_IMODE(st.st_mode)))
        try:
            with open(os.path.join(path, SERVER_CERT), 'rb') as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except (OSError, ValueError) as e:
            raise InvalidCredentials(path=path, reason='%s: %s' % (
                SERVER_CERT, e))
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1:
            raise InvalidCredentials(path=path, reason='%s has %d common '
                                     'names' % (SERVER_CERT, len(names)))
        try:
            sans = cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value
            ips = sans.get_values_for_type(x509.IPAddress)
        except x509.ExtensionNotFound:
            ips = []
        return cls(path, names[0].value, [ipaddress.ip_address(ip)
                                          for ip in ips])

    @classmethod
    def from_conf(cls, conf):
        """This node's credentials; None when ``[tls] enabled`` is off."""
        if not conf.tls.enabled:
            return None
        creds = cls.from_dir(conf.tls.certificates_dir)
        if creds.node != conf.host:
            raise InvalidCredentials(
                path=creds.path, reason='the certificate is of %r, this '
                                        'node is %r' % (creds.node,
                                                        conf.host))
        return creds

    def server_creds(self, object_id=SERVER_CREDS_ID):
        return server_creds(self.path, object_id)

    def client_creds(self, object_id=CLIENT_CREDS_ID):
        return client_creds(self.path, object_id)

    def secure(self, handle):
        """Make the libnbd *handle* require TLS with these credentials and
        check the server's certificate (against the host given to
        connect_tcp: connect to an IP address in its SANs)."""
        secure_handle(handle, self.path)
        return handle


def secure_handle(handle, certificates_dir):
    handle.set_tls(nbd.TLS_REQUIRE)
    handle.set_tls_certificates(certificates_dir)
    handle.set_tls_verify_peer(True)
    return handle
