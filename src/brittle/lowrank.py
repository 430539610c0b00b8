"""Rank-level attribution (ActSVD, Wei et al. 2024): the principal output directions of each linear layer on
calibration data, and reversible low-rank edits of the weights that remove them.

For a linear layer with canonical weight ``W`` (``[d_out, d_in]``, :func:`brittle.models.linear_weight`) and the
layer inputs ``X`` (``[N, d_in]``) at the response positions of the calibration examples, the output activations
are ``A = X W^T`` (``[N, d_out]``; a bias is not part of ``A``). Their top-``r`` right singular vectors ``V``
(``[d_out, r]``) span the ``r`` output directions the data uses most. Two edits, with ``P_v = V V^T``:

* top-``r`` removal:    ``W' = (I - P_v) W = W - V (V^T W)``;
* orthogonal removal:   ``W' = W - (I - P_u) P_s W`` with ``P_u = U U^T`` (top-``r_utility`` directions of the
  utility data) and ``P_s = S S^T`` (top-``r_safety`` directions of the safety data): the safety directions are
  removed only as far as they lie outside the utility subspace, so ``U^T W' x = U^T W x`` for every ``x``.
  ``rank(W - W') <= min(r_safety, d_out - r_utility)``. The paper's headline setting removes ~96 directions
  (``r_safety``) against a ~1096-dimensional utility subspace (``r_utility``; reference/seed-code-spec.md section
  3.2: the seed code's ``rank_pos``/``rank_neg`` are the *complements* of these ranks), so ``r_safety < r_utility``
  is the normal case, not an error.

Both edits are computed in fp32 in low-rank form (never a dense ``d_out x d_out`` projector) and cast once to the
weight's dtype. :func:`lowrank_modified` applies a plan (module name -> edit) and restores the original weights
bit-exactly on exit. Unlike the seed code, which edited layer after layer and recorded each layer's activations on
the already-edited model, the covariances here are recorded on the unmodified model in one pass.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .io import BrittleError
from .models import linear_modules, linear_weight, supports_logits_to_keep
from .scoring.compute import (
    CpuCopier,
    _as_btd,
    _encode_all,
    calibration_batches,
    pack_passes,
    select_modules,
)
from .scoring.methods import WANDA_POSITIONS, BatchInfo, activation_mask, get_method, response_rows

#: Where the output activations are taken: the same positions as Wanda's input statistics.
POSITIONS = WANDA_POSITIONS
#: Largest allowed ``max |B^T B - I|`` for a basis ``B`` to count as orthonormal (fp32 bases reach ~1e-6).
ORTHONORMAL_ATOL = 1e-4

# --------------------------------------------------------------------------------------------------
# Recording


def record_output_covariance(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Any],
    *,
    batch_size: int,
    max_length: int | None,
    modules: Iterable[str] | str | None = None,
    dtype: torch.dtype = torch.float32,
    max_accumulator_bytes: int | None = None,
    progress: bool = True,
    stats: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Per linear module, the uncentred second moment ``C = A^T A`` (``[d_out, d_out]``) of its output activations
    ``A = X W^T`` over the response positions (:data:`POSITIONS`) of ``examples``.

    One forward pass per batch serves all modules: a forward hook on each linear takes its input ``X`` at the
    response positions, forms ``A`` in ``dtype`` (fp32, or float64 when asked) from ``X`` and ``W`` and adds
    ``A^T A`` to an accumulator on the weight's device. Examples are encoded and batched exactly as for the Wanda
    scores (:func:`brittle.scoring.compute_scores`); an example left without response tokens is an error naming it.

    Why this is exact: with the thin SVD ``A = Q Sigma V^T``, ``A^T A = V Sigma^2 V^T``, so the eigenvectors of
    ``C`` for its ``r`` largest eigenvalues are the top-``r`` right singular vectors of ``A`` (eigenvalues =
    squared singular values), and ``C`` is a plain sum over tokens, so it can be accumulated batch by batch
    without keeping ``A`` (the seed code kept every ``X`` and ran ``torch.svd_lowrank``, an approximation).
    Memory: ``d_out^2`` accumulator elements per module (4 bytes each in fp32: 64 MiB for ``d_out = 4096``,
    462 MiB for 11008; about 42 GiB for all of Llama-2-7B; ``max_accumulator_bytes`` splits the modules over
    several passes over the data). A randomised SVD of ``A`` itself (``torch.svd_lowrank``) is preferable when
    ``d_out^2`` does not fit or ``d_out`` is much larger than the number of tokens (e.g. an ``lm_head`` over a
    large vocabulary), or when only ``r << d_out`` directions are needed and the ``O(d_out^3)``
    eigendecomposition of :func:`top_directions` is too slow; it needs ``A`` (``N x d_out``) in memory and its
    error depends on the spectral gap and the number of power iterations. With fewer tokens than ``d_out``, ``C``
    has rank at most ``N`` and directions beyond it are arbitrary.

    Args:
        modules: canonical names or fnmatch patterns (default: all linear modules of the decoder blocks).
        dtype: ``torch.float32`` or ``torch.float64`` for ``A`` and the accumulators.
        stats: if given, filled with ``n_examples``, ``n_tokens`` (non-padding input tokens),
            ``n_response_tokens`` (the rows of ``A``) and ``n_passes``.

    Returns:
        ``{canonical name: CPU tensor [d_out, d_out]}`` in ``linear_modules`` order (the sum over tokens, not the mean).
    """
    if batch_size < 1:
        raise BrittleError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in (torch.float32, torch.float64):
        raise BrittleError(f"covariance dtype must be torch.float32 or torch.float64, got {dtype}")
    encoded = _encode_all(tokenizer, examples, max_length, get_method("wanda"))  # same positions and errors as Wanda
    mods = select_modules(model, modules)
    names = list(mods)
    itemsize = torch.finfo(dtype).bits // 8
    passes = pack_passes([itemsize * linear_weight(mods[n]).shape[0] ** 2 for n in names], max_accumulator_bytes)
    batches = calibration_batches(tokenizer, encoded, batch_size)
    in_device = model.get_input_embeddings().weight.device
    extra = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * len(passes), desc="output covariance", unit="batch", dynamic_ncols=True)
    current: dict[str, BatchInfo] = {}  # the batch being run (its response positions)

    def hook_for(acc: torch.Tensor):  # one closure per module: each hook owns its accumulator
        def hook(module, args, output):
            batch = current["batch"]
            x = response_rows(_as_btd(args[0], *batch.shape), batch)  # [N, d_in]
            w = linear_weight(module).detach()
            a = x.to(device=acc.device, dtype=dtype) @ w.to(dtype).t()  # [N, d_out]
            acc.addmm_(a.t(), a)

        return hook

    out: dict[str, torch.Tensor] = {}
    n_resp = 0
    was_training = model.training
    model.eval()
    try:
        for pass_idx in passes:
            acc = {}
            for i in pass_idx:
                w = linear_weight(mods[names[i]])
                acc[names[i]] = torch.zeros(w.shape[0], w.shape[0], dtype=dtype, device=w.device)
            handles = [mods[n].register_forward_hook(hook_for(a)) for n, a in acc.items()]
            n_resp = 0
            try:
                for batch in batches:
                    mask = activation_mask(batch["labels"])
                    current["batch"] = BatchInfo(tuple(mask.shape), input_mask=mask)
                    n_resp += int(mask.sum())
                    with torch.no_grad():
                        model(input_ids=batch["input_ids"].to(in_device),
                              attention_mask=batch["attention_mask"].to(in_device), use_cache=False, **extra)
                    if bar is not None:
                        bar.update(1)
            finally:
                for h in handles:
                    h.remove()
            to_cpu = CpuCopier(acc.values())
            for n in list(acc):
                out[n] = to_cpu(acc.pop(n))  # one at a time: the device copy is freed at once
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if stats is not None:
        stats.update(n_examples=len(encoded), n_tokens=sum(len(e["input_ids"]) for e in encoded),
                     n_response_tokens=n_resp, n_passes=len(passes))
    return {n: out[n] for n in names}


