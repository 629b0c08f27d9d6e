"""A custom metric importable by path, as users give them in the spec (``module:function``)."""

import numpy as np


def max_abs_error(y_true, y_pred, y_score):
    return float(np.max(np.abs(np.asarray(y_true, float) - np.asarray(y_pred, float))))
