"""A fake Hugging Face Hub that models a repo's files, for push/load tests without the network.

Each repo holds, per branch, a list of commits; a commit is a dict ``path -> bytes``. The fake
``HfApi`` methods and ``snapshot_download`` take the keywords the real ones take (an unknown
keyword is a ``TypeError``, as with the real functions) and follow their documented semantics:

- ``upload_folder``: uploads the folder's files that match ``allow_patterns`` and no
  ``ignore_patterns``, and in the same commit deletes the remote files that match
  ``delete_patterns`` and are not being uploaded (``fnmatch`` on the repo path; a pattern
  ending in ``/`` matches a folder), as ``huggingface_hub.utils.filter_repo_objects`` does;
- ``snapshot_download``: the files of ONE commit (the branch head, or a commit index given as
  ``revision``) that match ``allow_patterns``, written to a fresh folder whose path is returned.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Sequence

import httpx
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

__all__ = ["FakeHub"]


def _as_list(patterns: str | Sequence[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return [p + "*" if p.endswith("/") else p for p in patterns]


def _matches(path: str, patterns: list[str] | None) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns or [])


def _response(url: str, status: int = 404) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("GET", url))


class FakeHub:
    """The fake Hub: ``install(monkeypatch)`` replaces ``huggingface_hub.HfApi`` and
    ``huggingface_hub.snapshot_download``; ``files(repo)`` is a repo's head."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.repos: dict[str, dict[str, list[dict[str, bytes]]]] = {}  # repo -> branch -> commits
        self.private: dict[str, bool | None] = {}
        self.tokens: list[Any] = []
        self.commit_messages: list[str] = []
        self._downloads = 0

    # ------------------------------------------------------------------ test helpers
    def install(self, monkeypatch: Any) -> "FakeHub":
        monkeypatch.setattr("huggingface_hub.HfApi", self.api)
        monkeypatch.setattr("huggingface_hub.snapshot_download", self.snapshot_download)
        return self

    def files(self, repo_id: str, revision: str | None = None) -> dict[str, bytes]:
        """The files of a branch head (``revision``: a branch name, default main)."""
        return dict(self._commit(repo_id, revision))

    def put(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> None:
        """A commit made by someone else (e.g. a file uploaded through the web page)."""
        self.repos.setdefault(repo_id, {"main": [{}]})
        head = self._commit(repo_id, revision)
        self.repos[repo_id][revision].append({**head, **files})

    def _commit(self, repo_id: str, revision: str | None) -> dict[str, bytes]:
        if repo_id not in self.repos:
            raise RepositoryNotFoundError(f"404: {repo_id}", response=_response(f"https://hf.co/{repo_id}"))
        branches = self.repos[repo_id]
        revision = revision or "main"
        if revision in branches:
            return branches[revision][-1]
        if revision.isdigit() and int(revision) < len(branches["main"]):
            return branches["main"][int(revision)]
        raise RevisionNotFoundError(f"404: {repo_id}@{revision}", response=_response(f"https://hf.co/{repo_id}"))

    def _fresh_dir(self, name: str) -> Path:
        self._downloads += 1
        folder = self.root / f"download-{self._downloads}-{name.replace('/', '--')}"
        folder.mkdir(parents=True)
        return folder

    # ------------------------------------------------------------------ huggingface_hub
    def api(self, token: Any = None) -> Any:
        hub = self
        hub.tokens.append(token)

        class Api:
            def create_repo(
                self, repo_id: str, *, token: Any = None, private: bool | None = None, repo_type: str | None = None,
                exist_ok: bool = False,
            ) -> str:
                assert repo_type in (None, "model")
                if repo_id in hub.repos:
                    if not exist_ok:
                        raise ValueError(f"{repo_id} exists")
                else:
                    hub.repos[repo_id] = {"main": [{}]}
                    hub.private[repo_id] = private
                return f"https://huggingface.co/{repo_id}"

            def file_exists(
                self, repo_id: str, filename: str, *, repo_type: str | None = None, revision: str | None = None,
                token: Any = None,
            ) -> bool:
                try:
                    return filename in hub._commit(repo_id, revision)
                except RepositoryNotFoundError:
                    return False

            def hf_hub_download(
                self, repo_id: str, filename: str, *, subfolder: str | None = None, repo_type: str | None = None,
                revision: str | None = None, cache_dir: Any = None, local_dir: Any = None, force_download: bool = False,
                etag_timeout: float = 10, token: Any = None, local_files_only: bool = False,
            ) -> str:
                files = hub._commit(repo_id, revision)
                if filename not in files:
                    raise EntryNotFoundError(f"{repo_id} has no {filename}")
                path = hub._fresh_dir(repo_id) / filename
                path.write_bytes(files[filename])
                return str(path)

            def upload_folder(
                self, *, repo_id: str, folder_path: str | Path, path_in_repo: str | None = None,
                commit_message: str | None = None, commit_description: str | None = None, token: Any = None,
                repo_type: str | None = None, revision: str | None = None, create_pr: bool | None = None,
                parent_commit: str | None = None, allow_patterns: str | Sequence[str] | None = None,
                ignore_patterns: str | Sequence[str] | None = None, delete_patterns: str | Sequence[str] | None = None,
            ) -> Any:
                assert repo_type in (None, "model") and path_in_repo in (None, "", ".") and not create_pr
                head = hub._commit(repo_id, revision)
                allow, ignore, delete = _as_list(allow_patterns), _as_list(ignore_patterns), _as_list(delete_patterns)
                folder = Path(folder_path)
                uploads = {}
                for path in sorted(folder.rglob("*")):
                    name = path.relative_to(folder).as_posix()
                    if path.is_file() and (allow is None or _matches(name, allow)) and not _matches(name, ignore):
                        uploads[name] = path.read_bytes()
                kept = {k: v for k, v in head.items() if k in uploads or not _matches(k, delete) or k == ".gitattributes"}
                branch = hub.repos[repo_id][revision or "main"]
                branch.append({**kept, **uploads})
                hub.commit_messages.append(commit_message or "")

                class CommitInfo:
                    commit_url = f"https://huggingface.co/{repo_id}/commit/{len(branch) - 1}"

                return CommitInfo()

        return Api()

    def snapshot_download(
        self, repo_id: str, *, repo_type: str | None = None, revision: str | None = None, cache_dir: Any = None,
        local_dir: Any = None, library_name: str | None = None, library_version: str | None = None,
        user_agent: Any = None, etag_timeout: float = 10, force_download: bool = False, token: Any = None,
        local_files_only: bool = False, allow_patterns: str | Sequence[str] | None = None,
        ignore_patterns: str | Sequence[str] | None = None, max_workers: int = 8, headers: Any = None,
        endpoint: str | None = None, dry_run: bool = False,
    ) -> str:
        assert repo_type in (None, "model") and not dry_run
        files = self._commit(repo_id, revision)
        allow, ignore = _as_list(allow_patterns), _as_list(ignore_patterns)
        folder = self._fresh_dir(repo_id)
        for name, data in files.items():
            if (allow is None or _matches(name, allow)) and not _matches(name, ignore):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
        return str(folder)
