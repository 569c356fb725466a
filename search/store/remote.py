"""Results on object storage: `resources.storage_path` (`s3://bucket/prefix`, or a directory every node sees).

Without it everything lives in the run directory on the driver's disk, and a cluster of several nodes needs a
shared filesystem for it. With it, `<storage_path>/<name>/` holds the search's results as well:

    ray/               Ray Tune's experiment state and the worker groups' Ray Train state (Ray writes it there)
    trials/NNNN/       each trial's directory, mirrored by its worker after every round (adapter, metrics,
                       round checkpoint) and downloaded again by a worker that retries it on another node
    trials.csv, report.md, report.html, spec.yaml, search.json, best/    uploaded by the driver when it writes them

Transfers go through pyarrow's filesystems, the ones Ray's own storage uses, so a URL Ray accepts works here:
`s3://bucket/prefix?endpoint_override=http://host:9000` reaches an S3-compatible store (MinIO). Credentials come
from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the node's instance role), never from the URL:
Ray saves the storage it is given in its experiment state (tuner.pkl), so a key in the URL would be written to
the bucket itself.
"""
from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass
from typing import List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from search.store.storage import redact_url

KEY = "resources.storage_path"
SCHEMES = ("s3",)   # pyarrow reads gs:// and hdfs:// too; only s3 is tested here
# query parameters that would carry credentials (pyarrow refuses them anyway, but not with a word on why)
CREDENTIAL_PARAMS = ("access_key", "secret_key", "session_token")
CREDENTIALS_HINT = ("credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the "
                    "node's instance role, never from the URL: Ray saves the URL with its state")
TRIALS, RAY = "trials", "ray"
LATEST = posixpath.join("checkpoint", "latest")   # trainers/checkpoint.py: names the round to resume from
OUTPUTS = ("trials.csv", "report.md", "report.html", "spec.yaml", "search.json", "best")


class RemoteStorageError(ValueError):
    """`resources.storage_path` cannot be used; the message is one line naming it."""


def storage_path_problems(value: Optional[str]) -> List[str]:
    """What is wrong with the form of `value` (no I/O): a known scheme, no credentials, an absolute local path."""
    if value is None:
        return []
    if not value.strip():
        return [f"{KEY}: must be s3://BUCKET/PREFIX or a directory, got an empty string"]
    if "://" not in value:
        return [] if os.path.isabs(value) else [f"{KEY}: a directory must be an absolute path, got {value!r}"]
    parts = urlsplit(value)
    if parts.scheme not in SCHEMES + ("file",):
        return [f"{KEY}: unknown scheme {parts.scheme!r}; use s3://BUCKET/PREFIX (an S3-compatible store: "
                f"add ?endpoint_override=http://HOST:PORT) or a directory, got {redact_url(value)!r}"]
    if parts.username or parts.password or set(parse_qs(parts.query)) & set(CREDENTIAL_PARAMS):
        return [f"{KEY}: {CREDENTIALS_HINT}; got {redact_url(value)!r}"]
    if parts.scheme == "s3" and not parts.hostname:
        return [f"{KEY}: an s3 URL needs a bucket (s3://BUCKET/PREFIX), got {value!r}"]
    return []


def reach_problem(value: str) -> Optional[str]:
    """Why the store at `value` cannot be used now (endpoint down, bucket missing, directory missing), or None.
    Reads only, so `validate` may call it: nothing is created."""
    import pyarrow.fs

    try:
        filesystem, path = _resolve(value)
        top = path.split("/", 1)[0] if isinstance(filesystem, pyarrow.fs.S3FileSystem) else path
        info = filesystem.get_file_info(top)
    except (OSError, ValueError) as exc:   # ArrowInvalid (a bad query parameter) is a ValueError
        return f"{KEY}: cannot reach {redact_url(value)}: {one_line(exc)}"
    if info.type == pyarrow.fs.FileType.NotFound:
        what = (f"bucket {top!r} does not exist (or these credentials cannot see it)"
                if isinstance(filesystem, pyarrow.fs.S3FileSystem) else f"directory {top} does not exist")
        return f"{KEY}: {what}, got {redact_url(value)!r}"
    return None


