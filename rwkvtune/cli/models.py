"""Handlers of ``rwkvtune models [list|show|new|download|check]`` and ``rwkvtune inspect``.

Imported lazily by :mod:`rwkvtune.cli`. Listing and showing configs needs only the standard
library; torch is imported (by :mod:`rwkvtune.io.checkpoint`) only when a checkpoint is read,
and huggingface_hub (by :mod:`rwkvtune.hub`) only when a file is downloaded.
Handlers return an exit status and raise :class:`rwkvtune.errors.RwkvtuneError` for user errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from rwkvtune.cli import set_handler
from rwkvtune.configs.check import check_all
from rwkvtune.configs.detect import inspect_checkpoint
from rwkvtune.configs.model_loader import (
    CONFIG_PATH_ENV,
    MODEL_DIR_ENV,
    PACKAGE_MODELS_DIR,
    ModelConfig,
    _registry_key,
    config_dirs,
    list_available_models,
    load_model_config,
    matching_registry_entry,
    models_dir,
    resolve_release,
)
from rwkvtune.configs.run_source import resolve_run
from rwkvtune.errors import ConfigError, RwkvtuneError
from rwkvtune.hub import download_command, download_model, target_path
from rwkvtune.io.layout import SHAPE_FIELDS
from rwkvtune.utils import human_count
from rwkvtune.hub_repos import download_repo
from rwkvtune.configs import model_loader, releases
from rwkvtune.hub_releases import download_release
from rwkvtune.hub_releases import ask_hub

_HERE = "rwkvtune.cli.models"


# action: (help, description); each action's handler is cmd_<action> in this module.
_ACTIONS = {
    "list": ("registry table (the default action)", None),
    "show": ("every field of one config",
             "Every field of a config: a registry name, a .json path or a .pth path."),
    "new": ("write a config JSON for a checkpoint",
            "Detect a checkpoint's dims and write a registry config for it. Default output: rwkv7-NAME.json in "
            "the first $RWKVTUNE_CONFIG_PATH directory if set, else the current directory."),
    "download": ("download a model file from its source (Hugging Face), or a Hugging Face model folder "
                 "(--repo), into the models directory",
                 "Download the model file of a config from the Hugging Face repository its \"source\" names, into "
                 "the models directory ($RWKVTUNE_MODEL_DIR, default ~/.rwkvtune/models). Resumes an interrupted "
                 "download, verifies the sha256, and does nothing if the file is already there. With --repo "
                 "OWNER/NAME instead of NAME: an RWKV-7 repository in the Hugging Face layout (e.g. RWKV/RWKV7-*-HF, "
                 "fla-hub/rwkv7-*) becomes the folder MODELS_DIR/OWNER/NAME (config.json, safetensors weights, "
                 "tokenizer files; every file verified against the hub's listing; pickle .bin files and code are "
                 "never downloaded), loadable with --model MODELS_DIR/OWNER/NAME. Honours HF_ENDPOINT and HF_TOKEN. "
                 "Needs huggingface_hub: pip install \"rwkvtune[hub]\"."),
    "releases": ("the releases of a size: which are known, which are present, which one the name means",
                 "The releases of a registry size (files named rwkv7-<release>-<size>-<date>-ctx<N>.pth): the "
                 "pinned one, those recorded by `models download --latest/--release`, and those present in the "
                 "models directory; --hub adds the hub's listing. `SIZE` means the newest present one, else the "
                 "pinned one; `SIZE@RELEASE` names one."),
    "check": ("validate every config; compare with model files that are present",
              "Validate every config in reach (package and $RWKVTUNE_CONFIG_PATH) and compare each with its "
              "model file where that file is present. Exit status 1 if any problem."),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Model config registry. Without an action: the registry table (same as `models list`)."
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    a = {}
    for name, (help_, description) in _ACTIONS.items():
        a[name] = actions.add_parser(name, help=help_, description=description or help_)
        set_handler(a[name], f"{_HERE}:cmd_{name}")
    a["show"].add_argument("name", metavar="NAME", help='registry name ("1.5b", "rwkv7-1.5b"), .json config or .pth file')
    a["show"].add_argument("--json", action="store_true", help="print one JSON object")
    a["new"].add_argument("checkpoint", metavar="CKPT", help="the .pth file")
    a["new"].add_argument("--name", required=True, help="registry name for it, e.g. my-1.5b (file rwkv7-NAME.json)")
    a["new"].add_argument("-o", "--output", metavar="FILE", help="where to write the .json (default: see above)")
    a["new"].add_argument("--force", action="store_true", help="overwrite an existing output file")
    a["download"].add_argument("name", metavar="NAME", nargs="?", default=None,
                               help='registry name ("1.5b", "rwkv7-1.5b", "1.5b@g1a") or .json config; '
                                    'not with --repo')
    a["download"].add_argument("--force", action="store_true",
                               help="download again even if the file (or --repo folder) is present; a present "
                                    "folder is replaced once the new one is complete")
    a["download"].add_argument("--repo", metavar="OWNER/NAME", default=None,
                               help="a Hugging Face repository in the RWKV-7 HF layout, downloaded as the folder "
                                    "MODELS_DIR/OWNER/NAME and recorded there (a later call finds it offline); "
                                    "instead of NAME, --release and --latest")
    a["download"].add_argument("--revision", metavar="REV", default=None,
                               help="with --repo: branch, tag or commit (default main)")
    which = a["download"].add_mutually_exclusive_group()
    which.add_argument("--release", metavar="R", default="",
                       help="this release of the size (g1a, g1a-20250922 or the file name); asks the hub's file "
                            "list when it is not known locally")
    which.add_argument("--latest", action="store_true",
                       help="the newest release of the size in the hub's file list; the choice is recorded in "
                            "the models directory, so NAME means that file from then on, offline")
    a["download"].add_argument("--models-dir", dest="models_dir", metavar="DIR",
                               help="download into DIR instead of the models directory")


    a["releases"].add_argument("name", metavar="SIZE", help='registry name, e.g. "1.5b"')
    a["releases"].add_argument("--hub", action="store_true", help="also ask the hub for its file list")
    a["releases"].add_argument("--json", action="store_true", help="print one JSON object")


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Detect every dimension of an RWKV-7 .pth from its tensor shapes, without loading tensor "
                     "data, and name the registry entry it matches.")
    p.add_argument("checkpoint", metavar="CKPT", help="the .pth file (or a training run's directory: the model it "
                                                      "holds or is based on)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# What each low-rank dim is (they are RWKV-7's own projections, not PEFT LoRA adapters).
DIM_NOTES = {
    "dim_att_lora": "w1/w2: decay",
    "dim_aaa_lora": "a1/a2: in-context learning rate",
    "dim_mv_lora": "v1/v2: value residual, layers >= 1",
    "dim_gate_lora": "g1/g2: output gate",
}



def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _present(cfg: ModelConfig) -> bool:
    return bool(cfg.model_path) and Path(cfg.model_path).is_file()


# ---- models list ---------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    rows = [["NAME", "MODEL", "LAYERS", "WIDTH", "PARAMS", "MODEL FILE", "PRESENT"]]
    broken, downloadable = [], []
    for key, path in list_available_models().items():
        try:
            cfg = resolve_release(ModelConfig.from_file(path), key)  # the file the name means now
        except RwkvtuneError:
            broken.append(key)
            rows.append([key, "(invalid config)", "-", "-", "-", path, "-"])
            continue
        rows.append([key, cfg.model_name, str(cfg.n_layer), str(cfg.n_embd), f"{cfg.n_params:,}",
                     cfg.model_file or "-", "yes" if _present(cfg) else "no"])
        if cfg.hf_repo and not _present(cfg):
            downloadable.append(key)
    print(_table(rows))
    print()
    if downloadable:
        print(f"get a missing model file with: rwkvtune models download NAME (e.g. {downloadable[0]})")
    env = "set" if os.environ.get(MODEL_DIR_ENV) else "not set, default"
    print(f"models directory: {models_dir()} (${MODEL_DIR_ENV} {env})")
    user_dirs = [str(d) for d in config_dirs() if d != PACKAGE_MODELS_DIR]
    print(f"config directories: {', '.join(user_dirs + [str(PACKAGE_MODELS_DIR)])}"
          + ("" if user_dirs else f" (add yours with ${CONFIG_PATH_ENV})"))
    if broken:
        print(f"{len(broken)} invalid config(s): {', '.join(broken)}; run `rwkvtune models check` for details")
    return 0


# ---- models show ---------------------------------------------------------------------------


def _config_record(cfg: ModelConfig, key: str | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": key}
    rec.update(dataclasses.asdict(cfg))
    rec["n_head"] = cfg.n_head
    rec["n_params"] = cfg.n_params
    rec["release"] = cfg.release
    rec["model_path"] = cfg.model_path
    rec["model_present"] = _present(cfg)
    rec["download_url"] = cfg.download_url
    rec["download_command"] = download_command(cfg)
    return rec


def _print_source(rec: dict[str, Any], width: int) -> None:
    """Where the model file comes from, and the command that fetches it while it is absent."""
    if not rec["hf_repo"]:
        print(f"{'source:':<{width}} none (this config names no download source)")
        return
    print(f"{'source:':<{width}} Hugging Face {rec['hf_repo']}, file {rec['hf_filename']}, "
          f"revision {rec['hf_revision']}")
    if rec["sha256"]:
        print(f"{'sha256:':<{width}} {rec['sha256']}")
    print(f"{'download_url:':<{width}} {rec['download_url']}")
    if not rec["model_present"] and rec["download_command"]:
        print(f"{'download:':<{width}} {rec['download_command']}")


def cmd_show(args: argparse.Namespace) -> int:
    cfg = load_model_config(args.name)
    low = args.name.strip().lower()
    key = None if low.endswith((".json", ".pth", ".pt")) and Path(args.name).exists() else _registry_key(args.name)
    rec = _config_record(cfg, key)
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    order = ["name", "model_name", "description", "architecture_version", "n_layer", "n_embd", "n_head",
             "head_size_a", "vocab_size", "ctx_len", "dim_ffn", "dim_att_lora", "dim_aaa_lora", "dim_mv_lora",
             "dim_gate_lora", "n_params", "release", "recommended_ctx_len", "recommended_batch_size", "recommended_lr",
             "model_file", "model_path", "config_path"]
    width = max(map(len, order)) + 1
    for field in order:
        value = rec[field]
        if field == "name" and value is None:
            continue
        text = "" if value is None else str(value)
        if field == "n_params":
            text = f"{value:,} ({human_count(value)})"
        elif field in DIM_NOTES:
            text = f"{value}  ({DIM_NOTES[field]})"
        elif field == "model_path" and value:
            text = f"{value}  ({'present' if rec['model_present'] else 'not present'})"
        print(f"{field + ':':<{width}} {text}")
        if field == "model_path":
            _print_source(rec, width)
    return 0


# ---- inspect -------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    run = resolve_run(args.checkpoint)  # a run directory: the weights file it uses (and what it adds)
    path = args.checkpoint if run is None else run.model
    if run is not None and not run.is_final:
        print(f"{args.checkpoint}: a training run: {run.describe()}", file=sys.stderr)
        path = load_model_config(run.model).model_path  # the base may be a registry name
    info = inspect_checkpoint(path)
    if args.json:
        print(json.dumps(info.summary(), indent=2))
        return 0
    summary = info.summary()
    width = max(map(len, summary)) + 1
    print(f"{'checkpoint:':<{width}} {info.path}")
    for field, value in summary.items():
        text = str(value)
        if field == "n_params":
            text = f"{value:,} ({human_count(value)})"
        elif field in DIM_NOTES:
            text = f"{value}  ({DIM_NOTES[field]})"
        elif field == "has_layer0_v":
            text = "yes (blocks.0.att.v0/v1/v2 present)" if value else "no (blocks.0.att.v0/v1/v2 absent; fine)"
        print(f"{field + ':':<{width}} {text}")
    if info.key_prefix:
        print(f"{'key prefix:':<{width}} {info.key_prefix!r} on every key (stripped)")
    if info.extra_keys:
        more = f" ... (+{len(info.extra_keys) - 5})" if len(info.extra_keys) > 5 else ""
        print(f"{'extra keys:':<{width}} {', '.join(info.extra_keys[:5])}{more} (not RWKV-7 weights; ignored)")
    match = matching_registry_entry(info)
    if match:
        print(f"registry entry: {match} ({list_available_models()[match]})")
    else:
        print(f"registry entry: none matches; write one with: rwkvtune models new {args.checkpoint} --name NAME")
    return 0


# ---- models new ----------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def cmd_new(args: argparse.Namespace) -> int:
    name = args.name.strip()
    if name.lower().startswith("rwkv7-"):
        name = name[len("rwkv7-"):]
    if not _NAME_RE.match(name) or name.lower().endswith(".json"):
        raise ConfigError(f"--name {args.name!r}: expected letters, digits and . _ + - (it becomes the file name "
                          f"rwkv7-NAME.json), e.g. --name my-1.5b")
    if args.output:
        out = Path(args.output).expanduser()
        if out.suffix.lower() != ".json":
            raise ConfigError(f"-o {args.output}: expected a file name ending in .json")
    else:
        user_dirs = [d for d in config_dirs() if d != PACKAGE_MODELS_DIR]
        out = (user_dirs[0] if user_dirs else Path.cwd()) / f"rwkv7-{name}.json"
    out = out.absolute()
    if out.exists() and not args.force:
        raise ConfigError(f"{out} already exists; pass --force to overwrite it or -o FILE to write elsewhere")

    info = inspect_checkpoint(args.checkpoint)
    given = Path(args.checkpoint).expanduser()
    in_models_dir = _same_dir(given.parent, models_dir())
    cfg = ModelConfig.from_checkpoint(info, name=f"RWKV7-{name}")
    cfg.model_file = given.name if in_models_dir else str(given.absolute())
    match = matching_registry_entry(info)
    cfg.description = f"RWKV-7 model detected from {given.name} by `rwkvtune models new`" + (
        f" (same dims as registry entry {match!r})" if match else "")
    try:
        cfg.save(out)
    except RwkvtuneError:
        raise
    except OSError as e:
        raise ConfigError(f"{out}: cannot write the config ({e.strerror or e}); choose another place with -o FILE") from e

    # Round trip: the file must load and describe the same model.
    back = ModelConfig.from_file(out)
    diffs = [f for f in SHAPE_FIELDS if getattr(back, f) != getattr(info, f)]
    if diffs:  # would be a bug in to_dict/from_dict
        raise ConfigError(f"{out}: written config does not round-trip ({', '.join(diffs)}); please report this")

    key = _registry_key(out.name)
    print(f"wrote {out}")
    print(f"  {back.model_name}: {back.n_layer} layers, n_embd {back.n_embd}, {back.n_params:,} params "
          f"({human_count(back.n_params)}), dims w/a/v/g = {back.dim_att_lora}/{back.dim_aaa_lora}/"
          f"{back.dim_mv_lora}/{back.dim_gate_lora}")
    if in_models_dir:
        print(f"  model_file: {cfg.model_file} (in the models directory {models_dir()})")
    else:
        print(f"  model_file: {cfg.model_file} (absolute: the file is outside the models directory "
              f"{models_dir()})")
    on_path = any(_same_dir(out.parent, d) for d in config_dirs() if d != PACKAGE_MODELS_DIR)
    if on_path:
        print(f"  its directory is on ${CONFIG_PATH_ENV}: load it by name with load_model_config({key!r}) "
              f"or `rwkvtune models show {key}`")
    else:
        print(f"  load it by path: load_model_config({str(out)!r})")
        print(f"  to load it by name ({key!r}), add its directory to ${CONFIG_PATH_ENV} "
              f"({os.pathsep!r}-separated), e.g.: export {CONFIG_PATH_ENV}={out.parent}")
    if (PACKAGE_MODELS_DIR / f"rwkv7-{key}.json").exists():
        print(f"  note: while its directory is on ${CONFIG_PATH_ENV} it overrides the package's entry {key!r}")
    return 0


# ---- models download -----------------------------------------------------------------------


def _download_repo(args: argparse.Namespace) -> int:
    """``models download --repo OWNER/NAME``: the HF folder, verified, recorded (rwkvtune.hub_repos)."""

    got = download_repo(args.repo, revision=args.revision or "main", models_dir=args.models_dir, force=args.force,
                        progress=sys.stderr.isatty())
    rec = got.record
    at = f"revision {rec.revision}" + (f", commit {rec.commit}" if rec.commit and rec.commit != rec.revision else "")
    if got.fresh:
        print(f"saved {rec.repo} ({at}) as {got.folder}: {len(rec.files)} files, {got.nbytes:,} bytes, each "
              f"verified against the hub's listing (LFS sha256 or git blob id)")
        if got.skipped_pickles:
            print(f"  not downloaded: {', '.join(got.skipped_pickles)} (pickle files, which rwkvtune never loads; "
                  f"the safetensors weights hold the same model)")
        if got.skipped_other:
            more = f" (+{len(got.skipped_other) - 6})" if len(got.skipped_other) > 6 else ""
            print(f"  left out: {', '.join(got.skipped_other[:6])}{more} (not weights, config or tokenizer files)")
    else:
        print(f"already present: {got.folder} ({rec.repo}, {at}; nothing downloaded; --force downloads it again)")
    print(f"  use it: rwkvtune generate --model {got.folder} --prompt \"...\"")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    if args.repo is not None:
        given = [flag for flag, on in (("NAME", args.name is not None), ("--release", args.release),
                                       ("--latest", args.latest)) if on]
        if given:
            raise ConfigError(f"--repo {args.repo} downloads a Hugging Face folder; {' and '.join(given)} "
                              f"{'name' if len(given) > 1 else 'names'} a registry model file: give one of them, "
                              f"not both")
        return _download_repo(args)
    if args.revision is not None:
        raise ConfigError("--revision goes with --repo; a registry entry's revision is source.hf_revision in its "
                          "config")
    if args.name is None:
        raise ConfigError("models download: give NAME (a registry name or .json config, e.g. 1.5b) or "
                          "--repo OWNER/NAME (a Hugging Face RWKV-7 folder)")
    if args.latest or args.release or "@" in args.name:

        path, cfg, fresh = download_release(args.name, release=args.release, latest=args.latest,
                                            models_dir=args.models_dir, force=args.force,
                                            progress=sys.stderr.isatty())
        if fresh:
            print(f"saved {path} ({path.stat().st_size:,} bytes, sha256 verified)")
        else:
            print(f"already present: {path} (nothing downloaded; --force downloads it again)")
        print(f"  release {cfg.release}, ctx_len {cfg.ctx_len}; `{_registry_key(args.name.partition('@')[0])}` "
              f"now resolves to the newest release present in {path.parent}")
        if path.parent != models_dir():
            print(f"  the registry looks in {models_dir()}; to use this file set {MODEL_DIR_ENV}={path.parent}")
        return 0
    cfg = load_model_config(args.name)
    target = target_path(cfg, args.models_dir) if cfg.model_file else None
    if target is not None and target.is_file() and not args.force and cfg.hf_repo:
        print(f"already present: {target} (nothing downloaded; --force downloads it again)")
        return 0
    path = download_model(cfg, models_dir=args.models_dir, force=args.force, progress=sys.stderr.isatty())
    print(f"saved {path} ({path.stat().st_size:,} bytes, sha256 verified)")
    if path != Path(cfg.model_path):  # --models-dir elsewhere: say how the registry finds it there
        print(f"  the registry looks in {Path(cfg.model_path).parent}; to use this file set "
              f"{MODEL_DIR_ENV}={path.parent}")
    return 0


# ---- models releases -----------------------------------------------------------------------


def cmd_releases(args: argparse.Namespace) -> int:
    base, spec = releases.split_spec(args.name)
    if spec:
        raise ConfigError(f"{args.name!r}: `models releases` takes a size without a release, e.g. {base!r}")
    key = _registry_key(base)
    path = list_available_models().get(key)
    if path is None:
        ModelConfig.from_name(base)  # the registry's "unknown model ... Closest" error
    cfg = ModelConfig.from_file(path)
    extra, variants = [], []
    if args.hub:

        extra, _, variants = ask_hub(cfg, key)
    size, default, known = model_loader.entry_releases(cfg, key, extra)
    if size is None:
        raise ConfigError(f"{path}: entry {key} has no releases: its model file {cfg.model_file!r} does not follow "
                          f"{releases.SCHEME}")
    resolved = model_loader.resolve_release(cfg, key)
    rows = []
    for rel in reversed(known):  # newest first
        origins = {r.origin for r in (default, *extra) if r and r.file == rel.file} | {rel.origin}
        rows.append({"release": rel.release, "date": rel.date, "ctx_len": rel.ctx_len, "file": rel.file,
                     "present": model_loader.release_present(cfg, rel), "known_from": sorted(origins),
                     "sha256": rel.sha256, "name": f"{key}@{rel.label}", "resolved": rel.file == resolved.model_file})
    if args.json:
        print(json.dumps({"size": size, "entry": key, "config_path": path, "resolves_to": resolved.model_file,
                          "releases": rows, "left_out_variants": variants}, indent=2))
        return 0
    table = [["", "RELEASE", "DATE", "CTX", "FILE", "PRESENT", "KNOWN FROM"]]
    for r in rows:
        table.append(["*" if r["resolved"] else "", r["release"], r["date"], str(r["ctx_len"]), r["file"],
                      "yes" if r["present"] else "no", ", ".join(r["known_from"])])
    print(_table(table))
    print()
    if default and resolved.model_file == default.file:
        why = "the pinned release" + ("" if Path(resolved.model_path).is_file() else
                                      f" (not present: `rwkvtune models download {key}`)")
    else:
        why = "the newest release present"
    print(f"* `{key}` resolves to {resolved.model_file}: {why}; `{key}@RELEASE` names another "
          f"(e.g. {key}@{known[-1].release})")
    if variants:
        print(f"left out: {len(variants)} file(s) of other RWKV-7 variants on the hub (rwkv7a-/rwkv7b-), which "
              f"rwkvtune does not train")
    if not args.hub:
        print(f"the hub may have more: rwkvtune models releases {key} --hub; rwkvtune models download {key} --latest")
    return 0


# ---- models check --------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    results, warnings = check_all()
    for w in warnings:
        print(f"WARN  {w}")
    width = max([len(r.key) for r in results] + [4])
    for r in results:
        status = "OK" if r.ok else "FAIL"
        detail = " ".join(r.detail.split()) + (f" [shadowed by {r.shadowed_by}]" if r.shadowed_by else "")
        where = f"{r.path}: " if r.ok else ""
        print(f"{status:<4}  {r.key:<{width}}  {where}{detail}")
    bad = sum(not r.ok for r in results)
    compared = sum(r.compared for r in results)
    print(f"{len(results)} config(s) checked: {len(results) - bad} OK, {bad} with problems; "
          f"{compared} compared with a model file (models directory: {models_dir()})")
    return 1 if bad else 0
