from qops.calibration.drift import DriftReport, check_drift
from qops.calibration.select import CalibrationResult, select_calibration, select_rows, stream_sample
from qops.calibration.sources import S3Options, TableSource

__all__ = ["CalibrationResult", "DriftReport", "S3Options", "TableSource", "check_drift", "select_calibration",
           "select_rows", "stream_sample"]