# --------------------------------------------------------------------------------------------------
# Directions


def _check_rank(value: int, limit: int, what: str, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise BrittleError(f"{what} must be an integer in [1, {limit}] ({why}), got {value!r}")


def top_directions(cov: torch.Tensor, r: int) -> torch.Tensor:
    """The eigenvectors of the symmetric ``cov`` (``[d, d]``, from :func:`record_output_covariance`) for its ``r``
    largest eigenvalues: ``[d, r]`` fp32 with orthonormal columns, largest first, each column's largest-magnitude
    entry positive (deterministic signs). Computed in float64 on ``cov``'s device (``O(d^3)``: move ``cov`` to a
    GPU for ``d`` in the thousands). The directions are nested: for a sweep over ranks call it once with the largest
    ``r`` and slice ``V[:, :r]`` (one eigendecomposition per module, not one per rank)."""
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise BrittleError(f"a covariance must be square [d_out, d_out], got {tuple(cov.shape)}")
    _check_rank(r, cov.shape[0], "r", f"d_out = {cov.shape[0]}")
    c = cov.to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise BrittleError("the covariance has non-finite entries (overflow in the activations?)")
    _, vecs = torch.linalg.eigh((c + c.t()) / 2)  # ascending eigenvalues
    v = vecs[:, -r:].flip(1)
    signs = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    return (v * signs).to(torch.float32)


def random_directions(d_out: int, r: int, seed: int, *, device: str | torch.device | None = None) -> torch.Tensor:
    """A uniformly random ``r``-dimensional subspace of R^d_out (the random-subspace control): ``[d_out, r]`` fp32
    with orthonormal columns, from the QR decomposition (in float64) of a Gaussian matrix drawn from its own
    generator seeded with ``seed`` (the global RNG is neither used nor advanced)."""
    _check_rank(r, d_out, "r", f"d_out = {d_out}")
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(d_out, r, generator=gen, dtype=torch.float64).to(device or "cpu")
    q, rr = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(rr))).to(torch.float32)  # signs fixed: Haar-distributed, deterministic


