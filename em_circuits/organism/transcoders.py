"""Per-layer skip transcoders for the organism, in circuit-tracer's on-disk format.

A transcoder of layer ``l`` reads the MLP input (``mlp.hook_in``, the output of
``post_attention_layernorm``) and reconstructs the MLP output (``mlp.hook_out``):

    pre  = x @ W_enc.T + b_enc
    acts = pre * (pre > threshold)          # JumpReLU, exactly what circuit-tracer applies
    y    = acts @ W_dec + x @ W_skip.T + b_dec

Training recipe: all layers are trained together (stacked tensors) with a TopK activation,
which fixes the sparsity without an L1 knob; then every feature gets a JumpReLU threshold that
reproduces its TopK firing rate, the decoder side is refit in closed form, and a short
fine-tune under the JumpReLU adapts all weights to the activation circuit-tracer will actually
use at load time. Its quality (:mod:`em_circuits.organism.quality`) is measured by the
pipeline's own code on the set as circuit-tracer loads it. Position 0 (BOS) is excluded
everywhere: circuit-tracer zeroes features and errors there, and its huge, context-free
activations would dominate the fit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from .lm import cosine_lr


@dataclass
class Activations:
    """MLP inputs and outputs of every layer at non-BOS, non-pad positions: (L, N, d)."""

    inputs: torch.Tensor
    outputs: torch.Tensor


def _mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MLP of every decoder layer of a Hugging Face causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no decoder layers at .model.layers (a ModuleList)"
        )
    mlps = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, torch.nn.Module):
            raise TypeError(f"decoder layer {i} ({type(layer).__name__}) has no .mlp module")
        mlps.append(mlp)
    return mlps


@torch.no_grad()
def collect_activations(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    batch_size: int = 64,
) -> Activations:
    """Run ``texts`` through the model and keep each MLP's input and output."""
    ins: list[list[torch.Tensor]] = [[] for _ in _mlps(model)]
    outs: list[list[torch.Tensor]] = [[] for _ in _mlps(model)]
    keep: torch.Tensor | None = None

    def hook(layer: int):
        def fn(module, args, output):
            ins[layer].append(args[0][keep])
            outs[layer].append(output[keep])

        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(_mlps(model))]
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True)
            keep = enc["attention_mask"].bool()
            keep[:, 0] = False  # BOS
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    return Activations(
        torch.stack([torch.cat(x) for x in ins]), torch.stack([torch.cat(x) for x in outs])
    )


class StackedTranscoders(torch.nn.Module):
    """One skip transcoder per layer, stored as stacked (L, ...) tensors for fast training."""

    threshold: torch.Tensor  # a registered buffer, (L, F)

    def __init__(self, n_layers: int, d_model: int, d_transcoder: int) -> None:
        super().__init__()
        L, d, F = n_layers, d_model, d_transcoder
        self.W_enc = torch.nn.Parameter(torch.zeros(L, F, d))
        self.b_enc = torch.nn.Parameter(torch.zeros(L, F))
        self.W_dec = torch.nn.Parameter(torch.zeros(L, F, d))
        self.b_dec = torch.nn.Parameter(torch.zeros(L, d))
        self.W_skip = torch.nn.Parameter(torch.zeros(L, d, d))
        # JumpReLU thresholds; None while training with TopK.
        self.register_buffer("threshold", torch.zeros(L, F))
        self.use_threshold = False

    @property
    def n_layers(self) -> int:
        return self.W_enc.shape[0]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(L, N, d) -> (L, N, F)."""
        return torch.baddbmm(self.b_enc[:, None, :], x, self.W_enc.transpose(1, 2))

    def activate(self, pre: torch.Tensor, k: int) -> torch.Tensor:
        if self.use_threshold:
            # Same forward as circuit-tracer's JumpReLU; the gradient reaches the weights
            # through the active units only (thresholds stay fixed).
            return pre * (pre > self.threshold[:, None, :])
        vals, idx = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def decode(self, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        skip = torch.bmm(x, self.W_skip.transpose(1, 2))
        return torch.baddbmm(self.b_dec[:, None, :] + skip, acts, self.W_dec)

    def forward(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        acts = self.activate(self.pre_acts(x), k)
        return self.decode(acts, x), acts

    def layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        """The tensors circuit-tracer's ``load_relu_transcoder`` reads, for one layer."""
        state = {
            "W_enc": self.W_enc[layer],
            "W_dec": self.W_dec[layer],
            "b_enc": self.b_enc[layer],
            "b_dec": self.b_dec[layer],
            "W_skip": self.W_skip[layer],
        }
        if self.use_threshold:
            state["activation_function.threshold"] = self.threshold[layer]
        return {k: v.detach().clone().contiguous().float() for k, v in state.items()}


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


