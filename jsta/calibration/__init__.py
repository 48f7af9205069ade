"""Training-free per-(layer, head) window calibration, and the strategies it produces.

  strategy  WindowStrategy: the window of every (layer, head), stored as versioned JSON
            (also ``jsta.strategy``)
  search    calibrate(): recall and error of candidate windows against full attention on a
            few inputs, and the cheapest window per head within a budget (also
            ``jsta.calibrate``)
  cli       the ``jsta-calibrate`` command (also ``python -m jsta.calibration``): q, k, v from
            .npz files or a synthetic model; the table, heatmap and option parsing that the
            repository's ``models/calibrate.py`` shares

The command line is not imported here: it is the only module that may import matplotlib.
"""

from jsta.calibration import search, strategy

__all__ = ["search", "strategy"]
