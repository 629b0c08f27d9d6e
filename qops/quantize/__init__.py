from qops.quantize.ort import QuantizeResult, quantize

__all__ = ["QuantizeResult", "quantize"]
