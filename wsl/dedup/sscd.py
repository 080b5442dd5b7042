"""`descriptor=sscd:PATH`: de-duplication with SSCD, a learned copy-detection descriptor.

SSCD (Pizzi et al., CVPR 2022; DINOv2's data curation de-duplicates with it) is a ResNet-50
trained to map an image and its edited copies (crops, overlays, borders, rotations, filters)
to nearby 512-d unit vectors. Its `.torchvision.pt` files hold a torchvision ResNet-50 whose
`avgpool` is GeM pooling (p = 3) and whose `fc` maps 2048 to 512, keys prefixed `backbone.`;
the output is L2-normalised. Nothing is downloaded: get `sscd_disc_mixup.torchvision.pt` from
https://github.com/facebookresearch/sscd-copy-detection (MIT licence) and pass its path.

Images are resized to SIZE x SIZE (SSCD's README resizes the shorter side to 288; a square lets
images of any shape share a batch) and normalised with ImageNet's statistics. A sample's score
is the cosine similarity of its descriptor with the nearest evaluation image's, searched
exactly; SSCD's authors call cosine > 0.75 a copy at 90% precision on DISC2021.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from wsl.errors import WslError
from wsl.files import write_atomic

SIZE = 288
BATCH = 32
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class GeM(nn.Module):
    """Generalised-mean pooling with a fixed p (SSCD's GlobalGeMPool2d), flattened."""

    def __init__(self, p: float = 3.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


def sscd_model() -> nn.Module:
    """SSCD's network in torchvision's layout, randomly initialised."""
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.avgpool = GeM(3.0)
    model.fc = nn.Linear(2048, 512)
    return model


def load_sscd(path: str | Path) -> nn.Module:
    """SSCD weights (`.torchvision.pt`, keys `backbone.*`) in eval mode, read without running code."""
    from wsl.release.checkpoints import read_state_dict

    state, _ = read_state_dict(path)  # weights_only: a pickle that asks for code is refused
    state = {key.removeprefix("backbone."): value for key, value in state.items()}
    model = sscd_model()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        problem = (
            f"{len(missing)} missing keys ({missing[0]}...)"
            if missing
            else f"{len(unexpected)} unexpected keys ({unexpected[0]}...)"
            if unexpected
            else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, not {tuple(expected[wrong[0]].shape)}"
        )
        raise WslError(f"{path}: not SSCD torchvision weights (ResNet-50, GeM, fc 2048 -> 512): {problem}")
    model.load_state_dict(state)
    return model.eval()


def sscd_path(descriptor: str) -> Path:
    """The weights file named by `sscd:PATH`, checked to exist."""
    path = Path(descriptor.split(":", 1)[1])
    if not path.is_file():
        raise WslError(
            f"SSCD weights not found: {path} (get sscd_disc_mixup.torchvision.pt from "
            "https://github.com/facebookresearch/sscd-copy-detection)"
        )
    return path


@torch.inference_mode()
def embed(model: nn.Module, images: list[Image.Image]) -> np.ndarray:
    """Unit-length SSCD descriptors [N, 512] of RGB images, BATCH at a time, on the GPU when there is one."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), BATCH):
        batch = np.stack([np.asarray(im.resize((SIZE, SIZE), Image.BILINEAR)) for im in images[start : start + BATCH]])
        x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255)
        x = (x - _MEAN.to(device)) / _STD.to(device)
        out.append(nn.functional.normalize(model(x), dim=1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 512), np.float32)


class SscdIndex:
    """The evaluation images' SSCD descriptors (`eval-sscd.npy`), searched exactly (`exact_search`);
    the same interface as `EvalIndex` (`keys`, `store`, `match`)."""

    def __init__(self, keys: list[str], store: np.ndarray, descriptors: np.ndarray, model: nn.Module):
        from wsl.dedup.index import search_scratch

        self.keys, self.store, self.descriptors, self.model = keys, store, descriptors, model
        self.scratch = search_scratch(descriptors)  # `exact_search`'s buffer (pages touched only when used)

    @classmethod
    def build(cls, sources: list[str], descriptor: str, folder: Path) -> SscdIndex:
        """Embed every image of `sources` into `folder` (`eval-sscd.npy`, then the keys file that marks it complete)."""
        from wsl.dedup.index import read_evaluation, write_evaluation

        model = _model_on_device(descriptor)
        chunks: list[np.ndarray] = []
        pending: list[Image.Image] = []

        def add(image: Image.Image) -> None:
            pending.append(image)
            if len(pending) == BATCH:
                chunks.append(embed(model, pending))
                pending.clear()

        keys, store, skipped = read_evaluation(sources, SIZE, on_image=add)
        chunks.append(embed(model, pending))

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as stream:
                np.save(stream, np.concatenate(chunks).astype(np.float32))

        write_atomic(folder / "eval-sscd.npy", write)
        write_evaluation(folder, keys, store, skipped)
        return cls.open(folder, descriptor)

    @classmethod
    def open(cls, folder: Path, descriptor: str, threads: int | None = None) -> SscdIndex:
        """The index built into `folder`, its network on `threads` CPU threads (default: torch's)."""
        if threads:
            torch.set_num_threads(threads)
        keys = json.loads((folder / "eval-keys.json").read_text())["keys"]
        store = np.load(folder / "eval-store.npy", mmap_mode="r")
        descriptors = np.load(folder / "eval-sscd.npy", mmap_mode="r")  # shared by a machine's workers
        return cls(keys, store, descriptors, _model_on_device(descriptor))

    @staticmethod
    def decode(data: bytes) -> Image.Image:
        """A pretraining image as `match` takes it: its shorter side at least SIZE (JPEG draft mode)."""
        from wsl.dedup.index import decode_small

        return decode_small(data, SIZE)

    def match(self, images: list[Image.Image]) -> list[tuple[float, int]]:
        """(cosine similarity, evaluation image) of each image's nearest evaluation image."""
        from wsl.dedup.index import exact_search

        if not images:
            return []
        similarity, rows = exact_search(embed(self.model, images), self.descriptors, 1, scratch=self.scratch)
        return [(float(s[0]), int(r[0])) for s, r in zip(similarity, rows)]


def _model_on_device(descriptor: str) -> nn.Module:
    """The network on this process's current GPU (`wsl.dedup.run` gives each worker its own), else the CPU."""
    model = load_sscd(sscd_path(descriptor))
    return model.to(torch.device("cuda", torch.cuda.current_device())) if torch.cuda.is_available() else model