def _check_basis(b: torch.Tensor, what: str) -> None:
    if b.dim() != 2 or b.shape[1] < 1 or b.shape[1] > b.shape[0]:
        raise BrittleError(f"{what} must be a [d_out, rank] matrix with 1 <= rank <= d_out, got {tuple(b.shape)}")
    if not b.is_floating_point() or not bool(torch.isfinite(b).all()):
        raise BrittleError(f"{what} must be a finite floating-point matrix")
    bf = b.to(torch.float32)
    err = float((bf.t() @ bf - torch.eye(b.shape[1], device=b.device)).abs().max())
    if err > ORTHONORMAL_ATOL:
        raise BrittleError(f"{what} must have orthonormal columns (max |B^T B - I| = {err:.3g} > {ORTHONORMAL_ATOL:g}; "
                           "pass fp32 bases from top_directions/random_directions, not bf16 or unnormalised ones)")


# --------------------------------------------------------------------------------------------------
# Edits


@dataclass(frozen=True, eq=False)
class TopRemoval:
    """``W' = W - V (V^T W)`` = ``(I - V V^T) W``: remove the ``r`` output directions ``V`` (``[d_out, r]``)."""

    V: torch.Tensor

    def __post_init__(self):
        _check_basis(self.V, f"V (r = {self.V.shape[-1]})")

    @property
    def rank(self) -> int:
        """Rank removed: ``r``."""
        return self.V.shape[1]

    def check(self, shape: tuple[int, int]) -> None:
        d_out, d_in = shape
        if self.V.shape[0] != d_out:
            raise BrittleError(f"V has {self.V.shape[0]} rows but the weight has d_out = {d_out}")
        _check_rank(self.rank, min(d_out, d_in), "r", f"at most min(d_out, d_in) = min({d_out}, {d_in})")

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        wf = w.to(torch.float32)
        v = self.V.to(device=w.device, dtype=torch.float32)
        return torch.addmm(wf, v, v.t() @ wf, alpha=-1).to(w.dtype)


