"""Fixtures shared by the cohort-store tests: a real S3 API (moto's server on 127.0.0.1), one per module."""

from __future__ import annotations

import logging
import uuid

import pytest
import s3fs
from moto.server import ThreadedMotoServer


@pytest.fixture(scope="module")
def s3_options():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        # Dummy credentials only; the region keeps botocore from looking anywhere else.
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield {
                "key": "testing",
                "secret": "testing",
                "anon": False,
                "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
            }
        finally:
            server.stop()


@pytest.fixture
def s3_url(s3_options) -> str:
    """A store URL in a fresh bucket of the module's S3 server."""
    bucket = f"cohort-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_options).mkdir(bucket)
    return f"s3://{bucket}/c.zarr"
