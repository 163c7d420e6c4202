"""The ExPLAIND reference implementation on its own workload, for ``analyses/bench_kernel.py``.

    python -m analyses.bench_reference [N_OUT [THREADS]]

Not a dependency of explaind_tl and not run by any test: it needs the reference package
(PyPI ``explaind`` 0.1.0, MIT). Its metadata asks for Python >= 3.12, but it runs unchanged on
3.11 with the torch, numpy and tqdm already in ``.venv``::

    pip download --no-deps --python-version 3.12 --only-binary=:all: explaind==0.1.0 -d /tmp/ref
    (cd /tmp/ref && unzip -q explaind-0.1.0-py3-none-any.whl -d src)
    PYTHONPATH=/tmp/ref/src .venv/bin/python -m analyses.bench_reference 23

It follows the authors' own experiment scripts (``experiments/train_models/modulo_model.py`` and
``experiments/validate_epk/modulo_epk_prediction.py`` of their repository): modular addition
p=23 with the reference's data generator (tokens ``a + b =``, vocabulary p+2), 150 training
examples in one full batch, 100 AdamW steps (lr 1e-3, wd 1.0, betas (0.9, 0.98)), its
one-layer model (d_model 32, 4 heads, d_mlp 128, ReLU, no LayerNorm, dropout 0), 20 queries x
all outputs x every training example, 10 midpoints per step (``integral_eps=0.1``). Its own
decoder has p+2 = 25 outputs; ``N_OUT=23`` swaps in a 23-logit decoder (the workload of
``bench_kernel``). Per-parameter kernels are kept (``keep_param_wise_kernel=False`` crashes in
0.1.0 at step 0). Prints training and explain seconds (1 thread, or ``THREADS`` BLAS threads), their ratio, the relative
error of the predicted output change (mean over queries of ``‖pred Δ - actual Δ‖ / ‖actual Δ‖``)
and the process's peak RSS.
"""
import atexit
import contextlib
import io
import random
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

try:
    from explaind.data_paths import DataPath
    from explaind.epk_model import ExactPathKernelModel
    from explaind.model_paths import ModelPath
    from explaind.modulo_model.data import ClassificationDataset, ModulusDataGenerator
    from explaind.modulo_model.loss import RegularizedCrossEntropyLoss
    from explaind.modulo_model.model import SingleLayerTransformerClassifier
    from explaind.optimizer_paths import AdamWOptimizerPath
except ImportError:  # pragma: no cover - optional comparator
    sys.exit(__doc__)

BASELINE_MB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after the imports
THREADS = int(sys.argv[2]) if len(sys.argv) > 2 else 1
torch.set_num_threads(THREADS)
device = "cpu"
P, N_TRAIN, N_QUERY, STEPS = 23, 150, 20, 100
D_MODEL, D_MLP, LR, WD, BETAS = 32, 128, 1e-3, 1.0, (0.9, 0.98)
N_TOKEN = P + 2                      # vocab: 0..22, '+'=23, '='=24 (authors: n_token=p+2)
N_OUT = int(sys.argv[1]) if len(sys.argv) > 1 else N_TOKEN   # authors' decoder has n_token outputs
SEED = 43
ckdir = tempfile.mkdtemp(prefix="explaind_ref_") + "/"
atexit.register(shutil.rmtree, ckdir, True)  # the folder this script made, and only it

torch.manual_seed(SEED)
np.random.seed(SEED)
random.seed(SEED)

# ---- data, exactly via the reference's generator: tokens (a, '+', b, '=') ----
gen = ModulusDataGenerator(num_samples=N_TRAIN, val_num_samples=N_QUERY, test_num_samples=0,
                           P=P, power=1)
train_data, val_data, _ = gen.generate_data()
train_ds = ClassificationDataset(train_data[0], train_data[1])
val_ds = ClassificationDataset(val_data[0], val_data[1])
train_loader = torch.utils.data.DataLoader(train_ds, batch_size=N_TRAIN, shuffle=True)  # full batch

# ---- model + path wrappers ----
net = SingleLayerTransformerClassifier(N_TOKEN, d_model=D_MODEL, nhead=4, dim_mlp=D_MLP, dropout=0.0)
if N_OUT != N_TOKEN:  # optional: restrict unembedding to the P residue logits
    net.decoder = torch.nn.Linear(D_MODEL, N_OUT, bias=False)
model = ModelPath(net, device=device, checkpoint_path=ckdir + "model_checkpoint.pt",
                  overwrite=True, output_dim=N_OUT)
