"""Reading model weights without running anyone's code: the one loader for every file `wsl` accepts.

Accepted: Lightning checkpoints of `wsl pretrain` / `wsl finetune` (`.ckpt`), torchvision and
WSL-Images state dicts (`.pth`, e.g. `ig_resnext101_32x8-c38310e5.pth`), timm and exported
safetensors (`.safetensors`). All hold torchvision's ResNet key layout (`conv1.weight`, ...,
`fc.weight`) possibly under a prefix (`net.`, `module.`, `model.`, `_orig_mod.`), which is
stripped. `.pth`/`.ckpt` are read with `torch.load(weights_only=True)`, which refuses any
pickle that asks for a callable; torch older than 2.6 is refused, its `weights_only` is not
safe (CVE-2025-32434). A file name ending in `-<hex>.<ext>` must match the start of the file's
SHA-256, as `torch.hub` checks with `check_hash=True`.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path

import torch

from wsl.errors import WslError
from wsl.models import STAGE_BLOCKS

HEAD_PREFIX = "fc."
_KEY_PREFIXES = ("net.", "module.", "model.", "_orig_mod.")
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z]+$")  # torch.hub's convention, at least 8 digits
# Facebook's WSL-Images files (CC-BY-NC 4.0), by width; torch.hub keeps them in its checkpoints folder.
WSL_IMAGES = {
    8: "ig_resnext101_32x8-c38310e5.pth",
    16: "ig_resnext101_32x16-c6f796b0.pth",
    32: "ig_resnext101_32x32-e4b90b00.pth",
    48: "ig_resnext101_32x48-3e41cc8a.pth",
}
# Published files whose names carry their SHA-256 prefix: always checked. Any other name is
# checked only when asked (`check_hash`, as torch.hub's): `model-20240101.pth` is a user's name.
PUBLISHED_WEIGHTS = frozenset(
    [
        *WSL_IMAGES.values(),
        "resnext50_32x4d-7cdf4587.pth",  # torchvision's ResNeXt weights (V1, V2)
        "resnext50_32x4d-1a0047aa.pth",
        "resnext101_32x8d-8ba56ff5.pth",
        "resnext101_32x8d-110c445d.pth",
        "resnext101_64x4d-173b62eb.pth",
    ]
)


def _torch_version() -> tuple[int, int]:
    major, minor = re.findall(r"\d+", torch.__version__)[:2]
    return int(major), int(minor)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _listed_in_release(path: Path) -> bool:
    """A file of a `wsl export` release folder (named in the metadata.json beside it)."""
    metadata = path.parent / "metadata.json"
    return metadata.is_file() and f'"{path.name}"' in metadata.read_text()


def check_name_hash(path: Path, check_hash: bool = False) -> None:
    """A name `...-<hex prefix>.<ext>` must match the file's SHA-256 (a truncated or swapped file
    does not): always for the published files and our release folders' files, for any other
    name only with `check_hash`."""
    match = _HASH_IN_NAME.search(path.name)
    if not match or not (check_hash or path.name in PUBLISHED_WEIGHTS or _listed_in_release(path)):
        return
    if not file_sha256(path).startswith(match.group(1)):
        raise WslError(
            f"{path}: SHA-256 does not start with {match.group(1)} as its name says: "
            "the file is truncated, corrupt or not the released one"
        )


def _state_dict_of(payload, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a loaded payload and what kind of file held it."""
    if isinstance(payload, dict) and "state_dict" in payload and "pytorch-lightning_version" in payload:
        return payload["state_dict"], "Lightning checkpoint"
    for key in ("state_dict", "model", "model_state_dict"):  # timm / DeiT / generic training checkpoints
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            return payload[key], f"training checkpoint ['{key}']"
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload, "state dict"
    raise WslError(f"{path}: no state dict of tensors inside (a {type(payload).__name__})")


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def read_checkpoint(path: str | Path, check_hash: bool = False) -> tuple[dict[str, torch.Tensor], str, dict]:
    """(state dict with torchvision's key names, kind of file, the Lightning checkpoint's
    hyper-parameters or {}) of a weights file, never running code. `check_hash`: check the
    hash prefix of any name (see `check_name_hash`)."""
    path = Path(path)
    if not path.is_file():
        raise WslError(f"weights file not found: {path}")
    check_name_hash(path, check_hash)
    hyper_parameters: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state, kind = load_file(str(path)), "safetensors"
        except (SafetensorError, OSError, ValueError) as exn:
            raise WslError(f"{path}: not a readable safetensors file ({exn})") from None
    else:
        if _torch_version() < (2, 6):
            raise WslError(
                f"{path}: refusing to unpickle with torch {torch.__version__} < 2.6 (its weights_only "
                "loading is unsafe, CVE-2025-32434): upgrade torch or use a .safetensors file"
            )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exn:
            reason = str(exn).strip().splitlines()[0] if str(exn).strip() else "forbidden pickle content"
            raise WslError(f"{path}: refused, the pickle holds more than tensors and plain data ({reason})") from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exn:
            raise WslError(f"{path}: unreadable or truncated checkpoint ({str(exn).splitlines()[0]})") from None
        state, kind = _state_dict_of(payload, path)
        if isinstance(payload, dict) and isinstance(payload.get("hyper_parameters"), dict):
            hyper_parameters = payload["hyper_parameters"]
    return {_strip_prefixes(k): v for k, v in state.items()}, kind, hyper_parameters


