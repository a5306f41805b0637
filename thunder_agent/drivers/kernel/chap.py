"""CHAP credentials of template exports and checks of the ones we use."""

import re
import secrets
import string

from thunder_agent import exception

_ALPHABET = string.ascii_letters + string.digits
# 12 to 16 characters is what every initiator accepts (Windows is the
# strictest); letters and digits keep tgtadm and iscsiadm arguments plain.
SECRET_LENGTH = 16
_USERNAME = re.compile(r'^[A-Za-z0-9._:-]{1,128}$')
_SECRET = re.compile(r'^[A-Za-z0-9._:@+/=-]{12,255}$')


def username(image_id):
    # tgt accounts are per tgtd; one per template keeps revocation simple.
    return 'thunder-' + image_id


def new_secret():
    return ''.join(secrets.choice(_ALPHABET) for _ in range(SECRET_LENGTH))


def check_credentials(data):
    """Refuse connection data without usable CHAP credentials."""
    if data.get('auth_method') != 'CHAP':
        raise exception.InvalidSource(
            reason='auth_method must be CHAP, not %r'
                   % (data.get('auth_method'),))
    user = data.get('auth_username')
    secret = data.get('auth_password')
    if not isinstance(user, str) or not _USERNAME.match(user):
        raise exception.InvalidSource(reason='auth_username %r is not valid'
                                             % (user,))
    if not isinstance(secret, str) or not _SECRET.match(secret):
        # Never echo a secret.
        raise exception.InvalidSource(
            reason='auth_password must be 12 to 255 plain characters')
