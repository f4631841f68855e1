#!/usr/bin/env python3
"""PyTorch's pure-bf16 error on the golden fixtures, predicted without a GPU or torch.

The GPU tests' bf16 tolerance is twice PyTorch's own bf16 error (HF transformers T5 + PEFT IA3 after
model.to(torch.bfloat16)), which only the device run measures (pytorch_baseline.py errors). This is a numpy model of
that forward pass: every tensor bf16, each op's result rounded where PyTorch rounds it (GEMMs accumulate in fp32 and
round once; elementwise ops compute in fp32 and round their result; T5LayerNorm's variance and scaling in fp32;
softmax in fp32, rounded after), with pytorch_baseline.py's metrics. In float64 it reproduces the fixtures' float64
references (to ~1e-7: the fixtures' weights are stored as F32), which checks the model itself. Assumptions and
what they move are in benchmarks/RESULTS.md ("bf16 accuracy predicted without a GPU").

    python3 benchmarks/pytorch_bf16_sim.py [--orders N] [--out FILE]

--orders N: also N runs with the fp32 sums inside each GEMM taken in random orders (cuBLAS's order is not
numpy's), reporting each quantity's smallest error (the tightest tolerance PyTorch could set).
"""
import json, math, os, struct, sys
import numpy as np

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'test', 'fixtures')


def load_st(path):
    """A safetensors file's tensors as numpy arrays (F32, F64, I64; BF16 widened to float32 exactly)."""
    b = open(path, 'rb').read()
    n = struct.unpack('<Q', b[:8])[0]
    h = json.loads(b[8:8 + n])
    out = {}
    dt = {'F32': '<f4', 'F64': '<f8', 'I64': '<i8', 'BF16': '<u2'}
    for k, v in h.items():
        if k == '__metadata__':
            continue
        s, e = v['data_offsets']
        a = np.frombuffer(b[8 + n + s:8 + n + e], dtype=dt[v['dtype']]).reshape(v['shape'])
        out[k] = (a.astype(np.uint32) << 16).view(np.float32) if v['dtype'] == 'BF16' else a
    return out


def bf16(x):
    """fp32 -> bf16 round-to-nearest-even (input first cast to fp32), NaN-safe; returned as float64."""
    f = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    u = f.view(np.uint32).astype(np.uint64)
    nan = np.isnan(f)
    r = ((u >> 16) & 1) + 0x7FFF
    u = ((u + r) & 0xFFFF0000).astype(np.uint32)
    u = np.where(nan, np.uint32(0x7FC00000), u)
    return u.view(np.float32).astype(np.float64)


class Num:
    """Rounding policy: mode 'f64' (no rounding) or 'bf16' (PyTorch pure-bf16)."""

    def __init__(self, mode, gemm_acc='f32', seed=0):
        self.mode = mode
        self.gemm_acc = gemm_acc
        self.rng = np.random.default_rng(seed)

    def R(self, x):  # result of an op on bf16 tensors
        return x if self.mode == 'f64' else bf16(x)

    def F(self, x):  # an fp32 intermediate
        return x if self.mode == 'f64' else np.asarray(x, dtype=np.float32).astype(np.float64)

    def mm(self, a, b):  # bf16 GEMM, fp32 accumulate, bf16 result
        if self.mode == 'f64':
            return a @ b
        if self.gemm_acc == 'f32':
            return bf16(np.asarray(a, np.float32) @ np.asarray(b, np.float32))
        if self.gemm_acc == 'perm':  # sequential fp32 accumulation in a random K order (exact bf16 products)
            a32 = np.asarray(a, np.float32); b32 = np.asarray(b, np.float32)
            K = a32.shape[-1]
            perm = self.rng.permutation(K)
            p = a32[..., :, perm, None] * b32[..., perm, :][..., None, :, :]
            return bf16(np.cumsum(p, axis=-2, dtype=np.float32)[..., -1, :])
        return bf16(a @ b)

    def c(self, v):  # python float scalar as used by a bf16 kernel (opmath float)
        return v if self.mode == 'f64' else float(np.float32(v))


def bucket(rel, bidirectional, num_buckets=32, max_distance=128):
    rb = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        rb += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    with np.errstate(divide='ignore'):
        large = max_exact + (np.log(rel.astype(np.float32) / max_exact) / math.log(max_distance / max_exact)
                             * (num_buckets - max_exact)).astype(np.float32)
    large = np.where(is_small, 0, large).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return rb + np.where(is_small, rel, large)


