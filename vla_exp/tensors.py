"""Files of tensors that vla-exp writes (checkpoints, trained policies, LoRA trainables): written atomically, read
with `weights_only=True`, so a file that holds anything else (a pickle that would run code when loaded) is refused
before it can."""
import errno
import pickle
from pathlib import Path

import torch

from vla_exp import UsageError
from vla_exp.files import atomic


def write(obj, path, what):
    """`torch.save` atomically; a full disk (or quota, or file size limit) is one line naming the folder and the
    space the file needs."""
    try:
        with atomic(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__  # torch's writer wraps the failed write
        if not isinstance(cause, OSError) or cause.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise UsageError(f"no space left on {Path(path).parent} ({cause.strerror}): the {what} needs about "
                         f"{tensor_bytes(obj) / 2 ** 20:.0f} MB") from None


def tensor_bytes(obj):
    """The bytes of every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        obj = list(obj.values())
    return sum(map(tensor_bytes, obj)) if isinstance(obj, (list, tuple)) else 0


def read(path, what):
    """`torch.load` of a file vla-exp wrote (`what` names it for the user), tensors and plain values only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{path}: refused: this {what} holds objects other than tensors and plain values, which "
                         "loading could run as code (a file of an older vla-exp, or not vla-exp's); delete it") from None
    except Exception as e:
        raise UsageError(f"{path} is not a readable {what} ({type(e).__name__}: {str(e)[:200]})") from None
