"""Model runtimes behind one small interface: base (Backend, BackendOptions), onnx (ONNX Runtime), torch."""
