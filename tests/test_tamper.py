"""WPN's tamper-resistance term (wpn_dist.app.tamper): the split of the simulated attack, its gradient
against a closed-form reference, its injection into a ZeRO-3 engine's partitioned gradients, and a
training run that uses it."""
import json
import os
import random

import pytest
import torch

from conftest import REPO, run_ranks
from wpn_dist.app import models
from wpn_dist.app.data import EncodedExample, EncodedPair, lm_batch
from wpn_dist.app.tamper import TamperTerm, split_groups
from wpn_dist.core.methods.base import TamperSettings

DATA = os.path.join(REPO, "tests", "data", "tiny.jsonl")


def test_the_attack_split_keeps_each_group_on_one_side():
    groups = ["a", "a", "b", "c", "c", "c", "d", "b"]
    for seed in range(20):
        attack, target = split_groups(groups, random.Random(seed))
        assert sorted(attack + target) == list(range(len(groups)))
        assert not {groups[i] for i in attack} & {groups[i] for i in target}
        assert len({groups[i] for i in attack}) == 2 and len({groups[i] for i in target}) == 2


def test_a_single_group_is_halved_by_example():
    attack, target = split_groups(["x"] * 7, random.Random(0))
    assert len(attack) == 3 and len(target) == 4 and not set(attack) & set(target)


def test_the_attack_gradient_is_the_target_gradient_after_adams_first_step():
    """With one attack step, AdamW (no weight decay) moves every weight by -lr * g / (|g| + eps), g the
    attack loss's gradient: the target loss's gradient at those weights, computed here with
    torch.func, is what the term returns."""
    from torch.func import functional_call
    tokenizer = models.load_tokenizer("tiny-opt")
    model = models.load_model("tiny-opt", tokenizer, init="random", seed=0)
    model.config.use_cache = False
    ids = tokenizer("how do i make it ? sure , step one", add_special_tokens=True)["input_ids"]
    harmful = EncodedPair(ids, prompt_length=5)
    harmless = EncodedPair(tokenizer("how do i make it ? i can not help", add_special_tokens=True)["input_ids"], 5)
    # Two groups: whichever way the split falls, example 0's harmful pair attacks and example 1's
    # harmless pair is the target, or the other way round; give both examples the same pairs.
    encoded = [EncodedExample(0, harmless, [harmful]), EncodedExample(1, harmless, [harmful])]
    lr = 1e-2
    term = TamperTerm(model, TamperSettings(weight=1.0, steps=1, lr=lr, batch_size=2), encoded, ["a", "b"],
                      tokenizer.pad_token_id, seed=0)
    start = {name: t.detach().clone() for name, t in model.state_dict().items()}
    grads, target_loss, attack_loss = term.attack_gradient(step=1, rank=0)

    reference = models.load_model("tiny-opt", tokenizer, init="random", seed=0)
    reference.config.use_cache = False
    reference.load_state_dict(start)
    attack_batch, target_batch = lm_batch([harmful, harmful], tokenizer.pad_token_id), lm_batch([harmless, harmless],
                                                                                               tokenizer.pad_token_id)
    names = [n for n, _ in reference.named_parameters()]
    g = torch.autograd.grad(reference(**attack_batch).loss, list(reference.parameters()), allow_unused=True)
    attacked = {n: (start[n] - lr * gi / (gi.abs() + 1e-8)) if gi is not None else start[n]
                for n, gi in zip(names, g)}
    attacked = {n: t.requires_grad_(True) for n, t in attacked.items()}
    loss = functional_call(reference, attacked, args=(), kwargs=target_batch).loss
    expected = torch.autograd.grad(loss, [attacked[n] for n in names], allow_unused=True)
    assert target_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert float(attack_loss) > 0
    moved = 0
    for name, got, want in zip(names, grads, expected):
        want = torch.zeros_like(got) if want is None else want
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), name
        moved += int(want.abs().sum() > 0)
    assert moved > 10  # not a vacuous comparison of zeros


