"""Transformer zoo models written here: ViT-Tiny, a BERT-tiny encoder, a GPT-style decoder with a
KV cache.

Attention is spelled out (MatMul, Softmax) rather than calling ``scaled_dot_product_attention``
so that the exported graphs hold the standard-op patterns real exporters produce and the passes
have to recognise.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x):
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def attend(self, q, k, v, bias=None):
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        b, h, s, d = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, s, h * d))

    def forward(self, x, bias=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.attend(self.split(q), self.split(k), self.split(v), bias)


class EncoderLayer(nn.Module):
    """Pre-norm (ViT) or post-norm (BERT) transformer layer."""

    def __init__(self, dim: int, heads: int, mlp: int, pre_norm: bool, eps: float):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))
        self.pre_norm = pre_norm

    def forward(self, x, bias=None):
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), bias)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, bias))
        return self.norm2(x + self.mlp(x))


class ViT(nn.Module):
    """Vision Transformer; the defaults are ViT-Ti/16 (Touvron et al. 2021): 192 wide, 12 deep, 3 heads."""

    def __init__(self, image=224, patch=16, dim=192, depth=12, heads=3, mlp=768, classes=1000):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, mlp, True, 1e-6) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])


class Bert(nn.Module):
    """BERT encoder; the defaults are BERT-tiny (Turc et al. 2019): 2 layers, 128 wide, 2 heads."""

    def __init__(self, vocab=30522, dim=128, depth=2, heads=2, mlp=512, max_len=512):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.types = nn.Embedding(2, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, mlp, False, 1e-12) for _ in range(depth))
        self.pooler = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        x = self.tokens(input_ids) + self.positions(positions) + self.types.weight[0]
        x = self.norm(x)
        # -10000 as in the original BERT: finite, so a fully masked row stays finite in FP16 too.
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        return x, torch.tanh(self.pooler(x[:, 0]))


class GPT(nn.Module):
    """GPT-2-style decoder with a KV cache: takes ``past_key_i``/``past_value_i`` per layer and
    returns logits plus ``present_key_i``/``present_value_i`` (past and new positions)."""

    def __init__(self, vocab=1024, dim=128, depth=2, heads=4, max_len=512):
        super().__init__()
        self.depth = depth
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, *past):
        seq, past_len = input_ids.shape[1], past[0].shape[2]
        positions = torch.arange(past_len, past_len + seq, device=input_ids.device).unsqueeze(0)
        x = self.tokens(input_ids) + self.positions(positions)
        # Causal mask over past + new keys: query i sits at absolute position past_len + i.
        keys = torch.arange(past_len + seq, device=input_ids.device)
        allowed = keys[None, :] <= positions[0][:, None]
        bias = torch.where(allowed, 0.0, -10000.0)[None, None]
        presents = []
        for i, block in enumerate(self.blocks):
            x, key, value = block(x, past[2 * i], past[2 * i + 1], bias)
            presents += [key, value]
        return (self.head(self.norm(x)), *presents)


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x, past_key, past_value, bias):
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)
        key = torch.cat([past_key, self.attn.split(k)], dim=2)
        value = torch.cat([past_value, self.attn.split(v)], dim=2)
        x = x + self.attn.attend(self.attn.split(q), key, value, bias)
        return x + self.mlp(self.norm2(x)), key, value
