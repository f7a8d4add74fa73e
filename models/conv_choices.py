"""The convolution race's choices kept on disk, so that a new process (a service replica, a second
run) skips timing every shape again (`models.implicit_conv` times each new shape's candidates at its
first call: seconds at start-up per batch size).

One JSON file holds the choices per environment: the GPU, torch, cuDNN, the CUTLASS configurations
built and the race's settings (`environment`). A choice is stored by the configuration's name, never
by its index, so a rebuild with other configurations drops the names it no longer has instead of
running the wrong kernel. The file is written atomically with a SHA-256 of its contents; a file that
does not verify, or that cannot be read, is ignored with a warning (the race runs as without it),
never an error. Processes sharing the file (a machine's replicas) each merge their new choices
into what they read before an atomic rename: the last rename wins, and a choice lost that way is
only timed again later. A cached choice only picks which correct kernel runs: every candidate computes the
same convolution (tests/gpu/test_cutlass_conv.py), so a stale file can cost speed, not results.

Where: `$UNCLIP_RT_CONV_CACHE` if set (empty or "off": no file), else
`$XDG_CACHE_HOME/unclip-rt/conv_choices.json` (`~/.cache/...` without it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from models.atomic_files import atomic_write
from models.file_integrity import sha256_json

ENV = "UNCLIP_RT_CONV_CACHE"
FORMAT = 1
log = logging.getLogger(__name__)


def cache_path() -> Path | None:
    """The cache file, or None where `$UNCLIP_RT_CONV_CACHE` turns it off."""
    given = os.environ.get(ENV)
    if given is not None:
        return None if given.strip().lower() in ("", "off", "0", "none") else Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unclip-rt" / "conv_choices.json"


def shape_key(key: tuple) -> str:
    """A race key (kind, x shape, weight shape, padding) as the file's text key."""
    kind, x, w, pad = key
    return json.dumps([kind, list(x), list(w), list(pad)])


def _parse_key(text: str) -> tuple:
    kind, x, w, pad = json.loads(text)
    return (str(kind), tuple(int(v) for v in x), tuple(int(v) for v in w), tuple(int(v) for v in pad))


def _read(path: Path) -> dict[str, dict[str, str]]:
    """The file's environments (environment → text key → choice name); {} where there is no file,
    and where it cannot be read or does not verify (with a warning)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        environments = data["environments"]
        if data.get("format") != FORMAT or data.get("sha256") != sha256_json(environments):
            raise ValueError("its checksum does not match its contents (damaged or edited)")
        if not all(isinstance(v, dict) and all(isinstance(n, str) for n in v.values())
                   for v in environments.values()):
            raise ValueError("unexpected contents")
        return environments
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring the convolution choices in %s (%s): the race runs again", path, exc)
        return {}


def load(path: Path | None, environment: str) -> dict[tuple, str]:
    """The choices stored for `environment`: race key → configuration name ("cudnn" included)."""
    if path is None:
        return {}
    chosen = {}
    for text, name in _read(path).get(environment, {}).items():
        try:
            chosen[_parse_key(text)] = name
        except (ValueError, TypeError):
            continue  # a key this version does not read: that shape races again
    return chosen


def save(path: Path | None, environment: str, choices: dict[tuple, str]) -> None:
    """Store `choices` (race key → name) for `environment` beside the file's other environments,
    atomically; a failure to write is logged, not raised (the cache only saves time)."""
    if path is None:
        return
    environments = _read(path)
    environments[environment] = {**environments.get(environment, {}),
                                 **{shape_key(k): name for k, name in choices.items()}}
    data = {"format": FORMAT, "sha256": sha256_json(environments), "environments": environments}
    try:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))
    except OSError as exc:
        log.warning("could not write the convolution choices to %s: %s", path, exc)
