"""Weight groups: exact sizes, tie rule against a brute-force reference, set difference, random controls,
group files, summaries and the `brittle groups` command."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

import brittle.groups as G
from brittle.groups import (
    SCOPES,
    bottom_k,
    GroupError,
    GroupFileError,
    group_summary,
    load_group,
    magnitude_bin_ids,
    magnitude_matched_random,
    module_sort_key,
    random_like,
    save_group,
    selection_size,
    set_difference,
    top_k,
)
from brittle.io import BrittleError

SHAPES = [(1, 1), (1, 7), (3, 5), (8, 8), (17, 3), (2, 33)]
FRACTIONS = [0.01, 0.1, 0.25, 0.5, 0.77, 1.0]


def make_scores(seed: int, shapes=SHAPES, ties: bool = False, prefix: str = "layers") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, shape in enumerate(shapes):
        if ties:  # integer-valued: massive ties at every threshold
            out[f"{prefix}.{i}.q"] = torch.randint(0, 4, shape, generator=g).float()
        else:
            out[f"{prefix}.{i}.q"] = torch.rand(shape, generator=g)
    return out


def ref_top_k(scores, fraction, scope):
    """Brute force: first k of sorted(candidates, key=(-score, position))."""
    out = {n: torch.zeros(s.shape, dtype=torch.bool) for n, s in scores.items()}
    if scope == "row":
        for n, s in scores.items():
            for r in range(s.shape[0]):
                row = s[r].tolist()
                k = max(1, math.floor(round(fraction * len(row), 9)))
                for c in sorted(range(len(row)), key=lambda c: (-row[c], c))[:k]:
                    out[n][r, c] = True
        return out
    if scope == "matrix":
        units = [[n] for n in scores]
    else:
        units = [sorted(scores, key=module_sort_key)]
    for names in units:
        cands = [(-v, mi, i) for mi, n in enumerate(names) for i, v in enumerate(scores[n].reshape(-1).tolist())]
        k = max(1, math.floor(round(fraction * len(cands), 9)))
        for _, mi, i in sorted(cands)[:k]:
            out[names[mi]].view(-1)[i] = True
    return out


def positions(group):
    """The selected entries as a set of (module, flat index): set algebra independent of tensor masks."""
    return {(n, i) for n, m in group.items() for i, v in enumerate(m.reshape(-1).tolist()) if v}


def count(group):
    return {n: int(m.sum()) for n, m in group.items()}


# ---------------------------------------------------------------------------------------------------
# top_k


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_matches_brute_force(scope, ties):
    for seed in range(3):
        scores = make_scores(seed, ties=ties)
        for f in FRACTIONS:
            got, ref = top_k(scores, f, scope), ref_top_k(scores, f, scope)
            assert list(got) == list(scores)
            for n in scores:
                assert got[n].dtype == torch.bool and got[n].shape == scores[n].shape
                assert torch.equal(got[n], ref[n]), (scope, f, n, seed)


@pytest.mark.parametrize("scope", SCOPES)
def test_bottom_k_is_the_top_k_of_the_lowest_scores(scope):
    """bottom_k selects the k lowest per unit (ties: lower flat index), exactly as many as top_k, and for
    fractions up to 1/2 never an entry that top_k selects. Catches a reversed order, an off-by-one k and
    ties taken from the wrong end."""
    for seed in range(3):
        scores = make_scores(seed, ties=True)
        for f in FRACTIONS:
            got, ref = bottom_k(scores, f, scope), ref_top_k({n: -s for n, s in scores.items()}, f, scope)
            assert all(torch.equal(got[n], ref[n]) for n in scores), (scope, f, seed)
            top = top_k(scores, f, scope)
            if scope == "global":  # as many in all; the modules they fall in differ
                assert sum(count(got).values()) == sum(count(top).values())
            else:
                assert count(got) == count(top)
            if f <= 0.5:
                for n in scores:  # every bottom entry scores at most every top entry of its module
                    if got[n].any() and top[n].any() and scope == "matrix":
                        assert scores[n][got[n]].max() <= scores[n][top[n]].min()


@pytest.mark.parametrize("scope", SCOPES)
def test_top_k_exact_sizes(scope):
    scores = make_scores(7, shapes=[(5, 40), (13, 21), (64, 16)], ties=True)
    total = sum(s.numel() for s in scores.values())
    for f in [1e-6, 0.003, 0.05, 0.3, 0.999, 1.0]:
        g = top_k(scores, f, scope)
        if scope == "row":
            for n, s in scores.items():
                assert (g[n].sum(1) == max(1, math.floor(f * s.shape[1] + 1e-9))).all()
        elif scope == "matrix":
            for n, s in scores.items():
                assert count(g)[n] == max(1, math.floor(f * s.numel() + 1e-9))
        else:
            assert sum(count(g).values()) == max(1, math.floor(f * total + 1e-9))


def test_selection_size_uses_decimal_fraction():
    assert selection_size(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in binary floating point
    assert selection_size(1e-9, 10) == 1
    assert selection_size(1.0, 12) == 12
    assert selection_size(0.5, 7) == 3


def test_tie_rule_lower_flat_index_and_natural_module_order():
    flat = {"layers.0.q": torch.ones(4, 5)}
    assert top_k(flat, 0.3, "matrix")["layers.0.q"].view(-1).nonzero().view(-1).tolist() == [0, 1, 2, 3, 4, 5]
    assert (top_k(flat, 0.4, "row")["layers.0.q"] == torch.tensor([True, True, False, False, False])).all()
    # global: layers.2 comes before layers.10 (natural order), regardless of dict order
    scores = {"layers.10.q": torch.ones(2, 2), "layers.2.q": torch.ones(2, 2)}
    g = top_k(scores, 0.5, "global")
    assert list(g) == ["layers.10.q", "layers.2.q"]
    assert count(g) == {"layers.10.q": 0, "layers.2.q": 4}
    # higher score beats lower index; -0.0 == 0.0
    s = {"m": torch.tensor([[0.0, -0.0, 3.0, 3.0, 1.0]])}
    assert top_k(s, 0.6, "matrix")["m"].view(-1).tolist() == [False, False, True, True, True]
    assert top_k(s, 0.8, "matrix")["m"].view(-1).tolist() == [True, False, True, True, True]


def test_dtypes_and_inf():
    s = {"a": torch.tensor([[1, 5, 5, 2]], dtype=torch.int64), "b": torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16),
         "c": torch.tensor([[-math.inf, math.inf, 0.0]], dtype=torch.float64)}
    for scope in SCOPES:
        assert all(torch.equal(a, b) for a, b in zip(top_k(s, 0.5, scope).values(), ref_top_k(s, 0.5, scope).values(), strict=True))


@pytest.mark.parametrize("ties", [False, True])
def test_global_bracket_path_matches_brute_force(monkeypatch, ties):
    monkeypatch.setattr(G.select, "_GLOBAL_CONCAT_LIMIT", 50)
    monkeypatch.setattr(G.select, "_GLOBAL_SAMPLE", 40)
    scores = make_scores(3, shapes=[(9, 11), (4, 30), (1, 1), (20, 5)], ties=ties)
    for f in [0.001, 0.02, 0.3, 0.5, 0.9, 1.0]:
        got, ref = top_k(scores, f, "global"), ref_top_k(scores, f, "global")
        assert all(torch.equal(got[n], ref[n]) for n in scores), f


def test_global_bracket_widens_when_sample_misleads(monkeypatch):
    monkeypatch.setattr(G.select, "_GLOBAL_CONCAT_LIMIT", 100)
    monkeypatch.setattr(G.select, "_GLOBAL_SAMPLE", 1000)
    x = torch.arange(20000, dtype=torch.float32) + 1
    x[::20] = -torch.arange(1000, dtype=torch.float32)  # the strided sample sees only the negative entries
    stats: dict[str, int] = {}
    assert G.select._kth_largest([x], 10000, stats) == torch.sort(x, descending=True).values[9999].item()
    assert stats["rounds"] >= 2  # the first bracket was wrong and had to be widened
    scores = {"layers.0.q": x.view(100, 200)}
    for f in [0.05, 0.5, 0.97]:
        assert torch.equal(top_k(scores, f, "global")["layers.0.q"], ref_top_k(scores, f, "global")["layers.0.q"])


def test_top_k_large_matrix_fast():
    x = torch.rand(1024, 2048)
    x[:, ::3] = 0.5  # plenty of ties near the threshold
    for scope in SCOPES:
        g = top_k({"layers.0.up": x}, 0.5, scope)["layers.0.up"]
        if scope == "row":
            assert (g.sum(1) == 1024).all()
        else:
            assert int(g.sum()) == x.numel() // 2


# ---------------------------------------------------------------------------------------------------
# set difference


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("ties", [False, True])
def test_set_difference_properties(scope, ties):
    safety, utility = make_scores(1, ties=ties), make_scores(2, ties=ties)
    for p, q in [(0.1, 0.1), (0.5, 0.2), (0.05, 0.6), (1.0, 0.3)]:
        sd = set_difference(safety, utility, p, q, scope)
        # brute force on positions: the top-q safety entries that are not among the top-p utility entries
        top_safety, top_utility = positions(ref_top_k(safety, q, scope)), positions(ref_top_k(utility, p, scope))
        assert positions(sd) == top_safety - top_utility, (p, q)
        if p == 1.0:
            assert sum(count(sd).values()) == 0
        elif not ties and q > p:  # independent scores: some top-q safety entries survive
            assert positions(sd)


def test_set_difference_validation():
    a = make_scores(0)
    b = dict(a)
    b.pop("layers.3.q")
    with pytest.raises(GroupError, match=r"layers\.3\.q"):
        set_difference(a, b, 0.1, 0.1)
    c = dict(a)
    c["layers.2.q"] = torch.rand(5, 3)
    with pytest.raises(GroupError, match=r"layers\.2\.q.*\(3, 5\).*\(5, 3\)"):
        set_difference(a, c, 0.1, 0.1)
    with pytest.raises(GroupError, match="q must satisfy"):
        set_difference(a, a, 0.1, 0.0)
    # callers (the CLI) catch BrittleError to print the message without a traceback
    with pytest.raises(BrittleError, match="p must satisfy"):
        set_difference(a, a, 1.5, 0.1)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 5, float("nan"), float("inf"), True, "0.1", None])
def test_fraction_validation(bad):
    with pytest.raises(GroupError, match="fraction"):
        top_k(make_scores(0), bad, "matrix")


def test_other_validation():
    with pytest.raises(GroupError, match="did you mean 0.05"):
        top_k(make_scores(0), 5, "matrix")
    with pytest.raises(GroupError, match="valid scopes: row, matrix, global"):
        top_k(make_scores(0), 0.1, "layer")
    with pytest.raises(GroupError, match=r"layers\.0\.q.*NaN"):
        top_k({"layers.0.q": torch.tensor([[1.0, float("nan")]])}, 0.5, "matrix")
    with pytest.raises(GroupError, match="2-D"):
        top_k({"v": torch.rand(3, 4, 5)}, 0.5, "row")
    with pytest.raises(GroupError, match="non-empty"):
        top_k({}, 0.5, "matrix")


# ---------------------------------------------------------------------------------------------------
# random controls


def test_random_like_counts_determinism_and_subsets():
    group = top_k(make_scores(4, ties=True), 0.3, "row")
    r1, r2, r3 = random_like(group, 0), random_like(group, 0), random_like(group, 1)
    assert count(r1) == count(group)
    assert all(torch.equal(r1[n], r2[n]) for n in group)
    assert any(not torch.equal(r1[n], r3[n]) for n in group if 0 < count(group)[n] < group[n].numel())
    # independent of dict order and of the other modules
    names = list(group)
    rev = random_like({n: group[n] for n in reversed(names)}, 0)
    sub = random_like({names[3]: group[names[3]]}, 0)
    assert all(torch.equal(rev[n], r1[n]) for n in names)
    assert torch.equal(sub[names[3]], r1[names[3]])


def test_random_like_is_roughly_uniform():
    group = {"m": torch.zeros(10, 10, dtype=torch.bool)}
    group["m"][0, :5] = True
    hits = sum(random_like(group, s)["m"].float() for s in range(400))
    assert hits.sum() == 2000
    assert 5 < hits.min() and hits.max() < 40  # expected 20 each


def test_magnitude_matched_bins_and_counts():
    g = torch.Generator().manual_seed(0)
    weights = {f"layers.{i}.q": torch.randn(shape, generator=g) * (i + 1) for i, shape in enumerate([(16, 32), (40, 8), (3, 3)])}
    weights["layers.0.q"][:, :8] = 0.0  # a quarter exact zeros: tied |W| collapses bins
    scores = {n: w.abs() * torch.rand(w.shape, generator=g) for n, w in weights.items()}  # SNIP-like: scales with |W|
    group = top_k(scores, 0.2, "matrix")
    for bins in (1, 4, 10):
        mm = magnitude_matched_random(group, weights, seed=3, bins=bins)
        assert count(mm) == count(group)
        for n in group:
            b = magnitude_bin_ids(weights[n], bins)
            assert torch.equal(torch.bincount(b[group[n].view(-1)], minlength=bins),
                               torch.bincount(b[mm[n].view(-1)], minlength=bins))
        again = magnitude_matched_random(group, weights, seed=3, bins=bins)
        assert all(torch.equal(mm[n], again[n]) for n in group)
    other = magnitude_matched_random(group, weights, seed=4)
    assert any(not torch.equal(other[n], mm[n]) for n in group)
    # deciles of distinct values hold equally many entries
    b = magnitude_bin_ids(torch.randn(50, 20, generator=g), 10)
    assert torch.bincount(b).tolist() == [100] * 10


def test_magnitude_matched_validation():
    group = {"layers.0.q": torch.ones(2, 3, dtype=torch.bool)}
    with pytest.raises(GroupError, match=r"no weight for module 'layers\.0\.q'"):
        magnitude_matched_random(group, {"layers.1.q": torch.rand(2, 3)}, 0)
    with pytest.raises(GroupError, match=r"layers\.0\.q.*\(3, 2\)"):
        magnitude_matched_random(group, {"layers.0.q": torch.rand(3, 2)}, 0)
    with pytest.raises(GroupError, match="bins"):
        magnitude_matched_random(group, {"layers.0.q": torch.rand(2, 3)}, 0, bins=0)
    with pytest.raises(GroupError, match="torch.bool"):
        random_like({"m": torch.ones(2)}, 0)


# ---------------------------------------------------------------------------------------------------
# group files


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def test_group_file_round_trip_both_encodings(tmp_path):
    g = torch.Generator().manual_seed(0)
    group = {
        "layers.0.q": torch.rand(64, 48, generator=g) < 0.005,  # sparse -> indices
        "layers.0.up": torch.rand(33, 17, generator=g) < 0.4,  # dense -> bits (numel not a multiple of 8)
        "layers.1.q": torch.zeros(5, 3, dtype=torch.bool),  # empty
        "layers.1.up": torch.ones(7, 1, dtype=torch.bool),  # full
    }
    meta = {"definition": "set_difference", "params": {"p": 0.05, "q": 0.05, "scope": "matrix"}, "note": "x"}
    path = save_group(tmp_path / "g.safetensors", group, meta)
    loaded, lmeta = load_group(path)
    assert list(loaded) == list(group)
    assert all(torch.equal(loaded[n], group[n]) for n in group)
    assert lmeta["definition"] == "set_difference" and lmeta["note"] == "x"
    assert json.loads(lmeta["params"]) == {"p": 0.05, "q": 0.05, "scope": "matrix"}
    header, _ = _header(path)
    enc = {n: s["encoding"] for n, s in json.loads(header["__metadata__"]["brittle_group"])["modules"].items()}
    assert enc == {"layers.0.q": "indices", "layers.0.up": "bits", "layers.1.q": "indices", "layers.1.up": "bits"}
    assert header["layers.0.q"]["dtype"] == "I32" and header["layers.0.up"]["dtype"] == "U8"
    for forced in ("bits", "indices"):
        p = save_group(tmp_path / f"{forced}.safetensors", group, encoding=forced)
        assert all(torch.equal(load_group(p)[0][n], group[n]) for n in group)
    with pytest.raises(BrittleError, match="already exists"):
        save_group(path, group)
    save_group(path, group, overwrite=True)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.03, 0.2, 0.5, 1.0])
def test_group_file_at_most_one_bit_per_weight(tmp_path, density):
    g = torch.Generator().manual_seed(1)
    group = {f"layers.{i}.q": torch.rand(128, 96, generator=g) < density for i in range(3)}
    path = save_group(tmp_path / "g.safetensors", group)
    _, header_bytes = _header(path)
    payload = path.stat().st_size - header_bytes
    assert payload <= sum(math.ceil(m.numel() / 8) for m in group.values())
    assert all(torch.equal(load_group(path)[0][n], group[n]) for n in group)


def test_index_dtype_and_bad_files(tmp_path):
    assert G.files._index_dtype(2**31 - 1) == torch.int32 and G.files._index_dtype(2**31) == torch.int64
    with pytest.raises(GroupFileError, match="not found"):
        load_group(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(GroupFileError, match="not a brittle group file"):
        load_group(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(GroupFileError, match="cannot read"):
        load_group(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------------
# summary


def test_group_summary():
    a = {"layers.0.q": torch.tensor([[1, 1, 0, 0]], dtype=torch.bool), "layers.1.q": torch.tensor([[1, 0, 0, 0]], dtype=torch.bool),
         "layers.0.up": torch.zeros(2, 2, dtype=torch.bool)}
    b = {"layers.0.q": torch.tensor([[0, 1, 1, 0]], dtype=torch.bool), "layers.1.q": torch.tensor([[1, 0, 0, 0]], dtype=torch.bool),
         "layers.0.up": torch.zeros(2, 2, dtype=torch.bool)}
    df = group_summary({"top_safety": a, "top_utility": b})
    mod = df[df.level == "module"].set_index("module")
    assert mod.loc["layers.0.q", "jaccard"] == pytest.approx(1 / 3)
    assert mod.loc["layers.1.q", "jaccard"] == 1.0
    assert math.isnan(mod.loc["layers.0.up", "jaccard"])
    assert mod.loc["layers.0.q", "top_safety_share"] == 0.5
    total = df[df.level == "total"].iloc[0]
    assert total["numel"] == 12 and total["top_safety"] == 3 and total["jaccard"] == pytest.approx(2 / 4)
    by_type = df[df.level == "type"].set_index("type")
    assert by_type.loc["q", "numel"] == 8 and by_type.loc["q", "intersection"] == 2
    by_layer = df[df.level == "layer"].set_index("layer")
    assert by_layer.loc[0, "numel"] == 8 and by_layer.loc[1, "top_utility"] == 1
    assert "| unit |" in G.summary_markdown(df)
    with pytest.raises(GroupError, match=r"layers\.0\.up"):
        group_summary({"a": a, "b": {k: v for k, v in b.items() if k != "layers.0.up"}})


# ---------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smol_tokenizer):
    from brittle.models import linear_modules, linear_weight, weight_fingerprint
    from brittle.scoring import save_scores
    from brittle.testing import tiny_model

    root = tmp_path_factory.mktemp("groups_cli")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    smol_tokenizer.save_pretrained(root / "model")
    fp = weight_fingerprint(model)
    weights = {n: linear_weight(m).detach().clone() for n, m in linear_modules(model).items()}
    g = torch.Generator().manual_seed(0)
    paths = {}
    for kind in ("safety", "utility"):
        scores = {n: (w.abs() * torch.rand(w.shape, generator=g)).contiguous() for n, w in weights.items()}
        paths[kind] = root / f"{kind}.safetensors"
        save_scores(paths[kind], scores, {"model": str(root / "model"), "model_hash": fp})
    return root, paths, weights


def meta_of(paths):
    from brittle.scoring import read_metadata

    return read_metadata(paths["safety"])


def _invoke(*args):
    from typer.testing import CliRunner

    from brittle.cli import app

    return CliRunner().invoke(app, ["groups", *map(str, args)])


def test_cli_groups_end_to_end(tiny_run, tmp_path):
    root, paths, weights = tiny_run
    out = tmp_path / "run"
    args = ["--safety", paths["safety"], "--utility", paths["utility"], "--top", 0.01, "--p", 0.05, "--q", 0.1,
            "--scope", "matrix", "--seed", 0, "--out", out]
    res = _invoke(*args)
    assert res.exit_code == 0, res.output
    assert "set_difference selects" in res.output
    groups = {}
    for name in G.GROUP_NAMES:
        groups[name], gmeta = load_group(out / "groups" / f"{name}.safetensors")
        assert json.loads(gmeta["params"])["scope"] == "matrix"
    assert gmeta["definition"] == "magnitude_matched_random" and "sha256" in gmeta["sources"]
    assert set(groups["top_safety"]) == set(weights)
    sd = groups["set_difference"]
    assert count(groups["random"]) == count(sd) == count(groups["random_magnitude"])
    for n, w in weights.items():
        b = magnitude_bin_ids(w, 10)
        assert torch.equal(torch.bincount(b[sd[n].view(-1)], minlength=10),
                           torch.bincount(b[groups["random_magnitude"][n].view(-1)], minlength=10))
        assert count(groups["top_safety"])[n] == max(1, math.floor(0.01 * w.numel()))
    from safetensors.torch import load_file

    safety, utility = load_file(str(paths["safety"])), load_file(str(paths["utility"]))
    expect = set_difference(safety, utility, 0.05, 0.1, "matrix")
    assert all(torch.equal(sd[n], expect[n]) for n in weights)
    manifest = json.loads((out / "groups" / "manifest.json").read_text())
    assert manifest["stage"] == "groups" and manifest["inputs"]["model_weights"] == G.score_model_hash(meta_of(paths))
    assert manifest["outputs"]["set_difference"]["count"] == sum(count(sd).values())
    assert (out / "groups" / "summary.csv").exists() and (out / "groups" / "summary.md").exists()
    res = _invoke(*args)  # the same again: reused
    assert res.exit_code == 0 and "reusing" in res.output, res.output
    # other settings: refused without --force, naming what differs
    res = _invoke(*args, "--no-magnitude", "--scope", "global")
    assert res.exit_code == 2 and "config.magnitude, config.scope" in res.output and "--force" in res.output
    res = _invoke(*args, "--force", "--no-magnitude", "--scope", "global")
    assert res.exit_code == 0, res.output
    assert not (out / "groups" / "random_magnitude.safetensors").exists()


def test_cli_groups_errors(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from brittle.scoring import save_scores

    root, paths, _ = tiny_run
    other = tmp_path / "other.safetensors"
    save_scores(other, load_file(str(paths["utility"])), {"model": "x", "model_hash": "f" * 64})
    res = _invoke("--safety", paths["safety"], "--utility", other, "--out", tmp_path / "a")
    assert res.exit_code == 2 and "different models" in res.output
    res = _invoke("--safety", paths["safety"], "--utility", paths["utility"], "--q", 5, "--out", tmp_path / "b")
    assert res.exit_code == 2 and "did you mean 0.05" in res.output and not (tmp_path / "b").exists()
    res = _invoke("--safety", paths["safety"], "--utility", paths["utility"], "--scope", "layer", "--out", tmp_path / "c")
    assert res.exit_code == 2 and "'row', 'matrix' or 'global'" in res.output
    # a safetensors file that brittle did not write is refused with a clear message
    plain = tmp_path / "plain-scores.safetensors"
    save_file(load_file(str(paths["safety"])), str(plain))
    res = _invoke("--safety", plain, "--utility", paths["utility"], "--out", tmp_path / "g")
    assert res.exit_code == 2 and "not a brittle score file" in res.output
    # no model named anywhere: the magnitude control needs --model (or --no-magnitude)
    bare = {}
    for kind in ("safety", "utility"):
        bare[kind] = tmp_path / f"bare-{kind}.safetensors"
        save_scores(bare[kind], load_file(str(paths[kind])), {})
    res = _invoke("--safety", bare["safety"], "--utility", bare["utility"], "--out", tmp_path / "d")
    assert res.exit_code == 2 and "--model" in res.output
    res = _invoke("--safety", bare["safety"], "--utility", bare["utility"], "--model", root / "model", "--out", tmp_path / "e")
    assert res.exit_code == 0, res.output
    res = _invoke("--safety", bare["safety"], "--utility", bare["utility"], "--no-magnitude", "--out", tmp_path / "f")
    assert res.exit_code == 0 and not (tmp_path / "f" / "groups" / "random_magnitude.safetensors").exists()