class T5Sim:
    def __init__(self, d, mode, adapter=None, gemm_acc='f32', enc_emb_name=None, seed=0, attn='eager'):
        self.cfg = json.load(open(os.path.join(d, 'config.json')))
        self.n = Num(mode, gemm_acc, seed)
        self.attn = attn
        raw = load_st(os.path.join(d, 'model.safetensors'))
        # weights: fp32 on disk -> fp32 model -> .to(bf16)
        self.w = {k: self.n.R(v.astype(np.float64)) for k, v in raw.items()}
        self.ia3 = {}
        if adapter:
            a = load_st(os.path.join(d, adapter, 'adapter_model.safetensors'))
            for k, v in a.items():
                key = k.replace('base_model.model.', '').replace('.ia3_l', '')
                # F64 file -> fp32 parameter (model was fp32 at load) -> .to(bf16)
                val = v.astype(np.float32).astype(np.float64) if mode != 'f64' else v.astype(np.float64)
                self.ia3[key] = self.n.R(val).reshape(-1)
        self.H = self.cfg['num_heads']
        self.dk = self.cfg['d_kv']
        self.eps = self.cfg['layer_norm_epsilon']
        self.gated = self.cfg['feed_forward_proj'].startswith('gated')
        self.tied = self.cfg.get('tie_word_embeddings', True)
        self.scale = self.cfg.get('scale_decoder_outputs', self.tied)
        self.enc_emb = self.w.get(enc_emb_name or 'encoder.embed_tokens.weight', self.w['shared.weight'])
        self.dec_emb = self.w.get((enc_emb_name or 'decoder.embed_tokens.weight').replace('encoder', 'decoder'),
                                  self.w['shared.weight'])
        if enc_emb_name == 'shared.weight':
            self.enc_emb = self.dec_emb = self.w['shared.weight']
        self.head = self.w['shared.weight'] if self.tied else self.w['lm_head.weight']

    # ---- building blocks
    def linear(self, x, name):
        W = self.w[name + '.weight']
        mod = name
        if mod in self.ia3 and mod.endswith('.wo'):  # feedforward IA3: scale the input
            x = self.n.R(x * self.ia3[mod])
        y = self.n.mm(x, W.T)
        if mod in self.ia3 and not mod.endswith('.wo'):  # k, v: scale the output
            y = self.n.R(y * self.ia3[mod])
        return y

    def layer_norm(self, h, name):
        n = self.n
        var = n.F(np.mean(n.F(h * h), -1, keepdims=True))
        hn = n.F(h * n.F(1.0 / np.sqrt(n.F(var + n.c(self.eps)))))
        hn = n.R(hn)
        return n.R(self.w[name + '.weight'] * hn)

    def gelu_new(self, x):
        n = self.n
        if n.mode == 'f64':
            return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
        p = n.R(x ** 3)
        b = n.R(n.c(0.044715) * p)
        c = n.R(x + b)
        d = n.R(n.c(math.sqrt(2.0 / math.pi)) * c)
        e = n.R(np.tanh(d))
        f = n.R(1.0 + e)
        g = n.R(n.c(0.5) * x)
        return n.R(g * f)

    def ff(self, x, p):
        if self.gated:
            g = self.gelu_new(self.linear(x, p + '.wi_0'))
            l = self.linear(x, p + '.wi_1')
            h = self.n.R(g * l)
        else:
            h = np.maximum(self.linear(x, p + '.wi'), 0)
        return self.linear(h, p + '.wo')

    def attention(self, xq, xkv, p, pos_bias):
        n = self.n
        B, Lq, _ = xq.shape
        Lk = xkv.shape[1]
        H, dk = self.H, self.dk
        q = self.linear(xq, p + '.q').reshape(B, Lq, H, dk).transpose(0, 2, 1, 3)
        k = self.linear(xkv, p + '.k').reshape(B, Lk, H, dk).transpose(0, 2, 1, 3)
        v = self.linear(xkv, p + '.v').reshape(B, Lk, H, dk).transpose(0, 2, 1, 3)
        if self.attn == 'sdpa':
            scores = n.F(q @ k.transpose(0, 1, 3, 2) + pos_bias)
        else:
            scores = n.mm(q, k.transpose(0, 1, 3, 2))
            scores = n.R(scores + pos_bias)
        s = n.F(scores)
        m = s.max(-1, keepdims=True)
        e = n.F(np.exp(n.F(s - m)))
        w = n.R(n.F(e / n.F(e.sum(-1, keepdims=True))))
        out = n.mm(w, v).transpose(0, 2, 1, 3).reshape(B, Lq, H * dk)
        return self.linear(out, p + '.o')

    def rel_bias(self, name, Lq, Lk, bidirectional):
        rel = np.arange(Lk)[None, :] - np.arange(Lq)[:, None]
        bk = bucket(rel, bidirectional, self.cfg['relative_attention_num_buckets'],
                    self.cfg['relative_attention_max_distance'])
        vals = self.w[name][bk]  # [Lq, Lk, H]
        return vals.transpose(2, 0, 1)[None]  # [1, H, Lq, Lk]

    def ext_mask(self, mask):  # [B, Lk] -> [B, 1, 1, Lk] additive
        mn = -3.3895313892515355e38 if self.n.mode != 'f64' else np.finfo(np.float64).min
        return ((1.0 - mask) * mn)[:, None, None, :]

    # ---- stacks
    def encode(self, ids, mask):
        n = self.n
        x = self.enc_emb[ids]
        B, L = ids.shape
        bias = self.rel_bias('encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight', L, L, True)
        pb = n.R(bias + self.ext_mask(mask.astype(np.float64)))
        for i in range(self.cfg['num_layers']):
            p = f'encoder.block.{i}'
            a = self.attention(self.layer_norm(x, p + '.layer.0.layer_norm'), None or self.layer_norm(x, p + '.layer.0.layer_norm'),
                               p + '.layer.0.SelfAttention', pb)
            x = n.R(x + a)
            f = self.ff(self.layer_norm(x, p + '.layer.1.layer_norm'), p + '.layer.1.DenseReluDense')
            x = n.R(x + f)
        return self.layer_norm(x, 'encoder.final_layer_norm')

    def decode(self, dec_in, enc, enc_mask):
        n = self.n
        x = self.dec_emb[dec_in]
        B, L = dec_in.shape
        bias = self.rel_bias('decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight', L, L, False)
        mn = -3.3895313892515355e38 if n.mode != 'f64' else np.finfo(np.float64).min
        causal = np.where(np.arange(L)[None, :] > np.arange(L)[:, None], mn, 0.0)[None, None]
        pb_self = n.R(bias + causal)
        pb_cross = n.R(np.zeros((1, self.H, L, enc.shape[1])) + self.ext_mask(enc_mask.astype(np.float64)))
        for i in range(self.cfg['num_decoder_layers']):
            p = f'decoder.block.{i}'
            h = self.layer_norm(x, p + '.layer.0.layer_norm')
            x = n.R(x + self.attention(h, h, p + '.layer.0.SelfAttention', pb_self))
            h = self.layer_norm(x, p + '.layer.1.layer_norm')
            x = n.R(x + self.attention(h, enc, p + '.layer.1.EncDecAttention', pb_cross))
            h = self.layer_norm(x, p + '.layer.2.layer_norm')
            x = n.R(x + self.ff(h, p + '.layer.2.DenseReluDense'))
        x = self.layer_norm(x, 'decoder.final_layer_norm')
        if self.scale:
            x = n.R(x * n.c(self.cfg['d_model'] ** -0.5))
        return n.mm(x, self.head.T)

    def rank_forward(self, ids, mask, tgt):
        B, C, Lc = tgt.shape
        enc = self.encode(ids, mask)
        enc_r = np.repeat(enc, C, 0)
        mask_r = np.repeat(mask, C, 0)
        flat = tgt.reshape(B * C, Lc)
        dec_in = np.concatenate([np.zeros_like(flat[:, :1]), flat[:, :-1]], 1)
        logits = self.decode(dec_in, enc_r, mask_r)
        if self.n.mode == 'f64':
            z = logits - logits.max(-1, keepdims=True)
            lsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
        else:  # log_softmax(logits.float()) in fp32
            l32 = logits.astype(np.float32)
            z = l32 - l32.max(-1, keepdims=True)
            lsm = (z - np.log(np.exp(z).sum(-1, keepdims=True, dtype=np.float32))).astype(np.float32)
        logp = np.take_along_axis(lsm, flat[..., None], -1)[..., 0]
        logp = (logp * (flat != 0)).astype(np.float64 if self.n.mode == 'f64' else np.float32)
        return enc, logits.reshape(B, C, Lc, -1), logp.reshape(B, C, Lc)


