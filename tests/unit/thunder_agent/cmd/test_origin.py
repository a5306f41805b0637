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
