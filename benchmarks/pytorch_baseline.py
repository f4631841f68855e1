#!/usr/bin/env python3
"""The PyTorch peer for the CUDA backend, run on the GPU machine in the same device run (device-check.sh).

Two jobs:

  errors  PyTorch's own bf16 error, which sets the GPU tests' tolerance (twice this error):
          - on the golden fixtures: HF T5 (+ PEFT IA3 adapter_a) in pure bf16 vs the float64 reference,
            for the forward outputs and (adapter_a) the T-Few losses and d total / d (IA)3 vectors;
          - on the random T0-3B-width checkpoint and batch of the GPU parity test: HF bf16 vs HF fp32.
          Metrics are the tests' own (test/helpers/reference.ts): relError = ||a-b||/||b|| per example or
          choice (max over them) for encoder states and logits; maxRelError = max |a-b|/max(|b|,1e-6) for the
          summed log-probs and the length-normalised scores.

  bench   RANK-3B-B32 and RANK-3B-B1 (../shared/reference/baselines.md) with HF transformers T5 + PEFT IA3
          (k, v, wo; ff = wo) on the T0-3B architecture with random weights, pure bf16, eager and under
          torch.compile (default mode for B32, "reduce-overhead" = CUDA graphs for B1). T-Few's scoring: the
          encoder once per example, its output repeated per choice, per-token log-probs. CUDA events,
          medians of 10 runs after 3 warm-ups.

  python3 benchmarks/pytorch_baseline.py errors --fixtures test/fixtures [--random DIR] --out FILE.json
  python3 benchmarks/pytorch_baseline.py bench [--no-compile] [--workloads RANK-3B-B32,...] --out FILE.json

          TRAIN-3B / TRAIN-3B-C4 (eager only): forward, T-Few losses and backward to the (IA)3 vectors with
          dropout on; no optimizer step (our number does not include it either).
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch


def log(msg):
    print(f"[pytorch_baseline] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# T-Few scoring with Hugging Face T5


def rank_forward(model, input_ids, attention_mask, targets):
    """Per-token log-probs of every choice. targets: [B, C, Lc] right-padded with 0.

    The encoder runs once per example; its output is repeated per choice (as T-Few does)."""
    from transformers.modeling_outputs import BaseModelOutput

    B, C, Lc = targets.shape
    enc = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    enc_r = enc.repeat_interleave(C, 0)
    mask_r = attention_mask.repeat_interleave(C, 0)
    flat = targets.reshape(B * C, Lc)
    dec_in = torch.cat([torch.zeros_like(flat[:, :1]), flat[:, :-1]], 1)
    logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=enc_r), attention_mask=mask_r,
                   decoder_input_ids=dec_in).logits
    logp = torch.log_softmax(logits.float(), -1).gather(-1, flat.unsqueeze(-1)).squeeze(-1)
    logp = logp * (flat != 0)
    return enc, logits.view(B, C, Lc, -1), logp.view(B, C, Lc)


def pad_batch(inputs, choices, device):
    """Right-padded tensors from lists (the shape lib/batch.ts builds)."""
    B = len(inputs)
    Le = max(len(x) for x in inputs)
    C = max(len(c) for c in choices)
    Lc = max(len(t) for c in choices for t in c)
    ids = torch.zeros(B, Le, dtype=torch.long)
    mask = torch.zeros(B, Le, dtype=torch.long)
    tgt = torch.zeros(B, C, Lc, dtype=torch.long)
    for b, x in enumerate(inputs):
        ids[b, :len(x)] = torch.tensor(x)
        mask[b, :len(x)] = 1
        for c, t in enumerate(choices[b]):
            tgt[b, c, :len(t)] = torch.tensor(t)
    return ids.to(device), mask.to(device), tgt.to(device)


def rel_error(a, b):
    a = a.double().flatten()
    b = b.double().flatten()
    return float(torch.linalg.norm(a - b) / torch.clamp(torch.linalg.norm(b), min=1e-300))


def max_rel_error(a, b, floor=1e-6):
    a = a.double().flatten()
    b = b.double().flatten()
    return float(((a - b).abs() / torch.clamp(b.abs(), min=floor)).max())


# ----------------------------------------------------------------------------------------------------------
# errors


def tfew_losses(logp, tgt, labels):
    """The T-Few losses of the fixture README from per-token log-probs [B, C, Lc] (0 at pad)."""
    mask = (tgt != 0)
    B, C, _ = tgt.shape
    gold = torch.zeros(B, C, dtype=torch.bool, device=tgt.device)
    gold[torch.arange(B), labels] = True
    gold_tok = mask & gold.unsqueeze(-1)
    wrong_tok = mask & ~gold.unsqueeze(-1)
    lm = -(logp * gold_tok).sum() / gold_tok.sum()
    ul = -(torch.log(1 - torch.exp(logp) + 0.01) * wrong_tok).sum() / wrong_tok.sum()
    scores = logp.sum(-1) / mask.sum(-1)
    ln = torch.nn.functional.cross_entropy(scores, labels)
    return lm, ul, ln, lm + ul + ln


def fixture_training_errors(d, ref, ids, mask, tgt, device):
    """bf16 error of the losses and of d total / d (IA)3 vectors (HF + PEFT, pure bf16) vs the fixture."""
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(model, os.path.join(d, "adapter_a"), is_trainable=True)
    model = copy.deepcopy(model).to(torch.bfloat16)
    model.eval()  # the fixtures have dropout 0
    labels = ref["labels"].long().to(device)
    _, _, logp = rank_forward(model, ids, mask, tgt)
    lm, ul, ln, total = tfew_losses(logp, tgt, labels)
    total.backward()
    losses = max(max_rel_error(torch.tensor([float(x)]), ref[f"ia3.{n}"])
                 for x, n in ((lm, "lm_loss"), (ul, "ul_loss"), (ln, "ln_loss"), (total, "total_loss")))
    grad = 0.0
    for name, p in model.named_parameters():
        if "ia3_l" not in name or p.grad is None:
            continue
        key = name.replace("base_model.model.", "").replace(".default", "")
        grad = max(grad, rel_error(p.grad.float().cpu(), ref[f"ia3.grad.{key}"]))
    return losses, grad


def fixture_errors(fixtures_dir, device):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import T5ForConditionalGeneration

    out = {}
    for name in ["tiny-gated-gelu-untied", "tiny-relu-tied"]:
        d = os.path.join(fixtures_dir, name)
        ref = load_file(os.path.join(d, "reference.safetensors"))
        ids = ref["input_ids"].long().to(device)
        mask = ref["attention_mask"].long().to(device)
        tgt = ref["choices"].long().to(device)
        B, C, Lc = tgt.shape
        lengths = mask.sum(1).tolist()
        out[name] = {}
        for variant in ["base", "ia3"]:
            model = T5ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).to(device).eval()
            if variant == "ia3":
                model = PeftModel.from_pretrained(model, os.path.join(d, "adapter_a")).eval()
            model = copy.deepcopy(model).to(torch.bfloat16).eval()  # pure bf16, as the benchmark runs
            with torch.no_grad():
                enc, logits, logp = rank_forward(model, ids, mask, tgt)
            enc, logits = enc.float().cpu(), logits.float().cpu()
            logp = logp.double().cpu()
            n_tok = (tgt != 0).sum(-1).cpu()
            sums = logp.sum(-1)
            scores = sums / n_tok
            r_enc = ref[f"{variant}.encoder_hidden"]
            r_logits = ref[f"{variant}.logits"]
            e = {
                "encoder_hidden": max(rel_error(enc[b, :lengths[b]], r_enc[b, :lengths[b]]) for b in range(B)),
                "logits": max(rel_error(logits[b, c, :int(n_tok[b, c])], r_logits[b, c, :int(n_tok[b, c])])
                              for b in range(B) for c in range(C)),
                "sum_logp": max_rel_error(sums, ref[f"{variant}.sum_logp"]),
                "scores": max_rel_error(scores, ref[f"{variant}.scores"]),
            }
            del model
            if variant == "ia3":
                e["losses"], e["grad"] = fixture_training_errors(d, ref, ids, mask, tgt, device)
            out[name][variant] = e
            log(f"{name} {variant} bf16 errors: {json.dumps(e)}")
    return out


def random_errors(random_dir, device):
    from transformers import T5ForConditionalGeneration
    from safetensors import safe_open

    with open(os.path.join(random_dir, "batch.json")) as f:
        batch = json.load(f)
    fp32 = T5ForConditionalGeneration.from_pretrained(random_dir, dtype=torch.float32).to(device).eval()
    with safe_open(os.path.join(random_dir, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # Our checkpoint has no separate encoder/decoder embeddings: they are shared.weight.
    with torch.no_grad():
        for stack in (fp32.encoder, fp32.decoder):
            name = "encoder.embed_tokens.weight" if stack is fp32.encoder else "decoder.embed_tokens.weight"
            if name not in keys and stack.embed_tokens.weight.data_ptr() != fp32.shared.weight.data_ptr():
                stack.embed_tokens.weight.copy_(fp32.shared.weight)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16).eval()
    enc_err, sums = [], {"fp32": [], "bf16": []}
    scores = {"fp32": [], "bf16": []}
    encs = {}
    for b, x in enumerate(batch["inputIds"]):
        ids, mask, tgt = pad_batch([x], [batch["choices"][b]], device)
        for tag, model in (("fp32", fp32), ("bf16", bf16)):
            with torch.no_grad():
                enc, _, logp = rank_forward(model, ids, mask, tgt)
            encs[tag] = enc.float()[0]
            n_tok = (tgt != 0).sum(-1)[0]
            s = logp.double()[0].sum(-1)
            sums[tag].append(s.cpu())
            scores[tag].append((s / n_tok).cpu())
        enc_err.append(rel_error(encs["bf16"], encs["fp32"]))
    e = {
        "encoder_hidden": max(enc_err),
        "sum_logp": max_rel_error(torch.cat(sums["bf16"]), torch.cat(sums["fp32"])),
        "scores": max_rel_error(torch.cat(scores["bf16"]), torch.cat(scores["fp32"])),
    }
    log(f"random T0-width bf16 vs fp32 errors: {json.dumps(e)}")
    return e


def cmd_errors(args):
    device = "cuda"
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    import transformers
    import peft

    result["transformers"] = transformers.__version__
    result["peft"] = peft.__version__
    result["fixtures"] = fixture_errors(args.fixtures, device)
    if args.random:
        result["random"] = random_errors(args.random, device)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {args.out}")


# ----------------------------------------------------------------------------------------------------------
# bench

T0_3B = dict(vocab_size=32128, d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, num_decoder_layers=24,
             relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
             layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
             is_encoder_decoder=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

WORKLOADS = {"RANK-3B-B32": (32, 256, 2, 8), "RANK-3B-B1": (1, 256, 2, 8),
             "TRAIN-3B": (8, 256, 2, 8), "TRAIN-3B-C4": (8, 256, 4, 8)}


def timed(fn, warmups=3, runs=10):
    for _ in range(warmups):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def gemm_ceiling():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms, _ = timed(lambda: a @ b, warmups=3, runs=10)
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def cmd_bench(args):
    from peft import IA3Config, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "workloads": {}}
    result["gemm_tflops"] = gemm_ceiling()
    log(f"bf16 GEMM ceiling {result['gemm_tflops']:.0f} TFLOP/s")

    t0 = time.time()
    with torch.device("cuda"):
        model = T5ForConditionalGeneration(T5Config(**T0_3B))
    model = model.to(torch.bfloat16).eval()
    model = get_peft_model(model, IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=["k", "v", "wo"],
                                            feedforward_modules=["wo"]))
    with torch.no_grad():  # adapter values near 1 (all-ones would cost the same; this is not a no-op)
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.2 * (torch.rand_like(p) - 0.5))
    model.eval()
    log(f"model ready in {time.time() - t0:.1f} s")

    names = [w for w in args.workloads.split(",") if w]
    runners = {}
    for name in names:
        B, Le, C, Lc = WORKLOADS[name]
        g = torch.Generator().manual_seed(11)
        ids = torch.randint(2, 32128, (B, Le), generator=g)
        ids[:, -1] = 1
        tgt = torch.randint(2, 32128, (B, C, Lc), generator=g)
        tgt[:, :, -1] = 1
        labels = torch.randint(0, C, (B,), generator=g).cuda()
        ids, tgt = ids.cuda(), tgt.cuda()
        mask = torch.ones_like(ids)
        training = name.startswith("TRAIN")

        def run(fwd=rank_forward, ids=ids, mask=mask, tgt=tgt, labels=labels, training=training):
            if training:  # forward + T-Few losses + backward to the (IA)3 vectors, dropout on (no optimizer)
                model.train()
                model.zero_grad(set_to_none=True)
                logp = fwd(model, ids, mask, tgt)[2]
                total = tfew_losses(logp, tgt, labels)[3]
                total.backward()
                model.eval()
                return total
            with torch.no_grad():
                return fwd(model, ids, mask, tgt)[2]

        runners[name] = (run, training, B)

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    # eager first for every workload (a time limit must not lose them), then torch.compile
    for name in names:
        run, training, _ = runners[name]
        w = result["workloads"].setdefault(name, {})
        torch.cuda.reset_peak_memory_stats()
        w["eager_ms"], w["eager_runs"] = timed(run, runs=5 if training else 10)
        w["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        log(f"{name} eager: {w['eager_ms']:.2f} ms, peak {w['peak_gib']:.1f} GiB")
        save()
    for name in names:
        run, training, B = runners[name]
        if args.no_compile or training:  # compiling the training step takes minutes (baselines.md)
            continue
        w = result["workloads"][name]
        mode = "reduce-overhead" if B == 1 else "default"
        compiled = torch.compile(rank_forward, mode=mode)
        t0 = time.time()
        run(compiled)
        torch.cuda.synchronize()
        w["compile_s"] = time.time() - t0
        w["compile_mode"] = mode
        w["compiled_ms"], w["compiled_runs"] = timed(lambda: run(compiled))
        log(f"{name} torch.compile({mode}): {w['compiled_ms']:.2f} ms after {w['compile_s']:.0f} s compiling")
        save()
    log(f"wrote {args.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("errors")
    e.add_argument("--fixtures", required=True)
    e.add_argument("--random")
    e.add_argument("--out", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--no-compile", action="store_true")
    b.add_argument("--workloads", default="RANK-3B-B32,RANK-3B-B1,TRAIN-3B,TRAIN-3B-C4")
    b.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        log("CUDA is not available to PyTorch here")
        sys.exit(1)
    {"errors": cmd_errors, "bench": cmd_bench}[args.cmd](args)


if __name__ == "__main__":
    main()
