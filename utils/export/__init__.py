"""export.py's library: a trained detector as an ONNX or TorchScript file that carries its own
description (class names, stride, input size), for val.py, detect.py and other runtimes."""
