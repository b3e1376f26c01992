"""Contrastive loss with negatives gathered across 2 real processes (gloo, loopback only).

What is compared, for a global batch of N = 2·B pairs split in two halves (rank r holds rows r·B..(r+1)·B-1):

1. the loss value on each rank equals the single-process loss on the full batch;
2. the gradient reaching each rank's local features equals W · (the matching slice of the single-process
   gradient with respect to the features), W = 2: `contrastive` scales it by W so that DDP's *average* is exact;
3. after DDP-style averaging (all_reduce(sum) / W) the gradients of the parameters that produced the features,
   and of logit_scale, equal the single-process gradients on the full batch — what an optimizer step sees.
"""
from __future__ import annotations

import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lexvla.losses import contrastive

W, B, D, V = 2, 4, 5, 7


def _problem() -> tuple[torch.Tensor, ...]:
    "The same data and parameter initialisation in every process."
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = torch.randn(W * B, D, generator=g), torch.randn(W * B, D, generator=g)
    w_img, w_txt = torch.randn(D, V, generator=g), torch.randn(D, V, generator=g)
    return x_img, x_txt, w_img, w_txt


def _forward(x_img, x_txt, w_img, w_txt):
    "A tiny pair of encoders: non-negative, L2-normalised rows like LexVLA's lexical vectors."
    return F.normalize(F.softplus(x_img @ w_img), dim=-1), F.normalize(F.softplus(x_txt @ w_txt), dim=-1)


def _single_process() -> dict[str, torch.Tensor]:
    x_img, x_txt, w_img, w_txt = _problem()
    w_img.requires_grad_(); w_txt.requires_grad_()
    ls = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    img, txt = _forward(x_img, x_txt, w_img, w_txt)
    img.retain_grad(); txt.retain_grad()
    loss = contrastive(img, txt, ls, gather=False)
    loss.backward()
    return dict(loss=loss.detach(), img=img.grad, txt=txt.grad, w_img=w_img.grad, w_txt=w_txt.grad, ls=ls.grad)


def _worker(rank: int, port: int) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        ref = _single_process()  # computed before anything distributed touches autograd
        x_img, x_txt, w_img, w_txt = _problem()
        sl = slice(rank * B, (rank + 1) * B)
        w_img.requires_grad_(); w_txt.requires_grad_()
        ls = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        img, txt = _forward(x_img[sl], x_txt[sl], w_img, w_txt)
        img.retain_grad(); txt.retain_grad()
        loss = contrastive(img, txt, ls, gather=True)
        loss.backward()
        # 1. the value is the global-batch loss
        torch.testing.assert_close(loss.detach(), ref["loss"], rtol=1e-5, atol=1e-6)
        # 2. local feature gradients are W x the matching slice of the single-process gradient
        torch.testing.assert_close(img.grad, W * ref["img"][sl], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(txt.grad, W * ref["txt"][sl], rtol=1e-4, atol=1e-6)
        # 3. DDP-style averaged parameter gradients equal the single-process ones
        for name, p in (("w_img", w_img), ("w_txt", w_txt), ("ls", ls)):
            g = p.grad.clone()
            dist.all_reduce(g)
            torch.testing.assert_close(g / W, ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_contrastive_matches_single_process() -> None:
    mp.spawn(_worker, args=(_free_port(),), nprocs=W, join=True)


def test_without_gather_each_rank_is_local() -> None:
    "Sanity check of the reference itself: the full-batch loss differs from the mean of per-half losses."
    x_img, x_txt, w_img, w_txt = _problem()
    img, txt = _forward(x_img, x_txt, w_img, w_txt)
    ls = torch.tensor(math.log(1 / 0.07))
    full = contrastive(img, txt, ls, gather=False)
    halves = (contrastive(img[:B], txt[:B], ls, gather=False) + contrastive(img[B:], txt[B:], ls, gather=False)) / 2
    assert full > halves  # more negatives, larger loss
