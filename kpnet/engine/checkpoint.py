"""Checkpoints: plain dicts of tensors and primitives, written atomically, read with weights_only=True."""

from __future__ import annotations

import dataclasses
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kpnet import __version__
from kpnet.config import Recipe, recipe_from_dict, with_num_classes
from kpnet.errors import KpnetError
from kpnet.io import atomic_torch_save

FORMAT = "kpnet-checkpoint-1"


def save_checkpoint(path: str | Path, model: nn.Module, recipe: Recipe, **state: Any) -> Path:
    """Write weights, recipe and training state atomically; the file is read back (size, header) before it replaces the old."""
    doc = {"format": FORMAT, "kpnet_version": __version__, "recipe": recipe.to_dict(), "model": model.state_dict()}
    doc.update(state)

    def verify(tmp: Path) -> None:
        try:
            back = _load(tmp, mmap=True)
        except (pickle.UnpicklingError, *_UNREADABLE) as e:
            raise KpnetError(path, f"the checkpoint just written does not read back ({type(e).__name__}); "
                                   "the previous file is unchanged") from None
        if not isinstance(back, dict) or back.get("format") != FORMAT or back.get("iteration") != state.get("iteration"):
            raise KpnetError(path, "the checkpoint just written reads back different; the previous file is unchanged")

    return atomic_torch_save(path, doc, verify)


_UNREADABLE = (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError)


def _load(path: Path, mmap: bool = False) -> Any:
    with warnings.catch_warnings():  # torch warns about legacy pickles before refusing them; the error says it
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict safely; anything but a kpnet checkpoint of tensors is refused with one line."""
    path = Path(path)
    if not path.is_file():
        raise KpnetError(path, "checkpoint not found")
    try:
        doc = _load(path)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"(?:Unsupported global: GLOBAL|Unsupported class) ([\w.]+)", str(e))
        what = f" ({culprit.group(1)})" if culprit else ""
        raise KpnetError(path, f"refusing to load: the checkpoint holds pickled objects other than tensors{what}") from None
    except _UNREADABLE as e:
        raise KpnetError(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KpnetError(path, "not a kpnet checkpoint (no kpnet format marker)")
    return doc


def load_weights(model: nn.Module, doc: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's weights into `model`, naming the first mismatch when the architectures differ."""
    state = doc["model"]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        stored = doc.get("recipe", {})
        what = f"family {stored.get('family')!r}, backbone {stored.get('model', {}).get('backbone')!r}"
        if shapes:
            k = shapes[0]
            detail = f"{k} has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}"
        elif missing:
            detail = f"missing {missing[0]} (+{len(missing) - 1} more)"
        else:
            detail = f"unexpected {unexpected[0]} (+{len(unexpected) - 1} more)"
        raise KpnetError(path, f"checkpoint does not match the recipe's architecture (checkpoint: {what}): {detail}")
    model.load_state_dict(state)


def checkpoint_recipe(doc: dict[str, Any], path: str | Path) -> Recipe:
    """The recipe stored in a checkpoint."""
    return recipe_from_dict(doc["recipe"], source=str(path))


def recipe_for_weights(recipe: Recipe, stored: Recipe) -> Recipe:
    """`recipe` as the checkpoint's weights need it: its `train` and `augment` sections are the ones the weights were
    trained with (they fix the scale the model knows, which `test.input_size: auto` follows), and
    `model.num_classes: auto` becomes the trained count."""
    recipe = dataclasses.replace(recipe, train=stored.train, augment=stored.augment)
    return with_num_classes(recipe, stored.model.num_classes)


def checkpoint_classes(doc: dict[str, Any]) -> tuple[list[str] | None, list[int] | None]:
    """The training set's class names and COCO category ids (class c <-> cat_ids[c]) a checkpoint recorded."""
    return doc.get("class_names"), doc.get("cat_ids")


# Keys that may change between a run and its --resume without changing what is trained. `train.accumulate`
# trades with the number of ranks (which a resume may change too): the sample stream stays the same.
RESUMABLE_KEYS = frozenset({
    "source", "data.num_workers", "train.log_every", "train.checkpoint_every", "train.max_iterations",
    "train.on_nonfinite", "train.nonfinite_limit", "train.accumulate",
})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def resume_differences(stored: Recipe, current: Recipe) -> list[str]:
    """`key: stored -> current` for each recipe key that differs and would change the resumed training."""
    a, b = _flatten(stored.to_dict()), _flatten(current.to_dict())
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS and not k.startswith("test.")]
