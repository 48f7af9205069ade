"""``python -m jsta.calibration``: the ``jsta-calibrate`` command."""

import sys

from jsta.calibration.cli import main

if __name__ == "__main__":        # importing every module of jsta (pkgutil) must not run it
  sys.exit(main())
