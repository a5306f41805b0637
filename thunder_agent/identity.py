"""Signed coordinator calls: a node speaks only for itself.

RabbitMQ permissions cannot bind a message to its sender (answers go
through the default exchange, which any server may publish to), so every
call to the coordinator carries an *envelope* signed with the node's key
(``[tls] certificates_dir``/client-key.pem, the key of its TLS
certificate)::

    {'certificate': PEM of the node's certificate,
     'timestamp': seconds since the epoch (float),
     'nonce': 32 random hex digits,
     'signature': base64 of the signature over canonical(...)}

:func:`canonical` encodes (method, every argument, timestamp, nonce) as
sorted, compact JSON: the arguments reach the coordinator as JSON, so it
rebuilds the same bytes from what it received. The coordinator
(:class:`Verifier`) checks that the certificate chains to the deployment
CA and is valid now (cryptography's X.509 client verification: a TLS
client certificate), the signature, that the timestamp is within the skew
window, and that the nonce was not seen within it. What the certificate
says (common name = node id, IP SANs = the relay addresses) is returned
as a :class:`Caller`; the endpoint compares it with the arguments.

Costs measured on this machine (P-256): a signature ~45 us; a check ~70
us, plus ~1 ms of chain verification the first time a certificate is seen
(cached, :data:`CHAIN_CACHE` certificates, each re-checked for its
validity period at every call).
"""

import base64
import binascii
import collections
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import os
import secrets
import threading
import time

from cryptography import exceptions as crypto_exceptions
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from thunder_agent import exception

ENVELOPE_KEYS = ('certificate', 'timestamp', 'nonce', 'signature')
# A P-256 certificate is ~700 bytes, an RSA-4096 one ~2 KB; 16 KB leaves
# room for long SAN lists and bounds what is parsed.
MAX_CERTIFICATE = 16384
MAX_SIGNATURE = 1024
NONCE_HEX = 32
# Certificates whose chain was verified, by SHA-256 of their PEM.
CHAIN_CACHE = 4096
# Nonces remembered at most: at 10 000 calls a second within a 2 x 60 s
# window this is ~1.2 M; each entry is ~150 bytes. Beyond it calls are
# refused (never forgotten early, which would allow replays).
MAX_NONCES = 1 << 21


class Refused(exception.ThunderException):
    """Why a call was refused: logged by the coordinator, never sent."""
    msg_fmt = "Refused %(method)s: %(reason)s"


def canonical(method, args, timestamp, nonce):
    """The bytes signed for a call of *method* with keyword *args*."""
    return json.dumps([method, args, timestamp, nonce], sort_keys=True,
                      separators=(',', ':'), ensure_ascii=True,
                      allow_nan=False).encode('ascii')


def _sign(key, data):
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    raise exception.InvalidInput(reason='signing keys must be ECDSA, RSA '
                                        'or Ed25519, not %s'
                                        % type(key).__name__)


