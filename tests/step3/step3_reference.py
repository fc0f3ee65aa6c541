"""An independent float64 re-computation of the published Step-3 forward math, from official-layout tensors.

Written from the paper / model-card equations, not from `modeling_step3.py`: plain loops over heads and experts,
explicit causal softmax, no transformers code.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over the whole last dimension. x: [S, D]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def step3_logits(state: dict[str, torch.Tensor], config, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits `[B, S, V]` for unpadded sequences, every tensor in float64."""
    w = {k: v.double() for k, v in state.items()}
    eps, theta = config.rms_norm_eps, config.rope_parameters["rope_theta"]
    n_heads, n_groups, d = config.num_attention_heads, config.num_attention_groups, config.head_dim
    moe_layers = {int(i) for i in config.moe_layers_enum.split(",")}
    outputs = []
    for ids in input_ids:
        seq = ids.shape[0]
        positions = torch.arange(seq)
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        x = w["model.embed_tokens.weight"][ids]
        for layer in range(config.num_hidden_layers):
            p = f"model.layers.{layer}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            q_low = rms_norm(h @ w[p + "self_attn.q_proj.weight"].T, w[p + "self_attn.inter_norm.weight"], eps)
            q = (q_low @ w[p + "self_attn.wq.weight"].T).view(seq, n_heads, d)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(seq, n_groups, d)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(seq, n_groups, d)
            heads = []
            for head in range(n_heads):
                group = head // (n_heads // n_groups)  # query heads are grouped contiguously per KV head
                qh, kh = rope(q[:, head], positions, theta), rope(k[:, group], positions, theta)
                scores = (qh @ kh.T) / d**0.5
                scores = scores.masked_fill(~causal, float("-inf"))
                heads.append(torch.softmax(scores, -1) @ v[:, group])
            x = x + torch.cat(heads, -1) @ w[p + "self_attn.o_proj.weight"].T

            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            if layer in moe_layers:
                probs = torch.softmax(h @ w[p + "moe.gate.weight"].T, -1)
                top_w, top_i = probs.topk(config.moe_top_k, -1)
                if config.norm_expert_weight:
                    top_w = top_w / top_w.sum(-1, keepdim=True)
                y = swiglu(
                    h,
                    w[p + "share_expert.gate_proj.weight"],
                    w[p + "share_expert.up_proj.weight"],
                    w[p + "share_expert.down_proj.weight"],
                )
                for t in range(seq):
                    for j in range(config.moe_top_k):
                        e = int(top_i[t, j])
                        y[t] += top_w[t, j] * swiglu(
                            h[t : t + 1],
                            w[p + "moe.gate_proj.weight"][e],
                            w[p + "moe.up_proj.weight"][e],
                            w[p + "moe.down_proj.weight"][e],
                        )[0]
            else:
                y = swiglu(h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
            x = x + y
        outputs.append(rms_norm(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T)
    return torch.stack(outputs)
