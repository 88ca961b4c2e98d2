"""study.represent: the four representation analyses (issue #27 item 4) on debug models and a tiny synthetic cohort."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from neuro_models import registry as R
from study import checkpoint as ckpt
from study import represent as rep
from study.run_math import model_config
from study.spec import RunSpec


def _run(tmp_path, *argv):
    assert rep.main([*argv, "--storage", str(tmp_path), "--study-name", "r"]) == 0
    out = tmp_path / "r"
    cmd = argv[0]
    assert (out / f"{cmd}.png").stat().st_size > 5000
    return json.loads((out / f"{cmd}.json").read_text())


def test_autocorr_cli(tmp_path, tiny_cohort):
    res = _run(tmp_path, "autocorr", "--manifest", tiny_cohort, "--n-windows", "4")
    curves = res["curves"]
    cfg = R.get_config("swift_v2", "debug")
    # the input and every stage of both default models
    assert set(curves) == {"input"} | {f"{f}:debug (random init) / stage {s}" for f in ("swift_v2", "swift_v2_revised")
                                       for s in range(cfg.num_stages)}
    for v in curves.values():
        assert len(v) == 8 and v[0] == pytest.approx(1.0) and all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in v)
    assert res["tr_s"] > 0 and res["n_windows"] == 4
    # the synthetic input is temporally smooth at lag 1 only a little; the JSON holds a finite or null summary
    assert all(v is None or v >= 0 for v in res["decorrelation_lag_frames"].values())


def test_cka_cli(tmp_path, tiny_cohort):
    res = _run(tmp_path, "cka", "--manifest", tiny_cohort, "--n-windows", "6", "--model", "swift_v2:debug@16",
               "swift_v2:debug@32")
    M = np.asarray(res["cka"])
    assert len(res["labels"]) == 4 and M.shape == (4, 4)
    assert np.allclose(M, M.T) and np.allclose(np.diag(M), 1.0)
    assert ((M > -1e-9) & (M < 1 + 1e-9)).all()
    assert not res["debiased"] and "Kornblith" in res["estimator"]


def test_recon_cli(tmp_path, tiny_cohort):
    res = _run(tmp_path, "recon", "--manifest", tiny_cohort, "--n-windows", "3")
    cfg = R.get_config("swift_v2", "debug")
    assert res["mask_ratio"] == pytest.approx(cfg.mask_ratio, abs=0.1)
    assert np.isfinite(res["masked_mse"]) and res["masked_mse_predict_zero"] > 0
    vols = np.load(tmp_path / "r" / "recon.npz")
    assert vols["x"].shape == vols["recon"].shape == vols["mask"].shape == (3, 24, 24, 24, 8)
    assert set(np.unique(vols["mask"])) <= {0.0, 1.0}


def test_memory_cli(tmp_path):
    res = _run(tmp_path, "memory", "--lengths", "10", "20", "40", "--measure")
    pred = res["predicted_gib"]
    # swift_v2's 2-frame windows cannot tile 10 frames at 51M (5 tokens): recorded, not plotted
    assert pred["swift_v2"][0] is None and "10" in res["invalid"]["swift_v2"]
    for fam in ("swift_v2", "swift_v2_revised"):
        vals = [v for v in pred[fam] if v is not None]
        assert len(vals) >= 2 and all(b > a for a, b in zip(vals, vals[1:]))  # grows with the sequence
        meas = res["measured"]["saved_mib"][fam]
        assert all(b > a for a, b in zip(meas, meas[1:]))


def test_unpatchify_inverts_the_swift_patchify():
    from neuro_models.swift.layers import patchify

    x = torch.randn(2, 1, 12, 12, 6, 4)
    assert torch.equal(rep.unpatchify(patchify(x, (6, 6, 3, 2)), (6, 6, 3, 2), 1), x)


def test_recon_of_a_perfect_predictor_has_zero_error(tiny_cohort):
    """The plumbing (prediction -> voxels, token mask -> voxels, brain mask) is exact: a model that predicts its
    input has masked MSE 0, while the predict-0 baseline does not."""
    from neuro_models.swift.layers import patchify

    m = rep.load_model("swift_v2:debug", grid=(24, 24, 24), sequence_length=8)
    x, bm, _ = rep.load_windows(tiny_cohort, grid=(24, 24, 24), sequence_length=8, n_windows=2)

    class Perfect(torch.nn.Module):
        def forward(self, x, brain_mask=None, mask=None):
            return {"loss": torch.tensor(0.0), "pred": patchify(x, m.cfg.patch_size), "mask": mask}

    m.model = Perfect()
    res = rep.run_recon(m, x, bm)
    assert res["masked_mse"] == pytest.approx(0.0, abs=1e-12) and res["masked_mse_predict_zero"] > 0.1
    assert np.array_equal(res["recon"], res["x"])


def test_stage_embeddings_shapes():
    m = rep.load_model("swift_v2_revised:debug", grid=(24, 24, 24), sequence_length=8)
    emb = rep.stage_embeddings(m.model.encoder, torch.randn(2, 1, 24, 24, 24, 8))
    grids, dims = m.cfg.stage_grids(), m.cfg.stage_dims()
    assert [e.shape for e in emb] == [(2, *g, d) for g, d in zip(grids, dims)]


def test_weights_file_loads_its_own_architecture_and_tensors(tmp_path, tiny_cohort):
    spec = RunSpec(family="swift_v2", size="debug", grid=(24, 24, 24), sequence_length=8, task="pretrain")
    cfg = model_config(spec)
    torch.manual_seed(11)
    model = R.build_pretrain_model(cfg)
    (tmp_path / "ck").mkdir()
    torch.save(model.state_dict(), tmp_path / "ck" / "model.pt")
    w = ckpt.export_weights(tmp_path / "ck", tmp_path / "w.safetensors", model_config=cfg, spec_json=spec.to_json())
    # the file's grid and frames win over the arguments; its tensors, not the seed's init, are loaded
    loaded = rep.load_model(str(w), grid=(48, 48, 48), sequence_length=4, manifest=tiny_cohort, seed=0)
    assert loaded.spec.sequence_length == 8 and tuple(loaded.spec.grid) == (24, 24, 24) and loaded.weights
    x = torch.randn(1, 1, 24, 24, 24, 8)
    ref = rep.load_model("swift_v2:debug", grid=(24, 24, 24), sequence_length=8, seed=11)
    other = rep.load_model("swift_v2:debug", grid=(24, 24, 24), sequence_length=8, seed=0)
    a = rep.stage_embeddings(loaded.model.encoder, x)[-1]
    assert np.allclose(a, rep.stage_embeddings(ref.model.encoder, x)[-1], atol=1e-6)
    assert not np.allclose(a, rep.stage_embeddings(other.model.encoder, x)[-1], atol=1e-3)
    res = _run(tmp_path, "autocorr", "--manifest", tiny_cohort, "--n-windows", "2", "--model", str(w))
    assert res["models"][0]["weights"] == str(w)


def test_models_of_different_inputs_are_refused(tmp_path, tiny_cohort, capsys):
    spec = RunSpec(family="swift_v2", size="debug", grid=(24, 24, 24), sequence_length=4, task="pretrain")
    cfg = model_config(spec)
    (tmp_path / "ck").mkdir()
    torch.save(R.build_pretrain_model(cfg).state_dict(), tmp_path / "ck" / "model.pt")
    w = ckpt.export_weights(tmp_path / "ck", tmp_path / "w4.safetensors", model_config=cfg, spec_json=spec.to_json())
    assert rep.main(["cka", "--manifest", tiny_cohort, "--storage", str(tmp_path), "--model", str(w),
                     "swift_v2:debug"]) == 2
    assert "different inputs" in capsys.readouterr().err


class _Identity(torch.nn.Module):
    """An 'encoder' whose one stage's tokens are the voxels themselves: ``[B, X, Y, Z, T, 1]`` (its stages found as
    a SwiFT encoder's are, through the family's ``stage_modules``)."""

    def __init__(self):
        super().__init__()
        self.cfg = types.SimpleNamespace(family="swift_v2")
        self.stages = torch.nn.ModuleList([torch.nn.Identity()])

    def forward(self, x):
        return self.stages[0](x[:, 0, ..., None])


def test_autocorr_of_an_identity_encoder_equals_the_inputs(tiny_cohort):
    """Embeddings that are the input voxels have the input's curve: the time axis and the brain mask are read the
    same way on both sides (background voxels are constant and left out)."""
    x, bm, tr = rep.load_windows(tiny_cohort, grid=(24, 24, 24), sequence_length=8, n_windows=3)
    m = rep.LoadedModel("identity", None, torch.nn.Module(), None, None)
    m.model.encoder = _Identity()
    res = rep.run_autocorr([m], x, bm, tr=tr)
    assert np.allclose(res["curves"]["identity / stage 0"], res["curves"]["input"], atol=1e-10)
    # and the curve is not trivial: windows shuffled in time lose it
    xs = x[..., torch.randperm(8, generator=torch.Generator().manual_seed(0))]
    assert not np.allclose(rep.run_autocorr([m], xs, bm, tr=tr)["curves"]["input"], res["curves"]["input"], atol=1e-3)


def test_cka_of_a_model_with_itself_is_one(tiny_cohort):
    x, _, _ = rep.load_windows(tiny_cohort, grid=(24, 24, 24), sequence_length=8, n_windows=6)
    a = rep.load_model("swift_v2:debug", grid=(24, 24, 24), sequence_length=8, seed=3)
    b = rep.load_model("swift_v2:debug", grid=(24, 24, 24), sequence_length=8, seed=3)
    M = np.asarray(rep.run_cka([a, b], x, debiased=True)["cka"])
    assert M[0, 2] == pytest.approx(1.0, abs=1e-9) and M[1, 3] == pytest.approx(1.0, abs=1e-9)
