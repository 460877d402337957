"""The learning-rate recipe (training/recipe.py) and the compiled dense part (train.compile).

Rates scale with the global batch from ``train.lr_reference_batch``; a raised rate starts with a
warm-up that reaches both optimizers (Adam on the dense part, the fused Adagrad of the tables);
``train.compile`` trains the same steps as the eager model, under TorchRec's train pipeline too.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures import small_demo_work
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from pipelines.training_set import load_manifest
from recsys_moe.config import DEMO_CONFIG, Config, TrainConfig, load_config
from recsys_moe.training.loggers import TrainingDiverged
from recsys_moe.training.module import TrainModule
from recsys_moe.training.recipe import build_scheduler, scaled_rates, schedule_factor
from recsys_moe.training.train import CACHE_ENV, _torch_cache_dir, compile_cache, train

SMALL = [
    "synth.users=150", "synth.items=60", "synth.days=4",
    "train.epochs=2", "train.batch_size=512", "train.log_every=2",
    "model.expert_dims=[16]", "model.tower_dims=[8]", "mlflow.experiment=recipe",
]  # fmt: skip


def test_rates_scale_with_the_global_batch() -> None:
    t = TrainConfig(batch_size=2048, lr=1e-3, embedding_lr=0.1, lr_reference_batch=512)
    one, two = scaled_rates(t, 1, 100), scaled_rates(t, 2, 100)
    assert one.global_batch == 2048 and two.global_batch == 4096
    # the defaults: the tables' rate linear in the batch (auto, up to 16x), Adam's as given
    assert one.lr == 1e-3 and one.embedding_lr == pytest.approx(0.4)
    assert two.lr == 1e-3 and two.embedding_lr == pytest.approx(0.8)
    assert one.warmup_steps == 5  # auto: 5 % of 100 steps, the rates were raised
    both = TrainConfig(batch_size=2048, lr=1e-3, embedding_lr=0.1, lr_scaling="sqrt",
                       embedding_lr_scaling="sqrt")  # fmt: skip
    rates = scaled_rates(both, 2, 100)
    assert rates.lr == pytest.approx(1e-3 * 8**0.5) and rates.embedding_lr == pytest.approx(
        0.1 * 8**0.5
    )
    linear = TrainConfig(batch_size=2048, lr=1e-3, lr_scaling="linear", embedding_lr_scaling="none")
    rates = scaled_rates(linear, 1, 100)
    assert rates.lr == pytest.approx(4e-3) and rates.embedding_lr == pytest.approx(0.05)
    # at the reference batch, or below it, nothing changes and nothing warms up
    same = scaled_rates(TrainConfig(batch_size=512, lr=1e-3), 1, 100)
    assert (same.lr, same.embedding_lr, same.warmup_steps) == (1e-3, 0.05, 0)
    small = scaled_rates(TrainConfig(batch_size=128, embedding_lr=0.1), 1, 100)
    assert small.embedding_lr == pytest.approx(0.025) and small.warmup_steps == 0
    fixed = scaled_rates(TrainConfig(batch_size=512, warmup_steps=7), 1, 100)
    assert fixed.warmup_steps == 7


def test_auto_recipe_follows_the_batch_size() -> None:
    """The measured large-batch recipe (recipe.py, benchmarks/README.md) as the demo config gets
    it: tables x16 at 8192 rows, x32 (not x64) at 32768, Adam as given with a 5 % warm-up up
    to 8192 (Muon beyond, without: test_muon.py), no decay;
    at the reference batch the demo's own settings exactly (linear decay, no warm-up)."""
    demo = load_config(DEMO_CONFIG).train
    assert (demo.lr_schedule, demo.embedding_lr_scaling) == ("auto", "auto")
    assert demo.lr_scaling == "none"

    def at(batch: int, world_size: int = 1, steps: int = 93) -> tuple[float, float, int, str]:
        r = scaled_rates(replace(demo, batch_size=batch), world_size, steps)
        return r.lr, r.embedding_lr, r.warmup_steps, r.schedule

    assert at(512, steps=5928) == (5e-3, 0.1, 0, "linear")  # the demo, unchanged
    assert at(128) == pytest.approx((5e-3, 0.025, 0, "linear"))  # smaller: linear down, decay
    assert at(2048) == pytest.approx((5e-3, 0.4, 5, "constant"))
    assert at(8192, steps=372) == pytest.approx((5e-3, 1.6, 19, "constant"))
    # Muon: no warm-up (test_muon), a cool-down over the last 20 % of the steps
    assert at(32768) == pytest.approx((5e-3, 3.2, 0, "wsd"))
    adam = replace(demo, batch_size=32768, dense_optimizer="adam")
    assert scaled_rates(adam, 1, 93).schedule == "constant"  # Adam above the reference: none
    assert at(16384, world_size=2) == at(32768)  # the global batch counts
    assert at(131072)[1] == pytest.approx(0.1 * 16 * 4**1.0)  # sqrt beyond 16x: x64 at 256x
    # continuous where linear hands over to sqrt
    below, above = (
        scaled_rates(TrainConfig(batch_size=b, embedding_lr=1.0, lr_reference_batch=100), 1, 10)
        for b in (1600, 1601)
    )
    assert below.embedding_lr == 16.0
    assert above.embedding_lr == pytest.approx(16.0 * (1601 / 1600) ** 0.5)
    # an explicit schedule is kept at any batch, and auto is resolved before a scheduler sees it
    assert scaled_rates(TrainConfig(batch_size=8192, lr_schedule="linear"), 1, 9).schedule == (
        "linear"
    )
    with pytest.raises(ValueError, match="lr schedule 'auto': expected one of constant, linear"):
        schedule_factor(0, "auto", 10, 0)


