"""On-device baselines: the same classification task trained entirely on the device.

* ``lora``: PEFT LoRA (r=8 on the attention q and v projections) plus the classifier head,
  back-propagating through the whole backbone.
* ``full``: every backbone weight trainable (AdamW), plus the classifier head.
* ``side_local``: MobiLLM's side network trained on the device itself (backbone forward only,
  back-propagation through the side network only): isolates what offloading buys.

All three read the classifier from the last real token, with the classifier initialised from the
backbone's LM-head rows of the verbalizers, exactly like MobiLLM's side network, so every
method starts from the same zero-shot model.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mobillm.backbone import Backbone
from mobillm.data import Batch
from mobillm.device.local import LocalModel
from mobillm.device.rows import plan_rows
from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead
from mobillm.side.model import SideNetwork
from mobillm.side.optim import lr_lambda

LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gemma": ["q_proj", "v_proj"],
}


class Method(Protocol):
    name: str

    def train_step(self, batch: Batch) -> float: ...

    def predict(self, batch: Batch) -> torch.Tensor: ...


def _optimizer(params: list[nn.Parameter], lr: float, total: int) -> tuple:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, 0.06, "cosine"))


class _Backprop:
    """Shared loop for methods that back-propagate through the backbone (LoRA, full)."""

    name = "backprop"

    def __init__(self, backbone: Backbone, side: SideConfig, lr: float, total: int) -> None:
        self.backbone = backbone
        self.base = backbone.family.base(backbone.model)
        head = FrozenHead(*backbone.export_head(side.head_rows))
        self.classifier = nn.Linear(head.spec.out_size, side.num_labels)
        with torch.no_grad():
            self.classifier.weight.copy_(head.lm_head_weight)
            self.classifier.bias.zero_()
        params = [p for p in backbone.model.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in params) + sum(
            p.numel() for p in self.classifier.parameters()
        )
        self.opt, self.sched = _optimizer([*params, *self.classifier.parameters()], lr, total)

    def _logits(self, batch: Batch) -> torch.Tensor:
        # The base model's output is already final-normed: the classifier reads it directly.
        out = self.base(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        return self.classifier(out[torch.arange(len(batch)), batch.loss_positions])

    def train_step(self, batch: Batch) -> float:
        self.backbone.model.train()
        loss = F.cross_entropy(self._logits(batch), batch.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        self.sched.step()
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        self.backbone.model.eval()
        return self._logits(batch).argmax(-1)


class LoraMethod(_Backprop):
    """PEFT LoRA on q/v with r=8, alpha=16, plus the classifier head."""

    name = "lora"

    def __init__(
        self, backbone: Backbone, side: SideConfig, lr: float, total: int, r: int = 8
    ) -> None:
        from peft import LoraConfig, get_peft_model

        arch = backbone.model.config.model_type
        cfg = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            lora_dropout=0.05,
            target_modules=LORA_TARGETS.get(arch, ["q_proj", "v_proj"]),
        )
        backbone.model = get_peft_model(backbone.model, cfg).base_model.model
        super().__init__(backbone, side, lr, total)


class FullMethod(_Backprop):
    """Full fine-tuning: every backbone weight trains."""

    name = "full"

    def __init__(self, backbone: Backbone, side: SideConfig, lr: float, total: int) -> None:
        backbone.model.requires_grad_(True)
        super().__init__(backbone, side, lr, total)


class SideLocalMethod:
    """MobiLLM's side network trained on the device: forward-only backbone, no offloading."""

    name = "side_local"

    def __init__(self, backbone: Backbone, side: SideConfig, lr: float, total: int) -> None:
        self.backbone = backbone
        self.net = SideNetwork(side, FrozenHead(*backbone.export_head(side.head_rows)))
        self.num_trainable = self.net.num_trainable()
        self.opt, self.sched = _optimizer(list(self.net.parameters()), lr, total)

    def train_step(self, batch: Batch) -> float:
        plan = plan_rows(batch, "loss")
        hidden: list[torch.Tensor] = []
        # The backbone's outputs are inference tensors; clone() outside inference mode makes
        # them ordinary leaves the side network can take gradients against.
        self.backbone.run(
            batch.input_ids, batch.attention_mask, lambda tap, h: hidden.append(plan.gather(h))
        )
        self.net.train()
        feats = self.net.features([h.clone() for h in hidden])
        loss = F.cross_entropy(self.net.logits(feats, plan.pool_rows), batch.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def predict(self, batch: Batch) -> torch.Tensor:
        return LocalModel(self.backbone, self.net).class_logits(batch).argmax(-1)


METHODS = {"lora": LoraMethod, "full": FullMethod, "side_local": SideLocalMethod}
