"""ONNX files and graph passes: io, export, sequence removal, simplify, precision cast."""
