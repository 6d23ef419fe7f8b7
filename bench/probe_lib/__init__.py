"""bench/gpu_probe.py's parts: the record and its budget (record), the timer (timing), the measurements of
attention (attention), GEMMs (gemm) and the fused LoRA linear (lora), and the Markdown report (report)."""
