"""Quantisation: calibration data, ModelOpt ONNX PTQ, pre-export quant modes, TensorRT 10 calibrator."""
