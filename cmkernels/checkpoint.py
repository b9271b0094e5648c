"""Checkpoints: atomic writes, safe loads, and building a denoiser from our files or the official
state_dicts.

This module owns our format: make_checkpoint builds it, save_checkpoint writes it, load_file,
select_weights and load_denoiser read it; nothing else assembles or picks apart its keys.
Our format (written by the trainer through make_checkpoint) is a dict of tensors and plain values:
  format "cmkernels", version 1, unet_config (UNetConfig as a dict), denoiser (parameterization,
  sigma_data, sigma_min, sigma_max, c_noise), model (state_dict), emas {rate: state_dict}, plus
  trainer state (target, optimizer, step, config, rng) that sampling ignores, and "checksum":
  the sha256 of all of the above (state_digest), verified by every load. Files written before
  checksums existed load as before.
Official files (cd_imagenet64_l2.pt, edm_bedroom256_ema.pt, ...) are plain UNet state_dicts.
diffusers directories (UNet2DModel / ConsistencyModelPipeline) load through diffusers_format.
Everything loads with torch.load(weights_only=True) (or safetensors): no arbitrary unpickling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from cmkernels.diffusion import Denoiser
from cmkernels.unet import PRESETS, UNet, UNetConfig

CHECKSUM_KEY = "checksum"
CHECKSUM_ALGORITHM = "sha256-tree-v1"  # see state_digest


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


# ------------------------------------------------------------------------------------------------
# Atomic writes: the one place every file of the package is written through.


def write_atomic(path: str | os.PathLike, write: Callable, *, binary: bool = True,
                 verify: Callable[[Path], None] | None = None) -> Path:
    """Write a file through a temporary file beside `path`: write(f) fills it, it is fsynced,
    `verify(tmp_path)` (if given) may check what reached the disk, and only then it is renamed
    over `path`. A crash, a full disk or a failed check leave the old file as it was (and no
    temporary file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        text = {} if binary else {"encoding": "utf-8"}
        with os.fdopen(fd, "wb" if binary else "w", **text) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(Path(tmp))
        # mkstemp creates the file 0600; give it the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(folder: str | os.PathLike, what: str = "the output folder", *,
                   create: bool = True) -> Path:  # fmt: skip
    """Prove a file can be written in `folder` (before any long work whose result would go
    there); CheckpointError naming `what` otherwise. create: make the folder now; False: leave the
    disk as it is and try the nearest folder of the path that exists (the caller creates the
    folder when it writes)."""
    folder = Path(folder)
    if not create:
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        if existing != folder:
            what, folder = f"{what} {folder}: the folder", existing
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CheckpointError(f"{what} {folder}: cannot write there ({blocker} is a file, not a "
                              "folder)")  # fmt: skip
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CheckpointError(f"{what} {folder}: cannot write there ({reason})") from None
    return folder


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text), binary=False)


def save_atomic(obj, path: str | os.PathLike, verify: Callable[[Path], None] | None = None
                ) -> Path:
    """torch.save through write_atomic: a crash leaves the old file or the new one, never a torn
    one."""
    return write_atomic(path, lambda f: torch.save(obj, f), verify=verify)


# ------------------------------------------------------------------------------------------------
# Checksums: every tensor and value of a checkpoint, verified on load.


def state_digest(obj) -> str:
    """sha256 over a walk of a checkpoint: dict keys and plain values by repr, tensors by dtype,
    shape and bytes. Equal contents give equal digests whatever the file's zip layout."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu()
            # Hash the bytes in memory order (no copy for channels_last and other dense
            # layouts); the strides are hashed too, and torch.save keeps them.
            order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
            dense = t.permute(order) if t.dim() else t
            if not dense.is_contiguous():
                dense, order = t.contiguous(), list(range(t.dim()))
            h.update(f"T{t.dtype}{tuple(t.shape)}{order}".encode())
            if t.numel():
                h.update(dense.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(b"D%d" % len(x))
            for k, v in x.items():
                h.update(repr(k).encode())
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(b"L%d" % len(x))
            for v in x:
                walk(v)
        else:
            h.update(f"V{x!r}".encode())

    walk(obj)
    return h.hexdigest()


def with_checksum(state: dict) -> dict:
    """A shallow copy of `state` carrying the checksum of everything else in it."""
    state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    state[CHECKSUM_KEY] = {"algorithm": CHECKSUM_ALGORITHM, "digest": state_digest(state)}
    return state


def verify_checksum(state: dict, source: str | os.PathLike) -> bool:
    """Check and remove the checksum of a loaded checkpoint. False for a file without one (written
    before checksums existed); CheckpointError when the contents do not match it."""
    record = state.get(CHECKSUM_KEY)
    if not (isinstance(record, dict) and "digest" in record):
        return False  # (a plain state_dict could name a tensor "checksum")
    del state[CHECKSUM_KEY]
    if record.get("algorithm") != CHECKSUM_ALGORITHM:
        raise CheckpointError(
            f"{source}: checksum of an unknown kind {record.get('algorithm')!r} (written by a "
            "newer cmkernels?)"
        )
    if state_digest(state) != record.get("digest"):
        raise CheckpointError(
            f"{source} is corrupt: its contents do not match the checksum written with it "
            "(a damaged disk or copy?); use an intact copy"
        )
    return True


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Save a checkpoint with its checksum, atomically; the file on disk is read back and verified
    before it replaces the previous one, which stays in place if anything fails."""
    state = with_checksum(state)
    return save_atomic(state, path, verify=lambda tmp: load_file(tmp, source=path))


