"""The PyTorch side of ``bench_libmtl.py``: LibMTL's own weighting classes on the benchmark MLP, driven as
LibMTL's ``Trainer`` drives them, timed in blocks on request.

It runs in a separate Python environment that has ``torch`` and ``LibMTL`` (not in this project's venv;
``benchmarks/README.md``, section "LibMTL side by side", says how to make one). ``bench_libmtl.py`` starts it
and talks to it by JSON lines: one request on stdin, one answer on stdout (everything else goes to stderr):

    {"cmd": "hello", "threads": 1}                    -> versions, the weightings LibMTL has
    {"cmd": "setup", "method": "MGDA", "rep_grad": false, "kwargs": {"mgda_gn": "none"}, "tasks": 4,
     "in_dim": 64, "hidden": [256, 256], "out_dim": 8, "batch": 256, "lr": 1e-3, "warmup": 5, "epoch": 2}
                                                       -> {"ok": true} or {"ok": false, "error": "..."}
    {"cmd": "time", "steps": 50}                      -> {"ok": true, "seconds": ...}
    {"cmd": "quit"}

The model is built the way ``LibMTL.Trainer._prepare_model`` builds it: ``class MTLmodel(HPS, Weighting)``
with ``init_param()``, an encoder ``Linear-ReLU-Linear-ReLU`` (the shared trunk) and one ``Linear`` decoder
per task; one step is the body of ``Trainer.train``'s batch loop for a single-input problem: the batch
(``batch`` rows drawn uniformly with replacement from a fixed data set in memory), the forward pass, the K
losses written into a ``torch.zeros(K)`` (MSE, as ``LibMTL.loss.MSELoss``), ``optimizer.zero_grad()``,
``model.backward(losses, **weight_args)`` and ``optimizer.step()`` (Adam), and for a weighting with ``update_w`` (FAMO, in LibMTL's later sources) the
Trainer's extra forward pass on the same batch under ``torch.no_grad()`` and ``model.update_w(new_losses)``.
Not timed: LibMTL's meter
(metrics and ``loss.item()`` bookkeeping) and the data loader.

One override, for torch >= 2.0: ``zero_grad_share_params`` calls ``encoder.zero_grad(set_to_none=False)``
(LibMTL 1.1.5 calls ``encoder.zero_grad()``, which since torch 2.0 sets the grads to None, and its
``_reset_grad`` then fails writing ``param.grad.data``; LibMTL's later sources make this same call).

For the same reason ``torch.symeig`` (removed in torch 2.x, called by the later sources' Aligned_MTL) is
mapped to ``torch.linalg.eigh`` with symeig's default (upper triangle).

``model.epoch`` is set to ``epoch`` (default 2) and ``model.train_loss_buffer`` to fixed positive losses of
epochs 0 and 1, so DWA and GradNorm take their per-epoch branches (weights from past losses, resp. the
GradNorm update), not their first-epoch equal weighting.

LibMTL is imported without running ``LibMTL/__init__.py`` (which imports the trainer, the architectures and
``LibMTL.model``, whose ResNet module needs ``torchvision.models.utils``, gone from torchvision): the package
and its ``weighting`` / ``architecture`` sub-packages are registered as empty namespace modules on their own
folders, so ``LibMTL.weighting.MGDA`` etc. load from LibMTL's files unchanged. ``--libmtl-src DIR`` (a
folder that contains ``LibMTL/``, e.g. a source checkout) is used instead of the installed package.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import random
import sys
import time
import traceback
import types


def load_libmtl(src: str | None):
    """(root folder of the LibMTL package, version string); registers the namespace stubs."""
    if src is not None:
        root = os.path.join(os.path.abspath(src), "LibMTL")
        if not os.path.isdir(root):
            raise SystemExit(f"--libmtl-src: no LibMTL/ folder in {src!r}")
        version = f"source {os.path.abspath(src)}"
    else:
        spec = importlib.util.find_spec("LibMTL")  # finds the package without executing its __init__
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("LibMTL is not installed in this Python (pip install --no-deps LibMTL)")
        root = list(spec.submodule_search_locations)[0]
        try:
            from importlib.metadata import version as dist_version
            version = dist_version("LibMTL")
        except Exception:  # pragma: no cover - a source tree on sys.path
            version = "unknown"
    for name, path in (("LibMTL", root), ("LibMTL.weighting", os.path.join(root, "weighting")),
                       ("LibMTL.architecture", os.path.join(root, "architecture"))):
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module
    return root, version


def weighting_class(name: str):
    return getattr(importlib.import_module(f"LibMTL.weighting.{name}"), name)


class Worker:
    def __init__(self, threads: int):
        import numpy as np
        import torch

        self.np, self.torch = np, torch
        torch.set_num_threads(threads)
        # LibMTL's Aligned_MTL (later sources) calls torch.symeig(M, eigenvectors=True), removed in torch 2.x
        # (it raises); torch's own replacement is torch.linalg.eigh (ascending eigenvalues, as symeig's).
        # symeig read the upper triangle, eigh the lower one: the same for the symmetric Gram matrix here.
        torch.symeig = lambda M, eigenvectors=False, upper=True: torch.linalg.eigh(M, UPLO="U" if upper else "L")
        self.device = torch.device("cpu")
        self.step_fn = None

    def setup(self, req: dict) -> dict:
        np, torch = self.np, self.torch
        nn, F = torch.nn, torch.nn.functional
        hps = importlib.import_module("LibMTL.architecture.HPS").HPS
        weighting = weighting_class(req["method"])
        K, in_dim, (h1, h2), out_dim = req["tasks"], req["in_dim"], req["hidden"], req["out_dim"]
        batch, seed = req["batch"], req.get("seed", 0)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

        # The same data as bench_libmtl.py's JAX side (the same NumPy draws).
        rng = np.random.default_rng(0)
        X = torch.from_numpy(rng.normal(size=(req["rows"], in_dim)).astype(np.float32))
        scales = np.asarray(req["scales"], np.float64)
        Y = rng.normal(size=(req["rows"], len(scales), out_dim))[:, :K] * scales[None, :K, None]
        Y = torch.from_numpy(Y.astype(np.float32))

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(in_dim, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU())

            def forward(self, x):
                return self.net(x)

        task_name = [f"task{k}" for k in range(K)]
        decoders = nn.ModuleDict({t: nn.Linear(h2, out_dim) for t in task_name})

        class MTLmodel(hps, weighting):   # LibMTL.Trainer._prepare_model
            def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, kwargs):
                super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
                self.init_param()

            def zero_grad_share_params(self):
                # LibMTL 1.1.5 calls encoder.zero_grad() and then writes into param.grad: written for
                # torch 1.x, whose zero_grad zeroed the grads; since torch 2.0 it sets them to None by
                # default and _reset_grad fails. LibMTL's later sources make exactly this call.
                self.encoder.zero_grad(set_to_none=False)

        model = MTLmodel(task_name=task_name, encoder_class=Encoder, decoders=decoders,
                         rep_grad=bool(req["rep_grad"]), multi_input=False, device=self.device,
                         kwargs={}).to(self.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=req["lr"])
        model.train()
        model.epoch = req.get("epoch", 2)
        buffer = np.zeros((K, model.epoch + 1))
        buffer[:, : model.epoch] = 1.0 + np.random.default_rng(1).random((K, model.epoch))
        model.train_loss_buffer = buffer
        weight_args = dict(req.get("kwargs", {}))
        gen = torch.Generator().manual_seed(seed)
        rows = X.shape[0]

        def task_losses(x, y):
            preds = model(x)
            losses = torch.zeros(K).to(self.device)
            for tn, task in enumerate(task_name):
                losses[tn] = F.mse_loss(preds[task], y[:, tn])
            return losses

        after_step = hasattr(model, "update_w")   # FAMO (later LibMTL): the Trainer updates its weights after the step

        def step():
            idx = torch.randint(0, rows, (batch,), generator=gen)
            x, y = X[idx], Y[idx]
            losses = task_losses(x, y)
            optimizer.zero_grad()
            model.backward(losses, **weight_args)
            optimizer.step()
            if after_step:
                with torch.no_grad():
                    model.update_w(task_losses(x, y).detach())

        self.step_fn = step
        for _ in range(req.get("warmup", 5)):
            step()
        return {"ok": True}

    def time(self, steps: int) -> dict:
        if self.step_fn is None:
            return {"ok": False, "error": "no setup"}
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step_fn()
        return {"ok": True, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--libmtl-src", default=None, help="folder containing LibMTL/ (default: the installed one)")
    args = parser.parse_args(argv)
    proto = sys.stdout
    sys.stdout = sys.stderr  # anything LibMTL prints must not mix with the answers
    root, version = load_libmtl(args.libmtl_src)
    worker = None

    def answer(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        cmd = req.get("cmd")
        try:
            if cmd == "quit":
                answer({"ok": True})
                return 0
            if cmd == "hello":
                worker = Worker(int(req.get("threads", 1)))
                import numpy
                import torch
                available = sorted(f[:-3] for f in os.listdir(os.path.join(root, "weighting"))
                                   if f.endswith(".py") and not f.startswith(("_", "abstract")))
                answer({"ok": True, "torch": torch.__version__, "libmtl": version, "numpy": numpy.__version__,
                        "python": sys.version.split()[0], "threads": torch.get_num_threads(),
                        "weightings": available})
            elif cmd == "setup":
                worker.step_fn = None
                answer(worker.setup(req))
            elif cmd == "time":
                answer(worker.time(int(req["steps"])))
            else:
                answer({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception as e:  # report, keep serving (one method failing must not end the run)
            traceback.print_exc(file=sys.stderr)
            answer({"ok": False, "error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