def test_schedule_warms_up_then_decays() -> None:
    f = [schedule_factor(s, "linear", 10, 4) for s in range(10)]
    assert f[:4] == pytest.approx([0.25 * 1.0, 0.5 * 0.9, 0.75 * 0.8, 1.0 * 0.7])
    assert f[4:] == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    assert [schedule_factor(s, "constant", 10, 0) for s in range(3)] == [1.0, 1.0, 1.0]
    seen = _rates_seen(0.4, 6, "constant", 10, warmup_steps=4)
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def _rates_seen(lr: float, steps: int, *args: Any, **kwargs: Any) -> list[float]:
    """The rate each of ``steps`` optimizer steps takes under ``build_scheduler(opt, *args)``."""
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, *args, **kwargs)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_wsd_holds_the_rate_then_cools_down_over_the_last_share() -> None:
    """wsd: 1 until the last cooldown_share of the steps, then linear to 0 at the end (its last
    step at 1/cooldown of the rate); a warm-up multiplies it as it does the others."""
    f = [schedule_factor(s, "wsd", 10, 0, cooldown_share=0.3) for s in range(10)]
    assert f == pytest.approx([1.0] * 8 + [2 / 3, 1 / 3])
    assert schedule_factor(10, "wsd", 10, 0, cooldown_share=0.3) == 0.0
    assert [schedule_factor(s, "wsd", 93, 0) for s in (0, 74, 75, 92)] == pytest.approx(
        [1.0, 1.0, 18 / 18.6, 1 / 18.6]
    )
    warm = [schedule_factor(s, "wsd", 10, 4, cooldown_share=0.5) for s in range(10)]
    assert warm[:6] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert warm[6:] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    # a run shorter than the cool-down: at least one step's decay, never a factor above 1
    assert schedule_factor(0, "wsd", 1, 0) == 1.0
    seen = _rates_seen(1.0, 5, "wsd", 5, cooldown_share=0.4)
    assert seen == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5])
    with pytest.raises(ValueError, match=r"train.lr_cooldown_share must be in \(0, 1\]"):
        TrainConfig(lr_cooldown_share=0.0)


