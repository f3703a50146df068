"""Verified exporters of repvgg_keras models: SavedModel (TF Serving), TFLite, ONNX, OpenVINO."""
