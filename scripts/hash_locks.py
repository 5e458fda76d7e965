"""Write requirements.lock and requirements-test.lock with a sha256 for every package.

`make lock` freezes the two pin lists (the package with its `workflow` extra; what the
`test` extra adds), has pip-tools' `pip-compile --generate-hashes` hash every pin of
both (the hashes of every file the registry serves for that release, so that
`pip install --require-hashes` accepts whichever wheel fits the machine), and calls

    python3 scripts/hash_locks.py COMPILED RUNTIME_PINS TEST_PINS

which splits the compiled file back into the two locks, in the pins' order, each entry
`NAME==VERSION` followed by its `--hash=sha256:...` lines. It refuses a compiled file
whose pins differ from the two lists (a package added, dropped or at another version)
or an entry without a hash.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

HEADERS = {
    "requirements.lock": (
        "# Pinned lock of every Python package rankbias runs with: the package and its `workflow`\n"
        "# extra (make install, CI and the container image install this file), with the sha256\n"
        "# of every file the registry serves for each release (pip install --require-hashes).\n"
        "# Regenerate: make lock\n"),
    "requirements-test.lock": (
        "# Pinned lock of the `test` extra (test and lint tools), on top of requirements.lock:\n"
        "# make install and CI install it, the container image does not. Hashed like\n"
        "# requirements.lock (pip install --require-hashes). Regenerate: make lock\n"),
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def entries(text: str) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (NAME==VERSION, [sha256 hex, ...])} of a requirements file, its
    backslash-continued lines joined."""
    out: dict[str, tuple[str, list[str]]] = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-")):
            continue
        words = line.split(" #", 1)[0].split()
        pin = words[0].split(";", 1)[0]
        name, sep, version = pin.partition("==")
        if not sep:
            raise SystemExit(f"not an exact pin: {line!r}")
        hashes = [w.split(":", 1)[1] for w in words[1:] if w.startswith("--hash=sha256:")]
        out[canonical(name)] = (f"{name}=={version}", hashes)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        raise SystemExit("usage: hash_locks.py COMPILED RUNTIME_PINS TEST_PINS")
    compiled = entries(Path(argv[0]).read_text())
    lists = {"requirements.lock": entries(Path(argv[1]).read_text()),
             "requirements-test.lock": entries(Path(argv[2]).read_text())}
    pinned = {n: pin for pins in lists.values() for n, (pin, _) in pins.items()}
    got = {n: pin for n, (pin, _) in compiled.items()}
    if {n: p.split("==")[1] for n, p in got.items()} != {n: p.split("==")[1] for n, p in pinned.items()}:
        extra = sorted(set(got.items()) - set(pinned.items()))
        missing = sorted(set(pinned.items()) - set(got.items()))
        raise SystemExit(f"the compiled pins differ from the frozen ones: added {extra}, missing {missing}")
    for out, pins in lists.items():
        lines = [HEADERS[out]]
        for name, (pin, _) in pins.items():
            hashes = compiled[name][1]
            if not hashes:
                raise SystemExit(f"{pin}: no sha256 in the compiled file")
            lines.append(f"{pin} \\\n" + " \\\n".join(f"    --hash=sha256:{h}" for h in sorted(set(hashes))) + "\n")
        Path(out).write_text("".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
