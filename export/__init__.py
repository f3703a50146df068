"""Exporters of repvgg_keras models: SavedModel (TF Serving), TFLite, ONNX, each verified."""
