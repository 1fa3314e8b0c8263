"""UNet runtimes: torch (eager, optionally torch.compile), ONNX Runtime and TensorRT, one protocol."""
