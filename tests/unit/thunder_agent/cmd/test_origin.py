"""thunder-origin's command line: an unsafe image is refused with a
message and exit status 2, and nothing serves."""

import pytest

from tests.unit.thunder_agent import test_image_check as headers
from thunder_agent.cmd import origin as origin_cmd
from thunder_agent import origin as origin_mod


class Recorder:
    def __init__(self):
        self.made = []
        self.server_class = origin_mod.OriginServer

    def __call__(self, *args, **kwargs):
        self.made.append((args, kwargs))
        return self.server_class(*args, **kwargs)


def test_an_image_naming_a_backing_file_is_refused(tmp_path, capsys,
                                                   monkeypatch):
    image = tmp_path / 'top.qcow2'
    image.write_bytes(headers.qcow2(backing=512))
    recorder = Recorder()
    monkeypatch.setattr(origin_cmd.origin, 'OriginServer', recorder)
    status = origin_cmd.main([
        '--image', str(image), '--format', 'qcow2', '--export', 'img-1',
        '--listen', 'unix:%s' % (tmp_path / 'o.sock'),
        '--run-path', str(tmp_path / 'run'), '--max-connections', '5'])
    assert status == 2
    out, err = capsys.readouterr()
    assert out == ''
    assert 'img-1 is refused' in err and 'backing' in err
    (args, kwargs), = recorder.made
    assert kwargs['max_connections'] == 5
    assert not (tmp_path / 'o.sock').exists()
    assert not (tmp_path / 'run').exists() or not any(
        (tmp_path / 'run').iterdir())


def test_max_connections_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        origin_cmd.main(['--image', 'x', '--export', 'e', '--listen',
                         'unix:/x', '--max-connections', '0'])
    assert info.value.code == 2
    assert 'max-connections' in capsys.readouterr().err


class Stop(Exception):
    pass


def _made(monkeypatch, argv, tmp_path):
    """The OriginServer keyword arguments thunder-origin passes."""
    made = []

    def record(*args, **kwargs):
        made.append(kwargs)
        raise Stop()

    monkeypatch.setattr(origin_cmd.origin, 'OriginServer', record)
    with pytest.raises(Stop):
        origin_cmd.main(['--image', str(tmp_path / 'i'), '--export', 'e',
                         '--listen', 'tcp:192.0.2.1:10809'] + argv)
    return made[0]


def test_tls_is_on_by_default_with_the_agent_directory(monkeypatch,
                                                       tmp_path):
    kwargs = _made(monkeypatch, [], tmp_path)
    assert kwargs['tls_dir'] == '/etc/thunder-agent/pki'
    assert kwargs['tls_allow'] == ('CN=*',)


def test_tls_options_reach_the_server(monkeypatch, tmp_path):
    kwargs = _made(monkeypatch, ['--tls-certificates-dir', '/srv/pki',
                                 '--tls-allow', 'CN=compute-*',
                                 '--tls-allow', 'CN=edge-1'], tmp_path)
    assert kwargs['tls_dir'] == '/srv/pki'
    assert kwargs['tls_allow'] == ('CN=compute-*', 'CN=edge-1')


def test_no_tls_is_said_loudly(monkeypatch, tmp_path, capsys):
    kwargs = _made(monkeypatch, ['--no-tls'], tmp_path)
    assert kwargs['tls_dir'] is None
    assert 'WITHOUT TLS' in capsys.readouterr().err


def test_a_missing_certificates_dir_is_refused_by_name(tmp_path, capsys):
    image = tmp_path / 'disk.raw'
    image.write_bytes(bytes(4096))
    status = origin_cmd.main([
        '--image', str(image), '--export', 'img-1',
        '--listen', 'tcp:127.0.0.1:1', '--run-path', str(tmp_path / 'run'),
        '--tls-certificates-dir', str(tmp_path / 'nowhere')])
    assert status == 2
    err = capsys.readouterr().err
    assert 'ca-cert.pem' in err and 'nowhere' in err
