"""What the cloud source and the sandbox inventory share about Modal: the SDK import,
the tags on every sandbox, a pool's id, and how an SDK error is said in one line."""
from __future__ import annotations

import getpass
import hashlib
import socket
from pathlib import Path
from types import ModuleType

from ..errors import ConfigError

# Tags on every sandbox: how a pool finds its own (and `hpc-sandbox cloud` all of ours).
POOL_TAG, OWNER_TAG, VERSION_TAG, PROFILE_TAG = ("hpc-sandbox-pool", "hpc-sandbox-owner", "hpc-sandbox-version",
                                                 "hpc-sandbox-profile")


def default_pool_id(state_dir: Path, profile: str) -> str:
    """The same id for the same user, host, state dir and cloud profile: a pool that
    restarts after a crash finds (by tag) the sandboxes its previous run left."""
    seed = f"{getpass.getuser()}@{socket.gethostname()}:{Path(state_dir).expanduser()}:{profile}"
    return f"{getpass.getuser()[:16]}-{hashlib.sha256(seed.encode()).hexdigest()[:10]}"


def import_sdk() -> ModuleType:
    try:
        import modal
    except ImportError:
        raise ConfigError("the modal package is not installed: pip install 'hpc-sandbox[modal]' "
                          "(then `modal setup` for credentials)") from None
    return modal


def describe(exc: BaseException) -> str:
    """An SDK error in one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["OWNER_TAG", "POOL_TAG", "PROFILE_TAG", "VERSION_TAG", "default_pool_id", "describe", "import_sdk"]
