"""Inference inputs and outputs for detect.py: sources of frames, annotated videos."""
