"""Releases on the hub: a repository's file list, the newest release of a size, and its download.

``rwkvtune models download 1.5b --latest`` asks the hub for the file list of the entry's repository
(huggingface_hub's ``HfApi.list_repo_tree``: ``GET {HF_ENDPOINT}/api/models/{repo}/tree/{revision}``),
parses the official naming scheme (:data:`rwkvtune.configs.releases.SCHEME`), takes the newest file of
the entry's size, downloads it through :func:`rwkvtune.hub.download_model` (resumable, checked against
the listing's LFS sha256 and the hub's), and records the choice in the models directory
(:func:`rwkvtune.configs.releases.record`), so that ``1.5b`` resolves to that file from then on, offline.
``--release R`` does the same for a named release, asking the hub only when R is not known locally.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from rwkvtune import hub
from rwkvtune.configs import model_loader, releases
from rwkvtune.configs.model_loader import ModelConfig
from rwkvtune.errors import CheckpointError, ConfigError, DownloadError, RwkvtuneError
from rwkvtune import __version__
from rwkvtune.io.checkpoint import read_shapes
from rwkvtune.io.variants import refusal


@dataclasses.dataclass(frozen=True)
class RepoFile:
    """One file of a hub listing: its path, size, LFS sha256 ("" for a file stored in git) and git blob
    id (for a file stored in git: sha1 of b"blob <size>\\0" + content; for an LFS file, its pointer's)."""

    path: str
    size: int
    sha256: str = ""
    git_oid: str = ""


def list_repo_files(repo: str, revision: str = "main",
                    fields: tuple[str, str] = ("source.hf_repo", "source.hf_revision")) -> list[RepoFile]:
    """Every file of a hub model repository at ``revision``, with sizes and checksums.

    One-line DownloadError when huggingface_hub is missing, the repository or revision does not exist
    (naming ``fields``: where the user sets the repository and the revision), the network or
    HF_HUB_OFFLINE stops the request, or the answer is not a file listing.
    """
    try:
        from huggingface_hub import HfApi, errors
        from huggingface_hub.hf_api import RepoFile as HfRepoFile
    except ImportError as e:
        raise DownloadError(f"asking the hub for releases needs the huggingface_hub package, which is not "
                            f"installed; install it with: {hub.INSTALL_HINT}") from e

    endpoint = (os.environ.get(model_loader.HF_ENDPOINT_ENV) or model_loader.DEFAULT_HF_ENDPOINT).rstrip("/")
    where = f"{endpoint}/{repo} (revision {revision})"
    api = HfApi(endpoint=endpoint, library_name="rwkvtune", library_version=__version__)
    try:
        entries = list(api.list_repo_tree(repo, recursive=True, revision=revision))
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # not the hub's listing format
        raise DownloadError(f"{where}: the server's file listing is malformed ({type(e).__name__}: "
                            f"{hub._one_line(str(e))}); check HF_ENDPOINT") from e
    except Exception as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, getattr(errors, "OfflineModeIsEnabled", ())):
            why = "HF_HUB_OFFLINE is set, so huggingface_hub makes no network requests; unset it to ask the hub"
        elif isinstance(e, errors.RevisionNotFoundError):
            why = f"revision {revision!r} not found; check {fields[1]}"
        elif isinstance(e, errors.RepositoryNotFoundError):
            why = f"repository not found (or private or gated: set HF_TOKEN); check {fields[0]}"
        elif status is not None:
            why = f"the server answered HTTP {status}; try again later"
        elif hub._is_transport_error(e):
            why = f"cannot reach the hub ({hub._describe(e)}); check {hub._network_hint()}"
        else:
            raise
        raise DownloadError(f"cannot list the files of {where}: {why}") from e
    out = []
    for entry in entries:
        if isinstance(entry, HfRepoFile):
            lfs = getattr(entry, "lfs", None)
            sha = str(getattr(lfs, "sha256", "") or "").lower() if lfs else ""
            oid = str(getattr(entry, "blob_id", "") or "").lower()
            out.append(RepoFile(entry.path, int(entry.size or 0), sha if releases._SHA256_RE.fullmatch(sha) else "",
                                oid if re.fullmatch(r"[0-9a-f]{40}", oid) else ""))
    return out


def hub_releases(files: list[RepoFile], repo: str, revision: str) -> tuple[list[releases.Release], list[str]]:
    """(releases of the scheme in a listing, other RWKV-7 variants' files that were left out)."""
    found, variants = [], []
    for f in files:
        rel = releases.parse_name(f.path)
        if rel is not None:
            found.append(dataclasses.replace(rel, sha256=f.sha256, hf_repo=repo, hf_filename=f.path,
                                             hf_revision=revision, origin=releases.HUB))
        elif releases.VARIANT_RE.fullmatch(f.path.rsplit("/", 1)[-1]):
            variants.append(f.path)
    return found, variants


def _entry(name: str) -> tuple[str, str, ModelConfig]:
    """(registry key, release spec, the entry's config as its JSON says) of ``SIZE[@RELEASE]``."""
    base, spec = releases.split_spec(name)
    key = model_loader._registry_key(base)
    path = model_loader.list_available_models().get(key)
    if path is None:
        ModelConfig.from_name(base)  # raises the registry's "unknown model ... Closest: ..." error
    return key, spec, ModelConfig.from_file(path)


