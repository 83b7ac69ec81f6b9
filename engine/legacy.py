"""Reading foreign checkpoints that pickle more than tensors, without executing anything.

Released checkpoints of other codebases pickle an argparse Namespace, OmegaConf containers, or a
Lightning training state next to the weights. ``torch.load(weights_only=True)`` refuses them; a plain
``torch.load`` would import and call whatever the file names. ``legacy_load`` unpickles with an
allow-list: tensors and storages are rebuilt as usual, a short list of harmless containers is mapped
to plain Python stand-ins, and any other global is replaced by an inert placeholder that records its
name and arguments but never imports or calls the real thing.
"""

import collections
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from engine.errors import TesseraError


class Opaque:
    """Stands in for any object the allow-list does not cover; keeps what the pickle said about it."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"Opaque({self.qualname})"


def _opaque(module: str, name: str):
    return type(name, (Opaque,), {"qualname": f"{module}.{name}"})


class Namespace(Opaque):
    """argparse.Namespace stand-in: attributes from the pickled state dict."""

    def __setstate__(self, state):
        self.state = state
        if isinstance(state, dict):
            self.__dict__.update(state)


SAFE = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("argparse", "Namespace"): Namespace,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("numpy.core.multiarray", "scalar"): None,  # filled below
}
for _dtype in ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char", "Byte", "Bool"):
    SAFE[("torch", f"{_dtype}Storage")] = getattr(torch, f"{_dtype}Storage")


def _numpy_scalar(dtype, data):
    import numpy as np

    return np.frombuffer(data, dtype=dtype)[0] if isinstance(data, bytes) else data


def _numpy_dtype(*args):
    import numpy as np

    return np.dtype(args[0]) if args and isinstance(args[0], str) else None


SAFE[("numpy.core.multiarray", "scalar")] = _numpy_scalar
SAFE[("numpy._core.multiarray", "scalar")] = _numpy_scalar
SAFE[("numpy", "dtype")] = _numpy_dtype


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages):
        super().__init__(file)
        self.storages = storages
        self.opaque_names: list[str] = []

    def find_class(self, module, name):
        if (module, name) in SAFE:
            return SAFE[(module, name)]
        self.opaque_names.append(f"{module}.{name}")
        return _opaque(module, name)

    def persistent_load(self, pid):
        kind, storage_type, key, location, numel = pid[:5]
        if kind != "storage":
            raise TesseraError(f"unsupported persistent id {kind!r} in checkpoint")
        return self.storages(storage_type, key, numel)


def legacy_load(path, map_location="cpu"):
    """Load a torch checkpoint (zip or legacy tar-less format) without running any pickled code.

    Returns the unpickled object; unknown classes come back as ``Opaque`` placeholders.
    """
    path = Path(path)
    if not path.is_file():
        raise TesseraError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise TesseraError(f"{path} is not a torch zip checkpoint (saved with torch >= 1.6); re-save it first")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        prefix = names[0].split("/")[0]
        data_name = f"{prefix}/data.pkl"
        if data_name not in names:
            raise TesseraError(f"{path}: no data.pkl in the archive; not a torch checkpoint")
        cache = {}

        def storage(storage_type, key, numel):
            if key not in cache:
                raw = zf.read(f"{prefix}/data/{key}")
                dtype = storage_type.dtype if hasattr(storage_type, "dtype") else storage_type(0).dtype
                untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
                cache[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
            return cache[key]

        with zf.open(data_name) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation notices
            obj = _Unpickler(f, storage).load()
    return _to_device(obj, map_location)


def _to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return type(obj)((k, _to_device(v, device)) for k, v in obj.items()) if not isinstance(
            obj, collections.defaultdict) else {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def state_dict_from(obj, keys=("state_dict", "model", "model_ema", "ema")) -> dict:
    """The first tensor dict found under ``keys`` (or obj itself when it is one)."""
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj
    for k in keys:
        if isinstance(obj, dict) and k in obj and isinstance(obj[k], dict):
            return obj[k]
    raise TesseraError(f"no state dict under any of {keys} in the checkpoint")