@dataclass(frozen=True, eq=False)
class OrthogonalRemoval:
    """``W' = W - (I - U U^T) S S^T W``, computed as ``M = S (S^T W)``, ``W' = W - (M - U (U^T M))``: remove the
    safety directions ``S`` (``[d_out, r_safety]``) as far as they lie outside the utility subspace ``U``
    (``[d_out, r_utility]``). Any ``r_safety`` (also below ``r_utility``, the paper's setting) is allowed;
    ``r_utility`` must be below ``d_out`` (``U`` spanning everything leaves nothing to remove)."""

    U: torch.Tensor
    S: torch.Tensor

    def __post_init__(self):
        _check_basis(self.U, f"U (r_utility = {self.U.shape[-1]})")
        _check_basis(self.S, f"S (r_safety = {self.S.shape[-1]})")
        if self.U.shape[0] != self.S.shape[0]:
            raise BrittleError(f"U and S must have the same d_out, got {self.U.shape[0]} and {self.S.shape[0]}")

    @property
    def rank(self) -> int:
        """Upper bound on ``rank(W - W')``: ``min(r_safety, d_out - r_utility)`` (reached for generic subspaces)."""
        return min(self.S.shape[1], self.S.shape[0] - self.U.shape[1])

    def check(self, shape: tuple[int, int]) -> None:
        d_out, d_in = shape
        if self.S.shape[0] != d_out:
            raise BrittleError(f"U and S have {self.S.shape[0]} rows but the weight has d_out = {d_out}")
        limit = min(d_out, d_in)
        _check_rank(self.U.shape[1], min(limit, d_out - 1), "r_utility",
                    f"below d_out = {d_out}, else nothing is removed, and at most min(d_out, d_in) = {limit}")
        _check_rank(self.S.shape[1], limit, "r_safety", f"at most min(d_out, d_in) = min({d_out}, {d_in})")

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        wf = w.to(torch.float32)
        u = self.U.to(device=w.device, dtype=torch.float32)
        s = self.S.to(device=w.device, dtype=torch.float32)
        m = s @ (s.t() @ wf)  # P_s W
        return (wf - torch.addmm(m, u, u.t() @ m, alpha=-1)).to(w.dtype)  # W - (I - P_u) P_s W


