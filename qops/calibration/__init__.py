from qops.calibration.drift import DriftReport, check_drift
from qops.calibration.select import CalibrationResult, select_calibration, select_rows

__all__ = ["CalibrationResult", "DriftReport", "check_drift", "select_calibration", "select_rows"]
