"""deploy: what leaves the toolkit: ONNX/pth/safetensors export, ONNX quantization, latency, op counts, reports.
May import: io, dynamics, budget, dynfile (never train)."""
