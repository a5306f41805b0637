"""Signed coordinator calls: envelopes made and checked with real keys."""

import datetime
import ipaddress

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives import hashes
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.oid import NameOID
import pytest

from thunder_agent import identity
from thunder_lab import pki

NOW = 1_800_000_000.0
ARGS = {'image_id': 'i', 'node': 'host-a',
        'address': {'host': '192.0.2.1', 'port': 10809, 'export': 'e'},
        'origin': {'driver_volume_type': 'nbd', 'data': {'port': 1}}}


class Clock:
    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn='test-ca', key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    when = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn))
            .issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(when - datetime.timedelta(days=1))
            .not_valid_after(when + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                           critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_node(ca, node, ips=(), key=None, days=30):
    ca_key, ca_cert = ca
    key = key or ec.generate_private_key(ec.SECP256R1())
    when = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)
    sans = [x509.DNSName(node)] + [x509.IPAddress(ipaddress.ip_address(ip))
                                   for ip in ips]
    cert = (x509.CertificateBuilder().subject_name(_name(node))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(when - datetime.timedelta(days=1))
            .not_valid_after(when + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH,
                 ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, None if isinstance(ca_key, ed25519.Ed25519PrivateKey)
                  else hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization
    pem = cert.public_bytes(serialization.Encoding.PEM).decode('ascii')
    return identity.Signer(key, pem, Clock())


@pytest.fixture(scope='module')
def ca():
    return make_ca()


@pytest.fixture
def verifier(ca):
    return identity.Verifier([ca[1]], skew=60, clock=Clock())


def test_a_good_envelope_names_the_caller_and_its_addresses(ca, verifier):
    signer = make_node(ca, 'host-a', ['192.0.2.1', '2001:db8::1'])
    caller = verifier.verify('join', ARGS, signer.sign('join', ARGS))
    assert caller.node == 'host-a'
    assert caller.owns('192.0.2.1') and caller.owns('2001:db8::1')
    assert not caller.owns('192.0.2.2') and not caller.owns('host-a')


@pytest.mark.parametrize('key', [
    rsa.generate_private_key(65537, 2048),
    ed25519.Ed25519PrivateKey.generate(),
    ec.generate_private_key(ec.SECP384R1())], ids=['rsa', 'ed25519', 'p384'])
def test_rsa_ed25519_and_other_curves_sign_too(ca, verifier, key):
    signer = make_node(ca, 'host-a', ['192.0.2.1'], key=key)
    assert verifier.verify('heartbeat', ARGS,
                           signer.sign('heartbeat', ARGS)).node == 'host-a'


def test_certtool_keys_of_the_lab_pki_sign(tmp_path):
    # certtool writes EC keys with a leading zero byte half of the time:
    # several keys make sure both forms are read.
    ca = pki.CA.create(str(tmp_path / 'ca'))
    verifier = identity.Verifier.from_file(ca.cert)
    for i in range(6):
        path = ca.issue('node-%d' % i, str(tmp_path / str(i)),
                        ips=['192.0.2.%d' % (i + 1)])
        signer = identity.Signer.from_dir(path)
        caller = verifier.verify('join', ARGS, signer.sign('join', ARGS))
        assert caller.node == 'node-%d' % i
        assert caller.owns('192.0.2.%d' % (i + 1))


def refusal(verifier, method, args, envelope):
    with pytest.raises(identity.Refused) as info:
        verifier.verify(method, args, envelope)
    return str(info.value)


def test_a_stranger_is_refused(ca, verifier):
    other = make_node(make_ca('other-ca'), 'host-a', ['192.0.2.1'])
    assert 'does not verify' in refusal(verifier, 'join', ARGS,
                                        other.sign('join', ARGS))
    assert 'no envelope' in refusal(verifier, 'join', ARGS, None)
    assert 'envelope keys' in refusal(verifier, 'join', ARGS, {})


def test_a_signature_binds_method_and_every_argument(ca, verifier):
    signer = make_node(ca, 'host-a', ['192.0.2.1'])
    envelope = signer.sign('join', ARGS)
    moved = dict(ARGS, address=dict(ARGS['address'], host='192.0.2.66'))
    assert 'bad signature' in refusal(verifier, 'join', moved, envelope)
    assert 'bad signature' in refusal(verifier, 'leave', ARGS, envelope)
    forged = dict(envelope, signature=signer.sign('x', {})['signature'])
    assert 'bad signature' in refusal(verifier, 'join', ARGS, forged)
    # The refused ones spent nothing: the genuine call still goes.
    assert verifier.verify('join', ARGS, envelope).node == 'host-a'


def test_a_replay_and_a_stale_timestamp_are_refused(ca, verifier):
    signer = make_node(ca, 'host-a', ['192.0.2.1'])
    envelope = signer.sign('join', ARGS)
    verifier.verify('join', ARGS, envelope)
    assert 'replayed nonce' in refusal(verifier, 'join', ARGS, envelope)
    signer._clock.now = NOW - 61
    assert 'skew window' in refusal(verifier, 'join', ARGS,
                                    signer.sign('join', ARGS))
    signer._clock.now = NOW + 61
    assert 'skew window' in refusal(verifier, 'join', ARGS,
                                    signer.sign('join', ARGS))


def test_nonces_are_forgotten_after_the_window_only(ca):
    clock = Clock()
    verifier = identity.Verifier([ca[1]], skew=60, clock=clock,
                                 max_nonces=3)
    signer = make_node(ca, 'host-a', ['192.0.2.1'])
    for _ in range(3):
        verifier.verify('join', ARGS, signer.sign('join', ARGS))
    # Full: refused rather than forgetting a nonce still replayable.
    assert 'too many calls' in refusal(verifier, 'join', ARGS,
                                       signer.sign('join', ARGS))
    clock.now += 61
    signer._clock.now = clock.now
    verifier.verify('join', ARGS, signer.sign('join', ARGS))
    assert len(verifier._nonces) == 1


def test_an_expired_certificate_is_refused_even_once_cached(ca):
    clock = Clock()
    verifier = identity.Verifier([ca[1]], skew=60, clock=clock)
    signer = make_node(ca, 'host-a', ['192.0.2.1'], days=1)
    verifier.verify('join', ARGS, signer.sign('join', ARGS))
    clock.now = signer._clock.now = NOW + 2 * 86400
    assert 'not valid now' in refusal(verifier, 'join', ARGS,
                                      signer.sign('join', ARGS))
    fresh = identity.Verifier([ca[1]], skew=60, clock=clock)
    assert 'does not verify' in refusal(fresh, 'join', ARGS,
                                        signer.sign('join', ARGS))


@pytest.mark.parametrize('field,value', [
    ('timestamp', 'now'), ('timestamp', True), ('nonce', 'x' * 32),
    ('nonce', 'ab'), ('signature', '!!'), ('signature', 'A' * 2000),
    ('certificate', 'not a pem'), ('certificate', 'A' * 20000)])
def test_malformed_envelopes_are_refused(ca, verifier, field, value):
    signer = make_node(ca, 'host-a', ['192.0.2.1'])
    envelope = dict(signer.sign('join', ARGS), **{field: value})
    refusal(verifier, 'join', ARGS, envelope)


def test_canonical_encoding_ignores_key_order_and_json_round_trip():
    import json
    a = identity.canonical('m', {'b': [1, (2, 3)], 'a': {'y': 1, 'x': 2.5}},
                           NOW, 'n')
    wire = json.loads(json.dumps({'a': {'x': 2.5, 'y': 1}, 'b': [1, [2, 3]]}))
    assert identity.canonical('m', wire, NOW, 'n') == a
