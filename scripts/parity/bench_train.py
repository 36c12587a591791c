#!/usr/bin/env python3
"""PyTorch + transformers side of fedtune's training-throughput benchmark.

Run by client/benches/train_throughput.rs with the same settings as the tch side: a randomly
initialized BertForSequenceClassification of the given shape, random token ids (no padding),
AdamW without decay on biases and LayerNorm weights, linear warm-up/decay, gradient clipping
at 1.0, dropout on. Prints one JSON line: samples_per_second (wall clock), samples_per_cpu_second (all threads'
CPU time, robust to other load on a shared machine) and peak_rss_mib (this process).
"""

import argparse
import json
import resource
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    config = BertConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        intermediate_size=a.intermediate,
        num_labels=2,
    )
    model = BertForSequenceClassification(config).to(device)
    model.train()
    no_decay = lambda n: n.endswith(".bias") or "LayerNorm." in n
    groups = [
        {"params": [p for n, p in model.named_parameters() if not no_decay(n)], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=5e-5, betas=(0.9, 0.999), eps=1e-8)
    total = a.warmup_steps + a.steps
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * total + 0.999), total)

    gen = torch.Generator().manual_seed(a.seed)
    n_batches = 4
    ids = torch.randint(1, a.vocab, (n_batches, a.batch, a.seq), generator=gen).to(device)
    labels = torch.randint(0, 2, (n_batches, a.batch), generator=gen).to(device)
    mask = torch.ones(a.batch, a.seq, dtype=torch.long, device=device)
    types = torch.zeros(a.batch, a.seq, dtype=torch.long, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step(i):
        with autocast:
            out = model(input_ids=ids[i % n_batches], attention_mask=mask, token_type_ids=types, labels=labels[i % n_batches])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return out.loss.detach()

    for i in range(a.warmup_steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = None
    for i in range(a.steps):
        loss = step(a.warmup_steps + i)
    final = float(loss)  # syncs the device
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(
        json.dumps(
            {
                "samples_per_second": a.steps * a.batch / elapsed,
                "samples_per_cpu_second": a.steps * a.batch / cpu,
                "seconds": elapsed,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                "final_loss": final,
                "torch": torch.__version__,
                "attn_implementation": model.config._attn_implementation,
            }
        )
    )


if __name__ == "__main__":
    main()