loss_fct = RegularizedCrossEntropyLoss(alpha=0.0, p=2, device=device)
optimizer = AdamWOptimizerPath(model, lr=LR, weight_decay=WD, betas=BETAS,
                               checkpoint_path=ckdir + "optimizer_checkpoint.pt",
                               overwrite=True, device=device)
data_path = DataPath(train_loader, checkpoint_path=ckdir + "data_checkpoint.pt",
                     overwrite=True, full_batch=False)

# ---- training (100 full-batch AdamW steps, with the reference's history logging) ----
t0 = time.perf_counter()
for _ in range(STEPS):
    for batch in train_loader:
        x, y = data_path.get_batch(batch)
        optimizer.zero_grad()
        out = model.forward(x)
        loss, reg = loss_fct(out, y, params=model.parameters(), output_reg=True)
        loss.backward()
        optimizer.step()
        model.log_checkpoint()
        optimizer.log_checkpoint()
t_train = time.perf_counter() - t0
print(f"final train loss {loss.item():.4f}; checkpoints: model {len(model.checkpoints)}, "
      f"opt {len(optimizer.checkpoints)}, data {len(data_path.checkpoints)}")

# ---- explanation: EPK with 10 midpoints per step (eps=0.1 everywhere) ----
epk = ExactPathKernelModel(
    model=model, optimizer=optimizer, loss_fn=RegularizedCrossEntropyLoss(alpha=0.0),
    data_path=data_path, integral_eps=0.1, early_integral_eps=0.1, early_steps=5,
    features_to_cpu=False, device=device, train_set_size=N_TRAIN,
    evaluate_predictions=True, keep_param_wise_kernel=True,
    param_wise_kernel_keep_out_dims=True, grad_scaling=1.0, kernel_store_interval=50)
steps = epk.get_integral_steps(epk.integral_eps, early_eps=epk.early_integral_eps,
                               early_steps=epk.early_steps)
assert [s for s, _ in steps] == list(range(STEPS)) and all(len(m) == 10 for _, m in steps)

X_q = val_ds.data
y_q = torch.as_tensor(np.asarray(val_ds.targets), dtype=torch.long)
t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):   # the reference prints per step
    pred, init_pred, kernel, reg_terms, prev_eval = epk.predict(
        X_q, y_test=y_q, is_train=False, keep_kernel_matrices=True)
t_explain = time.perf_counter() - t0

# ---- replication error ----
with torch.no_grad():
    q0 = model.forward(X_q, step=0).detach()
    qT = model.forward(X_q, step=STEPS).detach()
actual, predicted = qT - q0, pred.detach() - q0
err = predicted - actual
rel_per_query = err.norm(dim=1) / actual.norm(dim=1)
rel_global = err.norm() / actual.norm()
ref_avg_delta = (qT - pred).abs().sum().item() / N_OUT / N_QUERY   # authors' "avg pred delta"
ref_max_delta = (qT - pred).abs().max().item()
# kernel check: data part = (1/B) * sum over params & train examples of the stored kernel
K = sum(v for v in kernel.values())            # (n_query, 1, n_out, n_train)
data_part = K.sum(-1)[:, 0] / N_TRAIN
reg_part = predicted - data_part
print("kernel shape per parameter tensor:", tuple(K.shape), "params:", list(kernel.keys()))
print(f"|data part| {data_part.norm():.4e}  |weight-decay part| {reg_part.norm():.4e}")

rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"n_out={N_OUT} n_query={N_QUERY} n_train={N_TRAIN} steps={STEPS} midpoints=10")
print(f"train_seconds   {t_train:.3f}")
print(f"explain_seconds {t_explain:.3f}")
print(f"explain/train   {t_explain / t_train:.1f}")
print(f"rel_err mean over queries of ||pred_delta-actual_delta||/||actual_delta|| = {rel_per_query.mean():.4e}")
print(f"rel_err global ||.||_F ratio = {rel_global:.4e};  ||actual delta||_F = {actual.norm():.4e}")
print(f"reference avg pred delta (mean |q_T - epk_pred|) = {ref_avg_delta:.4e}, max {ref_max_delta:.4e}")
print(f"reference last-step step_mean_delta = {prev_eval['step_mean_delta'][-1]:.4e}, "
      f"final predictions_mean_delta = {prev_eval['predictions_mean_delta'][-1]:.4e}")
print(f"peak RSS {rss_mb:.1f} MiB (after the imports: {BASELINE_MB:.1f} MiB)")
