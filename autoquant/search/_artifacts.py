"""Where a study's artifacts live (the references, the captured denoiser inputs, each trial's
image grid): a folder every worker can reach, or an object store that needs no shared disk.

``--artifacts`` takes
- a folder (default ``OUT/artifacts``): workers on one machine, or a shared mount;
- ``s3://bucket[/prefix]``: Amazon S3 or anything that speaks it (MinIO, Cloudflare R2, Ceph),
  through Optuna's ``Boto3ArtifactStore``; the endpoint, region and credentials come from the
  usual AWS settings (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws/config``...);
  needs ``pip install "autoquant[s3]"``;
- ``gs://bucket[/prefix]``: Google Cloud Storage through Optuna's ``GCSArtifactStore``
  (``pip install google-cloud-storage``).

The study records its location (attribute ``artifacts``) when its first worker stores the
shared inputs; a worker started without ``--artifacts`` uses it, and a worker that cannot read
them is told where they are and how to pass that.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, BinaryIO

from .._errors import InputError

#: the study attribute that says where its artifacts are
LOCATION = "artifacts"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,221}[a-z0-9]$")


def is_remote(location: str) -> bool:
    return location.startswith(("s3://", "gs://"))


def normalize(spec: str | Path | None, out: Path) -> str:
    """The canonical location for ``--artifacts`` (an absolute folder, or ``s3://bucket/prefix``
    with the prefix ending in ``/``), refused with a clear error when malformed. Checked before
    any model loads."""
    if spec is None:
        return str((Path(out) / "artifacts").resolve())
    text = str(spec)
    if "://" not in text:
        return str(Path(text).expanduser().resolve())
    scheme, _, rest = text.partition("://")
    if scheme not in ("s3", "gs"):
        raise InputError(f"--artifacts {text}: use a folder, s3://bucket[/prefix] or "
                         f"gs://bucket[/prefix]")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise InputError(f"--artifacts {text}: {bucket!r} is not a bucket name (3-63 lowercase "
                         f"letters, digits, '.', '-')")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise InputError(f"--artifacts {text}: the prefix may not hold '.' or '..'")
    return f"{scheme}://{bucket}/" + "".join(f"{p}/" for p in parts)


def check_available(location: str) -> None:
    """The package an object store needs is installed (else: what to install)."""
    if location.startswith("s3://"):
        try:
            import boto3  # noqa: F401
        except ImportError:
            raise InputError(f"--artifacts {location}: S3 needs boto3: "
                             f"pip install \"autoquant[s3]\"") from None
    elif location.startswith("gs://"):
        try:
            from google.cloud import storage  # noqa: F401
        except ImportError:
            raise InputError(f"--artifacts {location}: GCS needs google-cloud-storage: "
                             f"pip install google-cloud-storage") from None


class PrefixedStore:
    """An Optuna artifact store whose ids live under ``prefix`` (Optuna's S3 and GCS stores
    take a bucket only): many studies or projects can share one bucket."""

    def __init__(self, store: Any, prefix: str):
        self.store, self.prefix = store, prefix

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.store.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.store.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(self.prefix + artifact_id)


def open_store(location: str, create: bool = True):
    """The artifact store of a location from :func:`normalize`."""
    import optuna

    if not is_remote(location):
        path = Path(location)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return optuna.artifacts.FileSystemArtifactStore(str(path))
    check_available(location)
    scheme, _, rest = location.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme == "s3":
        import boto3

        # boto3 reads AWS_ENDPOINT_URL(_S3), the region and credentials from the environment
        store = optuna.artifacts.Boto3ArtifactStore(bucket, client=boto3.client("s3"))
    else:
        store = optuna.artifacts.GCSArtifactStore(bucket)
    return PrefixedStore(store, prefix) if prefix else store


def recorded(study) -> dict | None:
    """``{"location": ..., "host": ...}`` as the study recorded it, or None (checked: it comes
    from a database anyone may have written)."""
    value = study.user_attrs.get(LOCATION)
    if isinstance(value, dict) and isinstance(value.get("location"), str) and \
            isinstance(value.get("host", ""), str):
        return value
    return None


def unreadable(location: str, study_location: dict | None, error: BaseException) -> InputError:
    """The one-line error of a worker that cannot read the study's artifacts."""
    where = ""
    if study_location:
        host = study_location.get("host")
        where = (f"; the study keeps them at {study_location['location']}"
                 + (f" (written from host {host})" if host and not is_remote(
                     study_location["location"]) else ""))
    how = ("pass --artifacts with that location (a folder every worker mounts, or "
           "s3://bucket/prefix, which needs no shared disk)")
    return InputError(f"cannot read the study's shared inputs from {location} "
                      f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}){where}: {how}")
