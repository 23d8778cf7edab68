"""``bnfold verify -j N``: the same reports as one process, in config order; a crashed worker fails its model only."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from click.testing import CliRunner

import bnfold
from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.parallel import verify_many
from tests.nets import _net  # the same small conv net as test_cli_verify


def crash_on_bad(**kwargs):
    """A stand-in for bnfold.verify that dies like a segfaulting custom op for the model named "bad"."""
    if kwargs["name"] == "bad":
        os.kill(os.getpid(), signal.SIGKILL)
    return bnfold.verify(**kwargs)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("project")
    x = (torch.randn(4, 3, 8, 8),)
    for name, trained in (("good", True), ("stale", False), ("other", True)):
        torch.export.save(torch.export.export(_net(trained), x), str(folder / f"{name}.pt2"))
    models = "\n".join(f'[[tool.bnfold.models]]\nname = "{n}"\npath = "{n}.pt2"\n' for n in ("good", "stale", "other"))
    (folder / "pyproject.toml").write_text(f'[tool.bnfold]\nchecks = ["audit", "fold"]\n\n{models}')
    return folder


def _document(result, path):
    assert result.exit_code == 1, result.output  # "stale" has never-learned statistics: BN004
    doc = json.loads(path.read_text())
    for model in doc["models"]:
        model.pop("timings")
        for check in model["checks"]:
            check.pop("seconds")
    for check in doc["checks"]:
        check.pop("seconds")
    return doc


def test_jobs_give_the_same_report_as_one_process(project, monkeypatch):
    monkeypatch.chdir(project)
    one = _document(CliRunner().invoke(main, ["verify", "--json", "one.json"]), project / "one.json")
    two = _document(CliRunner().invoke(main, ["verify", "-j", "2", "--json", "two.json"]), project / "two.json")
    assert one == two
    assert [m["model"] for m in two["models"]] == ["good", "stale", "other"]


def test_a_crashed_worker_fails_its_model_only(project):
    jobs = [{"model": project / f"{n}.pt2", "name": n, "checks": ("audit",)} for n in ("good", "other")]
    jobs.insert(1, {"model": project / "good.pt2", "name": "bad", "checks": ("audit",)})
    reports = verify_many(jobs, 2, function=crash_on_bad)
    assert [r.model for r in reports] == ["good", "bad", "other"]
    assert reports[0].ok and reports[2].ok and not reports[1].ok
    assert "killed by signal 9" in reports[1].checks[0].detail


def test_a_model_that_cannot_load_stops_the_run_as_without_jobs(project, tmp_path):
    jobs = [{"model": project / "good.pt2", "name": "good", "checks": ("audit",)},
            {"model": tmp_path / "missing.pt2", "name": "missing", "checks": ("audit",)}]
    with pytest.raises(BnfoldError, match="missing: .*no such file"):
        verify_many(jobs, 2)
