"""Benchmarks: `python -m jaxkd.bench step|epoch|mfu ...`; each prints its headline figure last.

step   one distillation step at fixed shapes (random token ids, dropout on), median seconds;
       `--vs-torch` alternates it with ../shared/bench/torch_kd_step.py and prints the ratio.
epoch  one distillation epoch end to end, against a PyTorch + transformers loop: SST-2, or
       CoNLL-2003 NER with `--task conll2003` (a classifier on every token).
mfu    achieved FLOP/s of the distillation step and its fraction of the device's measured
       matmul rate (fp32, or bf16 accumulated in fp32), and of the peak where it is known.

`--alpha` weighs the hard-label CE here, as in the PyTorch reference
(loss = alpha * CE + (1 - alpha) * T^2 * KL); jaxkd's LossConfig.alpha weighs the KD term,
so the step gets LossConfig(alpha=1 - alpha). Results: docs/performance.md.
"""
