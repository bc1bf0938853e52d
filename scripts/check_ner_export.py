"""Entity F1 of an exported student on a CoNLL file, computed outside jaxkd (transformers + seqeval,
each word read at its first sub-token), beside the F1 in the run's report.json.

  python scripts/check_ner_export.py runs/exp/conll2003_kd_s0 ../shared/data/conll2003/test.txt
"""
import json, sys, torch
from transformers import AutoModelForTokenClassification, BertTokenizer
from seqeval.metrics import f1_score
run, data = sys.argv[1], sys.argv[2]
model = AutoModelForTokenClassification.from_pretrained(f"{run}/student").eval()
tok = BertTokenizer.from_pretrained(f"{run}/student")
sents, words, tags = [], [], []
for line in open(data, encoding="utf-8"):
    f = line.split()
    if not f or f[0] == "-DOCSTART-":
        if words: sents.append((words, tags))
        words, tags = [], []
        continue
    words.append(f[0]); tags.append(f[-1])
if words: sents.append((words, tags))
gold, pred = [], []
torch.set_num_threads(1)
with torch.no_grad():
    for i in range(0, len(sents), 64):
        chunk = sents[i:i + 64]
        enc = tok([w for w, _ in chunk], is_split_into_words=True, padding=True, truncation=True,
                  max_length=512, return_tensors="pt")
        ids = model(**enc).logits.argmax(-1)
        for k, (w, t) in enumerate(chunk):
            first = {}
            for pos, wid in enumerate(enc.word_ids(k)):
                if wid is not None and wid not in first:
                    first[wid] = model.config.id2label[int(ids[k, pos])]
            pred.append([first.get(j, "O") for j in range(len(w))])
            gold.append(t)
report = json.load(open(f"{run}/report.json"))
print(f"outside jaxkd f1={f1_score(gold, pred):.4f}  report.json f1={report['student']['metrics']['f1']:.4f}")
