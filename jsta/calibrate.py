"""``jsta.calibrate`` is :mod:`jsta.calibration.search` (``calibrate`` and its statistics), under
the name the README and user code use; importing it gives that very module, so attributes set on
one are seen through the other. Run as ``python -m jsta.calibrate`` it only points to the
commands."""

import sys

from jsta.calibration import search

if __name__ == "__main__":
  # A usage error (status 2), not the command: the library has no command line of its own.
  print("python -m jsta.calibrate: error: jsta.calibrate is the calibration library; run "
        "`jsta-calibrate` (or `python -m jsta.calibration`) for q/k/v files or a synthetic "
        "model, or `python -m models.calibrate` in a checkout for the video DiT of models/",
        file=sys.stderr)
  sys.exit(2)

sys.modules[__name__] = search