@torch.no_grad()
def _init_from_data(tc: StackedTranscoders, acts: Activations, gen: torch.Generator) -> None:
    """Least-squares skip connection, data-sampled encoder rows, small random decoder rows.

    Starting W_skip/b_dec at the best affine map puts the features to work on what a linear map
    cannot explain (the MLP's nonlinearity) from step one; encoder rows copied from real inputs
    make every feature fire on some data at the start, which keeps the dead fraction low.
    """
    L, N, d = acts.inputs.shape
    F = tc.W_enc.shape[1]
    sub = torch.randperm(N, generator=gen)[: min(N, 20000)]
    for layer in range(L):
        x, y = acts.inputs[layer, sub], acts.outputs[layer, sub]
        xa = torch.cat([x, torch.ones(len(x), 1)], 1)
        sol = torch.linalg.lstsq(xa, y, driver="gelsd").solution  # (d+1, d)
        tc.W_skip[layer] = sol[:d].T
        tc.b_dec[layer] = sol[d]
        xc = x - x.mean(0)
        rows = xc[torch.randint(len(xc), (F,), generator=gen)]
        tc.W_enc[layer] = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-6)
        dec = torch.randn(F, d, generator=gen)
        tc.W_dec[layer] = 0.1 * y.std() * dec / dec.norm(dim=1, keepdim=True)


