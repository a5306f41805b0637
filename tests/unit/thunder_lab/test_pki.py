"""The lab PKI: what certtool makes is what [tls] certificates_dir needs."""

import os
import shutil
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from thunder_lab import pki

pytestmark = pytest.mark.skipif(shutil.which('certtool') is None,
                                reason='certtool (gnutls-bin) is missing')


def test_issue_gives_the_layout_with_private_keys(tmp_path):
    ca = pki.CA.create(str(tmp_path / 'ca'))
    out = ca.issue('host-a', str(tmp_path / 'a'), ips=['10.0.0.1'])
    assert sorted(os.listdir(out)) == [
        'ca-cert.pem', 'client-cert.pem', 'client-key.pem',
        'server-cert.pem', 'server-key.pem']
    for key in ('server-key.pem', 'client-key.pem'):
        assert stat.S_IMODE(os.stat(os.path.join(out, key)).st_mode) == 0o600
    with open(os.path.join(out, 'server-cert.pem'), 'rb') as f:
        cert = x509.load_pem_x509_certificate(f.read())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    san = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert cn == 'host-a'
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        '10.0.0.1']
    with open(ca.cert, 'rb') as f:
        cert.verify_directly_issued_by(
            x509.load_pem_x509_certificate(f.read()))
