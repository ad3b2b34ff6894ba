"""Shared test fixtures.

`s3_endpoint`: a real S3 endpoint for each test (moto's server on 127.0.0.1, one per session) with a fresh
bucket. pyarrow's own S3 client ignores boto mocks, so everything is tested against the endpoint. The AWS
variables are set in the environment for the test (s3fs/botocore read AWS_ENDPOINT_URL), and are also given
as `env` (for subprocesses and Ray workers) and as `storage_options` (fsspec/s3fs, datasets).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest


@dataclass
class S3Endpoint:
    url: str  # http://127.0.0.1:PORT
    bucket: str  # a fresh, empty bucket for this test
    env: dict[str, str]  # AWS_* variables that point any S3 client at the endpoint
    storage_options: dict  # the same for fsspec / s3fs / datasets.load_dataset

    def uri(self, *parts: str) -> str:
        """s3://<bucket>/<parts...>"""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)]).rstrip("/")

    def fs(self):
        import s3fs
        return s3fs.S3FileSystem(**self.storage_options)

    def pyarrow_fs(self):
        import pyarrow.fs
        return pyarrow.fs.S3FileSystem(
            access_key=self.env["AWS_ACCESS_KEY_ID"], secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region=self.env["AWS_DEFAULT_REGION"], endpoint_override=self.url.split("://", 1)[1], scheme="http")


@pytest.fixture(scope="session")
def s3_server() -> str:
    import logging

    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_endpoint(s3_server, monkeypatch) -> S3Endpoint:
    import boto3
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_server,
               "client_kwargs": {"region_name": "us-east-1"}}
    return S3Endpoint(url=s3_server, bucket=bucket, env=env, storage_options=options)


@pytest.fixture(scope="module")
def ray_local(request):
    """A local Ray for one test module, which may define tools or functions of its own: Ray workers
    cannot import tests/, so the module is shipped by value."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(request.module)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(request.module)
