"""MLflow credentials stay out of tracking URIs.

The MLflow client finds a user and password by itself, in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
(or a token in MLFLOW_TRACKING_TOKEN, or ~/.mlflow/credentials): the flow, the margin search and the CLIs
need nothing else. A URI with `user:password@` in it would reach what the project and Ray write down: the
`tracking.uri` param of every run, the flow's closing lines, a job's entrypoint or runtime env. It is refused.
"""

from __future__ import annotations

from urllib.parse import urlsplit


class CredentialsInUriError(ConnectionError):
    """A tracking URI that carries a user name or password (a ConnectionError: the server is not contacted, and
    every caller already turns that into one line)."""


def refuse_credentials_in_uri(uri: str) -> None:
    """CredentialsInUriError, naming the URI without its credentials, if `uri` has a user or password in it."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return
    shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
    raise CredentialsInUriError(
        f"tracking URI {shown} carries credentials: put them in MLFLOW_TRACKING_USERNAME and "
        f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead, where the MLflow client reads them")
