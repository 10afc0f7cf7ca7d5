"""Same-shape optimizer step of PyTorch references (CPU) against our jitted update.

Runs when the ``bench-peers`` packages import (``torch``, ``peft``, ``pytorch_optimizer``). The
torch model is ``layers`` blocks with separate ``q`` and ``v`` ``nn.Linear(d, d)`` layers adapted
by PEFT LoRA (``lora_A: (r, d)``, ``lora_B: (d, r)``): the same pairs as the q,v pair tree.
Gradients are fixed random tensors; one timed torch call is ``optimizer.step()``, one timed call
of ours is the jitted ``update`` + ``apply_updates``. Both run interleaved in one loop; the ratio
is ours / theirs (below 1: ours is faster).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Callable

import numpy as np
import optax

from benchmarks import harness
from benchmarks.registry import BY_NAME
from benchmarks.update_cost import TIMING_LR

PACKAGES = ("torch", "peft", "pytorch_optimizer")


@dataclasses.dataclass
class PeerRow:
    rank: int
    peer: str
    ours: str
    ratio: float  # our time / peer time, median of paired rounds
    ours_ms: float
    peer_ms: float


def versions() -> dict[str, str] | None:
    """Versions of the peer packages, or ``None`` when any of them does not import."""
    try:
        import peft  # noqa: F401
        import pytorch_optimizer  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return None
    return {name: importlib.metadata.version(name) for name in PACKAGES}


def torch_device() -> str:
    """``"cuda"`` when jax runs on a GPU and torch sees one too, else ``"cpu"``."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_model(rank: int, layers: int, d: int, device: str):
    import torch
    from peft import LoraConfig, get_peft_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(d, d, bias=False)
            self.v = torch.nn.Linear(d, d, bias=False)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(layers))

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=rank, lora_alpha=32, target_modules=["q", "v"]))
    model = model.to(device)
    for p in model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.normal_(0.0, 1.0 / np.sqrt(max(p.shape)))
            p.grad = 1e-3 * torch.randn_like(p)
    return model


def _peer_optimizers(model) -> dict[str, tuple[str, Callable]]:
    """``peer name: (our registry method, builder)``."""
    import torch
    from peft.optimizers import create_loraplus_optimizer, create_riemannian_optimizer
    from pytorch_optimizer import LoRARite

    def lora_params():
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        a = [p for n, p in named if "lora_A" in n]
        b = [p for n, p in named if "lora_B" in n]
        return [p for pair in zip(a, b) for p in pair]

    return {
        "torch.optim.AdamW": ("adamw", lambda: torch.optim.AdamW(lora_params(), lr=TIMING_LR)),
        "peft create_riemannian_optimizer(AdamW)": (
            "scaled_adamw",
            lambda: create_riemannian_optimizer(model, torch.optim.AdamW, lr=TIMING_LR)),
        "peft create_loraplus_optimizer(AdamW, ratio 4)": (
            "loraplus_adamw",
            lambda: create_loraplus_optimizer(model, torch.optim.AdamW, lr=TIMING_LR,
                                              loraplus_lr_ratio=4.0)),
        "pytorch_optimizer.LoRARite": ("lora_rite", lambda: LoRARite(lora_params(), lr=TIMING_LR)),
    }


def _ours(name: str) -> optax.GradientTransformation:
    if name == "adamw":
        return optax.adamw(TIMING_LR, weight_decay=0.0)
    return BY_NAME[name].make(TIMING_LR)


def measure(ranks, rounds: int, layers: int = harness.N_LAYERS, d: int = harness.D_MODEL,
            log=print) -> list[PeerRow]:
    import torch

    device = torch_device()
    torch.set_num_threads(1)  # tiny tensors; OpenMP workers only spin on a shared CPU
    rows = []
    for rank in ranks:
        model = _torch_model(rank, layers, d, device)
        params = harness.pair_tree(rank, all_four=False, layers=layers, d=d)
        grads = harness.gradients_like(params)
        for peer, (ours, build) in _peer_optimizers(model).items():
            opt = build()
            step = harness.update_step(_ours(ours), params, grads)

            def peer_step(opt=opt):
                opt.step()
                if device == "cuda":
                    torch.cuda.synchronize()

            with torch.no_grad():
                times = harness.interleaved_times({"ours": step, "peer": peer_step}, rounds)
            row = PeerRow(rank, peer, ours, harness.median_ratio(times, "ours", "peer"),
                          1e3 * float(np.median(times["ours"])),
                          1e3 * float(np.median(times["peer"])))
            log(f"  peers r={rank} {peer}: ours {row.ours_ms:.1f} ms vs {row.peer_ms:.1f} ms "
                f"({row.ratio:.2f}×)")
            rows.append(row)
    return rows
