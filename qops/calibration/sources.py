"""Table sources for calibration: local or ``s3://`` parquet/CSV files (and folders of them), or an
in-memory DataFrame, opened as Arrow datasets so large pools are streamed batch by batch.

S3 credentials come from boto3's credential chain (environment, shared files, instance roles); an
S3-compatible store is reached through ``endpoint_url`` (or ``$AWS_ENDPOINT_URL_S3`` /
``$AWS_ENDPOINT_URL``). Credentials never appear in errors, logs or manifests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pandas as pd

from qops.artifacts import sha256_file
from qops.errors import DataError


@dataclass
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@dataclass
class TableSource:
    """A readable table: ``uri`` (path or s3://) or ``frame``; ``describe()`` gives its provenance."""

    uri: str
    frame: pd.DataFrame | None = None
    s3: S3Options = field(default_factory=S3Options)
    role: str = "table"  # what the table is for, named in every error

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def _split(self) -> tuple[str, str]:
        bucket, _, key = self.uri[len("s3://"):].partition("/")
        return bucket, key

    def _boto(self):
        import boto3

        return boto3.session.Session(region_name=self.s3.region).client("s3", endpoint_url=self.s3.resolved_endpoint())

    def _arrow_fs(self):
        from pyarrow import fs

        if not self.is_s3:
            return fs.LocalFileSystem(), self.uri
        import boto3

        creds = boto3.session.Session().get_credentials()
        if creds is None:
            raise DataError(f"No AWS credentials found for {self.uri}.",
                            "configure the boto3 credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                            "~/.aws/credentials, or an instance role).")
        frozen = creds.get_frozen_credentials()
        endpoint = self.s3.resolved_endpoint()
        kwargs = dict(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token,
                      region=self.s3.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        bucket, key = self._split()
        return fs.S3FileSystem(**kwargs), f"{bucket}/{key}"

    def _format(self) -> str:
        name = self.uri.rstrip("/").lower()
        return "csv" if name.endswith((".csv", ".csv.gz", ".txt")) else "parquet"

    def check_exists(self) -> None:
        """Clear errors for a missing object or denied access, before any reading starts."""
        if self.frame is not None:
            return
        if not self.is_s3:
            if not Path(self.uri).exists():
                raise DataError(f"The {self.role} file {self.uri} does not exist.",
                                f"check the {self.role} path in the spec/arguments.")
            return
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self._split()
        try:
            client = self._boto()
            if key and not key.endswith("/"):
                client.head_object(Bucket=bucket, Key=key)
            else:
                client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise DataError(f"The {self.role} {self.uri} does not exist (S3 says {code}).",
                                "check the bucket and key; list them with `aws s3 ls`.") from None
            if code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise DataError(f"Access to the {self.role} {self.uri} was denied (S3 says {code}).",
                                "grant s3:GetObject/s3:ListBucket to these credentials or use others.") from None
            raise DataError(f"Reading {self.uri} failed: S3 error {code}.", "check the S3 endpoint and "
                            "credentials.") from None
        except BotoCoreError as e:
            raise DataError(f"Cannot reach S3 for {self.uri}: {e}", "check the endpoint URL and network.") from None

    def dataset(self):
        import pyarrow as pa
        import pyarrow.dataset as ds

        if self.frame is not None:
            return ds.dataset(pa.Table.from_pandas(self.frame, preserve_index=False))
        self.check_exists()
        filesystem, path = self._arrow_fs()
        try:
            return ds.dataset(path, format=self._format(), filesystem=filesystem)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"The {self.role} {self.uri} is not a readable {self._format()} dataset: {e}",
                            "check that the file is valid parquet/CSV (and not truncated).") from None

    def batches(self, columns: list[str] | None = None, batch_size: int = 65_536) -> Iterator:
        import pyarrow as pa

        dataset = self.dataset()
        missing = [c for c in (columns or []) if c not in dataset.schema.names]
        if missing:
            raise DataError(f"The {self.role} {self.uri} lacks column(s) {missing}; it has "
                            f"{dataset.schema.names[:30]}.",
                            "fix the column names in the spec or the data.")
        try:
            yield from dataset.to_batches(columns=columns, batch_size=batch_size)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"Reading the {self.role} {self.uri} failed: {e}",
                            "check that the file is valid parquet/CSV (and not truncated).") from None

    def schema_names(self) -> list[str]:
        return list(self.dataset().schema.names)

    def describe(self) -> dict:
        """Provenance for the manifest: size, mtime / ETag and version id; never credentials."""
        if self.frame is not None:
            return {"uri": "<DataFrame>", "rows": int(len(self.frame))}
        if not self.is_s3:
            p = Path(self.uri)
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
            out = {"uri": str(p), "files": len(files), "bytes": int(sum(f.stat().st_size for f in files)),
                   "mtime": max((f.stat().st_mtime for f in files), default=None)}
            if p.is_file():
                out["sha256"] = sha256_file(p)
            return out
        bucket, key = self._split()
        client = self._boto()
        if key and not key.endswith("/"):
            head = client.head_object(Bucket=bucket, Key=key)
            return {"uri": self.uri, "etag": head.get("ETag", "").strip('"'), "version_id": head.get("VersionId"),
                    "bytes": head.get("ContentLength"), "last_modified": str(head.get("LastModified"))}
        objs = client.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
        return {"uri": self.uri, "objects": [{"key": o["Key"], "etag": o["ETag"].strip('"'), "bytes": o["Size"]}
                                             for o in objs[:1000]]}


def as_source(obj, s3: S3Options | None = None, role: str = "table") -> TableSource:
    if isinstance(obj, TableSource):
        return obj
    if isinstance(obj, pd.DataFrame):
        return TableSource(uri="<DataFrame>", frame=obj, role=role)
    return TableSource(uri=str(obj), s3=s3 or S3Options(), role=role)
