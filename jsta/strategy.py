"""``jsta.strategy`` is :mod:`jsta.calibration.strategy` (WindowStrategy), under the name the
README and user code use; importing it gives that very module, so attributes set on one are
seen through the other."""

import sys

from jsta.calibration import strategy

sys.modules[__name__] = strategy
