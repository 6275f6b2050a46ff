"""One place that turns a dataset URI (local path or s3://bucket/key) into a pyarrow filesystem + path."""

from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEME = "s3://"
# Attempts per S3 request (AWS_MAX_ATTEMPTS, as in the AWS SDKs and CLI). The AWS standard strategy waits
# up to 2^n x (0-1) s between attempts (at most 20 s): 10 attempts ride out an outage of ~half a minute
# or more; pyarrow's own default of 3 gives up after about a second.
DEFAULT_S3_ATTEMPTS = 10


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def _s3_endpoint() -> tuple[str | None, str]:
    """(endpoint host[:port] or None, scheme) from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None, "https"
    if "://" not in endpoint:
        return endpoint.rstrip("/"), "https"
    parsed = urlparse(endpoint)
    return parsed.netloc, parsed.scheme or "https"


CREDENTIAL_KEYS = ("access_key", "secret_key", "session_token")


class S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with the AWS standard retry strategy, kept when pickled: pyarrow's own
    __reduce__ leaves the strategy out, so Ray Data read tasks and Ray Train workers (which get the
    filesystem pickled) would silently fall back to 3 attempts.

    Credentials taken from the environment (`s3_filesystem()`) are not pickled: pyarrow's pickle carries the
    keys in clear, and Ray stores pickles where they outlive the job (Ray Tune writes its trials' storage
    filesystem into its experiment state, on that very storage). The receiving process takes them from its
    own environment, as every Ray process on a node does (or from the instance profile)."""

    def __init__(self, max_attempts: int = DEFAULT_S3_ATTEMPTS, credentials_from_environment: bool = False,
                 **kwargs) -> None:
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **kwargs)
        self.max_attempts = max_attempts
        self.credentials_from_environment = credentials_from_environment

    def __reduce__(self):
        _, (kwargs,) = super().__reduce__()
        kwargs.pop("retry_strategy", None)  # in case a later pyarrow pickles it too
        if self.credentials_from_environment:
            for key in CREDENTIAL_KEYS:
                kwargs.pop(key, None)
        return _rebuild_s3, (self.max_attempts, kwargs, self.credentials_from_environment)


def _rebuild_s3(max_attempts: int, kwargs: dict, credentials_from_environment: bool = False) -> S3FileSystem:
    if credentials_from_environment:
        kwargs = {**kwargs, **_environment_credentials()}
    return S3FileSystem(max_attempts=max_attempts, credentials_from_environment=credentials_from_environment,
                        **kwargs)


def _environment_credentials() -> dict[str, str]:
    """access_key / secret_key (/ session_token) from the AWS environment variables; empty without them,
    and pyarrow then falls back to the default AWS credential chain (profiles, instance roles)."""
    access_key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not (access_key and secret_key):
        return {}
    credentials = {"access_key": access_key, "secret_key": secret_key}
    if os.environ.get("AWS_SESSION_TOKEN"):
        credentials["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return credentials


def s3_attempts() -> int:
    raw = os.environ.get("AWS_MAX_ATTEMPTS", "")
    try:
        attempts = int(raw) if raw else DEFAULT_S3_ATTEMPTS
    except ValueError:
        raise ValueError(f"AWS_MAX_ATTEMPTS must be a whole number >= 1, got {raw!r}") from None
    if attempts < 1:
        raise ValueError(f"AWS_MAX_ATTEMPTS must be a whole number >= 1, got {raw!r}")
    return attempts


def s3_filesystem() -> pafs.S3FileSystem:
    """S3FileSystem configured from the standard AWS environment variables (credentials are never logged)."""
    endpoint, scheme = _s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict = {"region": region, "scheme": scheme}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    return S3FileSystem(max_attempts=s3_attempts(), credentials_from_environment=True,
                        **kwargs, **_environment_credentials())


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it). s3://bucket/key -> (S3FileSystem, "bucket/key")."""
    if is_s3(uri):
        path = uri[len(S3_SCHEME):].strip("/")
        if not path:
            raise ValueError(f"S3 URI {uri!r} names no bucket")
        return s3_filesystem(), path
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {uri!r} (use a local path or s3://bucket/prefix)")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping the s3:// scheme intact."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *[p.strip("/") for p in parts])
    return os.path.join(uri, *parts)


def parent_and_name(uri: str) -> tuple[str, str]:
    """("s3://b/a", "x") for "s3://b/a/x"; local paths likewise."""
    if is_s3(uri):
        head, name = posixpath.split(uri.rstrip("/"))
        return head, name
    path = os.path.abspath(os.path.expanduser(uri))
    return os.path.dirname(path), os.path.basename(path)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Local: write a temp file then os.replace; S3: a single PUT (atomic per object). The temp file's name
    starts with '.', so a write killed midway leaves nothing a reader of the folder (pyarrow, a glob) picks up."""
    if is_s3(uri):
        fs, path = resolve(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    _, path = resolve(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def delete_dir(uri: str) -> None:
    """Remove a directory/prefix and everything under it; missing is fine."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    fs.delete_dir(path)