def test_bad_recipe_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="train.lr_reference_batch must be >= 1"):
        TrainConfig(lr_reference_batch=0)
    with pytest.raises(ValueError, match="train.warmup_steps must be >= 0"):
        TrainConfig(warmup_steps=-3)
    with pytest.raises(ValueError, match="train.lr_scaling: expected one of 'none', 'sqrt'"):
        TrainConfig(lr_scaling="cube")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def work() -> Path:
    return small_demo_work("recipe-", SMALL)


def config(work: Path, *extra: str) -> Config:
    return load_config(DEMO_CONFIG, [*SMALL, *extra], workdir=work)


@pytest.mark.slow
def test_warmup_reaches_the_tables_fused_optimizer_and_is_logged(work: Path) -> None:
    """A batch of 1024 at reference 256: the tables' rate x4 (auto, the default), with a
    4-step warm-up against none. Adam's rate is set so small that the dense part barely moves,
    so a difference between the two runs' second losses comes from the tables: the warm-up
    reached the fused Adagrad (applied inside the tables' backward, outside torch's optimizer
    API). The effective rates and warm-up are the run's params."""
    base = ["train.batch_size=1024", "train.lr_reference_batch=256", "train.lr=1e-9"]
    warm = train(config(work, *base, "train.warmup_steps=4"))
    cold = train(config(work, *base, "train.warmup_steps=0"))
    assert warm.losses[0] == pytest.approx(cold.losses[0], rel=1e-6)  # same start
    assert abs(warm.losses[1] - cold.losses[1]) > 1e-4
    from recsys_moe.tracking import client_for

    cfg = config(work, *base)
    params = client_for(cfg).get_run(warm.run_id).data.params
    assert float(params["train.lr_effective"]) == pytest.approx(1e-9)
    assert float(params["train.embedding_lr_effective"]) == pytest.approx(
        4 * cfg.train.embedding_lr
    )
    assert params["train.warmup_steps_effective"] == "4"
    assert params["train.lr_schedule_effective"] == "constant"  # the demo's auto, above 256


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["true", "cudagraphs"])
def test_compiled_dense_part_trains_the_same_steps(work: Path, mode: str) -> None:
    """train.compile under TorchRec's TrainPipelineSparseDist (its fx trace runs through the
    compiled dense step): the same losses as the eager plain step. "cudagraphs" on a CPU
    compiles without graphs but takes the graphed path (a step marker per replay, the logged
    losses copied out of the graphs' outputs). A compiled run leaves each epoch's short last
    batch out (train.drop_last = auto), as the eager run here is told to."""
    eager = train(config(work, "train.drop_last=true"))
    compiled = train(config(work, f"train.compile={mode}", "train.pipeline=sparse_dist"))
    cfg = config(work)
    rows = load_manifest(cfg.dataset_dir)["rows"]["train"]
    assert rows % cfg.train.batch_size  # there is a short batch to leave out
    epochs = compiled.stopped_step // (rows // cfg.train.batch_size)
    assert compiled.stopped_step == epochs * (rows // cfg.train.batch_size)
    assert len(compiled.losses) == len(eager.losses) > 4
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    assert compiled.valid == pytest.approx(eager.valid, rel=1e-3)
    # the run's compiled graphs are gone with it: the next run in this process (a sweep's
    # trial) compiles afresh rather than counting against dynamo's recompile limit (8)
    assert _debug_get_cache_entry_list(TrainModule._dense_step.__code__) == []


@pytest.mark.parametrize(
    ("log_every", "seen"),
    [(1, r"the loss is not finite at step 2 \(train/loss nan"),  # the first flush of losses
     (1000, r"the validation predictions of \['p_click', 'watch_time_s'\] are not finite")],
)  # fmt: skip
def test_a_diverging_run_stops_with_a_clear_error(work: Path, log_every: int, seen: str) -> None:
    """Rates far too high: the run stops at the first losses that are not finite (step 2's: step
    1's loss precedes the first update) or, before any were read, at the first validation,
    naming what to lower; it saves no model and its MLflow run is marked failed."""
    from recsys_moe.tracking import client_for

    sets = ["train.lr=1e30", "train.epochs=2", f"train.log_every={log_every}"]
    cfg = config(work, *sets)
    with pytest.raises(TrainingDiverged, match=seen) as caught:
        train(cfg)
    assert "train.lr" in str(caught.value) and "train.embedding_lr" in str(caught.value)
    client = client_for(cfg)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    last = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[0]
    assert last.info.status == "FAILED"
    assert not (cfg.path("models") / last.info.run_id).exists()


@pytest.mark.slow
def test_a_compiled_run_keeps_its_compiled_code_for_the_next_run(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.compile_cache: torch.compile's caches go to the directory given; the next run of
    the same model loads the compiled graphs from there (inductor's cache hits, no miss) and
    its traced forward and backward (AOTAutograd's cache hits: the dense step's autocast no
    longer makes it bypass the cache), and trains the same steps; a run with other rates loads
    them too. The environment is the caller's again after each run."""
    for name in CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "cc"
    sets = ("train.compile=true", "train.epochs=1", f"train.compile_cache={cache}")
    counters.clear()
    first = train(config(work, *sets))
    assert counters["inductor"]["fxgraph_cache_miss"] > 0
    assert counters["inductor"]["fxgraph_cache_hit"] == 0
    assert counters["aot_autograd"]["autograd_cache_saved"] > 0
    assert counters["aot_autograd"]["autograd_cache_bypass"] == 0
    assert any((cache / "fxgraph").rglob("*")), "nothing cached in train.compile_cache"
    assert not {*CACHE_ENV} & set(os.environ)
    counters.clear()
    second = train(config(work, *sets))
    assert counters["inductor"]["fxgraph_cache_hit"] > 0
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    assert counters["aot_autograd"]["autograd_cache_hit"] > 0
    assert counters["aot_autograd"]["autograd_cache_miss"] == 0
    assert second.losses == first.losses
    assert not {*CACHE_ENV} & set(os.environ)
    counters.clear()  # a run that differs in its rates alone (a sweep's trial) shares them
    third = train(config(work, *sets, "train.lr=0.003", "train.embedding_lr=0.07"))
    assert counters["inductor"]["fxgraph_cache_hit"] > 0
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    assert counters["aot_autograd"]["autograd_cache_hit"] > 0
    assert third.losses[1:] != first.losses[1:]  # (other rates: other steps)


def test_the_compile_cache_is_the_workdirs_unless_the_environment_names_one(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(work)
    cpu = torch.device("cpu")
    for name in CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    with compile_cache(cfg, False, cpu) as path:  # nothing compiled: nothing set
        assert path is None and CACHE_ENV[0] not in os.environ
    with compile_cache(cfg, "step", cpu) as path:
        assert path == (work / "compile-cache").resolve()
        assert os.environ[CACHE_ENV[0]] == str(path)
        assert os.environ[CACHE_ENV[1]] == str(path / "triton" / "0")
    assert not {*CACHE_ENV} & set(os.environ)
    # torch puts its own default into the environment (importing torchrec does): not the user's
    monkeypatch.setenv(CACHE_ENV[0], _torch_cache_dir())
    with compile_cache(cfg, "step", cpu) as path:
        assert path == (work / "compile-cache").resolve()
    assert os.environ[CACHE_ENV[0]] == _torch_cache_dir()
    monkeypatch.setenv(CACHE_ENV[0], "/somewhere/else")
    with compile_cache(cfg, True, cpu) as path:  # auto: the environment's, left as it is
        assert path is None and os.environ[CACHE_ENV[0]] == "/somewhere/else"
    given = config(work, "train.compile_cache=my-cache")
    with compile_cache(given, True, cpu) as path:  # a setting wins over the environment
        assert path == (work / "my-cache").resolve()
        assert os.environ[CACHE_ENV[0]] == str(path)
    assert os.environ[CACHE_ENV[0]] == "/somewhere/else"
    bad = config(work, f"train.compile_cache={cfg.dataset_dir / 'cache'}")
    refused = pytest.raises(ValueError, match="train.compile_cache .* sits inside the training set")
    with refused, compile_cache(bad, True, cpu):
        pass
