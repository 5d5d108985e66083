"""Published ConvNeXt weights: which exist, where they live, how they were evaluated; download.

The registry (data/pretrained.json) lists, for every `arch.tag` timm publishes (classifiers and
headless backbones, num_classes 0), the Hugging Face hub repo and file, the number of classes,
the evaluation preprocessing (input size, crop_pct, crop_mode, interpolation, mean, std), the
licence and whether timm loads it for `pretrained=True`. `tests/test_hub.py` checks every field
of every entry against timm's pretrained configs, and the names against timm's list.
Downloads go through huggingface-hub's cache, so offline (HF_HUB_OFFLINE=1 or no network) a file
fetched once is found again; when the hub's host cannot even be resolved, only the cache is
looked in, so the answer comes at once instead of after huggingface-hub's retries.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import threading
import urllib.parse
import urllib.request
from functools import lru_cache
from importlib import resources

from .errors import CheckpointError

# How long the look-up of the hub's host name may take before the hub counts as unreachable.
DNS_TIMEOUT = 2.0


@lru_cache(maxsize=None)
def registry() -> dict[str, dict]:
    """`arch.tag` -> hub repo, file, num_classes, preprocessing and licence."""
    return json.loads(resources.files(__package__).joinpath("data/pretrained.json").read_text())


def matches(name: str, patterns: str | list[str] | tuple[str, ...]) -> bool:
    """timm's filter: a shell-style wildcard (fnmatch), or any of several."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def list_pretrained(filter: str | list[str] | None = None) -> list[str]:
    """Every `arch.tag` with published weights, as timm's `list_pretrained`: all of them, those
    matching a wildcard filter ("convnext_tiny.*", "*dinov3*"), or those of one architecture
    named without wildcard ("convnext_tiny")."""
    if not filter:
        return list(registry())
    if isinstance(filter, str) and not any(c in filter for c in "*?[."):
        return [n for n in registry() if n.split(".", 1)[0] == filter]
    return [n for n in registry() if matches(n, filter)]


def default_tag(arch: str) -> str:
    """The tag timm loads for `create_model(arch, pretrained=True)`."""
    tags = [n for n in list_pretrained(arch) if registry()[n].get("default")]
    if not tags:
        raise CheckpointError(f"no published weights for {arch!r}: timm has no pretrained=True choice for it")
    return tags[0].split(".", 1)[1]


def pretrained_entry(name: str) -> dict:
    """The registry entry of `arch.tag`; a bare architecture name means its first tag."""
    if "." not in name:
        tags = list_pretrained(name)
        if not tags:
            raise CheckpointError(f"no published weights for {name!r}")
        name = tags[0] if f"{name}.fb_in1k" not in registry() else f"{name}.fb_in1k"
    if name not in registry():
        arch = name.split(".", 1)[0]
        known = ", ".join(list_pretrained(arch)) or "none"
        raise CheckpointError(f"unknown pretrained weights {name!r}; published for {arch}: {known}")
    return dict(registry()[name], name=name)


def _resolves(host: str, timeout: float) -> bool:
    """Whether `host` resolves within `timeout` seconds (getaddrinfo has no timeout of its own,
    so it runs in a daemon thread that is left behind if it hangs)."""
    answer: list[bool] = []

    def look_up():
        try:
            socket.getaddrinfo(host, None)
            answer.append(True)
        except (OSError, UnicodeError):
            answer.append(False)

    thread = threading.Thread(target=look_up, name="npconvnext-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def offline_reason(endpoint: str | None = None) -> str | None:
    """Why the hub cannot be reached, or None when it may be: HF_HUB_OFFLINE is set, or the
    endpoint's host does not resolve. Behind a proxy the host need not resolve here, so nothing
    is guessed and huggingface-hub is left to try."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = endpoint or constants.ENDPOINT
    parts = urllib.parse.urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    if not parts.hostname:
        return None
    if (parts.scheme in proxies or "all" in proxies) and not urllib.request.proxy_bypass(parts.hostname):
        return None
    if not _resolves(parts.hostname, DNS_TIMEOUT):
        return f"the hub's host {parts.hostname} cannot be resolved"
    return None


def cache_folder(cache_dir: str | None = None) -> str:
    """The huggingface-hub cache folder downloads go to (HF_HUB_CACHE, or ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return os.path.abspath(cache_dir or constants.HF_HUB_CACHE)


def offline_advice(entry: dict, cache_dir: str | None = None) -> str:
    """Where the weights of a registry entry can come from on a machine without the hub."""
    return (f"Where there is internet, `hf download {entry['hf_hub_id']} {entry['file']}` (the CLI "
            f"huggingface-hub installs) fetches it and prints its path: copy that file here and pass it "
            f"with --weights FILE on the command line, or create_model('{entry['name'].split('.')[0]}', "
            f"weights='path/to/{entry['file']}') in Python; or copy that machine's whole hub cache "
            f"({cache_folder(cache_dir)}) to the same place here.")


def copy_advice(path: str, name: str, cache_dir: str | None = None) -> str:
    """How to use the file `download_weights` fetched on a machine without internet."""
    cache = cache_folder(cache_dir)
    arch = name.split(".")[0]
    copy = name + os.path.splitext(path)[1]
    return (f"{name} is in the huggingface-hub cache {cache}. To use it on a machine without internet, copy\n"
            f"  the file:  cp -L {path} {copy}, then there: npconvnext classify IMAGE --weights {copy} "
            f"(Python: create_model('{arch}', weights='{copy}'))\n"
            f"  or the whole cache:  rsync -a {cache}/ OTHER:{cache}/ (or point HF_HUB_CACHE there at "
            f"the copy); then `--model {name}` loads offline there as here")


def download_weights(name: str, cache_dir: str | None = None) -> str:
    """Local path of the weight file of `arch.tag`, downloading it into huggingface-hub's cache
    if it is not there yet. Offline (see `offline_reason`) only the cache is looked in."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    entry = pretrained_entry(name)
    endpoint = constants.ENDPOINT
    reason = offline_reason(endpoint)
    where = f"{entry['file']} of hub repo {entry['hf_hub_id']}"
    try:
        return hf_hub_download(entry["hf_hub_id"], entry["file"], cache_dir=cache_dir, endpoint=endpoint,
                               local_files_only=reason is not None)
    except LocalEntryNotFoundError as exc:
        why = f"offline: {reason}" if reason else f"the hub cannot be reached ({exc.__class__.__name__})"
        raise CheckpointError(f"cannot get {entry['name']}: {where} is not in the huggingface-hub cache and "
                              f"{why}. {offline_advice(entry, cache_dir)}") from None
    except (OSError, ValueError) as exc:  # HTTP errors, a full disk, an unwritable cache
        raise CheckpointError(f"cannot get {entry['name']}: downloading {where} failed "
                              f"({exc.__class__.__name__}: {exc})") from None
