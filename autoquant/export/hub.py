"""``export --push-to-hub REPO``: upload what an export wrote, with its model card, to a
Hugging Face model repository (``huggingface_hub``: the token and endpoint it finds --
``HF_TOKEN``, ``huggingface-cli login``, ``HF_ENDPOINT``).

A diffusers folder goes up whole; a single file (GGUF, ComfyUI) goes up with the card and
pictures beside it, nothing else from its folder. The repository id is checked before anything
is exported; a failed upload leaves the export on disk and says where.
"""

from __future__ import annotations

import re
from pathlib import Path

from .._errors import InputError

#: ``owner/name`` as the hub allows it (letters, digits, ``-``, ``_``, ``.``; no ``..``)
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
#: what a single-file export's folder holds for the hub: the card and its pictures
CARD_FILES = ("README.md", "bitmap.png", "images.png")


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid ``owner/name``; InputError otherwise (before any work)."""
    if not _REPO.fullmatch(repo_id or "") or ".." in repo_id or repo_id.endswith((".git",
                                                                                     ".")):
        raise InputError(f"--push-to-hub {repo_id!r}: give a model repository as owner/name "
                         f"(letters, digits, '-', '_', '.')")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise InputError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") \
            from None
    return repo_id


def push_to_hub(path: str | Path, repo_id: str, private: bool = False,
                message: str | None = None) -> dict:
    """Upload ``path`` (a folder: all of it; a file: it and the card files beside it) to the
    model repository ``repo_id`` (created if missing). Returns ``{"repo", "url", "files"}``."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    path = Path(path)
    if path.is_dir():
        folder, allow = path, None
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    else:
        folder = path.parent
        allow = [path.name] + [f for f in CARD_FILES if (folder / f).is_file()]
        files = allow
    api = HfApi()
    message = message or f"autoquant export: {path.name}"
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          allow_patterns=allow, commit_message=message)
    except Exception as e:  # noqa: BLE001 -- any hub failure: the export stays, say where
        raise InputError(f"--push-to-hub {repo_id}: the upload failed ({type(e).__name__}: "
                         f"{str(e)[:200]}); the export is at {path}") from None
    return {"repo": repo_id, "url": str(url), "files": files}


__all__ = ["push_to_hub", "check_repo_id"]
