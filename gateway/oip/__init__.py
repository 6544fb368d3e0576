"""The Open Inference Protocol (KServe v2, Triton's `inference.GRPCInferenceService`) on the gateway's port."""
