"""The test process ends with pytest's own exit status, without the interpreter's teardown.

Many tests run the product's parts inside this process: two start and stop an embedded Ray, several read
the S3 test server through pyarrow, others train with torch. Each leaves native threads running that no
Python call stops: Ray's GCS client and gRPC threads after `ray.shutdown()`, the AWS SDK's event loop. At
the end of a run of three of those test files, 26 native threads were still running, among them
`gcs_client_io_s`, `grpc_global_tim`, `event_engine` and `AwsEventLoop1`. When the interpreter exits, the
libraries' static destructors run while those threads still do, and now and then one of them touches what
was destroyed: CI saw `731 passed`, then a segmentation fault (exit code 139) after the summary. That crash
says nothing about the tests, and the product's own process is not this one (the tests that run the CLI in a
subprocess check its exit code), so once pytest has printed its summary the process leaves with pytest's
status.
"""
from __future__ import annotations

import os
import sys

import pytest

_exit_status = None


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _exit_status is None:   # the session never ran (a usage error): pytest exits as it would
        return
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, ValueError):   # replaced or closed by a plugin
            pass
    os._exit(_exit_status)
