"""Whether the Hugging Face hub can be reached, decided in about a second (or at once with
HF_HUB_OFFLINE=1), so a command that needs weights from it fails fast offline, with a message that
names the repository and file it tried and the ways around it, instead of retrying for a minute.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

PROBE_SECONDS = 1.5


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float | None = None) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub (HF_ENDPOINT) takes no TCP connection within
    `timeout` seconds (PROBE_SECONDS). The probe runs in a thread: name lookup ignores timeouts."""
    if offline_requested():
        return False
    timeout = PROBE_SECONDS if timeout is None else timeout
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((url.hostname, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def unreachable_message(repo: str, filename: str, local_hint: str) -> str:
    """One line: what was tried, and how to get it anyway (`local_hint` names the command's own
    flag for a local copy and its offline starter model)."""
    why = "HF_HUB_OFFLINE is set" if offline_requested() else "the hub is unreachable"
    folder = "./" + repo.split("/")[-1]
    return (
        f"cannot fetch {filename} of {repo!r} from the Hugging Face hub ({why}) and it is not in "
        f"the local cache: on a machine with access run `hf download {repo} --local-dir {folder}` "
        f"(pip install huggingface_hub) and copy the folder here, then {local_hint}"
    )
