"""CHAP credentials of template exports and checks of the ones we use.

A relaying template's export and every child logging in to it need the
same secret, and the secret must never travel through the coordinator or
sit in a record. Both sides therefore derive it: HMAC-SHA256 of the
export's IQN under the deployment's relay key ([kernel] relay_key_file,
the same on every host), written as 16 letters and digits. 16 base-62
digits hold 95 bits, the most every initiator accepts (12 to 16
characters); the HMAC's 256 bits reduced modulo 62**16 leave no bias worth
the name (below 2**-160). A different IQN (host or image) gives an
unrelated secret, so one export's secret opens no other.
"""

import hashlib
import hmac
import re
import secrets
import string

from thunder_agent import exception

_ALPHABET = string.ascii_letters + string.digits
# 12 to 16 characters is what every initiator accepts (Windows is the
# strictest); letters and digits keep tgtadm and iscsiadm arguments plain.
SECRET_LENGTH = 16
# A relay key shorter than the HMAC's output weakens it.
MIN_KEY_BYTES = 32
_USERNAME = re.compile(r'^[A-Za-z0-9._:-]{1,128}$')
_SECRET = re.compile(r'^[A-Za-z0-9._:@+/=-]{12,255}$')


def username(image_id):
    # tgt accounts are per tgtd; one per template keeps revocation simple.
    return 'thunder-' + image_id


def new_secret():
    return ''.join(secrets.choice(_ALPHABET) for _ in range(SECRET_LENGTH))


def relay_secret(key, iqn):
    """The CHAP secret of the relay export *iqn* under relay *key*."""
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise exception.BackendError(
            reason='the relay key must hold at least %d bytes'
                   % MIN_KEY_BYTES)
    number = int.from_bytes(
        hmac.new(key, iqn.encode('utf-8'), hashlib.sha256).digest(), 'big')
    number %= len(_ALPHABET) ** SECRET_LENGTH
    digits = []
    for _ in range(SECRET_LENGTH):
        number, digit = divmod(number, len(_ALPHABET))
        digits.append(_ALPHABET[digit])
    return ''.join(digits)


def check_credentials(data, secret=None):
    """Refuse connection data without usable CHAP credentials; return
    ``(username, secret)``.

    The secret is the one in *data* or, when *data* carries none (a relay
    parent's export), *secret*.
    """
    if data.get('auth_method') != 'CHAP':
        raise exception.InvalidSource(
            reason='auth_method must be CHAP, not %r'
                   % (data.get('auth_method'),))
    user = data.get('auth_username')
    if not isinstance(user, str) or not _USERNAME.match(user):
        raise exception.InvalidSource(reason='auth_username %r is not valid'
                                             % (user,))
    if 'auth_password' in data or secret is None:
        secret = data.get('auth_password')
    if not isinstance(secret, str) or not _SECRET.match(secret):
        # Never echo a secret.
        raise exception.InvalidSource(
            reason='auth_password must be 12 to 255 plain characters')
    return user, secret
