"""What runs a stage: the `Engine` interface (`engine`), each stage's I/O declared once
(`signatures`), the torch and ONNX Runtime engines and engine folders (`engines`), the TensorRT
engine (`tensorrt`), and which backend a machine runs (`choose`)."""
