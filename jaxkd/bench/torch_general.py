"""PyTorch + transformers reference for one general-distillation step: what the Hugging Face
Distiller (DistilBERT's general distillation) computes per step, written as its user would.

The teacher (BertForMaskedLM, a fresh head where the checkpoint has none) runs under no_grad;
the student (the teacher's layers spread over --student-layers, as jaxkd's bench picks them)
runs forward and backward; on the masked positions: 5 * KD on the masked-LM distributions at T
(times T^2) + 2 * the student's masked-LM cross-entropy; on every real token: 1 * (1 - cosine)
of the last hidden states; AdamW. Prints the median step seconds last; with --losses the first
step's terms as a JSON line first.

usage: python -m jaxkd.bench.torch_general --teacher DIR [--student-layers 3] [--batch 32]
       [--seq 128] [--steps 10] [--warmup 2] [--threads N] [--temperature 2]
       [--batch-file F.npz] [--losses]
"""
import argparse
import copy
import json
import statistics
import time

import numpy as np

# DistilBERT's weights of its three terms (alpha_ce, alpha_mlm, alpha_cos).
KD_WEIGHT, MLM_WEIGHT, COSINE_WEIGHT = 5.0, 2.0, 1.0


def spread(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layers a student keeps, evenly from the bottom as DistilBERT picks them (and
    jaxkd.bench.common.spread_layers): 3 of 6 -> 0 2 4."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def random_masked(vocab: int, batch: int, seq: int, mask_id: int, cls_id: int, sep_id: int):
    """Rows [CLS] random ids [SEP], 15% of the inner positions targets replaced by [MASK]."""
    g = np.random.default_rng(0)
    ids = g.integers(1000, vocab, (batch, seq))
    ids[:, 0], ids[:, -1] = cls_id, sep_id
    count = max(1, round(0.15 * (seq - 2)))
    positions = np.sort(np.stack([g.choice(np.arange(1, seq - 1), count, replace=False)
                                  for _ in range(batch)]), axis=1)
    labels = np.take_along_axis(ids, positions, 1)
    np.put_along_axis(ids, positions, mask_id, 1)
    return ids, positions, labels


def main():
    import torch
    import torch.nn.functional as F
    from transformers import BertForMaskedLM, BertTokenizerFast

    p = argparse.ArgumentParser()
    p.add_argument("--teacher", required=True)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--batch-file", default=None, help="npz of input_ids, positions, labels")
    p.add_argument("--losses", action="store_true", help="print the first step's terms")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    teacher = BertForMaskedLM.from_pretrained(a.teacher).eval()
    student = copy.deepcopy(teacher)
    layers = spread(teacher.config.num_hidden_layers, a.student_layers)
    student.bert.encoder.layer = torch.nn.ModuleList([student.bert.encoder.layer[i] for i in layers])
    student.config.num_hidden_layers = len(layers)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.01)
    if a.batch_file:
        data = np.load(a.batch_file)
        ids, positions, labels = data["input_ids"], data["positions"], data["labels"]
    else:
        tok = BertTokenizerFast.from_pretrained(a.teacher)
        ids, positions, labels = random_masked(teacher.config.vocab_size, a.batch, a.seq,
                                               tok.mask_token_id, tok.cls_token_id, tok.sep_token_id)
    ids = torch.tensor(ids, dtype=torch.long)
    mask = torch.ones_like(ids)
    targets = torch.full_like(ids, -100)
    real = torch.tensor(labels) >= 0
    rows = torch.arange(len(ids))[:, None].expand_as(real)
    targets[rows[real], torch.tensor(positions)[real]] = torch.tensor(labels, dtype=torch.long)[real]
    T = a.temperature

    def step():
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        chosen = targets >= 0
        s_sel, t_sel = s.logits[chosen], t.logits[chosen]
        kd = F.kl_div(F.log_softmax(s_sel / T, -1), F.softmax(t_sel / T, -1),
                      reduction="batchmean") * T * T
        mlm = F.cross_entropy(s_sel, targets[chosen])
        cos = (1 - F.cosine_similarity(s.hidden_states[-1], t.hidden_states[-1], dim=-1))[mask > 0].mean()
        loss = KD_WEIGHT * kd + MLM_WEIGHT * mlm + COSINE_WEIGHT * cos
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss/kd": kd.item(), "loss/mlm": mlm.item(), "loss/cosine": cos.item(),
                "loss/total": loss.item()}

    first = step()
    if a.losses:
        print(json.dumps(first))
    for _ in range(max(a.warmup - 1, 0)):
        step()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"torch {torch.__version__} threads={torch.get_num_threads()} batch={len(ids)} "
          f"seq={ids.shape[1]} student_layers={len(layers)} general min={min(times):.4f}s")
    print(f"{statistics.median(times):.4f}")


if __name__ == "__main__":
    main()