def rel_error(a, b):
    a = np.asarray(a, np.float64).ravel(); b = np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def max_rel_error(a, b, floor=1e-6):
    a = np.asarray(a, np.float64).ravel(); b = np.asarray(b, np.float64).ravel()
    return float((np.abs(a - b) / np.maximum(np.abs(b), floor)).max())


def loss_masks(tgt, labels):
    """The T-Few losses' token masks of choices [B, C, Lc] (0 = padding): real tokens, gold-choice tokens, the rest."""
    mask = tgt != 0
    B, C, _ = tgt.shape
    gold = np.zeros((B, C), bool)
    gold[np.arange(B), labels] = True
    return mask, mask & gold[..., None], mask & ~gold[..., None]


def tfew_losses(logp, tgt, labels):
    mask, gold_tok, wrong_tok = loss_masks(tgt, labels)
    B = tgt.shape[0]
    lp = logp.astype(np.float64)
    lm = -(lp * gold_tok).sum() / gold_tok.sum()
    ul = -(np.log(1 - np.exp(lp) + 0.01) * wrong_tok).sum() / wrong_tok.sum()
    scores = lp.sum(-1) / mask.sum(-1)
    z = scores - scores.max(-1, keepdims=True)
    ls = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ln = -ls[np.arange(B), labels].mean()
    return dict(lm_loss=lm, ul_loss=ul, ln_loss=ln, total_loss=lm + ul + ln)


