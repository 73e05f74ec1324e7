"""A stand-in for the `yolov5` PyPI package (7.0.14): what benchmarks/harness_yolov5.py imports, with the
module paths and call signatures of tests/reference/yolov5_api.py, written simply on our own library
so that the harness runs end to end where the package is not installed (CI). Its numbers are ours, not
YOLOv5's: it checks the harness, never a measurement.

tests/test_benchmarks.py copies this folder, adds our hyp/scratch-low.yaml and model YAMLs where the
package ships its own (data/hyps/, models/) and puts the copy and the repository on PYTHONPATH.
"""

__version__ = "7.0.14 stand-in"
