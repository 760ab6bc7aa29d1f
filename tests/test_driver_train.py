"""End-to-end runs of the driver recipe (in process, CPU, tiny models)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from vcyclefx.driver.config import ConfigError, TrainConfig
from vcyclefx.driver.train import load_weights, main
from vcyclefx.zoo.gpt import GPT, GPTConfig

FIELDS = {"event", "step", "schedule", "stage", "level", "loss", "val_loss", "lr", "tokens",
          "flops", "wall", "tok_per_s", "mfu"}


def tiny(tmp: Path, **kw) -> TrainConfig:
    data = tmp / "corpus.txt"
    if not data.exists():
        data.write_bytes(b"".join(Path(m.__file__).read_bytes() for m in (json, subprocess, pytest)))
    base = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32, batch_size=8, steps=60, warmup=5,
                lr=3e-3, eval_every=20, eval_batches=4, log_every=10, ckpt_every=0,
                schedule="baseline", data=str(data), cache_dir=str(tmp / "cache"),
                out=str(tmp / "run"), quiet=True)
    return TrainConfig.from_dict({**base, **kw})


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_baseline_run_learns_and_writes_metrics_summary_plot_and_weights(tmp_path, capsys):
    cfg = tiny(tmp_path)
    summary = main(cfg)
    out = Path(cfg.out)
    recs = rows(out)
    assert all(FIELDS <= r.keys() for r in recs)
    train = [r for r in recs if r["event"] == "train"]
    evals = [r for r in recs if r["event"] == "eval"]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in evals] == [0, 20, 40, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # from ~ln(256)=5.5 to < 4.5
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["tokens"] == 60 * 8 * 32
    assert train[-1]["flops"] == pytest.approx(60 * 8 * 32 * recs[0]["flops_per_token"])
    assert all(r["tok_per_s"] > 0 and 0 < r["mfu"] < 1 for r in train)
    s = summary["schedules"]["baseline"]
    assert s["final_val_loss"] == evals[-1]["val_loss"] == summary["baseline_final_val_loss"]
    assert s["flops_to_baseline_loss"] == s["total_flops"]  # it reaches its own loss at the end
    assert json.loads((out / "summary.json").read_text())["schedules"]["baseline"] == s
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "baseline" in capsys.readouterr().out.splitlines()[-1]
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    load_weights(model, out / "baseline.safetensors")  # strict=True into the original class
    assert torch.equal(model.lm_head.weight, model.wte.weight)


def test_existing_output_dir_and_changed_options_on_resume_are_refused(tmp_path):
    cfg = tiny(tmp_path, steps=3, eval_every=0)
    main(cfg)
    with pytest.raises(ConfigError, match="exists and is not empty.*--resume"):
        main(cfg)
    with pytest.raises(ConfigError, match=r"different lr=0.003 \(now 0.1\)"):
        main(cfg.replace(resume=cfg.out, lr=0.1))


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    cfg = tiny(tmp_path, steps=6, eval_every=3, log_every=1, ckpt_every=3)
    first = main(cfg)
    before = (Path(cfg.out) / "metrics.jsonl").read_text()
    again = main(cfg.replace(resume=cfg.out))
    assert (Path(cfg.out) / "metrics.jsonl").read_text() == before
    assert again["schedules"] == first["schedules"]


def test_vcyclefx_train_command_reports_bad_data_as_an_error(tmp_path, capsys):
    from vcyclefx.cli import main as vcyclefx_main

    rc = vcyclefx_main(["train", "--schedule", "baseline", "--data", str(tmp_path / "missing.txt"),
                        "-o", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "vcyclefx train: error: --data" in err and "no such file" in err


def test_compare_runs_both_schedules_on_the_same_data_and_reports_the_saving(tmp_path):
    cfg = tiny(tmp_path, schedule="compare", steps=80, eval_every=10, log_every=2,
               frontier_budgets=(1.0, 1.5), coarse_budgets=())  # the envelope: the test below
    summary = main(cfg)
    out = Path(cfg.out)
    recs = rows(out)
    assert list(summary["schedules"]) == ["baseline", "baseline-x1.5", "vcycle"]
    base, vc = summary["schedules"]["baseline"], summary["schedules"]["vcycle"]
    assert summary["schedules"]["baseline-x1.5"]["steps"] == 120
    # default V-cycle: 1.5x the steps; 5% level 0, 90% level 1 (lr x2), 5% level 0; the moments
    # are carried through both transitions
    assert [(s["level"], s["steps"], s["lr_scale"], s["optimizer"]) for s in vc["stages"]] == \
        [(0, 6, 1.0, "fresh"), (1, 108, 2.0, "carried"), (0, 6, 1.0, "carried")]
    f0, f1 = vc["stages"][0]["flops_per_token"], vc["stages"][1]["flops_per_token"]
    assert f0 == base["stages"][0]["flops_per_token"] and f1 < 0.5 * f0
    assert vc["total_flops"] == pytest.approx(120 * 8 * 32 * (0.1 * f0 + 0.9 * f1))
    assert vc["total_flops"] < 0.6 * base["total_flops"]
    vtrain = [r for r in recs if r["event"] == "train" and r["schedule"] == "vcycle"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in vtrain)
    assert vtrain[-1]["loss"] < vtrain[0]["loss"] - 1.0
    assert vc["final_val_loss"] < 5.0 and base["final_val_loss"] < 5.0
    # same init, same batch at every step, same lr: until the V-cycle coalesces at step 6, both
    # schedules train the same function (the GPT module and its captured level) identically
    btrain = [r for r in recs if r["event"] == "train" and r["schedule"] == "baseline"]
    assert [r["step"] for r in vtrain[:2]] == [r["step"] for r in btrain[:2]] == [2, 4]
    assert [r["loss"] for r in vtrain[:2]] == pytest.approx([r["loss"] for r in btrain[:2]],
                                                            abs=1e-5)
    reached = summary["vcycle_saving"]["flops"]
    if vc["flops_to_baseline_loss"] is None:
        assert reached is None
    else:
        assert reached == pytest.approx(1 - vc["flops_to_baseline_loss"] / base["total_flops"])
    assert "1x baseline" in summary["vcycle_saving"]["measure"]
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    load_weights(model, out / "vcycle.safetensors")  # level 0 of the cycle, strict, into GPT
    assert sorted(p.name for p in (out / "vcycle").iterdir()) == ["stage-000", "stage-001",
                                                                   "stage-002"]


def test_an_impossible_vcycle_fails_at_start_up_before_the_baseline_trains(tmp_path):
    from vcyclefx.errors import VCycleError

    cfg = tiny(tmp_path, schedule="compare", steps=10, vcycle_steps=10)  # 5% of 10 rounds to 0
    with pytest.raises(VCycleError, match="needs at least 1"):
        main(cfg)
    assert not (Path(cfg.out) / "metrics.jsonl").read_text()


def test_progress_bar_shows_step_level_loss_and_tokens_per_second_on_a_terminal(tmp_path):
    import os
    import pty
    import sys

    cfg = tiny(tmp_path)  # writes the corpus
    master, slave = pty.openpty()
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "train.py"),
           "--schedule", "baseline", "--steps", "20", "--log-every", "5", "--n-layer", "1",
           "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--batch-size", "4",
           "--data", cfg.data, "--cache-dir", cfg.cache_dir, "-o", str(tmp_path / "bar")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "baseline" in text and "20/20" in text
    assert "level=0 loss=" in text and "tok/s=" in text


def test_the_driver_trains_a_llama_config_directory_and_writes_hugging_face_models(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_dir = tmp_path / "llama"
    LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=32000, max_position_embeddings=16,
                use_cache=False).save_pretrained(cfg_dir)
    from vcyclefx.cli import main as vcyclefx_main

    data = tiny(tmp_path).data  # writes the small corpus
    args = ["train", "--model", str(cfg_dir), "--steps", "20", "--schedule", "compare",
            "--data", data, "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "run"),
            "--seq-len", "32", "--batch-size", "8", "--warmup", "2", "--eval-every", "10",
            "--eval-batches", "4", "--lr", "3e-3", "--quiet"]
    assert vcyclefx_main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for schedule in ("baseline", "vcycle"):
        loss = summary["schedules"][schedule]["final_val_loss"]
        assert loss < 5.0, (schedule, loss)  # below log(256) = 5.55: it learned something
        back = LlamaForCausalLM.from_pretrained(tmp_path / "run" / f"{schedule}-hf")
        assert back.config.vocab_size == 256  # the vocabulary comes from the data (bytes)
        assert back.config.num_key_value_heads == 2 and back.config.num_hidden_layers == 2
        back.load_state_dict(load_weights_dict(tmp_path / "run" / f"{schedule}.safetensors"),
                             strict=False)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert back(x).logits.shape == (2, 16, 256)


def load_weights_dict(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_bad_model_option_is_refused_before_anything_is_written(tmp_path):
    cfg = tiny(tmp_path, model=str(tmp_path / "no-such-config"))
    with pytest.raises(ConfigError, match="--model .*no-such-config"):
        main(cfg)
    assert not (tmp_path / "run").exists()


def test_compare_writes_the_effective_saving_against_the_0_75x_1x_and_1_5x_baselines(tmp_path, capsys):
    """summary.json's effective_saving is 1 - C / C_frontier(L) on the frontier of the three
    default baselines (log-linear in cost), in FLOPs and in wall seconds at the baselines' seconds
    per step; the table prints both measures, labelled, and a verdict."""
    from vcyclefx.driver.saving import Frontier

    cfg = tiny(tmp_path, schedule="compare", steps=40, eval_every=20, log_every=10,
               coarse_budgets=(1, 2), alone_sizes="1x16x2")
    summary = main(cfg)
    eff = json.loads((Path(cfg.out) / "summary.json").read_text())["effective_saving"]
    assert eff == summary["effective_saving"]
    bs = [summary["schedules"][n] for n in ("baseline-x0.75", "baseline", "baseline-x1.5")]
    vc = summary["schedules"]["vcycle"]
    assert [b["steps"] for b in bs] == [30, 40, 60]
    assert set(eff["budgets"]) == {"baseline-x0.75", "baseline", "baseline-x1.5"}
    flops = Frontier.from_points([(b["total_flops"], b["final_val_loss"]) for b in bs])
    need = flops.cost_at(vc["final_val_loss"], extrapolate=True)
    assert eff["flops"] == pytest.approx(1 - vc["total_flops"] / need.value)
    assert eff["flops_extrapolated"] == need.extrapolated
    # steady wall: per stage its steps x the median seconds per step between training records
    recs = rows(Path(cfg.out))
    for name, s in summary["schedules"].items():
        assert 0 < s["steady_wall_seconds"] <= 1.5 * s["wall_seconds"], name
    assert {r["schedule"] for r in recs if r["event"] == "stage"} == set(summary["schedules"])
    sps = sorted(b["steady_wall_seconds"] / b["steps"] for b in bs)[1]  # median of 3
    assert eff["baseline_seconds_per_step"] == pytest.approx(sps)
    wall = Frontier.from_points([(b["steps"] * sps, b["final_val_loss"]) for b in bs])
    assert eff["wall"] == pytest.approx(1 - vc["steady_wall_seconds"] / wall.cost_at(
        vc["final_val_loss"], extrapolate=True).value)
    text = capsys.readouterr().out
    assert "effective saving against the baseline frontier" in text
    assert "to reach the 1x baseline's final loss" in text and "Verdict: " in text
    assert (Path(cfg.out) / "baseline-x1.5.safetensors").exists()
    # the envelope: level 1's architecture (1 x 16, 1 head) trained alone at 1x and 2x --steps,
    # at --lr x the coarse lr scale; the V-cycle's saving against the cheaper of the two sizes
    from vcyclefx.driver.saving import Envelope

    alone = [summary["schedules"][n] for n in ("alone-L1-x1", "alone-L1-x2")]
    assert [a["steps"] for a in alone] == [40, 80]
    # the built-in GPT at level 1's sizes (1 block, 1 head, 16 wide); the coalesced level
    # itself keeps the attention's inner width (2 heads of 16), so it has more parameters
    from vcyclefx.driver.startup import coarse_sizes
    from vcyclefx.zoo.gpt import GPT, GPTConfig

    assert coarse_sizes(cfg, 1) == (1, 1, 16)
    coarse_params = sum(p.numel() for p in GPT(GPTConfig(
        block_size=32, vocab_size=256, n_layer=1, n_head=1, n_embd=16)).parameters())
    assert all(a["params"] == coarse_params for a in alone)
    assert vc["stages"][1]["params"] > coarse_params
    assert vc["params"] == bs[0]["params"] and vc["tokens_per_param"] == vc["tokens"] / vc["params"]
    # --alone-sizes 1x16x2: one more size of the envelope (1 block, 2 heads, 16 wide), at the
    # same budgets and the coarse lr scale
    extra = [summary["schedules"][n] for n in ("alone-1x16x2-x1", "alone-1x16x2-x2")]
    assert [a["steps"] for a in extra] == [40, 80]
    extra_params = sum(p.numel() for p in GPT(GPTConfig(
        block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=16)).parameters())
    assert all(a["params"] == extra_params for a in extra)
    lrs = [r["lr"] for r in rows(Path(cfg.out))
           if r["event"] == "train" and r["schedule"] == "alone-1x16x2-x1"]
    assert max(lrs) == pytest.approx(2 * cfg.lr, rel=0.05)  # the coarse lr scale, near the peak
    env = eff["envelope"]
    assert set(env["sizes"]) == {"level0", "level1", "1x16x2"}
    assert env["params"]["level1"] == coarse_params and env["params"]["1x16x2"] == extra_params
    hull = Envelope({"level0": flops, "level1": Frontier.from_points(
        [(a["total_flops"], a["final_val_loss"]) for a in alone]), "1x16x2":
        Frontier.from_points([(a["total_flops"], a["final_val_loss"]) for a in extra])})
    need = hull.cost_at(vc["final_val_loss"], extrapolate=True)
    assert env["flops"] == pytest.approx(1 - vc["total_flops"] / need.value)
    assert env["flops"] <= eff["flops"] + 1e-12 or need.extrapolated  # the hull is never dearer
    assert env["size_at_loss"] in ("level0", "level1", "1x16x2")
    assert "saving against the envelope" in text and "tokens/param" in text
