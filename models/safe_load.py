"""Reading the project's .pt files without running code from them.

`torch.load(weights_only=True)` unpickles tensors, state dicts and plain data (numbers, strings, lists,
tuples, dicts) only: a file whose pickle names any other callable (`os.system`, `builtins.exec`, a class
with a `__reduce__`) is refused before anything in it runs. Every checkpoint file the project reads
(state.pt, net.pt, centres_<start>_<end>.pt) goes through `load_weights`.
"""

from __future__ import annotations

import os
import pickle
import re

import torch


class UnsafeFileError(ValueError):
    """A .pt file holding more than tensors and plain data: refused, nothing in it was run."""


def load_weights(path: str | os.PathLike, map_location: str | torch.device = "cpu", **kwargs):
    """torch.load(path, weights_only=True); UnsafeFileError (one line naming the file and what it asked to
    call) for a pickle that would run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        # torch's message is a page of advice ending in "weights_only=False will likely succeed": not here.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"its pickle asks for {found.group(1)}" if found else "its pickle asks for more"
        raise UnsafeFileError(f"{path}: refused: not only tensors and plain data ({what})") from None
