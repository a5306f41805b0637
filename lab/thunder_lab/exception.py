"""Errors of the lab tools: benchmark, guest harness, test images, traces.

They never cross the agent's RPC API, so they live here rather than in
:mod:`thunder_agent.exception`; they share its message templates.
"""

from thunder_agent.exception import ThunderException


class ToolNotFound(ThunderException):
    msg_fmt = ("Program %(program)s not found: install the Debian package "
               "%(package)s.")


class GuestImageBuildFailed(ThunderException):
    msg_fmt = "Cannot build the test guest image: %(reason)s"


class PackageFetchFailed(GuestImageBuildFailed):
    msg_fmt = ("Cannot get Debian package %(package)s with apt: %(reason)s")


class GuestHarnessError(ThunderException):
    msg_fmt = "Guest test harness cannot run: %(reason)s"


class TraceRecordFailed(ThunderException):
    msg_fmt = "Cannot record a boot trace of %(image)s: %(reason)s"


class BenchmarkFailed(ThunderException):
    msg_fmt = "Boot-storm benchmark failed: %(reason)s"
