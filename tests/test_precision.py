"""bf16 autocast (the GPU default) keeps the physics: geometry and regression outputs stay float32."""

import pytest
import torch

from muonreg.data.dataset import MuonEventDataset, collate
from muonreg.data.features import HitFeatures
from muonreg.data.format import DatasetReader
from muonreg.data.simulate import SimulationConfig, write_simulated_dataset
from muonreg.models import MaskFormer
from muonreg.tasks import ObjectHitMaskTask, ObjectValidTask, WeightedPoolingObjectHitRegressionTask

from conftest import FIELDS

FEATURES = [
    "spacePoint_globEdgeLowX",
    "spacePoint_globEdgeLowY",
    "spacePoint_globEdgeLowZ",
    "spacePoint_driftR",
    "eta",
]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    config = SimulationConfig(pt_min=50, pt_max=200, pt_spectrum="flat_pt")
    path = write_simulated_dataset(
        tmp_path_factory.mktemp("bf16") / "ds", 40, seed=3, config=config, progress=False
    )
    reader = DatasetReader(path)
    dataset = MuonEventDataset(reader, HitFeatures(FEATURES, reader.hit_features), FIELDS, 2)
    return collate([dataset[i] for i in range(len(dataset))])


def test_bf16_autocast_keeps_hit_embedding_and_regression_at_high_pt(batch):
    torch.manual_seed(0)
    dim = 32
    regression = WeightedPoolingObjectHitRegressionTask(dim, len(FEATURES), FIELDS, pooling=["mean", "fit"])
    model = MaskFormer(
        len(FEATURES),
        dim=dim,
        heads=4,
        valid_task=ObjectValidTask(dim),
        hit_mask_task=ObjectHitMaskTask(dim),
        regression_task=regression,
    ).eval()
    model.input_norm.fit(batch["hit_x"], batch["hit_x_valid"])
    regression.fit_normalization(batch, batch["particle_valid"])
    torch.nn.init.normal_(regression.head[-1].weight, std=0.3)  # a head that corrects the fit
    embeddings = []
    model.input_net.register_forward_hook(lambda module, inputs, output: embeddings.append(output))
    truth = model.truth(batch)["particle_hit_valid"].float()

    def predict() -> dict[str, torch.Tensor]:
        """The regression on the truth assignment (so a threshold crossing cannot change the hits)."""
        out = model(batch)
        hit_x = model.input_norm(batch["hit_x"], batch["hit_x_valid"])
        inputs = model._regression_inputs(batch, out["hit_embed"], hit_x)
        return regression.predict(regression(query=out["query_embed"], hit_probability=truth, **inputs))

    with torch.no_grad():
        full = predict()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = predict()
    assert embeddings[1].dtype == torch.float32
    torch.testing.assert_close(embeddings[1], embeddings[0])  # coordinates enter in float32 under autocast
    valid = batch["particle_valid"]
    pt32, pt16 = full["track_truthMuon_pt"][valid], half["track_truthMuon_pt"][valid]
    assert pt16.dtype == torch.float32
    relative = ((pt16 - pt32) / pt32).abs().numpy()
    # stated tolerance: the bf16 encoder and decoder move the head's input; its correction, scaled by
    # the fit's error, moves pT by < 0.1 % at 50-200 GeV (bf16 regression outputs moved it by 1-2 %)
    assert relative.max() < 1e-3, relative.max()
    assert torch.equal(full["track_truthMuon_q"], half["track_truthMuon_q"])
    assert (full["track_truthMuon_eta"] - half["track_truthMuon_eta"])[valid].abs().max() < 1e-4


def test_the_evaluation_runs_in_float32_unless_asked_whatever_the_training_precision():
    """`evaluation.precision` (fp32 by default, also for checkpoints written before the key), not
    `trainer.precision`, sets the autocast of test evaluation and prediction."""
    from omegaconf import OmegaConf

    from muonreg.config import ConfigError
    from muonreg.training.device import evaluation_dtype

    cpu = torch.device("cpu")
    trained_in_bf16 = OmegaConf.create({"trainer": {"precision": "bf16"}, "evaluation": {}})
    assert evaluation_dtype(cpu, trained_in_bf16) is None
    trained_in_bf16.evaluation.precision = "bf16"
    assert evaluation_dtype(cpu, trained_in_bf16) is torch.bfloat16
    trained_in_bf16.evaluation.precision = "fp16"  # e.g. from `muonreg.evaluate --set`: never bf16 silently
    with pytest.raises(ConfigError, match=r"precision='fp16' must be one of \['auto', 'fp32', 'bf16'\]"):
        evaluation_dtype(cpu, trained_in_bf16)
