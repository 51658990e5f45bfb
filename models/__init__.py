"""Models: appraisal and authentication networks, ONNX runtime, River detectors, evaluation.

Builds on infra only. Empty until the model issues land: nothing here is claimed done.
"""
