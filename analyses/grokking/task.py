"""Modular addition: the grokking task, its data and its model/optimizer presets.

The task (Power et al. 2022; Nanda et al. 2023): the input is the three tokens ``[a, b, =]``
with ``a, b`` in ``0..p-1`` and ``=`` the extra token ``p``; the target is ``(a + b) % p``,
read off the logits at the last position. All ``p**2`` pairs are split into a training and a
test set by a seeded permutation. A one-layer ReLU transformer without LayerNorm, trained full
batch with AdamW and strong weight decay, first memorises the training set and only much later
generalises ("groks").

Presets (:data:`CONFIGS`):

* ``default`` — ``p = 59``, half of the pairs for training, ``d_model = 64``: groks in about
  2,000 full-batch steps, a couple of minutes on two CPU cores. What ``make demo`` runs.
* ``nanda`` — the setting of Nanda et al. ("Progress measures for grokking via mechanistic
  interpretability"): ``p = 113``, 30% training data, ``d_model = 128``, 25,000 full-batch
  steps. Opt-in: measured ~6x the per-step cost of ``default`` (276 vs 45 ms CPU time per
  full-batch step on one core), and a fixed 25k steps: about 2 hours of training on one CPU
  core before any attribution.
* ``tiny`` — ``p = 11``, ``d_model = 24``, 100 steps: for tests and notebooks (seconds). It
  memorises but does not grok within its step cap (small ``p`` groks late and erratically).

The training loss is :func:`explaind_tl.losses.last_token_cross_entropy`.

Importing this module is cheap: ``transformer_lens`` and ``datasets`` are imported inside the
functions that need them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset
    from transformer_lens import HookedTransformerConfig

__all__ = [
    "CONFIGS",
    "GrokkingConfig",
    "get_config",
    "modular_addition_data",
    "modular_addition_tensors",
]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def modular_addition_tensors(p: int, train_fraction: float, seed: int = 0) -> dict[str, Any]:
    """The modular-addition split as plain tensors.

    Pair ``(a, b)`` has index ``a * p + b``. A ``torch.randperm(p * p)`` seeded with ``seed``
    orders the pairs; the first ``int(train_fraction * p * p)`` are the training set (in that
    permuted order), the rest the test set.

    Args:
        p: The modulus (a prime in the usual setting); the ``=`` token is ``p``.
        train_fraction: Fraction of the ``p**2`` pairs used for training, in ``(0, 1)``.
        seed: Seed of the permutation.

    Returns:
        A dict with ``train_tokens [N, 3]``, ``train_label [N]``, ``test_tokens [M, 3]``,
        ``test_label [M]`` (int64) and ``train_pairs``/``test_pairs`` (pair indices).
    """
    if p < 2:
        raise ValueError(f"p must be >= 2, got {p}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    eq = torch.full_like(a, p)
    tokens = torch.stack([a, b, eq], dim=1)
    labels = (a + b) % p
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(p * p, generator=gen)
    n_train = int(train_fraction * p * p)
    if n_train < 1 or n_train >= p * p:
        raise ValueError(f"train_fraction={train_fraction} leaves an empty split for p={p}")
    tr, te = perm[:n_train], perm[n_train:]
    return {
        "train_tokens": tokens[tr],
        "train_label": labels[tr],
        "test_tokens": tokens[te],
        "test_label": labels[te],
        "train_pairs": tr,
        "test_pairs": te,
    }


def _to_dataset(tokens: torch.Tensor, labels: torch.Tensor) -> Dataset:
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "tokens": tokens.tolist(),
            "label": labels.tolist(),
            "id": list(range(len(labels))),
        }
    )


def modular_addition_data(p: int, train_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Modular-addition train and test sets as ``datasets.Dataset`` objects.

    Each row has ``tokens`` (``[a, b, p]``), ``label`` (``(a + b) % p``) and ``id`` (the row
    index in its split). See :func:`modular_addition_tensors` for the split.

    Args:
        p: The modulus; the ``=`` token is ``p`` (vocabulary ``p + 1`` inputs, ``p`` outputs).
        train_fraction: Fraction of all ``p**2`` pairs used for training.
        seed: Seed of the train/test permutation.

    Returns:
        ``(train, test)``.
    """
    t = modular_addition_tensors(p, train_fraction, seed)
    return _to_dataset(t["train_tokens"], t["train_label"]), _to_dataset(
        t["test_tokens"], t["test_label"]
    )


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrokkingConfig:
    """Everything that defines one grokking run: data, model, optimizer, stopping, analysis.

    Attributes:
        name: Preset name (used for the default output directory).
        p: Modulus; the vocabulary has ``p + 1`` input tokens and ``p`` output classes.
        train_fraction: Fraction of the ``p**2`` pairs used for training.
        data_seed: Seed of the train/test split.
        seed: Seed of the model initialisation (and of batch sampling when not full batch).
        d_model, n_heads, d_head, d_mlp, n_layers: Transformer shape.
        act_fn: MLP activation (``"relu"`` for the grokking models).
        normalization_type: ``None`` (no LayerNorm) or a TransformerLens normalization type.
        lr, weight_decay, betas, eps: AdamW hyper-parameters (decoupled weight decay).
        batch_size: ``None`` for full-batch training.
        max_steps: Hard cap on the number of optimizer steps.
        stop_test_acc: Test accuracy that counts as "grokked".
        extra_steps: Train this many steps after test accuracy first reaches
            ``stop_test_acc``, then stop; ``None`` trains exactly ``max_steps`` steps.
        checkpoint_every: Full checkpoint interval of the trajectory (steps).
        log_every: Interval (steps) of the train/test loss and accuracy log (``metrics.csv``).
        step_bin: Bin width (steps) of the step axis in the component analyses.
        align_window: Window width (steps) of the per-query alignment analysis.
        n_align_queries: Number of test queries in the per-query analyses.
        n_test_queries: Test examples (a seeded subset) used as queries for the test-set
            component influence; ``None`` for the whole test set.
        n_train_queries: Training examples (a seeded subset) used as queries for the
            training-set influence; ``None`` for all.
        n_fourier_keys: Number of key frequencies used by the progress measures.
        backend: ``"hooked"`` (a ``HookedTransformer``), ``"bridge"`` (a ``TransformerBridge``
            booted natively and initialised as the ``HookedTransformer`` is) or ``"auto"``
            (hooked where TransformerLens has it).
        description: One line for ``--help`` and the report.
    """

    name: str = "default"
    p: int = 59
    train_fraction: float = 0.5
    data_seed: int = 0
    seed: int = 0
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    d_mlp: int = 256
    n_layers: int = 1
    act_fn: str = "relu"
    normalization_type: str | None = None
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    batch_size: int | None = None
    max_steps: int = 4000
    stop_test_acc: float = 0.99
    extra_steps: int | None = 200
    checkpoint_every: int = 100
    log_every: int = 10
    step_bin: int = 50
    align_window: int = 100
    n_align_queries: int = 16
    n_test_queries: int | None = None
    n_train_queries: int | None = 96
    n_fourier_keys: int = 5
    backend: str = "auto"
    description: str = field(default="", compare=False)

    # ---- derived -----------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """Context length: ``[a, b, =]``."""
        return 3

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.train_fraction * self.p * self.p)

    def replace(self, **changes: Any) -> GrokkingConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of all fields."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GrokkingConfig:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)

    # ---- builders ----------------------------------------------------------------------

    def data(self) -> tuple[Dataset, Dataset]:
        """``(train, test)`` datasets (see :func:`modular_addition_data`)."""
        return modular_addition_data(self.p, self.train_fraction, self.data_seed)

    def hooked_config(self) -> HookedTransformerConfig:
        """The TransformerLens config: ``d_vocab = p + 1``, ``d_vocab_out = p``, ``n_ctx = 3``."""
        from transformer_lens import HookedTransformerConfig

        return HookedTransformerConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            d_head=self.d_head,
            n_heads=self.n_heads,
            d_mlp=self.d_mlp,
            d_vocab=self.p + 1,
            d_vocab_out=self.p,
            n_ctx=self.n_ctx,
            act_fn=self.act_fn,
            normalization_type=self.normalization_type,
            seed=self.seed,
            device="cpu",
        )

    def make_model(self) -> torch.nn.Module:
        """A freshly initialised ``HookedTransformer`` (seeded by ``seed``), or a
        ``TransformerBridge`` with the same initial numbers (``backend="bridge"``)."""
        from analyses.induction.task import resolve_backend

        if resolve_backend(self.backend) == "bridge":
            from transformer_lens.config import TransformerBridgeConfig
            from transformer_lens.model_bridge import TransformerBridge

            from explaind_tl.model.bridge import init_like_hooked_transformer

            bcfg = TransformerBridgeConfig(
                n_layers=self.n_layers, d_model=self.d_model, d_head=self.d_head, n_heads=self.n_heads, d_mlp=self.d_mlp,
                d_vocab=self.p + 1, d_vocab_out=self.p, n_ctx=self.n_ctx, act_fn=self.act_fn,
                normalization_type=self.normalization_type)
            return init_like_hooked_transformer(TransformerBridge.boot_native(bcfg), self.seed)
        from transformer_lens import HookedTransformer

        torch.manual_seed(self.seed)
        model = HookedTransformer(self.hooked_config())
        model.train()
        return model

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (``foreach=False`` for exact replay)."""
        params = [q for q in model.parameters() if q.requires_grad]
        return torch.optim.AdamW(
            params,
            lr=self.lr,
            betas=tuple(self.betas),
            eps=self.eps,
            weight_decay=self.weight_decay,
            foreach=False,
        )


CONFIGS: dict[str, GrokkingConfig] = {
    "default": GrokkingConfig(
        name="default",
        description=(
            "p=59, 50% train, d_model 64, 4 heads, d_mlp 256; AdamW lr 1e-3 wd 1.0; "
            "stops 200 steps after test acc >= 99% (~2.4k steps, ~2 min of training on 2 CPU cores); "
            "explains the whole test set"
        ),
    ),
    "nanda": GrokkingConfig(
        name="nanda",
        p=113,
        train_fraction=0.3,
        d_model=128,
        n_heads=4,
        d_head=32,
        d_mlp=512,
        max_steps=25_000,
        extra_steps=None,
        checkpoint_every=500,
        log_every=100,
        step_bin=500,
        align_window=1000,
        n_test_queries=256,
        description=(
            "Nanda et al. 2023: p=113, 30% train, d_model 128, d_mlp 512; 25k full-batch steps "
            "(opt-in: ~6x default's cost per step, ~2 h of training on one CPU core)"
        ),
    ),
    "tiny": GrokkingConfig(
        name="tiny",
        p=11,
        train_fraction=0.7,
        d_model=24,
        n_heads=2,
        d_head=12,
        d_mlp=96,
        lr=1e-2,
        max_steps=100,
        extra_steps=20,
        checkpoint_every=20,
        log_every=5,
        step_bin=10,
        align_window=20,
        n_align_queries=8,
        n_train_queries=None,
        n_fourier_keys=2,
        description=(
            "p=11, 70% train, d_model 24, lr 1e-2, 100 steps: memorises in ~50 steps, does not "
            "grok within the cap; for tests and notebooks (seconds)"
        ),
    ),
}


def get_config(name: str, **overrides: Any) -> GrokkingConfig:
    """A preset by name, with optional field overrides.

    Raises:
        KeyError: For an unknown preset (the message lists the known ones).
    """
    if name not in CONFIGS:
        raise KeyError(f"unknown grokking config {name!r}; choose one of {sorted(CONFIGS)}")
    cfg = CONFIGS[name]
    return cfg.replace(**overrides) if overrides else cfg