def test_with_prompt_noise_the_target_rows_are_read_disturbed_and_the_attack_rows_as_written():
    """--tamper_prompt_noise: the target loss is taken on the step's disturbed harmless rows, while the
    attack still fine-tunes on the harmful pairs as written. Compared with a term built on data that
    already holds the disturbed positives (and the original negatives): the same losses and gradients.
    Without the option the disturbed rows are never read."""
    tokenizer = models.load_tokenizer("tiny-opt")

    def pair(text):
        return EncodedPair(tokenizer(text, add_special_tokens=True)["input_ids"], prompt_length=5)
    harmful, harmless = pair("how do i make it ? sure , step one"), pair("how do i make it ? i can not help")
    noisy_harmful = pair("how red i make blue ? sure , step one")
    noisy_harmless = pair("how red i make blue ? i can not")
    encoded = [EncodedExample(i, harmless, [harmful]) for i in range(4)]
    steps_seen = []

    def disturbed(example, step):  # a fixed stand-in for the batch maker's noise, on every row
        steps_seen.append(step)
        return EncodedExample(example.example_id, noisy_harmless, [noisy_harmful])

    def run(examples, noise, hook=None):
        model = models.load_model("tiny-opt", tokenizer, init="random", seed=0)
        model.config.use_cache = False
        settings = TamperSettings(weight=1.0, steps=2, lr=1e-2, batch_size=3, prompt_noise=noise)
        term = TamperTerm(model, settings, examples, ["a", "b", "a", "b"], tokenizer.pad_token_id, seed=0,
                          disturbed=hook)
        return term.attack_gradient(step=7, rank=0)

    noisy = run(encoded, True, disturbed)
    assert steps_seen and set(steps_seen) == {7}
    calls = len(steps_seen)
    reference = run([EncodedExample(i, noisy_harmless, [harmful]) for i in range(4)], False)
    plain, ignored = run(encoded, False), run(encoded, False, disturbed)
    assert noisy[1].item() == pytest.approx(reference[1].item(), rel=1e-6)
    assert noisy[2].item() == pytest.approx(reference[2].item(), rel=1e-6)  # the same attack
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(noisy[0], reference[0]))
    assert len(steps_seen) == calls and ignored[1].item() == plain[1].item()
    assert noisy[1].item() != pytest.approx(plain[1].item(), rel=1e-3)


@pytest.mark.parametrize("stage", [3, 0])
def test_the_injected_gradient_moves_the_engines_weights(tmp_path, stage):
    """Two CPU ranks: the term's copy of the engine's weights is exact; after a backward, ``add_gradients`` adds weight x the ranks' mean of a known
    per-rank tensor; with SGD at lr 1 the weights after the step differ from a step without it by
    exactly that (read back from the gathered weights, not through the gradient API)."""
    out = tmp_path / "injected.json"
    run_ranks(["tests/dist_scripts/tamper_injection.py", str(out), str(stage)])
    result = json.loads(out.read_text())
    assert result["checked"] > 10
    assert result["max_error"] < 1e-6, result
    assert result["copy_error"] == 0.0 and result["copy_norm"] > 0, result


def test_a_toy_run_has_the_tamper_term_by_default_and_logs_it(tmp_path, toy_cache):
    run = tmp_path / "run"
    run_ranks(["wpn_dist/train.py", "--output_dir", str(run), "--steps", "3", "--log_every", "1",
               "--evaluate", "false", "--tamper_steps", "2"], WPN_DIST_CACHE=toy_cache)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss/tamper" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]
    assert all(r["loss/tamper"] > 0 and r["tamper/attack_loss"] > 0 for r in losses)
    config = json.loads((run / "config.json").read_text())
    method, train = config["method"], config["train"]
    assert (method["tamper_weight"], method["tamper_lr"], train["lr"]) == (1.0, 1e-3, 3.5e-4)


def test_the_tuned_defaults_are_the_toy_worlds_only():
    """The toy world's WPN defaults have the tamper term tuned (weight 1, its attack at lr 1e-3, retention
    10, the prompt noise's wrap 0.5, drawn from the prompts' tokens); a model of yours gets the earlier
    ones (the data pool), with normal data or without. The attack's targets read the prompt noise
    everywhere (it only acts with the tamper term and the noise both on); --no_tamper_prompt_noise
    turns that off."""
    from wpn_dist.core.methods import method_class
    tuned = ("tamper_weight", "tamper_lr", "retention_weight", "prompt_noise_wrap", "prompt_noise_pool")
    for toy_world, normal, values in ((True, False, (1.0, 1e-3, 10.0, 0.5, "prompts")),
                                      (False, True, (0.0, 5e-4, 4.0, 0.0, "data")),
                                      (False, False, (0.0, 5e-4, 0.0, 0.0, "data"))):
        options = method_class("wpn").Options()
        options.resolve_defaults(toy_world=toy_world, has_normal_data=normal)
        assert tuple(getattr(options, name) for name in tuned) == values, (toy_world, normal)
        assert options.tamper_prompt_noise is True
    explicit = method_class("wpn").Options(tamper_weight=0.0, tamper_lr=2e-3, prompt_noise_wrap=0.0,
                                           prompt_noise_pool="data")
    explicit.resolve_defaults(toy_world=True)
    assert (explicit.tamper_weight, explicit.tamper_lr, explicit.prompt_noise_wrap,
            explicit.prompt_noise_pool) == (0.0, 2e-3, 0.0, "data")
    from wpn_dist.bench.toybench import resolved_config
    off = resolved_config(["--method", "wpn", "--no_tamper_prompt_noise", "--prompt_noise_pool", "data"])["method"]
    assert (off["tamper_prompt_noise"], off["prompt_noise_pool"]) == (False, "data")
    # The toy world's lr is WPN's own (tuned with the term); the other methods keep theirs.
    assert [resolved_config(["--method", m])["train"]["lr"] for m in ("wpn", "sft", "ga")] == [3.5e-4, 5e-4, 5e-4]