def _torch_load_message(exc: Exception) -> str:
    """What torch.load's failure means, in our words (torch's hint to pass weights_only=False is
    the wrong advice for a file of unknown origin, so it is not passed on)."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found or "Weights only load failed" in text:
        what = f" ({found.group(1)})" if found else ""
        return (f"it holds Python objects{what} besides tensors and plain values, which cmkernels "
                "never unpickles (they could run code); if you trust its source, re-save it as a "
                "plain state_dict of tensors")
    first = next((line for line in text.splitlines() if line.strip()), "")
    first = first.split(". ")[0].rstrip(".")  # torch's advice after the first sentence is not ours
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"{detail} (corrupt, truncated, or not a torch file)"


def load_file(path: str | os.PathLike, source: str | os.PathLike | None = None) -> dict:
    """Load a checkpoint safely (weights_only / safetensors) onto the CPU; its checksum, if it has
    one, is verified and removed. source: the name used in messages (default: path)."""
    path = Path(path)
    source = path if source is None else source
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {source}")
    if path.is_dir():
        raise CheckpointError(f"{source} is a directory, not a checkpoint file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file as load_st
        except ImportError as exc:
            raise CheckpointError(
                f"{source}: reading .safetensors needs `pip install safetensors`"
            ) from exc
        try:
            return load_st(str(path))
        except Exception as exc:
            raise CheckpointError(f"cannot read {source}: {_torch_load_message(exc)}") from exc
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {source}: the file is empty (0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {source}: {_torch_load_message(exc)}") \
            from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{source} holds a {type(obj).__name__}, not a state_dict or checkpoint"
        )
    verify_checksum(obj, source)
    return obj


def build_unet_meta(preset: str | UNetConfig) -> UNet:
    """The UNet of a preset on the meta device (names and shapes, no memory)."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    with torch.device("meta"):
        return UNet(dataclasses.replace(cfg))


def _layout_distance(state: dict, preset: str) -> int:
    ref = {n: tuple(t.shape) for n, t in build_unet_meta(preset).state_dict().items()}
    got = {n: tuple(t.shape) for n, t in state.items()}
    return len(set(ref) ^ set(got)) + sum(ref[n] != got[n] for n in set(ref) & set(got))


def suggest_preset(state: dict) -> str:
    """The presets whose tensor layout matches `state` best, as text ("gray28 or gray32")."""
    scores = {p: _layout_distance(state, p) for p in PRESETS}
    best = min(scores.values())
    return " or ".join(sorted(p for p, s in scores.items() if s == best))


def describe_mismatch(ref: dict, state: dict) -> str:
    """The differences between two tensor layouts {name: tensor} in one clause."""
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    mismatched = [k for k in ref if k in state and tuple(ref[k].shape) != tuple(state[k].shape)]

    def show(keys):
        return ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    if mismatched:
        k = mismatched[0]
        parts.append(f"shape mismatches: {show(mismatched)} (e.g. {k} is "
                     f"{list(state[k].shape)}, the model's {list(ref[k].shape)})")  # fmt: skip
    return "; ".join(parts)


def config_differences(want: dict, have: dict) -> list[str]:
    """'name a (checkpoint: b)' for each UNet setting in which two configs differ."""
    return [f"{k} {want[k]} (checkpoint: {have[k]})" for k in want
            if k in have and k != "ops" and _plain(want[k]) != _plain(have[k])]  # fmt: skip


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _load_strict(net: UNet, state: dict, source: str, preset: str | None):
    ref = net.state_dict()
    diff = describe_mismatch(ref, state)
    if diff:
        hint = suggest_preset(state)
        raise CheckpointError(
            f"{source} does not fit the {preset or 'configured'} UNet: {diff}; its layout "
            f"matches the preset {hint} best: try --preset {hint.split()[0]}"
        )
    net.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------
