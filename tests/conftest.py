"""Shared test fixtures."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run torch with one thread for a test module: on a busy 2-core machine, OpenMP threads
    waiting for each other make CPU runs erratic (up to 10x slower)."""
    import torch  # here, not at the top: the ETL tests never load torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def moto_s3():
    """moto's standalone S3 server on 127.0.0.1 for a test module, the AWS environment pointing
    at it (test credentials, AWS_ENDPOINT_URL) and bucket `patchetl-test`; yields a boto3
    client."""
    import logging

    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        client = boto3.client("s3")
        client.create_bucket(Bucket="patchetl-test")
        yield client
    server.stop()
