"""Urza's artifact bytes in an S3-compatible object store (`S3_ENDPOINT_URL`; MinIO, Ceph, AWS, moto in tests).

Objects live at `<prefix>objects/<sha[:2]>/<sha>` in `bucket`, the same content-addressed layout as the local store;
the bucket is created on first use if it does not exist. Credentials come from boto3's usual chain
(`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, a profile, an instance role). Every `get` hashes the bytes it received
and refuses them unless they hash to the address, so a corrupted or substituted object never reaches `load_kernel`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from cambium.morph.errors import BackendError, redact
from cambium.morph.library import ArtifactError, check_sha, verified

__all__ = ["S3ObjectStore"]

_MISSING = {"404", "NoSuchKey", "NotFound"}


class S3ObjectStore:
    """Bytes in an S3 bucket, addressed by their sha256."""

    def __init__(self, endpoint_url: str, bucket: str = "cambium-urza", *, prefix: str = "",
                 region: str = "us-east-1", timeout_s: float = 10.0) -> None:
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.prefix = prefix
        cfg = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 2})
        try:
            self._s3: Any = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)
        except ValueError as exc:
            raise BackendError(f"S3_ENDPOINT_URL={redact(endpoint_url)!r} is not an endpoint URL: {exc}") from None
        self._bucket_ready = False

    def _where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {redact(self.endpoint_url)}"

    def _call(self, doing: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except NoCredentialsError:
            raise BackendError(f"no S3 credentials for {self._where()}: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY") from None
        except ClientError:
            raise
        except BotoCoreError as exc:
            raise BackendError(f"S3 store {self._where()} failed while {doing}: {exc}") from None

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        try:
            self._call("checking the bucket", self._s3.head_bucket, Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                raise BackendError(f"S3 store {self._where()} refused access to the bucket: {_code(exc)}") from None
            try:
                self._call("creating the bucket", self._s3.create_bucket, Bucket=self.bucket)
            except ClientError as exc2:
                if _code(exc2) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise BackendError(f"S3 store {self._where()} could not create the bucket: {_code(exc2)}"
                                       ) from None
        self._bucket_ready = True

    def _key(self, sha: str) -> str:
        check_sha(sha)
        return f"{self.prefix}objects/{sha[:2]}/{sha}"

    def ping(self) -> str:
        """What the store answers about the bucket; changes nothing (a missing bucket is created on first use)."""
        try:
            self._call("checking the bucket", self._s3.head_bucket, Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                raise BackendError(f"S3 store {self._where()} refused access to the bucket: {_code(exc)}") from None
            return f"bucket {self.bucket} does not exist yet (created on first write)"
        return f"bucket {self.bucket} exists"

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has(sha):
            try:
                self._call("storing an object", self._s3.put_object, Bucket=self.bucket, Key=self._key(sha),
                           Body=data)
            except ClientError as exc:
                raise BackendError(f"S3 store {self._where()} refused to store {sha[:12]}...: {_code(exc)}"
                                   ) from None
        return sha

    def get(self, sha: str) -> bytes:
        self._ensure_bucket()
        try:
            reply = self._call("reading an object", self._s3.get_object, Bucket=self.bucket, Key=self._key(sha))
            data: bytes = reply["Body"].read()
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise ArtifactError(f"artifact {sha[:12]}... is not in {self._where()}; compile the blueprint "
                                    "again") from None
            raise BackendError(f"S3 store {self._where()} refused to read {sha[:12]}...: {_code(exc)}") from None
        return verified(sha, data, self._where())

    def has(self, sha: str) -> bool:
        self._ensure_bucket()
        try:
            self._call("checking an object", self._s3.head_object, Bucket=self.bucket, Key=self._key(sha))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            raise BackendError(f"S3 store {self._where()} refused to check {sha[:12]}...: {_code(exc)}") from None
        return True


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))
