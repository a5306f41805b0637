"""CHAP on every export and login (guest)."""

import copy

import pytest

from thunder_agent import exception
from tests.guest.conftest import iscsi_sessions
from tests.guest.conftest import leftovers
from tests.guest.conftest import MIB

pytestmark = [pytest.mark.guest]


def test_wrong_chap_secret_is_refused(agents, make_image, guest):
    image = make_image(8 * MIB)
    a, b = agents('a'), agents('b')
    ta = a.create_template(image, [image.export('10.99.1.1')])
    try:
        assert ta.export['data']['auth_method'] == 'CHAP'
        wrong = copy.deepcopy(ta.export)
        wrong['data']['auth_password'] = 'WrongSecret12345'
        with pytest.raises(exception.SourceUnavailable):
            b.create_template(image, [wrong])
        # The origin refuses a wrong secret too.
        with pytest.raises(exception.SourceUnavailable):
            b.create_template(image, [image.export(
                '10.99.1.2', secret='WrongSecret12345')])
        # No CHAP at all is refused before any login is tried.
        bare = copy.deepcopy(ta.export)
        del bare['data']['auth_method']
        with pytest.raises(exception.InvalidSource):
            b.create_template(image, [bare])

        a_portal = ta.export['data']['target_portal']
        assert [s for s in iscsi_sessions()
                if s[0] in (a_portal, '10.99.1.2:3260')] == []
        assert leftovers(b) == {'dm': [], 'loops': [], 'targets': []}
    finally:
        a.delete_template(ta)