def remove_directions(w: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """ActSVD top-``r`` removal ``W - V (V^T W)`` (fp32, cast once to ``w``'s dtype); ``r = V.shape[1]``."""
    edit = TopRemoval(V)
    edit.check(tuple(w.shape))
    return edit(w)


def orthogonal_removal(w: torch.Tensor, U: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """ActSVD orthogonal variant ``W - (I - U U^T) S S^T W`` (fp32, cast once to ``w``'s dtype)."""
    edit = OrthogonalRemoval(U, S)
    edit.check(tuple(w.shape))
    return edit(w)


#: A plan entry: an edit object, or any callable ``W [d_out, d_in] -> W'`` of the same shape.
Edit = TopRemoval | OrthogonalRemoval | Callable[[torch.Tensor], torch.Tensor]


def top_removal_plan(covs: Mapping[str, torch.Tensor], r: int) -> dict[str, TopRemoval]:
    """``{name: TopRemoval(top_directions(cov, r))}``."""
    return {n: TopRemoval(top_directions(c, r)) for n, c in covs.items()}


def orthogonal_plan(utility: Mapping[str, torch.Tensor], safety: Mapping[str, torch.Tensor], *, r_utility: int,
                    r_safety: int) -> dict[str, OrthogonalRemoval]:
    """``{name: OrthogonalRemoval(top r_utility of the utility covariance, top r_safety of the safety one)}``."""
    if set(utility) != set(safety):
        raise BrittleError(f"utility and safety covariances cover different modules: {sorted(set(utility) ^ set(safety))}")
    return {n: OrthogonalRemoval(top_directions(utility[n], r_utility), top_directions(safety[n], r_safety))
            for n in safety}


def random_plan(model: nn.Module, r: int, *, seed: int, modules: Iterable[str] | str | None = None
                ) -> dict[str, TopRemoval]:
    """The random-subspace control: per module a random ``r``-dimensional output subspace (:func:`random_directions`,
    seeded by ``seed`` and the module name, so each module's draw does not depend on which others are chosen)."""
    out = {}
    for n, m in select_modules(model, modules).items():
        d_out = linear_weight(m).shape[0]
        sub_seed = int.from_bytes(hashlib.sha256(f"{seed}:{n}".encode()).digest()[:8], "little")
        out[n] = TopRemoval(random_directions(d_out, r, sub_seed))
    return out


# --------------------------------------------------------------------------------------------------
# Applying a plan


def _validate_plan(modules: Mapping[str, nn.Module], plan: Mapping[str, Edit]) -> None:
    for name, edit in plan.items():
        if name not in modules:
            raise BrittleError(f"module '{name}' does not exist in this model (e.g. {next(iter(modules))})")
        if not callable(edit):
            raise BrittleError(f"plan entry for '{name}' is a {type(edit).__name__}, not an edit (TopRemoval, "
                               "OrthogonalRemoval or a callable W -> W')")
        if isinstance(edit, (TopRemoval, OrthogonalRemoval)):
            try:
                edit.check(tuple(linear_weight(modules[name]).shape))
            except BrittleError as e:
                raise BrittleError(f"{name}: {e}") from None


@contextlib.contextmanager
def lowrank_modified(model: nn.Module, plan: Mapping[str, Edit], *, offload: bool = False) -> Iterator[nn.Module]:
    """Replace the weight of every module named in ``plan`` by its edit inside the block; on exit (also when the
    body or an edit raises) write back the original tensors, bit-exactly.

    Every entry is validated before any weight changes. The originals are kept as full copies (as
    :func:`brittle.ablation.ablated` keeps the entries it zeroes, but here every entry changes): the size of the
    edited weights in their dtype, on their device, or in CPU memory with ``offload=True``. Transient memory
    while editing one module: about three fp32 copies of its weight.
    """
    modules = linear_modules(model)
    _validate_plan(modules, plan)
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, edit in plan.items():
                w = linear_weight(modules[name])
                new = edit(w.detach())
                if tuple(new.shape) != tuple(w.shape):
                    raise BrittleError(f"{name}: the edit returned shape {tuple(new.shape)}, expected {tuple(w.shape)}")
                saved[name] = w.detach().to("cpu", copy=True) if offload else w.detach().clone()
                w.copy_(new)
                del new
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                linear_weight(modules[name]).copy_(original)


def fraction_removed(model: nn.Module, plan: Mapping[str, Edit]) -> dict[str, float]:
    """Per module, the fraction of its rank the edit removes: ``rank / min(d_out, d_in)`` as the paper reports it
    (``r`` for top-``r`` removal, ``min(r_safety, d_out - r_utility)`` for the orthogonal variant, an upper bound)."""
    modules = linear_modules(model)
    _validate_plan(modules, plan)
    out = {}
    for name, edit in plan.items():
        if not hasattr(edit, "rank"):
            raise BrittleError(f"plan entry for '{name}' has no rank (a plain callable); cannot report its fraction")
        d_out, d_in = linear_weight(modules[name]).shape
        out[name] = edit.rank / min(d_out, d_in)
    return out


# --------------------------------------------------------------------------------------------------
# The rank sweep (stage ``lowrank``): the same loop, table, markdown and figure as the weight-level ablation


def target_modules(model: nn.Module, roles: Sequence[str] = ("all",)) -> dict[str, nn.Module]:
    """The linear modules whose role (``layers.{i}.{role}``) is one of ``roles`` (``("all",)``: every one), in
    ``linear_modules`` order; an unknown role is an error naming the model's roles."""
    modules = linear_modules(model)
    if tuple(roles) == ("all",):
        return modules
    known = list(dict.fromkeys(n.split(".", 2)[2] for n in modules))
    unknown = [r for r in roles if r not in known]
    if unknown:
        raise BrittleError(f"lowrank.targets: unknown role(s) {', '.join(unknown)} (this model's roles: "
                           f"{', '.join(known)}, or all)")
    return {n: m for n, m in modules.items() if n.split(".", 2)[2] in roles}


def check_sweep_ranks(modules: Mapping[str, nn.Module], ranks: Sequence[int],
                      orthogonal: Sequence[tuple[int, int]] = ()) -> None:
    """Every rank of a sweep fits every module: ``r <= min(d_out, d_in)`` (and ``r_utility < d_out``); the error
    names the first module that is too small and the largest rank that fits all of them."""
    if not modules:
        raise BrittleError("no linear modules to edit")
    shapes = {n: tuple(linear_weight(m).shape) for n, m in modules.items()}
    limit = min(min(s) for s in shapes.values())
    smallest = min(shapes, key=lambda n: min(shapes[n]))
    where = f"module {smallest} is {shapes[smallest][0]} x {shapes[smallest][1]} (d_out x d_in)"
    for r in ranks:
        _check_rank(r, limit, "lowrank.ranks: each rank", f"at most min(d_out, d_in) of every edited module; {where}")
    for r_u, r_s in orthogonal:
        u_limit = min(min(min(s), s[0] - 1) for s in shapes.values())
        _check_rank(r_u, u_limit, "lowrank.orthogonal: r_utility",
                    f"below d_out and at most min(d_out, d_in) of every edited module; {where}")
        _check_rank(r_s, limit, "lowrank.orthogonal: r_safety", f"at most min(d_out, d_in) of every edited module; {where}")


def _metric_columns() -> tuple[str, ...]:
    from .ablation import ABLATION_COLUMNS

    return ABLATION_COLUMNS[ABLATION_COLUMNS.index("fraction_removed") + 1:]


#: ``lowrank.csv``: the edit kind (``dense``, ``top_safety``, ``random``, ``orthogonal``), the rank ``r`` of the
#: top/random rows (``r_safety`` for orthogonal), the orthogonal pair, the mean fraction of rank removed, the metrics.
LOWRANK_COLUMNS = ("group", "rank", "r_utility", "r_safety", "fraction_removed", *_metric_columns())


def lowrank_layout():
    """The :class:`brittle.ablation.SweepLayout` of the rank sweep (``lowrank.csv``/``.md``/``.png``)."""
    from .ablation import SweepLayout

    return SweepLayout(
        "lowrank", LOWRANK_COLUMNS,
        "`rank` = output directions removed per module (`r`; `r_safety` for `orthogonal`, whose removed rank is at "
        "most min(r_safety, d_out - r_utility)); `fraction_removed` = removed rank / min(d_out, d_in), mean over the "
        "edited modules",
        "rank removed (% of min(d_out, d_in), mean over modules)")


def sweep_points(model: nn.Module, safety: Mapping[str, torch.Tensor], utility: Mapping[str, torch.Tensor] | None,
                 ranks: Sequence[int], orthogonal: Sequence[tuple[int, int]], *, seed: int,
                 kinds: Sequence[str] = ("top_safety", "random")) -> tuple[list, list[dict[str, Any]]]:
    """The points of the rank sweep (:class:`brittle.ablation.SweepPoint`, for :func:`brittle.ablation.run_sweep`)
    and the per-module fractions (rows ``label, module, d_out, d_in, rank, fraction``).

    ``safety``/``utility``: per edited module the top directions at the largest rank needed (nested: each point
    slices them). Per kind, then per rank: ``top_safety`` (the top-``r`` safety directions), ``random``
    (:func:`random_plan` with ``seed``, the same modules and ranks); then ``orthogonal`` per ``(r_utility,
    r_safety)``. Every plan is built and validated here, before any weight changes; each point rebuilds its plan
    when applied (slices and seeded draws: the same plan) and applies it with :func:`lowrank_modified`."""
    from .ablation import SweepPoint

    names = list(safety)
    modules = linear_modules(model)

    def top(r: int) -> Callable[[], dict[str, Edit]]:
        return lambda: {n: TopRemoval(safety[n][:, :r]) for n in names}

    def rand(r: int) -> Callable[[], dict[str, Edit]]:
        return lambda: random_plan(model, r, seed=seed, modules=names)

    def orth(r_u: int, r_s: int) -> Callable[[], dict[str, Edit]]:
        if utility is None or set(utility) != set(names):
            raise BrittleError("the orthogonal rows need the utility directions of the same modules")
        return lambda: {n: OrthogonalRemoval(utility[n][:, :r_u], safety[n][:, :r_s]) for n in names}

    specs = [(kind, f"{kind}-r{r}", {"rank": r, "r_utility": None, "r_safety": r if kind == "top_safety" else None},
              (top if kind == "top_safety" else rand)(r)) for kind in kinds for r in ranks]
    specs += [("orthogonal", f"orthogonal-u{r_u}-s{r_s}", {"rank": r_s, "r_utility": r_u, "r_safety": r_s},
               orth(r_u, r_s)) for r_u, r_s in orthogonal]
    points, per_module = [], []
    for kind, label, fields, make in specs:
        plan = make()
        fractions = fraction_removed(model, plan)  # validates the plan against the weights
        for n, f in fractions.items():
            d_out, d_in = linear_weight(modules[n]).shape
            per_module.append({"label": label, "module": n, "d_out": d_out, "d_in": d_in,
                               "rank": plan[n].rank, "fraction": f})
        frac = sum(fractions.values()) / len(fractions)
        del plan
        points.append(SweepPoint(kind, label, fields, frac,
                                 (lambda make=make: lowrank_modified(model, make())),
                                 f"{label}: removing {frac:.2%} of the rank of {len(fractions)} modules (mean)"))
    return points, per_module
