"""`python -m cambium.moe …` (what `torchrun --nproc-per-node N -m cambium.moe train …` runs): the `cambium moe`
commands, a CambiumError printed as one line with a non-zero exit as `cambium` does."""

import sys

from cambium.core.errors import CambiumError
from cambium.moe.cli import app

if __name__ == "__main__":
    try:
        app(prog_name="python -m cambium.moe")
    except CambiumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