@functools.lru_cache(maxsize=None)
def _resolve(url: str) -> Tuple["object", str]:
    """(pyarrow filesystem, path on it) for the URL or directory; once per process."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(url)


def one_line(exc: BaseException) -> str:
    """An S3 error (several lines from the AWS SDK) as one short line, for a problem line or a fail reason."""
    return " ".join(str(exc).split())[:300] or type(exc).__name__


@dataclass(frozen=True)
class RemoteRun:
    """`<storage_path>/<name>/` of one search. Picklable (it travels to the workers): the filesystem is
    resolved in each process from the URL, and credentials are the environment's there."""

    storage_path: str
    name: str

    @classmethod
    def of(cls, storage_path: Optional[str], name: str) -> Optional["RemoteRun"]:
        return cls(storage_path, name) if storage_path else None

    @property
    def filesystem(self):
        return _resolve(self.storage_path)[0]

    def path(self, *parts: str) -> str:
        return posixpath.join(_resolve(self.storage_path)[1], self.name, *parts)

    def url(self, *parts: str) -> str:
        """For messages: where `parts` lie, as the user would write it (without the URL's query)."""
        base = self.storage_path.split("?", 1)[0].rstrip("/")
        return "/".join([base, self.name, *parts])

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs

        return self.filesystem.get_file_info(self.path(*parts)).type != pyarrow.fs.FileType.NotFound

    def upload(self, local: str, *parts: str) -> None:
        """The file or directory `local` to `parts` (a directory's files are added or replaced, none removed)."""
        import pyarrow.fs

        target = self.path(*parts)
        self.filesystem.create_dir(posixpath.dirname(target) if os.path.isfile(local) else target)
        # no threads for uploads: pyarrow's threaded S3 upload is unsafe (apache/arrow#32372, as Ray does)
        pyarrow.fs.copy_files(local, target, destination_filesystem=self.filesystem, use_threads=False)

    def download(self, local: str, *parts: str) -> bool:
        """`parts` (file or directory) to `local`; False when it is not in the store."""
        import pyarrow.fs

        source = self.path(*parts)
        info = self.filesystem.get_file_info(source)
        if info.type == pyarrow.fs.FileType.NotFound:
            return False
        os.makedirs(local if info.type == pyarrow.fs.FileType.Directory else os.path.dirname(local), exist_ok=True)
        pyarrow.fs.copy_files(source, local, source_filesystem=self.filesystem)
        return True

    # --- Ray
    def ray_storage(self) -> Tuple[str, object]:
        """(storage_path, storage_filesystem) for a Ray Tune or Ray Train RunConfig: `<name>/ray`."""
        return self.path(RAY), self.filesystem

    # --- a trial (on the worker that runs it)
    def upload_trial(self, trial_dir: str, number: int) -> None:
        """Every file of the trial directory but checkpoint/latest, which `publish_checkpoint` adds after all
        nodes uploaded their part of the round (a `latest` seen early would name a round half in the store)."""
        for directory, _subdirs, files in os.walk(trial_dir):
            for name in files:
                relative = os.path.relpath(os.path.join(directory, name), trial_dir).replace(os.sep, "/")
                if relative != LATEST:
                    self.upload(os.path.join(trial_dir, relative), *trial_parts(number, relative))

    def publish_checkpoint(self, trial_dir: str, number: int) -> None:
        """checkpoint/latest, then the older rounds' folders go (trainers/checkpoint.py keeps only the newest)."""
        import pyarrow.fs

        latest = os.path.join(trial_dir, LATEST)
        if not os.path.isfile(latest):
            return
        self.upload(latest, *trial_parts(number, LATEST))
        with open(latest, encoding="utf-8") as handle:
            current = handle.read().strip()
        selector = pyarrow.fs.FileSelector(self.path(*trial_parts(number, "checkpoint")), allow_not_found=True)
        for info in self.filesystem.get_file_info(selector):
            if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("round-") \
                    and info.base_name != current:
                self.filesystem.delete_dir(info.path)

    def restore_trial(self, trial_dir: str, number: int) -> bool:
        """The trial's directory from the store into `trial_dir` when the store holds a checkpoint of it
        (a retry on a node that never ran it); False when there is none."""
        if not self.exists(*trial_parts(number, LATEST)):
            return False
        return self.download(trial_dir, *trial_parts(number))

    # --- the driver's outputs
    def fetch_trial(self, trial_dir: str, number: int) -> bool:
        """The trial's adapter, settings and metrics (not its checkpoint) into `trial_dir`, for best/."""
        found = False
        for name in ("adapter", "settings.json", "metrics.json"):
            found |= self.download(os.path.join(trial_dir, name), *trial_parts(number, name))
        return found

    def upload_outputs(self, run_dir: str) -> None:
        for name in OUTPUTS:
            if os.path.exists(os.path.join(run_dir, name)):
                self.upload(os.path.join(run_dir, name), name)


def trial_parts(number: int, relative: str = "") -> Tuple[str, ...]:
    """The path parts of `relative` in trial `number`'s directory, under <name>/ (as search/trial.trial_dir)."""
    return (TRIALS, f"{number:04d}", *[part for part in relative.split("/") if part])