def _check_signature(public_key, signature, data):
    """Raises InvalidSignature (or TypeError for an unknown key type)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, data, padding.PKCS1v15(),
                          hashes.SHA256())
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, data)
    else:
        raise TypeError('unsupported key type %s' % type(public_key).__name__)


_CURVES = {'1.2.840.10045.3.1.7': ec.SECP256R1(),
           '1.3.132.0.34': ec.SECP384R1(), '1.3.132.0.35': ec.SECP521R1()}


def load_private_key(pem):
    """The private key in *pem* (bytes).

    GnuTLS's certtool (3.7) writes an EC key whose top bit is set with a
    leading zero byte (33 bytes for P-256), which cryptography refuses;
    such a SEC 1 key is read here by value instead.
    """
    try:
        return serialization.load_pem_private_key(pem, None)
    except ValueError:
        if b'-----BEGIN EC PRIVATE KEY-----' not in pem:
            raise
    body = pem.split(b'-----BEGIN EC PRIVATE KEY-----')[1].split(
        b'-----END EC PRIVATE KEY-----')[0]
    der = base64.b64decode(b''.join(body.split()))
    # ECPrivateKey ::= SEQUENCE { version INTEGER (1), privateKey OCTET
    # STRING, [0] parameters (a curve OID), [1] publicKey }
    items = _der_items(_der_items(der)[0][1])
    if len(items) < 3 or items[0] != (0x02, b'\x01') or items[1][0] != 0x04:
        raise ValueError('not a SEC 1 EC private key')
    params = _der_items(items[2][1]) if items[2][0] == 0xa0 else []
    if not params or params[0][0] != 0x06:
        raise ValueError('EC private key without a named curve')
    curve = _CURVES.get(_oid(params[0][1]))
    if curve is None:
        raise ValueError('EC private key on an unsupported curve')
    return ec.derive_private_key(int.from_bytes(items[1][1], 'big'), curve)


def _der_items(data):
    """[(tag, value)] of the DER elements concatenated in *data*."""
    items = []
    while data:
        if len(data) < 2:
            raise ValueError('truncated DER')
        tag, length, offset = data[0], data[1], 2
        if length & 0x80:
            size = length & 0x7f
            if not 0 < size <= 4 or len(data) < 2 + size:
                raise ValueError('bad DER length')
            length = int.from_bytes(data[2:2 + size], 'big')
            offset += size
        if len(data) < offset + length:
            raise ValueError('truncated DER')
        items.append((tag, data[offset:offset + length]))
        data = data[offset + length:]
    return items


def _oid(value):
    first = value[0]
    arcs = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    number = 0
    for byte in value[1:]:
        number = (number << 7) | (byte & 0x7f)
        if not byte & 0x80:
            arcs.append(number)
            number = 0
    return '.'.join(str(a) for a in arcs)


class Signer:
    """Signs this node's calls with its key and certificate."""

    def __init__(self, key, certificate_pem, clock=time.time):
        self._key = key
        self.certificate = certificate_pem
        self._clock = clock

    @classmethod
    def from_dir(cls, path, clock=time.time):
        from thunder_agent import tls  # tls imports libnbd: only here
        with open(os.path.join(path, tls.CLIENT_KEY), 'rb') as f:
            key = load_private_key(f.read())
        with open(os.path.join(path, tls.CLIENT_CERT), 'rb') as f:
            cert = f.read().decode('ascii')
        return cls(key, cert, clock)

    def sign(self, method, args):
        """The envelope of a call of *method* with keyword *args*."""
        timestamp = self._clock()
        nonce = secrets.token_hex(NONCE_HEX // 2)
        signature = _sign(self._key, canonical(method, args, timestamp,
                                               nonce))
        return {'certificate': self.certificate, 'timestamp': timestamp,
                'nonce': nonce,
                'signature': base64.b64encode(signature).decode('ascii')}


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who signed a call, as its verified certificate says."""

    node: str
    ips: frozenset

    def owns(self, host):
        """Whether *host* (a normalised relay host) is one of the IP
        addresses of the certificate; a host name never is."""
        try:
            return ipaddress.ip_address(host) in self.ips
        except ValueError:
            return False


class Verifier:
    """Checks envelopes against the deployment CA (coordinator side)."""

    def __init__(self, ca_certificates, skew=60, clock=time.time,
                 max_nonces=MAX_NONCES):
        self._store = verification.Store(list(ca_certificates))
        self.skew = skew
        self._clock = clock
        self._max_nonces = max_nonces
        # nonce -> timestamp, in arrival order; entries older than the
        # window are dropped from the front.
        self._nonces = collections.OrderedDict()
        self._chains = collections.OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, ca_file, skew=60, clock=time.time):
        with open(ca_file, 'rb') as f:
            cas = x509.load_pem_x509_certificates(f.read())
        return cls(cas, skew, clock)

    def verify(self, method, args, envelope):
        """The :class:`Caller` of a call; raises :class:`Refused`."""
        def refuse(reason):
            raise Refused(method=method, reason=reason)

        if not isinstance(envelope, dict):
            refuse('no envelope')
        if sorted(envelope) != sorted(ENVELOPE_KEYS):
            refuse('envelope keys are not %s' % (ENVELOPE_KEYS,))
        pem = envelope['certificate']
        timestamp = envelope['timestamp']
        nonce = envelope['nonce']
        signature = envelope['signature']
        if not isinstance(pem, str) or len(pem) > MAX_CERTIFICATE:
            refuse('certificate is not a PEM string')
        if (isinstance(timestamp, bool)
                or not isinstance(timestamp, (int, float))):
            refuse('timestamp is not a number')
        if (not isinstance(nonce, str) or len(nonce) != NONCE_HEX
                or nonce.strip('0123456789abcdef')):
            refuse('nonce is not %d hex digits' % NONCE_HEX)
        if not isinstance(signature, str) or len(signature) > MAX_SIGNATURE:
            refuse('signature is not base64')
        try:
            raw_signature = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            refuse('signature is not base64')
        now = self._clock()
        if abs(now - timestamp) > self.skew:
            refuse('timestamp %.3f is %.1f s away from now (skew window '
                   '%s s)' % (timestamp, timestamp - now, self.skew))
        cert = self._verified(pem, now, refuse)
        try:
            data = canonical(method, args, timestamp, nonce)
        except (TypeError, ValueError) as e:
            refuse('arguments cannot be encoded: %s' % e)
        try:
            _check_signature(cert.public_key(), raw_signature, data)
        except (crypto_exceptions.InvalidSignature, TypeError, ValueError):
            refuse('bad signature')
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1:
            refuse('certificate has %d common names' % len(names))
        try:
            ips = frozenset(cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(
                    x509.IPAddress))
        except x509.ExtensionNotFound:
            ips = frozenset()
        # Last: a nonce is spent only by a call that is otherwise good,
        # so that nobody burns another node's nonces with bad calls.
        self._spend(nonce, timestamp, now, refuse)
        return Caller(names[0].value, ips)

    def _verified(self, pem, now, refuse):
        digest = hashlib.sha256(pem.encode('utf-8', 'replace')).digest()
        with self._lock:
            cert = self._chains.get(digest)
            if cert is not None:
                self._chains.move_to_end(digest)
        when = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        if cert is not None:
            if not (cert.not_valid_before_utc <= when
                    <= cert.not_valid_after_utc):
                refuse('certificate is not valid now')
            return cert
        try:
            certs = x509.load_pem_x509_certificates(pem.encode('ascii'))
        except (ValueError, UnicodeEncodeError):
            refuse('certificate is not PEM')
        verifier = verification.PolicyBuilder().store(self._store).time(
            when).build_client_verifier()
        try:
            verifier.verify(certs[0], certs[1:])
        except verification.VerificationError as e:
            refuse('certificate does not verify against the CA: %s' % e)
        with self._lock:
            self._chains[digest] = certs[0]
            while len(self._chains) > CHAIN_CACHE:
                self._chains.popitem(last=False)
        return certs[0]

    def _spend(self, nonce, timestamp, now, refuse):
        with self._lock:
            # A nonce can be replayed while its timestamp is in the
            # window, i.e. until timestamp + skew: keep it till then.
            while self._nonces:
                oldest, stamp = next(iter(self._nonces.items()))
                if stamp + self.skew >= now:
                    break
                del self._nonces[oldest]
            if nonce in self._nonces:
                refuse('replayed nonce')
            if len(self._nonces) >= self._max_nonces:
                refuse('too many calls within the skew window')
            self._nonces[nonce] = timestamp
