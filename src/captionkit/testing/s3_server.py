"""A real S3-compatible server for tests and benchmarks: moto's standalone server in a subprocess on 127.0.0.1.

As s3fs's own test suite does. Authentication is on (``INITIAL_NO_AUTH_ACTION_COUNT``): the first
three requests create an IAM user with full access and its key, every later request must be signed
with that key, so wrong credentials really get a 403 from the server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str

    def storage_options(self, key: str | None = None, secret: str | None = None) -> dict[str, Any]:
        return {"key": key or self.key, "secret": secret or self.secret,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.key, aws_secret_access_key=self.secret)

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> list[str]:
        """Every file under ``folder`` to ``s3://bucket/prefix/<relative path>``; returns the URLs."""
        client = self.client()
        urls = []
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(folder).as_posix()}"
                client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
                urls.append(f"s3://{bucket}/{key}")
        return urls


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_server() -> Iterator[S3Server]:
    import boto3

    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                assert process.poll() is None, "moto server exited"
                assert time.time() < deadline, "moto server did not start within 60 s"
                time.sleep(0.1)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="captionkit-test")
        iam.put_user_policy(UserName="captionkit-test", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        access = iam.create_access_key(UserName="captionkit-test")["AccessKey"]
        yield S3Server(endpoint, access["AccessKeyId"], access["SecretAccessKey"])
    finally:
        process.terminate()
        process.wait(timeout=30)
