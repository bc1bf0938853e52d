"""Benchmarks: `python -m jaxkd.bench step|epoch|mfu|deploy ...`; each prints its headline figure last.

step   one distillation step at fixed shapes (random token ids, dropout on), median seconds;
       `--vs-torch` alternates it with ../shared/bench/torch_kd_step.py and prints the ratio.
epoch  one distillation epoch end to end, against a PyTorch + transformers loop: SST-2, or
       CoNLL-2003 NER with `--task conll2003` (a classifier on every token).
mfu    achieved FLOP/s of the distillation step and its fraction of the device's measured
       matmul rate (fp32, or bf16 accumulated in fp32), and of the peak where it is known.
deploy a model directory's deployment table on a labelled file: metric, agreement, size,
       batch-1 latency and throughput of JAX fp32/bf16, ONNX fp32/int8 (and PyTorch eager fp32
       with `--torch`), alternated (the table a run's report holds: jaxkd.deploy.table).

`--alpha` weighs the hard-label CE here, as in the PyTorch reference
(loss = alpha * CE + (1 - alpha) * T^2 * KL); jaxkd's LossConfig.alpha weighs the KD term,
so the step gets LossConfig(alpha=1 - alpha). Results: docs/performance.md.
"""