# Our format: the one writer and the readers.

FORMAT = "cmkernels"
FORMAT_VERSION = 1
TRAINING_KEYS = ("model", "optimizer", "step", "emas")  # what --resume needs besides the format


def denoiser_meta(den: Denoiser) -> dict:
    """The denoiser settings a checkpoint records beside the UNet config."""
    return dict(parameterization=den.parameterization, sigma_data=den.sigma_data,
                sigma_min=den.sigma_min, sigma_max=den.sigma_max, c_noise=den.c_noise_convention)


def make_checkpoint(den: Denoiser, emas: dict[str, dict], **trainer_state) -> dict:
    """A checkpoint of our format: the network of `den` (its config, settings and weights), the
    evaluation EMAs {rate: state_dict} and any trainer state (target, optimizer, step, config,
    rng), which sampling ignores. save_checkpoint writes it."""
    net = den.net
    return {"format": FORMAT, "version": FORMAT_VERSION,
            "unet_config": dataclasses.asdict(net.config), "denoiser": denoiser_meta(den),
            "model": net.state_dict(), "emas": emas, **trainer_state}  # fmt: skip


def is_ours(state: dict) -> bool:
    return state.get("format") == FORMAT


def check_training_checkpoint(state: dict, source: str | os.PathLike) -> dict:
    """`state` if it can continue a run (--resume), else CheckpointError naming what is missing."""
    for key in TRAINING_KEYS:
        if key not in state:
            raise CheckpointError(f"{source} is not a training checkpoint (no {key!r})")
    return state


def select_weights(state: dict, weights: str, source: str | os.PathLike) -> dict:
    """The UNet state_dict that `weights` names: for our checkpoints "ema" (the first evaluation
    EMA, or the model when there is none), "model", or an EMA rate such as 0.9999; a plain
    state_dict (an official file) is its own weights."""
    if not is_ours(state) and "model" not in state:
        return state
    emas = state.get("emas") or {}
    if weights == "ema":
        return next(iter(emas.values())) if emas else state["model"]
    if weights == "model":
        return state["model"]
    for key, value in emas.items():
        try:
            if key == weights or float(key) == float(weights):
                return value
        except ValueError:
            pass
    have = ", ".join(repr(k) for k in emas) or "none"
    raise CheckpointError(
        f"--weights {weights!r}: {source} has no such weights; choose 'ema', 'model' or one of "
        f"its EMA rates ({have})"
    )


def load_denoiser(
    path: str | os.PathLike,
    preset: str | None = None,
    parameterization: str | None = None,
    weights: str = "ema",
    device: str | torch.device = "cpu",
) -> Denoiser:
    """A Denoiser from our checkpoint (EMA weights by default) or an official state_dict.

    preset:           for plain state_dicts (official files): a UNet preset such as "imagenet64",
                      "lsun256" or "gray32" (required for them)
    parameterization: override "cm"/"edm" (official edm_*.pt files are EDM teachers)
    weights:          "ema" (the first evaluation EMA, if any), "model" or an EMA rate ("0.9999")

    A diffusers directory (ConsistencyModelPipeline or UNet2DModel) or diffusers .safetensors
    file loads through cmkernels.diffusers_format.load_any (no preset needed).
    """
    from cmkernels import diffusers_format  # imported here: it imports this module

    if diffusers_format.is_diffusers_source(path):  # the one dispatch, with its preset check
        return diffusers_format.load_any(path, preset=preset, parameterization=parameterization,
                                         device=device)[0]  # fmt: skip
    state = load_file(path)
    if is_ours(state):
        cfg = UNetConfig(**state["unet_config"])
        meta = dict(state["denoiser"])
        weights_sd = select_weights(state, weights, path)
        net = UNet(cfg)
        _load_strict(net, weights_sd, str(path), None)
        if parameterization:
            meta["parameterization"] = parameterization
        den = Denoiser(net, meta["parameterization"], meta["sigma_data"], meta["sigma_min"],
                       meta["sigma_max"], meta["c_noise"])  # fmt: skip
    else:
        if preset is None:
            hint = suggest_preset(state)
            raise CheckpointError(
                f"{path} is a plain state_dict (an official checkpoint?): pass its preset, "
                f"e.g. --preset {hint}"
            )
        if preset not in PRESETS:
            raise CheckpointError(f"unknown preset {preset!r}; choose one of "
                                  f"{', '.join(sorted(PRESETS))}")
        net = UNet(dataclasses.replace(PRESETS[preset]))
        _load_strict(net, state, str(path), preset)
        kind = parameterization or ("edm" if Path(path).name.startswith("edm") else "cm")
        den = Denoiser(net, kind, c_noise="official")
    return den.to(device).eval()