def _normalised_mse(y_hat: torch.Tensor, y: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Mean over layers of each layer's MSE / output variance (a batch estimate of FVU)."""
    return (((y_hat - y) ** 2).sum(-1).mean(-1) / var).mean()


def train_transcoders(
    acts: Activations,
    *,
    d_transcoder: int,
    k: int,
    steps: int,
    finetune_steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
) -> StackedTranscoders:
    """TopK training, JumpReLU threshold calibration, then a JumpReLU fine-tune."""
    gen = torch.Generator().manual_seed(seed)
    L, N, d = acts.inputs.shape
    tc = StackedTranscoders(L, d, d_transcoder)
    _init_from_data(tc, acts, gen)
    var = ((acts.outputs - acts.outputs.mean(1, keepdim=True)) ** 2).sum(-1).mean(-1)

    def run(n_steps: int, desc: str) -> None:
        opt = torch.optim.Adam(tc.parameters(), lr=lr, betas=(0.9, 0.999))
        bar = tqdm(
            _batches(N, batch_size, n_steps, gen),
            total=n_steps,
            desc=desc,
            disable=not progress,
            leave=False,
        )
        for step, idx in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, n_steps, lr)
            x, y = acts.inputs[:, idx], acts.outputs[:, idx]
            y_hat, _ = tc(x, k)
            loss = _normalised_mse(y_hat, y, var)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not tc.use_threshold:  # unit-norm decoder rows keep TopK scores comparable
                with torch.no_grad():
                    tc.W_dec.div_(tc.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
            if step % 50 == 0:
                bar.set_postfix(fvu=f"{loss.item():.3f}")

    run(steps, "transcoders (TopK)")
    calibrate_thresholds(tc, acts, k)
    tc.use_threshold = True
    refit_decoders(tc, acts, gen)
    if finetune_steps > 0:
        run(finetune_steps, "transcoders (JumpReLU)")
    return tc


@torch.no_grad()
def refit_decoders(
    tc: StackedTranscoders,
    acts: Activations,
    gen: torch.Generator,
    max_tokens: int = 30000,
    ridge: float = 1e-4,
) -> None:
    """Closed-form (ridge) refit of W_dec, W_skip and b_dec under the fixed JumpReLU encoder.

    Switching from TopK to thresholds changes which features fire; with the encoder fixed the
    best decoder is a linear least-squares problem, so solve it exactly instead of with SGD.
    """
    L, N, d = acts.inputs.shape
    F = tc.W_enc.shape[1]
    sub = torch.randperm(N, generator=gen)[: min(N, max_tokens)]
    for layer in range(L):
        x, y = acts.inputs[layer, sub], acts.outputs[layer, sub]
        pre = x @ tc.W_enc[layer].T + tc.b_enc[layer]
        a = pre * (pre > tc.threshold[layer])
        z = torch.cat([a, x, torch.ones(len(x), 1)], dim=1).double()
        gram = z.T @ z
        gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        sol = torch.linalg.solve(gram, z.T @ y.double()).float()  # (F + d + 1, d)
        tc.W_dec[layer] = sol[:F]
        tc.W_skip[layer] = sol[F : F + d].T
        tc.b_dec[layer] = sol[F + d]


@torch.no_grad()
def calibrate_thresholds(
    tc: StackedTranscoders, acts: Activations, k: int, max_tokens: int = 20000
) -> None:
    """Per-feature JumpReLU threshold that keeps the feature's TopK firing rate.

    For a feature that fired on a fraction f of tokens under TopK, the threshold is the
    (1 - f) quantile of its pre-activations, so it fires on about as many tokens (mean L0
    ~= k) but now decides on its own, as circuit-tracer's JumpReLU does. Thresholds are
    clamped positive: a JumpReLU with a negative threshold would pass negative activations.
    Features that never fired get an unreachable threshold (they stay dead).
    """
    x = acts.inputs[:, :max_tokens]
    pre = tc.pre_acts(x)  # (L, N, F)
    fired = (tc.activate(pre, k) > 0).float().mean(1)  # (L, F)
    n = pre.shape[1]
    sorted_pre = pre.sort(dim=1, descending=True).values  # (L, N, F)
    rank = (fired * n).round().long().clamp(1, n) - 1  # index of the last firing token
    thr = sorted_pre.gather(1, rank[:, None, :]).squeeze(1)
    # Midway between the last token that fires and the first that does not.
    nxt = sorted_pre.gather(1, (rank + 1).clamp(max=n - 1)[:, None, :]).squeeze(1)
    thr = 0.5 * (thr + nxt)
    thr = torch.where(fired > 0, thr, sorted_pre[:, 0] + 1.0)
    tc.threshold.copy_(thr.clamp_min(1e-3))


def save_transcoders(tc: StackedTranscoders, out_dir: Path, scan: str) -> Path:
    """Write ``layer_{i}.safetensors`` + ``config.yaml`` (relative paths); returns the config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for layer in range(tc.n_layers):
        name = f"layer_{layer}.safetensors"
        save_file(tc.layer_state(layer), str(out_dir / name))
        files.append(name)
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "scan": scan,
        "transcoders": files,
    }
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_stacked_transcoders(config_path: Path) -> StackedTranscoders:
    """Read a saved transcoder set back (to evaluate exactly what is on disk)."""
    config = yaml.safe_load(Path(config_path).read_text())
    states = [load_file(str(Path(config_path).parent / f)) for f in config["transcoders"]]
    F, d = states[0]["W_enc"].shape
    tc = StackedTranscoders(len(states), d, F)
    with torch.no_grad():
        for i, s in enumerate(states):
            for name in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip"):
                getattr(tc, name)[i] = s[name]
            # No threshold key means plain ReLU in circuit-tracer: a zero threshold.
            if "activation_function.threshold" in s:
                tc.threshold[i] = s["activation_function.threshold"]
    tc.use_threshold = True
    return tc
