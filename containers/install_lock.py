"""Print the entries of requirements.lock that the image installs: all but the torch stack,
each pin on one line with its hashes (so pip checks every file it installs).

The base image ships torch and torchvision built against its own CUDA libraries.
Installing the lock's torch over them would leave two torch/CUDA stacks in the image
(the lock's torch brings its CUDA libraries as nvidia-* wheels). So the base must
provide torch and torchvision at the lock's releases (checked here, ignoring the local
build label such as +cu132), and the torch stack's distributions are left out of what
pip installs.

    python3 containers/install_lock.py requirements.lock > /tmp/requirements.image.txt
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

# What the base image must provide, at the lock's release.
FROM_BASE = ("torch", "torchvision")
# The torch/CUDA stack: the base's copies are used, the lock's never installed.
TORCH_STACK = re.compile(r"^(torch|torchvision|triton|nvidia-.+|cuda-.+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    """{canonical name: (the lock's entry on one line, pinned version)}; every entry must be
    NAME==VERSION, followed by its ``--hash=sha256:...`` options (backslash-continued
    lines are one entry, as pip reads them)."""
    pins = {}
    number, entry = 0, ""
    lines = path.read_text().splitlines()
    for i, raw in enumerate(lines, 1):
        text = raw if raw.lstrip().startswith("--hash") else raw.split("#", 1)[0]
        if not entry:
            number = i
        entry += " " + text.strip()
        if entry.endswith("\\") and i < len(lines):
            entry = entry[:-1]
            continue
        line, entry = " ".join(entry.split()), ""
        if not line:
            continue
        pin, *options = line.split()
        name, sep, version = pin.partition("==")
        if (not sep or not name.strip() or not version.strip()
                or not all(o.startswith("--hash=sha256:") for o in options)):
            raise SystemExit(f"{path}:{number}: {line!r} is not an exact pin NAME==VERSION (with its hashes)")
        pins[canonical(name)] = (line, version.strip())
    return pins


def check_base(pins: dict[str, tuple[str, str]]) -> None:
    for name in FROM_BASE:
        if name not in pins:
            raise SystemExit(f"requirements.lock pins no {name}; the image's torch stack is checked against it")
        wanted = pins[name][1]
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"the base image has no {name}; it must provide {name}=={wanted} "
                             "(the build argument BASE_IMAGE)") from None
        if have.split("+", 1)[0] != wanted:
            raise SystemExit(f"the base image has {name} {have}, requirements.lock pins {wanted}: "
                             "choose a base image with that release (BASE_IMAGE), or change the lock")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: install_lock.py REQUIREMENTS_LOCK")
    pins = read_lock(Path(argv[0]))
    check_base(pins)
    for name, (line, _) in pins.items():
        if not TORCH_STACK.match(name):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
