"""ServiceProcess: its config file, log place and start-up wait."""

import configparser
import os

import pytest

from thunder_lab.emulation import service_process


class Daemon(service_process.ServiceProcess):
    module = 'json.tool'        # exits at once: it takes no --config-file
    name = 'daemon'

    def __init__(self, *args, pings_to_fail=0, **kwargs):
        self.pings_to_fail = pings_to_fail
        self.pings = 0
        super().__init__(*args, **kwargs)

    def complete_groups(self, groups):
        groups.setdefault('extra', {})['conf'] = self.conf_file

    def ping(self):
        self.pings += 1
        if self.pings <= self.pings_to_fail:
            raise ConnectionError('not yet')


class RunningProc:
    pid = 0
    returncode = None

    def poll(self):
        return None


def test_config_and_log_go_to_the_log_dir(tmp_path):
    work, logs = tmp_path / 'work', tmp_path / 'logs'
    daemon = Daemon(str(work), {'DEFAULT': {'host': 'h'}},
                    log_dir=str(logs))
    assert daemon.conf_file == str(logs / 'daemon.conf')
    assert daemon.log_file == str(logs / 'daemon.log')
    assert work.is_dir()
    parser = configparser.ConfigParser()
    parser.read(daemon.conf_file)
    assert parser['DEFAULT']['log_file'] == daemon.log_file
    assert parser['DEFAULT']['host'] == 'h'
    # complete_groups saw the final paths.
    assert parser['extra']['conf'] == daemon.conf_file


def test_without_a_log_dir_everything_stays_in_the_workdir(tmp_path):
    daemon = Daemon(str(tmp_path), {})
    assert os.path.dirname(daemon.conf_file) == str(tmp_path)
    assert os.path.dirname(daemon.log_file) == str(tmp_path)


def test_wait_ready_returns_once_ping_answers(tmp_path):
    daemon = Daemon(str(tmp_path), {}, pings_to_fail=2)
    daemon.proc = RunningProc()
    assert daemon.wait_ready(30) is daemon
    assert daemon.pings == 3


def test_a_process_that_exits_fails_the_wait_with_its_log(tmp_path):
    daemon = Daemon(str(tmp_path), {}, pings_to_fail=10 ** 6)
    assert daemon.spawn() is daemon
    with pytest.raises(RuntimeError) as info:
        daemon.wait_ready(60)
    assert 'daemon exited with 2' in str(info.value)
    assert '--config-file' in str(info.value)      # json.tool's usage