def variant_errors(name, variant, mode, **kw):
    d = os.path.join(FIX, name)
    ref = load_st(os.path.join(d, 'reference.safetensors'))
    ids, mask, tgt = ref['input_ids'], ref['attention_mask'], ref['choices']
    labels = ref['labels']
    B, C, Lc = tgt.shape
    lengths = mask.sum(1)
    m = T5Sim(d, mode, adapter='adapter_a' if variant == 'ia3' else None, **kw)
    enc, logits, logp = m.rank_forward(ids, mask, tgt)
    n_tok = (tgt != 0).sum(-1)
    sums = logp.astype(np.float64).sum(-1)
    scores = sums / n_tok
    r_enc, r_logits = ref[f'{variant}.encoder_hidden'], ref[f'{variant}.logits']
    e = {
        'encoder_hidden': max(rel_error(enc[b, :lengths[b]], r_enc[b, :lengths[b]]) for b in range(B)),
        'logits': max(rel_error(logits[b, c, :n_tok[b, c]], r_logits[b, c, :n_tok[b, c]])
                      for b in range(B) for c in range(C)),
        'sum_logp': max_rel_error(sums, ref[f'{variant}.sum_logp']),
        'scores': max_rel_error(scores, ref[f'{variant}.scores']),
    }
    if mode == 'f64':
        e['token_logp'] = max_rel_error(logp, ref[f'{variant}.token_logp'])
    L = tfew_losses(logp, tgt, labels)
    e['loss_values'] = {k: float(v) for k, v in L.items()}
    e['loss_err'] = {k: max_rel_error([v], ref[f'{variant}.{k}']) for k, v in L.items()}
    e['losses'] = max(e['loss_err'].values())
    e['pred'] = scores.argmax(-1).tolist()
    e['ref_pred'] = ref[f'{variant}.pred'].tolist()
    e['_sums'] = sums.tolist()
    e['_enc'] = [enc[b, :lengths[b]].tolist() for b in range(B)]
    return e


def main():
    args = sys.argv[1:]
    orders = int(args[args.index('--orders') + 1]) if '--orders' in args else 0
    out_file = args[args.index('--out') + 1] if '--out' in args else None
    quantities = ['encoder_hidden', 'logits', 'sum_logp', 'scores', 'losses']
    out = {}
    for mode in ['f64', 'bf16']:
        out[mode] = {}
        for name in ['tiny-gated-gelu-untied', 'tiny-relu-tied']:
            out[mode][name] = {}
            for variant in ['base', 'ia3']:
                e = variant_errors(name, variant, mode)
                if orders > 0 and mode == 'bf16':
                    for seed in range(orders):
                        r = variant_errors(name, variant, mode, gemm_acc='perm', seed=seed)
                        for q in quantities:
                            e[q + '_min'] = min(e.get(q + '_min', e[q]), r[q])
                out[mode][name][variant] = {k: v for k, v in e.items() if not k.startswith('_')}
                print(mode, name, variant, ' '.join(f'{q} {e[q]:.2e}' + (f' (min {e[q + "_min"]:.2e})' if q + '_min' in e else '')
                                                   for q in quantities))
    if out_file:
        with open(out_file, 'w') as f:
            json.dump(out, f, indent=1)


if __name__ == '__main__':
    main()
