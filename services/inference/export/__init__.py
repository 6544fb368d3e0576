"""Making servable graphs: the ONNX export (onnx), derived fp32/int8/fp16 graphs (conversion), their accuracy."""
