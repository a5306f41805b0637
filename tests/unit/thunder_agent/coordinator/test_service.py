"""The coordinator service's wiring of identity checks and notifications."""

import logging
import os

from oslo_config import cfg
import pytest

from thunder_agent import conf as agent_conf
from thunder_agent.coordinator import rpc as coordinator_rpc
from thunder_agent.coordinator import service
from thunder_agent import identity
from thunder_agent import rpc
from thunder_lab import pki


@pytest.fixture
def conf():
    conf = agent_conf.register_opts(cfg.ConfigOpts())
    conf([])
    return conf


def test_without_tls_every_caller_is_believed_and_it_says_so(conf, caplog):
    conf.set_override('enabled', False, 'tls')
    with caplog.at_level(logging.WARNING):
        assert service.make_verifier(conf) is None
    assert 'believes every caller' in caplog.text


def test_the_ca_defaults_to_the_certificates_dir(conf, tmp_path):
    ca = pki.CA.create(str(tmp_path / 'ca'))
    path = ca.issue('coordinator', str(tmp_path / 'coordinator'))
    conf.set_override('certificates_dir', path, 'tls')
    assert service.ca_file(conf) == os.path.join(path, 'ca-cert.pem')
    conf.set_override('ca_file', ca.cert, 'coordinator')
    assert service.ca_file(conf) == ca.cert
    verifier = service.make_verifier(conf)
    assert isinstance(verifier, identity.Verifier)
    assert verifier.skew == 60


def test_the_server_checks_signatures_and_the_manager_notifies(conf,
                                                               tmp_path):
    ca = pki.CA.create(str(tmp_path / 'ca'))
    conf.set_override('certificates_dir',
                      ca.issue('coordinator', str(tmp_path / 'c')), 'tls')
    svc = service.CoordinatorService(conf)
    svc.manager = svc.make_manager()
    transport = rpc.get_transport(cfg.CONF, 'fake:/')
    try:
        server = svc.make_server(transport)
        endpoint = server.dispatcher.endpoints[0]
        assert isinstance(endpoint.verifier, identity.Verifier)
        assert isinstance(svc.manager.notify, coordinator_rpc.AgentNotifier)
        assert [job.name for job in svc.periodic_jobs()] == ['expiry',
                                                             'notify']
    finally:
        transport.cleanup()