def read_state_dict(path: str | Path, check_hash: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict with torchvision's key names, kind of file) of a weights file, never running code."""
    state, kind, _ = read_checkpoint(path, check_hash)
    return state, kind


def infer_architecture(state: dict[str, torch.Tensor]) -> str | None:
    """The registry name (`resnext101_32x8d`) of a torchvision-layout ResNet(X) state dict, if it is one."""
    conv2 = state.get("layer1.0.conv2.weight")
    if conv2 is None or conv2.ndim != 4:
        return None
    width = conv2.shape[1]  # a grouped 3x3 conv: each group sees `width` input channels
    groups = conv2.shape[0] // width
    blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{stage}.")}) for stage in (1, 2, 3, 4)]
    depth = next((d for d, b in STAGE_BLOCKS.items() if b == blocks), None)
    return f"resnext{depth}_{groups}x{width}d" if depth else f"ResNeXt with blocks {blocks}, {groups}x{width}d"


def load_weights(
    net: torch.nn.Module, path: str | Path, model_name: str, head: str = "new", check_hash: bool = False
) -> str:
    """Load a weights file into `net` (built by `wsl.models.build_model(model_name, ...)`).

    head="new": the checkpoint's classifier (hashtag or ImageNet head) is dropped and `net`'s
    freshly initialised one kept; head="keep": the checkpoint's classifier is loaded too and
    must fit `net`'s classes. Every backbone tensor must be there with its shape, or it is an
    error naming the architecture the file holds. Returns a one-line report.
    """
    if head not in ("new", "keep"):
        raise WslError(f"head must be 'new' or 'keep', not '{head}'")
    path = Path(path)
    state, kind = read_state_dict(path, check_hash)
    expected = net.state_dict()
    held = infer_architecture(state) or "not a torchvision ResNet(X)"
    required = [k for k in expected if not k.startswith(HEAD_PREFIX) and not k.endswith("num_batches_tracked")]
    missing = [k for k in required if k not in state]
    reshaped = [k for k in required if k in state and state[k].shape != expected[k].shape]
    if missing or reshaped:
        example = (
            f"{reshaped[0]} is {tuple(state[reshaped[0]].shape)}, not {tuple(expected[reshaped[0]].shape)}"
            if reshaped
            else f"{missing[0]} is missing"
        )
        raise WslError(
            f"{path} holds {held}, not {model_name}: {len(missing)} backbone tensors missing, "
            f"{len(reshaped)} of another shape ({example})"
        )
    checkpoint_head = state.get(HEAD_PREFIX + "weight")
    head_shape = tuple(checkpoint_head.shape) if checkpoint_head is not None else None
    if head == "keep":
        if head_shape != tuple(expected[HEAD_PREFIX + "weight"].shape):
            raise WslError(
                f"{path}: its classifier is {head_shape or 'missing'}, the data needs "
                f"{tuple(expected[HEAD_PREFIX + 'weight'].shape)}: use head=new to train a new one"
            )
        loaded = {k: v for k, v in state.items() if k in expected}
        head_note = f"classifier kept ({head_shape[0]} classes)"
    else:
        loaded = {k: v for k, v in state.items() if k in expected and not k.startswith(HEAD_PREFIX)}
        dropped = f"dropped the checkpoint's {head_shape[0]}-class head, " if head_shape else ""
        head_note = f"{dropped}new {expected[HEAD_PREFIX + 'weight'].shape[0]}-class head"
    net.load_state_dict(loaded, strict=False)
    unexpected = [k for k in state if k not in expected]
    absent = [k for k in expected if k not in loaded and not k.startswith(HEAD_PREFIX)]
    return (
        f"loaded {len(loaded)} tensors of {held} from {path.name} ({kind}); {head_note}; "
        f"missing: {', '.join(absent[:3]) + ('...' if len(absent) > 3 else '') if absent else 'none'}; "
        f"unexpected: {', '.join(unexpected[:3]) + ('...' if len(unexpected) > 3 else '') if unexpected else 'none'}"
    )
