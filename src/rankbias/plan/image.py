"""The container image every workflow job runs in: a registry image pinned by digest or a
local Apptainer file."""
from __future__ import annotations

import os
import re
from typing import MutableMapping

ENV_CONTAINER = "RANKBIAS_CONTAINER"
DEFAULT_CONTAINER = "rankbias.sif"     # what `make apptainer` builds
_DIGEST = re.compile(r"@sha256:([0-9a-f]{64})$")


def container_image(environ: MutableMapping[str, str] | None = None) -> str:
    """The image every Snakemake job runs in under `--sdm apptainer`.

    env RANKBIAS_CONTAINER: a registry image pinned by digest
    (docker://<registry>/rankbias@sha256:<64 hex>) or a local Apptainer image file;
    default `rankbias.sif`, built by `make apptainer`. A registry image given by tag
    is refused: a tag can point at different images over time. For a pinned image the
    digest is passed into the container as RANKBIAS_IMAGE_DIGEST (through Apptainer's
    APPTAINERENV_ prefix, so jobs run outside the container never claim it), where
    rankbias.store.provenance records it; a local .sif carries it as a label instead.
    """
    env = os.environ if environ is None else environ
    image = (env.get(ENV_CONTAINER) or DEFAULT_CONTAINER).strip()
    if "://" in image:
        m = _DIGEST.search(image)
        if not m:
            raise ValueError(f"{ENV_CONTAINER}: {image!r} is not pinned by digest; expected "
                             "docker://<registry>/<name>@sha256:<64 hex digits> or a local "
                             ".sif file")
        env["APPTAINERENV_RANKBIAS_IMAGE_DIGEST"] = f"sha256:{m.group(1)}"
    return image
