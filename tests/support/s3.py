"""S3 on loopback: moto's server with credential checks, and the DVC remote pointed at it."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import requests

from tests.support.dvc import dvc


@dataclass(frozen=True)
class S3Endpoint:
    """An S3-compatible server on loopback, a bucket on it and credentials that may use it."""

    url: str
    bucket: str
    access_key_id: str
    secret_access_key: str

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name="us-east-1",
        )

    def objects(self) -> dict[str, bytes]:
        client = self.client()
        listing = client.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return {
            item["Key"]: client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
            for item in listing
        }


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's standalone S3 server on a free 127.0.0.1 port (as dvc-s3's own tests use it)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def fresh_moto_account(url: str, bucket: str) -> S3Endpoint:
    """Empty the moto server and make it check credentials, as MinIO always does.

    After ``reset-auth N`` moto serves N requests without credentials (the IAM set-up
    below) and then authenticates and authorises every request against IAM.
    """
    requests.post(f"{url}/moto-api/reset", timeout=10).raise_for_status()
    requests.post(f"{url}/moto-api/reset-auth", data=b"3", timeout=10).raise_for_status()
    iam = boto3.client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    iam.create_user(UserName="pipeline")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="pipeline", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="pipeline")["AccessKey"]
    endpoint = S3Endpoint(url, bucket, key["AccessKeyId"], key["SecretAccessKey"])
    endpoint.client().create_bucket(Bucket=bucket)
    return endpoint


def configure_remote(workspace: Path, s3: S3Endpoint, env: dict[str, str], **overrides) -> None:
    """Point the project's `minio` remote at ``s3`` in .dvc/config.local (never committed)."""
    settings = {
        "url": f"s3://{s3.bucket}/dandelion-vs-grass",
        "endpointurl": s3.url,
        "access_key_id": s3.access_key_id,
        "secret_access_key": s3.secret_access_key,
        **overrides,
    }
    for key, value in settings.items():
        result = dvc(workspace, "remote", "modify", "--local", "minio", key, value, env=env)
        assert result.returncode == 0, result.stderr


class StoreSwitch:
    """A TCP relay on its own loopback port to an S3 server: ``off`` stops it as a stopped
    store would (connections refused, those open cut), ``on`` starts it again on that port."""

    def __init__(self, target_url: str) -> None:
        from urllib.parse import urlsplit

        target = urlsplit(target_url)
        self.target = (target.hostname, target.port)
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, args=(self.listener,), daemon=True).start()

    def off(self) -> None:
        if self.listener is not None:
            # Wakes the thread blocked in accept(), which else keeps the socket listening.
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        self.connections = []

    def accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: the store is off
                return
            upstream = socket.create_connection(self.target)
            self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=relay, args=(source, sink), daemon=True).start()


def relay(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
