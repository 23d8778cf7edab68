"""bnfold recalibrate: exact population statistics, nothing else touched, distributed == single process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.recalibrate import recalibrate
from models import zoo

MEANS, STDS = torch.tensor([5.0, -1.0, 0.0]), torch.tensor([1.0, 2.0, 3.0])


def data(n: int = 600, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64).float() * STDS.view(1, 3, 1, 1) + MEANS.view(1, 3, 1, 1)


def two_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()


@pytest.mark.parametrize("method", ["layerwise", "global"])
def test_first_layer_gets_the_population_statistics(method):
    x = data()
    result = recalibrate(two_layer(), list(x.split(64)), method=method)
    flat = x.double().transpose(0, 1).reshape(3, -1)
    bn = result.model[0]
    torch.testing.assert_close(bn.running_mean.double(), flat.mean(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), flat.var(1, unbiased=True), rtol=1e-6, atol=1e-5)
    assert result.samples == 600 and result.layers[0].samples == 600 * 16


def test_layerwise_sees_what_inference_sees():
    """Layer by layer, a later BN's statistics are those of its input computed with the *new* earlier BN."""
    x = data()
    result = recalibrate(two_layer(), list(x.split(64)))
    model = result.model
    with torch.no_grad():
        h = model[2](model[1](model[0](x))).double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(model[3].running_mean.double(), h.mean(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(model[3].running_var.double(), h.var(1), rtol=1e-5, atol=1e-6)

def test_exact_population_variance_not_an_average_of_batch_variances():
    """Batches with very different means: averaging per-batch variances misses the spread between them."""
    x = data()
    sorted_x = x[x[:, 0].mean((1, 2)).argsort()]
    shuffled = recalibrate(two_layer(), list(x.split(64))).model[0].running_var
    by_mean = recalibrate(two_layer(), list(sorted_x.split(64))).model[0].running_var
    torch.testing.assert_close(by_mean, shuffled, rtol=1e-5, atol=1e-5)  # the batching does not matter
    per_batch = torch.stack([b.double().transpose(0, 1).reshape(3, -1).var(1) for b in sorted_x.split(64)]).mean(0)
    assert per_batch[0] < 0.97 * by_mean[0].double()  # what a per-batch average would have reported


def test_nothing_else_changes_and_input_untouched():
    model = two_layer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = model[0].momentum
    result = recalibrate(model, lambda: data().split(100))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input model is untouched
    after = result.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"0.running_mean", "0.running_var", "3.running_mean", "3.running_var"}
    assert result.model[0].momentum == momentum and not result.model.training
    assert [d.name for d in result.layers] == ["0", "3"]
    assert result.layers[0].mean_shift > 4  # old mean 0 vs data mean 5 (std 1)


def test_samples_cap_and_skips():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    result = recalibrate(model, data().split(64), samples=100)
    assert result.samples == 100
    assert result.skipped == [("1", "no running statistics (track_running_stats=False)")]


def _worker(rank: int, world: int, store: str, x: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        shard = x[rank::world]
        result = recalibrate(two_layer(), list(shard.split(50)))
        if rank == 0:
            torch.save(result.model.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process(tmp_path):
    x = data(500)
    out = tmp_path / "dist.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), x, str(out)), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)
    single = recalibrate(two_layer(), list(x.split(50))).model.state_dict()
    for key in ("0.running_mean", "0.running_var", "3.running_mean", "3.running_var"):
        torch.testing.assert_close(distributed[key], single[key], rtol=1e-5, atol=1e-6)


def test_cli_recalibrate_and_verify_stale_statistics(tmp_path, in_root):
    state = tmp_path / "digits.pt"
    torch.save(zoo.build("resnet_digits").state_dict(), state)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(size=(200, 1, 8, 8)).astype(np.float32))
    arch = ["--arch", "models.zoo:resnet_digits"]
    runner = CliRunner()
    result = runner.invoke(main, ["recalibrate", str(state), "--data", str(calib), *arch, "-o", str(tmp_path / "r.pt")])
    assert result.exit_code == 0, result.output
    assert "Recalibrated on 200 inputs (layerwise)" in result.output
    # The randomised statistics are stale for this data; the recalibrated ones are not.
    verify = ["verify", "--input-shape", "4,1,8,8", "--data", str(calib), "--skip", "onnx", *arch]
    stale = runner.invoke(main, [*verify[:1], str(state), *verify[1:]])
    assert stale.exit_code == 0 and "BN013" in stale.output  # a warning: reported, not failed
    fresh = runner.invoke(main, [*verify[:1], str(tmp_path / "r.pt"), *verify[1:]])
    assert fresh.exit_code == 0 and "BN013" not in fresh.output, fresh.output
    bad = runner.invoke(main, ["recalibrate", str(state), "--data", str(tmp_path / "nope.npz"), *arch])
    assert bad.exit_code == 2 and bad.output.startswith("error: ")


def test_python_api_is_exported():
    assert bnfold.recalibrate is recalibrate
