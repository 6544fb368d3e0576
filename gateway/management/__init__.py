"""The management API on the gateway: every call forwarded to the inference stage, its codes and details kept."""
