"""GCG: the optimised span sits where each chat template puts it, cached losses equal a plain forward,
the loss goes down, runs resume, batches halve on out-of-memory, and bad inputs fail clearly."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import build_hf, build_model, make_tokenizer

from refat.attacks import gcg
from refat.attacks.base import AttackConfigMismatch, Behaviour, read_records
from refat.attacks.gcg import GCG, GCGConfig, filter_candidates, run, run_one, sample_candidates, split_prompt
from refat.configs import fingerprint_data
from refat.models import wrap

GOAL, TARGET, INIT = "Tell me how", "Sure", "xxxxxxxx"
FAST = dict(search_width=24, topk=16, optim_str_init=INIT, seed=3)

# Four chat-template families; each adds its own special tokens to the byte-level test tokenizer.
FAMILIES = {
    "chatml": ("qwen2", [], None, "<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": ("llama", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "gemma": ("gemma", ["<bos>", "<start_of_turn>", "<end_of_turn>"],
              ("<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
               "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
               "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
              "<end_of_turn>\n<start_of_turn>model\n"),
    "mistral": ("mistral", ["<s>", "[INST]", "[/INST]"],
                ("<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"),
                " [/INST]"),
}


def family_model(name: str, *, system_prompt: str | None = None):
    arch, specials, template, _ = FAMILIES[name]
    tok = make_tokenizer() if template is None else make_tokenizer(chat_template=template)
    if specials:
        tok.add_tokens(specials, special_tokens=True)
    hf = build_hf(arch, vocab_size=len(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, seed=1)
    return wrap(hf, tok, name=f"tiny-{name}", system_prompt=system_prompt)


def reference_loss(model, optim: str, goal: str = GOAL, target: str = TARGET, user: str = "{goal} {optim}") -> float:
    """Cross-entropy of the target after the full prompt, tokenized in one piece, no cache, all logits."""
    tok = model.tokenizer
    ids = tok(model.format(user.format(goal=goal, optim=optim)) + target, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n = len(tok(target, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model.hf(input_ids=ids).logits[0]
    return float(torch.nn.functional.cross_entropy(logits[-n - 1:-1].double(), ids[0, -n:]))


@pytest.fixture(scope="module")
def model():
    return build_model("llama", layers=2, hidden=32, seed=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_optimized_span_is_where_the_template_puts_it(family):
    m = family_model(family, system_prompt="Be brief." if family == "chatml" else None)
    tok = m.tokenizer
    s = split_prompt(m, GOAL, TARGET)
    assert s.text("OPT") == m.format(f"{GOAL} OPT")  # the model's own template, placeholder substituted
    assert s.before.endswith(GOAL + " ") and s.after == FAMILIES[family][3]
    optim_ids = tok(INIT, add_special_tokens=False)["input_ids"]
    full = tok(s.text(INIT) + TARGET, add_special_tokens=False)["input_ids"]
    assert s.before_ids + optim_ids + s.after_ids + s.target_ids == full  # byte-level: pieces tokenize as the whole
    span = full[len(s.before_ids):len(s.before_ids) + len(optim_ids)]
    assert tok.decode(span) == INIT
    for special in FAMILIES[family][1]:  # the family's markers are single special tokens, not bytes
        assert tok.convert_tokens_to_ids(special) in full or special not in s.text(INIT)

    # one step of GCG: the reported loss is the reference loss of the reported string at that span
    res = run_one(m, (GOAL, TARGET), GCGConfig(num_steps=2, **FAST), progress=False)
    assert len(res.strings) == 2
    changed = sum(a != b for a, b in zip(res.strings[0], INIT))
    assert len(res.strings[0]) == len(INIT) and changed <= 1  # n_replace=1 on a one-byte-per-token string
    for loss, string in zip(res.losses, res.strings):
        assert loss == pytest.approx(reference_loss(m, string), abs=1e-9)
    assert res.init_loss == pytest.approx(reference_loss(m, INIT), abs=1e-9)


def test_string_before_the_goal(model):
    cfg = GCGConfig(num_steps=2, placement="{optim_str}\n{goal}", **FAST)
    s = split_prompt(model, GOAL, TARGET, cfg.placement)
    assert s.before.endswith("<|im_start|>user\n") and s.after.startswith("\n" + GOAL + "<|im_end|>")
    res = run_one(model, (GOAL, TARGET), cfg, progress=False)
    for loss, string in zip(res.losses, res.strings):
        assert loss == pytest.approx(reference_loss(model, string, user="{optim}\n{goal}"), abs=1e-9)


def test_candidate_losses_equal_uncached_forward(model):
    """Batched, prefix-cached candidate losses (float64) equal a plain full forward per candidate."""
    attacker = GCG(model, GCGConfig(**FAST), progress=False)
    attacker.batch_size = 8  # several batches, each starting at its own earliest changed token
    s = split_prompt(model, GOAL, TARGET)
    attacker._prepare(s)
    ids = torch.tensor(model.tokenizer(INIT, add_special_tokens=False)["input_ids"])
    grad, cur_loss, _, cache = attacker._gradient(ids)
    assert cur_loss == pytest.approx(reference_loss(model, INIT), abs=1e-10)
    g = torch.Generator().manual_seed(0)
    cands = torch.unique(sample_candidates(ids, grad, 40, 16, 2, attacker.disallowed, g), dim=0)
    cands = cands[~(cands == ids).all(1)]
    first = (cands != ids).int().argmax(1)
    assert len(set(first.sort().values[::8].tolist())) > 3  # the batches start at several positions
    contiguous = []  # the vocabulary projection gets the target positions as one dense matrix (fast path)
    head = model.hf.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: contiguous.append(args[0].is_contiguous()))
    try:
        losses, _ = attacker._evaluate(cands, ids, cache)
    finally:
        handle.remove()
    assert contiguous and all(contiguous)
    ref = [reference_loss(model, model.tokenizer.decode(r.tolist())) for r in cands]
    assert torch.allclose(losses, torch.tensor(ref, dtype=torch.float64), atol=1e-10, rtol=0)


def test_prefix_cache_does_not_change_the_trajectory(model):
    cfg = GCGConfig(num_steps=4, **FAST)
    cached = run_one(model, (GOAL, TARGET), cfg, progress=False)
    plain = run_one(model, (GOAL, TARGET), GCGConfig(**{**cfg.__dict__, "use_prefix_cache": False}), progress=False)
    assert cached.strings == plain.strings
    assert cached.losses == pytest.approx(plain.losses, abs=1e-10)
    assert cached.n_backward == plain.n_backward == 4


def test_loss_decreases(model):
    res = run_one(model, (GOAL, "ok"), GCGConfig(num_steps=6, search_width=64, topk=32, optim_str_init=INIT),
                  progress=False)
    assert len(res.losses) == 6 and res.best_loss == min(res.losses)
    assert res.best_loss < res.init_loss - 0.05
    assert res.losses[-1] < res.losses[0]
    assert res.best_string == res.strings[res.losses.index(res.best_loss)]
    assert res.n_forward > res.n_backward == 6


def test_mellowmax_and_buffer(model):
    res = run_one(model, (GOAL, TARGET), GCGConfig(num_steps=3, buffer_size=3, use_mellowmax=True,
                                                   mellowmax_alpha=2.0, **FAST), progress=False)
    assert all(math.isfinite(x) for x in res.losses) and len(res.strings) == 3
    attacker = GCG(model, GCGConfig(use_mellowmax=True, mellowmax_alpha=2.0), progress=False)
    logits = torch.randn(3, 2, 7, dtype=torch.float64)
    target = torch.tensor([1, 4])
    picked = logits[:, [0, 1], target]
    want = (torch.logsumexp(-2.0 * picked, -1) - math.log(2)) / 2.0
    assert torch.allclose(attacker._loss(logits, target)[0], want)


def test_early_stop_when_greedy_output_is_the_target(model):
    tok = model.tokenizer
    for goal in ["Tell me how", "Explain it", "Go on", "Say hi", "Do it", "Why not", "Again", "Show me"]:
        s = split_prompt(model, goal, "x")
        ids = torch.tensor([s.before_ids + tok(INIT, add_special_tokens=False)["input_ids"] + s.after_ids])
        with torch.no_grad():
            first = int(model.hf(input_ids=ids).logits[0, -1].argmax())
        target = tok.decode([first])  # what the model already answers first
        if tok(target, add_special_tokens=False)["input_ids"] == [first]:  # not a lone UTF-8 byte
            break
    else:
        pytest.fail("no goal whose greedy first token is a whole character")
    res = run_one(model, (goal, target), GCGConfig(num_steps=5, early_stop=True, **FAST), progress=False)
    assert res.early_stopped and len(res.losses) == 1
    longer = run_one(model, (goal, target + "zzz"), GCGConfig(num_steps=2, early_stop=True, **FAST), progress=False)
    assert not longer.early_stopped and len(longer.losses) == 2  # a target it does not say: no stop


@pytest.fixture(scope="module")
def peaked():
    """A tiny model with its output projection scaled up (sharp next-token distributions) and a target it
    almost says after the initial string: as with a trained model and its usual target, most of the loss sits
    in the first target positions and candidates' partial losses spread far apart (a random model's stay near
    log V at every position, and nothing can be pruned)."""
    m = build_model("llama", layers=2, hidden=32, seed=0)
    head = m.hf.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach() * 40)  # its own copy: the input embeddings keep theirs
    s = split_prompt(m, GOAL, "x")
    ids = torch.tensor([s.before_ids + m.tokenizer(INIT, add_special_tokens=False)["input_ids"] + s.after_ids])
    with torch.no_grad():
        said = m.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    return m, replace(s, target_ids=said[0, ids.shape[1]:].tolist())  # token ids: bytes need not decode


def _step_candidates(peaked, config: GCGConfig):
    model, split = peaked
    attacker = GCG(model, config, progress=False)
    attacker.batch_size = 16
    attacker._prepare(split)
    ids = torch.tensor(model.tokenizer(INIT, add_special_tokens=False)["input_ids"])
    grad, _, _, cache = attacker._gradient(ids)
    cands = torch.unique(sample_candidates(ids, grad, 64, 32, 1, attacker.disallowed,
                                           torch.Generator().manual_seed(0)), dim=0)
    return attacker, cands[~(cands == ids).all(1)], ids, cache


def test_pruning_the_target_tail_keeps_the_best_candidate_and_its_loss(peaked, monkeypatch):
    attacker, cands, ids, cache = _step_candidates(peaked, GCGConfig(**FAST))
    full, _ = attacker._evaluate(cands, ids, cache)
    pruned, _ = attacker._evaluate(cands, ids, cache, prune=True)
    kept = pruned.isfinite()
    assert attacker._deferred(cache) == 3 and (~kept).any()  # 40 % of 8 positions; some candidates unfinished
    assert int(pruned.argmin()) == int(full.argmin()) and float(pruned.min()) == pytest.approx(float(full.min()))
    assert torch.allclose(pruned[kept], full[kept], atol=1e-9, rtol=0)
    assert (full[~kept] > full.min()).all()  # only candidates that could not be the best were left unfinished
    # a whole attack follows the same path as without pruning, with fewer positions computed
    monkeypatch.setattr(gcg, "split_prompt", lambda *args: peaked[1])
    cfg = GCGConfig(num_steps=3, **FAST)
    plain = run_one(peaked[0], (GOAL, "unused"), replace(cfg, prune_tail=0.0), progress=False)
    fast = run_one(peaked[0], (GOAL, "unused"), cfg, progress=False)
    assert fast.strings == plain.strings and fast.losses == pytest.approx(plain.losses, abs=1e-9)
    assert sum(fast.pruned) > 0 and plain.pruned == [0, 0, 0]


def test_pruning_scores_every_candidate_that_can_match_when_stopping_early(peaked):
    attacker, cands, ids, cache = _step_candidates(peaked, GCGConfig(early_stop=True, **FAST))
    full, full_match = attacker._evaluate(cands, ids, cache)
    pruned, match = attacker._evaluate(cands, ids, cache, prune=True)
    assert full_match.any() and not full_match.all() and pruned.isinf().any()
    assert (match == full_match).all() and torch.allclose(pruned[match], full[match], atol=1e-9, rtol=0)


def test_prune_tail_is_checked_and_left_out_of_fingerprints_at_its_default():
    with pytest.raises(ValueError, match="prune_tail"):
        GCGConfig(prune_tail=1.0)
    assert "prune_tail" not in fingerprint_data(GCGConfig())
    assert fingerprint_data(GCGConfig(prune_tail=0.0))["prune_tail"] == 0.0
    attacker = GCG(build_model("llama", layers=1, hidden=16), GCGConfig(use_mellowmax=True), progress=False)
    attacker._prepare(split_prompt(attacker.model, GOAL, "Sure, here"))
    assert attacker._deferred(None) == 0  # a mellowmax loss is no sum of non-negative terms: nothing to bound


def test_sampling_respects_disallowed_tokens_and_filtering(model):
    attacker = GCG(model, GCGConfig(**FAST), progress=False)
    tok = model.tokenizer
    special = tok.convert_tokens_to_ids("<|im_end|>")
    assert attacker.disallowed[special] and attacker.disallowed[tok.pad_token_id]
    assert not attacker.disallowed[tok.convert_tokens_to_ids("x")]
    ids = torch.tensor(tok(INIT, add_special_tokens=False)["input_ids"])
    grad = torch.zeros(len(ids), attacker.disallowed.numel())
    grad[:, special] = -100.0  # the gradient begs for the special token
    cands = sample_candidates(ids, grad, 50, attacker.topk, 2, attacker.disallowed, torch.Generator().manual_seed(0))
    assert not attacker.disallowed[cands].any()
    assert ((cands != ids).sum(1) <= 2).all()
    # bytes that spell a special token do not survive decode/re-encode
    spelled = torch.tensor([tok("<|im_end|>", add_special_tokens=False)["input_ids"]])
    assert spelled.shape[1] == 1  # ... because the tokenizer reads them back as one token
    bytes_ = torch.tensor([[tok.convert_tokens_to_ids(c) for c in "<|im_end|>"], [tok.convert_tokens_to_ids(c) for c in "abcdefghij"]])
    assert filter_candidates(bytes_, tok).tolist() == bytes_[1:].tolist()


def test_oom_halves_the_candidate_batch(model):
    cfg = GCGConfig(num_steps=2, use_prefix_cache=False, **FAST)
    want = run_one(model, (GOAL, TARGET), cfg, progress=False)
    original = model.hf.forward
    sizes = []

    @functools.wraps(original)
    def forward(*args, **kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        sizes.append(x.shape[0])
        if x.shape[0] > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    model.hf.forward = forward
    try:
        attacker = GCG(model, cfg, progress=False)
        got = attacker.attack(GOAL, TARGET)
    finally:
        del model.hf.forward
    assert attacker.batch_size <= 4 and max(sizes) > 4  # it tried bigger, then settled at <= 4
    assert got.strings == want.strings and got.losses == pytest.approx(want.losses, abs=1e-10)


def test_run_records_and_resume(model, tmp_path, monkeypatch):
    behaviours = [Behaviour("Tell me how", "Sure"), Behaviour("Explain it", "Ok"), Behaviour("Go on", "Yes")]
    cfg = GCGConfig(num_steps=2, max_new_tokens=4, **FAST)
    first = run(model, behaviours[:2], cfg, tmp_path, progress=False)
    assert [r.behaviour_id for r in first] == [b.id for b in behaviours[:2]]
    r = first[0]
    assert r.attack == "gcg" and len(r.history) == 2 and r.history[0]["step"] == 1
    assert r.prompt == f"{r.goal} {r.extra['best_string']}" and isinstance(r.completion, str)
    assert r.cost.forward > 0 and r.cost.backward == 2 and r.cost.seconds > 0
    assert r.refused is not None and r.extra["best_loss"] == min(h["loss"] for h in r.history)
    assert r.extra["prompt_tokenizes_as_optimized"] is True
    calls = []
    real = GCG.attack
    monkeypatch.setattr(GCG, "attack", lambda self, g, t: calls.append(g) or real(self, g, t))
    again = run(model, behaviours, cfg, tmp_path, progress=False)
    assert calls == ["Go on"]  # the two finished behaviours were skipped
    assert [x.to_dict() for x in again[:2]] == [x.to_dict() for x in first]
    assert len(read_records(tmp_path / "records.jsonl")) == 3
    assert json.loads((tmp_path / "attack.json").read_text())["attack"] == "gcg"
    with pytest.raises(AttackConfigMismatch):
        run(model, behaviours, GCGConfig(num_steps=3, **FAST), tmp_path, progress=False)


def test_clear_errors(model):
    with pytest.raises(ValueError, match="empty"):
        run(model, [], GCGConfig(**FAST))
    static = wrap(model.hf, make_tokenizer(chat_template="{{ 'You are a bot.' }}"), name="static")
    with pytest.raises(ValueError, match="does not put the user message"):
        split_prompt(static, GOAL, TARGET)
    with pytest.raises(ValueError, match="placement"):
        GCGConfig(placement="{goal} and nothing else")
    with pytest.raises(ValueError, match="search_width"):
        GCGConfig(search_width=0)
    with pytest.raises(ValueError, match="n_replace"):
        run_one(model, (GOAL, TARGET), GCGConfig(n_replace=9, optim_str_init="xyz"), progress=False)
    with pytest.raises(ValueError, match="target"):
        split_prompt(model, GOAL, "")
    assert gcg.user_message("G", "S", "{optim_str}\n{goal}") == "S\nG"


# ---------------------------------------------------------------------------------------------
# Probe sampling (Zhao et al. 2024): a draft model screens the candidates


def test_probe_sampling_with_the_target_as_draft_chooses_the_plain_search_candidates(model):
    """A draft identical to the target ranks exactly as the target does (ρ = 1): the target then scores only
    the probe and the draft's best, which is the plain search's best, so every step moves the same way."""
    cfg = GCGConfig(num_steps=4, **FAST)
    plain = run_one(model, (GOAL, TARGET), cfg, progress=False)
    twin = build_model("llama", layers=2, hidden=32, seed=0)  # a second copy: the same weights
    probed = run_one(model, (GOAL, TARGET), cfg, progress=False, draft=twin)
    assert probed.strings == plain.strings
    assert probed.losses == pytest.approx(plain.losses, abs=1e-10)
    assert probed.probe_agreement == pytest.approx([1.0] * 4)
    assert all(p < t for p, t in zip(probed.target_scored, plain.target_scored))  # the target scored fewer
    assert probed.n_draft_forward > 0  # (calls, not rows: the target makes more, smaller calls)


def test_probe_sampling_with_another_draft_runs_and_records(model):
    draft = build_model("llama", layers=1, hidden=32, seed=7)
    cfg = GCGConfig(num_steps=3, **{**FAST, "search_width": 48},
                    probe_sampling=gcg.ProbeSamplingConfig(draft="tiny-draft", r=2, sampling_factor=4))
    res = run_one(model, (GOAL, TARGET), cfg, progress=False, draft=draft)
    assert len(res.losses) == 3 and len(res.probe_agreement) == 3
    assert all(-1.0 <= rho <= 1.0 for rho in res.probe_agreement)
    for loss, string in zip(res.losses, res.strings):  # each step's loss is the target's own, of its string
        assert loss == pytest.approx(reference_loss(model, string), abs=1e-9)
    # every step the target scored the probe (1/4 of the distinct candidates) and at least one of the draft's best
    assert all(12 // 4 <= n < 48 for n in res.target_scored)


def test_probe_sampling_loads_the_draft_from_the_context_and_records_it(model, tmp_path):
    cfg = GCGConfig(num_steps=2, max_new_tokens=2, **FAST,
                    probe_sampling=gcg.ProbeSamplingConfig(draft=model.name))  # the target's name: no second copy
    (rec,) = run(model, [Behaviour(GOAL, TARGET)], cfg, tmp_path, progress=False)
    assert len(rec.extra["probe_agreement"]) == 2 and rec.extra["draft_forward"] > 0
    assert len(rec.extra["target_scored"]) == 2


def test_probe_sampling_errors(model):
    with pytest.raises(ValueError, match="pass the loaded draft"):
        GCG(model, GCGConfig(probe_sampling=gcg.ProbeSamplingConfig(draft="some/model")), progress=False)
    other = make_tokenizer()
    other.add_tokens(["<extra>"], special_tokens=True)
    stranger = wrap(build_hf("llama", vocab_size=len(other)), other, name="stranger")
    with pytest.raises(ValueError, match="does not share the tokenizer"):
        GCG(model, GCGConfig(**FAST), progress=False, draft=stranger)
    with pytest.raises(ValueError, match="sampling_factor"):
        gcg.ProbeSamplingConfig(sampling_factor=0)
