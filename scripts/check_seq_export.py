"""Accuracy of an exported sentence classifier on a GLUE-style TSV (sentence, label), computed
outside jaxkd (transformers + the directory's tokenizer, windows of the max_seq_len the export
records), beside the accuracy in the run's report.json.

  python scripts/check_seq_export.py runs/quickstart data/sst2/glue_dev.tsv
"""
import csv, json, sys, torch
from transformers import AutoModelForSequenceClassification, BertTokenizer
run, data = sys.argv[1], sys.argv[2]
model = AutoModelForSequenceClassification.from_pretrained(f"{run}/student").eval()
tok = BertTokenizer.from_pretrained(f"{run}/student")
max_len = json.load(open(f"{run}/student/config.json"))["jaxkd"]["max_seq_len"]
with open(data, encoding="utf-8-sig", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
label2id = {v: int(k) for k, v in model.config.id2label.items()}
gold = [int(r["label"]) if r["label"].isdigit() else label2id[r["label"]] for r in rows]
pred = []
with torch.no_grad():
    for i in range(0, len(rows), 64):
        enc = tok([r["sentence"] for r in rows[i:i + 64]], padding=True, truncation=True,
                  max_length=max_len, return_tensors="pt")
        pred += model(**enc).logits.argmax(-1).tolist()
accuracy = sum(p == g for p, g in zip(pred, gold)) / len(gold)
report = json.load(open(f"{run}/report.json"))
print(f"outside jaxkd accuracy={accuracy:.4f}  report.json accuracy={report['student']['metrics']['accuracy']:.4f}")
