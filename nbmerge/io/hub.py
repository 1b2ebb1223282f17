"""Hugging Face Hub ids as model references: ``org/name`` or ``org/name@revision`` that is not an existing path.

Such a reference resolves through huggingface_hub to its snapshot folder (what a recipe copied from a model card
names): only from the local cache (``local_files_only``) when offline (``HF_HUB_OFFLINE=1``), else downloaded into
the cache as needed; the cache is ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else huggingface_hub's default, read when
the reference is resolved. Only the files a merge reads are fetched: safetensors weights (pickled ``.bin`` weights
only where the repository has no safetensors), configuration, tokenizer and chat-template files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nbmerge.errors import ModelInputError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")
METADATA = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
_TRUE = ("1", "ON", "YES", "TRUE")


class HubModelUnavailable(ModelInputError):
    """A Hub id that cannot be read; ``reason`` says why, without the reference's label."""

    def __init__(self, label: str, reason: str):
        super().__init__(f"{label}: {reason}")
        self.reason = reason


def is_hub_id(reference) -> bool:
    """A string shaped like ``org/name`` (optionally ``@revision``) that is not an existing path."""
    return (isinstance(reference, str) and HUB_ID.match(reference) is not None
            and not Path(reference).expanduser().exists())


def hub_cache() -> str:
    """The Hub cache folder huggingface_hub would use, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return value.upper() in _TRUE if value is not None else bool(constants.HF_HUB_OFFLINE)


def hub_folder(reference: str, label: str) -> Path:
    """The local snapshot folder of the Hub model ``reference`` (see the module docstring); ModelInputError naming
    the reference when it cannot be had."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ModelInputError(f"{label}: {reference!r} is not a path; to read it as a Hugging Face Hub model, "
                              f"install huggingface_hub (pip install 'nbmerge[hf]')") from None
    repo, _, revision = reference.partition("@")
    local_only = offline()
    cache = hub_cache()

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache, allow_patterns=patterns,
                                      local_files_only=local_only))

    try:
        folder = fetch(["*.safetensors", *METADATA])
        if not any(folder.glob("*.safetensors")):
            folder = fetch(["*.bin", *METADATA])
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if local_only else "the Hub could not be reached"
        raise HubModelUnavailable(label, f"{reference!r} is neither an existing file or folder nor a Hugging Face "
                                  f"Hub model in the local cache ({cache}), and {where}; fix the path, or download "
                                  f"the model first (huggingface-cli download {repo})") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        message = " ".join(str(exc).split())[:200]
        raise HubModelUnavailable(label, f"{reference!r} is neither an existing file or folder nor a Hugging Face "
                                  f"Hub model that can be read ({type(exc).__name__}: {message})") from None
    return folder