def ask_hub(cfg: ModelConfig, key: str) -> tuple[list[releases.Release], list[releases.Release], list[str]]:
    """(the entry's size's releases on the hub, all releases of the listing, left-out variant files)."""
    if not cfg.hf_repo:
        raise ConfigError(f"{cfg.config_path}: entry {key} has no download source (\"source\" with hf_repo), so "
                          f"there is no repository to ask for releases")
    found, variants = hub_releases(list_repo_files(cfg.hf_repo, cfg.hf_revision), cfg.hf_repo, cfg.hf_revision)
    size = releases.entry_size(key, cfg.model_file, cfg.hf_filename)
    return [r for r in found if r.size == size], found, variants


def _no_release_of_size(cfg: ModelConfig, key: str, size: str, found: list[releases.Release],
                        variants: list[str]) -> DownloadError:
    sizes = sorted({r.size for r in found}, key=lambda s: float(s[:-1]))
    skipped = f"; {len(variants)} file(s) of other RWKV-7 variants (rwkv7a-/rwkv7b-) left out" if variants else ""
    return DownloadError(f"{cfg.hf_repo} (revision {cfg.hf_revision}) lists no file of size {size} named "
                         f"{releases.SCHEME} (sizes it has: {', '.join(sizes) or 'none'}{skipped}); "
                         f"`rwkvtune models download {key}` gets the pinned release")


def pick(name: str, release: str = "", latest: bool = False) -> tuple[ModelConfig, releases.Release, str]:
    """(the entry's config for the chosen release, that release, a note) for ``models download``:
    ``latest`` -> the newest release of the size on the hub; ``release`` (or ``SIZE@R``) -> that one,
    from local knowledge if it has it, else from the hub's listing; neither -> the usual resolution."""
    key, spec, cfg = _entry(name)
    if spec and release and spec.lower() != release.strip().lower():
        raise ConfigError(f"{name!r} names release {spec!r} but --release says {release!r}; give one")
    spec = spec or release.strip()
    if latest and spec:
        raise ConfigError(f"--latest and release {spec!r} both given; give one")
    size, default, known = model_loader.entry_releases(cfg, key)
    if size is None and (latest or spec):
        raise ConfigError(f"{cfg.config_path}: entry {key} has no releases: its model file {cfg.model_file!r} does "
                          f"not follow {releases.SCHEME}")
    if latest:
        mine, found, variants = ask_hub(cfg, key)
        if not mine:
            raise _no_release_of_size(cfg, key, size, found, variants)
        chosen = max(mine, key=releases.Release.newness)
        note = f"newest {size} release on {cfg.hf_repo}: {chosen.label} ({chosen.file}, ctx {chosen.ctx_len})"
        return model_loader.with_release(cfg, chosen), chosen, note
    if not spec:
        resolved = model_loader.resolve_release(cfg, key)
        return resolved, releases.parse_name(resolved.model_file) or default, ""
    try:
        chosen = releases.choose(spec, known, lambda r: model_loader.release_present(cfg, r), default, key)
        return model_loader.with_release(cfg, chosen), chosen, ""
    except ConfigError as e:
        if "no release" not in str(e) or not cfg.hf_repo:
            raise
    mine, found, variants = ask_hub(cfg, key)
    if not mine:
        raise _no_release_of_size(cfg, key, size, found, variants)
    chosen = releases.choose(spec, releases.known_releases(size, default, model_loader.models_dir(), mine),
                             lambda r: False, default, key)
    return model_loader.with_release(cfg, chosen), chosen, f"{key}@{spec} on {cfg.hf_repo}: {chosen.file}"


def _check_variant(path: Path) -> None:
    """A downloaded file must be plain RWKV-7: name another variant in one line (shapes only, no data)."""

    shapes, _, _ = read_shapes(path)
    problem = refusal(str(path), shapes)
    if problem:
        raise CheckpointError(f"{problem}; the file was downloaded but not recorded: delete it, since "
                              f"`rwkvtune models` would otherwise resolve its size to it")


def download_release(name: str, release: str = "", latest: bool = False, models_dir: str | os.PathLike | None = None,
                     force: bool = False, progress: bool = True) -> tuple[Path, ModelConfig, bool]:
    """Download ``SIZE[@RELEASE]`` (or the newest with ``latest``) into the models directory and record
    the choice there; returns (path, its config, whether bytes were downloaded: False when the file
    was already there)."""
    cfg, chosen, note = pick(name, release, latest)
    target = hub.target_path(cfg, models_dir)
    fresh = not target.is_file() or force
    if note:
        hub._say(progress, note)
    path = hub.download_model(cfg, models_dir=models_dir, force=force, progress=progress)
    if chosen is None or chosen.origin == releases.REGISTRY or not (latest or release or "@" in name):
        return path, cfg, fresh
    _check_variant(path)
    sha = chosen.sha256 or cfg.sha256 or (hub._sha256(path) if fresh else "")
    rec = dataclasses.replace(chosen, sha256=sha, hf_repo=cfg.hf_repo, hf_filename=cfg.hf_filename,
                              hf_revision=cfg.hf_revision, origin=releases.RECORDED)
    try:
        releases.record(path.parent, rec)
    except RwkvtuneError:
        raise
    except OSError as e:
        raise hub._unwritable(path.parent, e) from e
    return path, cfg, fresh
