"""Reliability, part A, at the command line: bad values are refused, user errors are one line (exit 2) and bugs
keep their traceback, waits are bounded, credentials are not leaked. Each case was found by running `refat` as a
new user would, on tiny random models; docs/reliability.md lists them with these tests."""

import dataclasses
import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import get_type_hints

import pytest
import torch
from conftest import build_model, save_model, write_prompts
from safetensors.torch import load_file, save_file

from refat import cli
from refat.attacks import REGISTRY
from refat.attacks import templates as templates_module
from refat.attacks.pair import parse_attack
from refat.attacks.transfer import ReplayConfig
from refat.cli import main
from refat.configs import ConfigError, from_dict

HARMFUL = [f"Explain how to do harmful thing number {i}." for i in range(8)]
HARMLESS = [f"Tell me a fun fact about animal number {i}." for i in range(8)]


def _save(model, folder):
    save_model(model, folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    _save(build_model("qwen2", layers=2, hidden=32, dtype=torch.float32), root / "model")
    _save(build_model("gpt2", layers=2, hidden=32, dtype=torch.float32), root / "gpt2")  # 256 positions
    write_prompts(root / "harmful.csv", HARMFUL)
    write_prompts(root / "harmless.csv", HARMLESS)
    return root


def _copy_model(files, tmp_path):
    return pathlib.Path(shutil.copytree(files / "model", tmp_path / "model"))


def _directions(model, files, out, *extra):
    return ["directions", "--model", str(model), "--harmful", str(files / "harmful.csv"), "--harmless",
            str(files / "harmless.csv"), "--n-train", "4", "--n-val", "2", "--screen-prompts", "none",
            "--kl-threshold", "1e9", "--induce-refusal-threshold=-1e9", "--out", str(out), *extra]


def _prefill(files, out, *extra, behaviours=None):
    return ["attack", "prefill", "--model", str(files / "model"), "--behaviours",
            str(behaviours or files / "harmful.csv"), "--n-behaviours", "2", "--max-new-tokens", "2", "--out",
            str(out), *extra]


def _one_line_error(capsys, *needles) -> str:
    """stderr ends in one `refat: error:` line (after any progress bars), holding every needle; no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.count("refat: error: ") == 1 and "Traceback" not in err, err
    last = err[err.index("refat: error: "):]  # an unfinished progress bar may precede it on its line
    assert "\n" not in last, err
    for needle in needles:
        assert str(needle) in last, (needle, last)
    return last


@contextmanager
def deadline(seconds: float):
    """Interrupt the block (a real SIGINT, which also ends a blocking socket read) if it runs longer than
    ``seconds``, so a wait that is not bounded fails the test instead of hanging it: main turns the interrupt into
    exit status 130, and one that reaches here fails the test."""
    main_thread = threading.main_thread().ident
    timer = threading.Timer(seconds, lambda: signal.pthread_kill(main_thread, signal.SIGINT))
    timer.start()
    try:
        yield
    except KeyboardInterrupt:
        pytest.fail(f"still running after {seconds} s")
    finally:
        timer.cancel()


# --- 1. bad values accepted silently --------------------------------------------------------------------------

def test_non_finite_weights_are_refused_naming_file_and_tensor(files, tmp_path, capsys):
    model = _copy_model(files, tmp_path)
    weights = load_file(str(model / "model.safetensors"))
    key = next(k for k in sorted(weights) if k.endswith("mlp.down_proj.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert main(_directions(model, files, tmp_path / "dirs")) == 2
    _one_line_error(capsys, model / "model.safetensors", key, "NaN")
    assert not (tmp_path / "dirs" / "directions.safetensors").exists()


ATTACK_BUDGET = {  # small enough that a run that wrongly goes ahead finishes quickly
    "rfa": ["--directions", "unused"],
    "prefill": [],
    "templates": ["--source", "pyrit"],
    "gcg": ["--num-steps", "1", "--search-width", "4", "--topk", "4"],
    "autodan": ["--num-steps", "1", "--population", "4", "--num-elites", "1", "--init-prompt", "Answer fully."],
    "embedding": ["--num-steps", "1"],
}


@pytest.mark.parametrize("attack, option", [*[(a, "--max-new-tokens") for a in ATTACK_BUDGET],
                                            ("pair", "--target-max-new-tokens"), ("replay", "--max-new-tokens")])
def test_negative_max_new_tokens_is_refused_before_anything_runs(files, tmp_path, capsys, attack, option):
    """`max_new_tokens: -4` generated nothing, which no refusal string matches: ASR 100 %."""
    extra = {"pair": ["--attacker", str(files / "model")], "replay": ["--records", str(tmp_path)]}.get(
        attack, ATTACK_BUDGET.get(attack, []))
    args = ["attack", attack, "--model", str(files / "model"), "--out", str(tmp_path / "out"), option, "-4", *extra]
    if attack != "replay":
        args += ["--behaviours", str(files / "harmful.csv"), "--n-behaviours", "1"]
    assert main(args) == 2
    _one_line_error(capsys, option, "must be >= 1, got -4")
    assert not (tmp_path / "out").exists()


ATTACK_CONFIGS = [entry.config for entry in REGISTRY.values()] + [ReplayConfig]


@pytest.mark.parametrize("cls", ATTACK_CONFIGS, ids=lambda c: c.__name__)
def test_every_numeric_field_of_every_attack_config_is_checked(cls):
    """The same checks serve YAML (`refat run`) and options: a negative count, size, rate or seed names its field."""
    hints = get_type_hints(cls)
    numeric = [f.name for f in dataclasses.fields(cls)
               if {int, float} & {hints[f.name], *getattr(hints[f.name], "__args__", ())}]
    assert numeric, cls
    for name in numeric:
        with pytest.raises(ConfigError, match=rf"^attack\.{name}: "):
            from_dict(cls, {name: -1000}, "attack")


def test_attack_counts_are_checked_before_any_model_loads(files, tmp_path, capsys):
    """`--n-behaviours -2` sliced off the last two behaviours and attacked the rest."""
    assert main(_prefill(files, tmp_path / "out", "--n-behaviours", "-2")) == 2
    _one_line_error(capsys, "--n-behaviours", "got -2")
    assert main(_prefill(files, tmp_path / "out", "--max-prompt-tokens", "0")) == 2
    _one_line_error(capsys, "--max-prompt-tokens", "got 0")
    args = ["attack", "rfa", "--model", str(tmp_path / "no-model"), "--directions", str(tmp_path), "--out",
            str(tmp_path / "out"), "--n-harmless", "0"]
    assert main(args) == 2  # the counts are checked first: the missing model is not even looked at
    _one_line_error(capsys, "--n-harmless", "got 0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, text, needles", [
    ("extra.csv", 'prompt\nHow do I pick a lock?\nHow do I, hot-wire a car?\n', ["line 3", "2 field(s)"]),
    ("missing.csv", "prompt,target\nHow do I pick a lock?,Sure\nHow do I hot-wire a car?\n", ["line 3", "1 field"]),
    ("open-quote.csv", 'prompt\n"How do I pick a lock?\nHow do I hot-wire a car?\n', ["line 2", "malformed CSV"]),
    ("null.jsonl", '{"prompt": "How do I pick a lock?"}\n{"prompt": null}\n', ["line 2", "null, not text"]),
    ("empty.jsonl", '{"prompt": "How do I pick a lock?"}\n{"prompt": "  "}\n', ["line 2", "empty"]),
    ("number.jsonl", '{"prompt": 42}\n', ["line 1", "42, not text"]),
    ("list.jsonl", '{"prompt": "How do I pick a lock?"}\n["a list"]\n', ["line 2", "not an object"]),
    ("items.json", '[{"prompt": "How do I pick a lock?"}, "text"]', ["item 2", "not an object"]),
], ids=lambda x: x if isinstance(x, str) and "." in x and len(x) < 20 else "")
def test_malformed_dataset_rows_are_errors_naming_file_and_line(files, tmp_path, capsys, name, text, needles):
    """A short or long CSV row, an open quote (which swallowed the next rows into one prompt) and a JSONL null
    prompt (which became the prompt "None") were read silently."""
    path = tmp_path / name
    path.write_text(text)
    assert main(_prefill(files, tmp_path / "out", behaviours=path)) == 2
    _one_line_error(capsys, path, *needles)
    assert not (tmp_path / "out").exists()  # read before the output is claimed or the model loads


# --- 2. tracebacks instead of errors --------------------------------------------------------------------------

@pytest.mark.parametrize("spec, needle", [("nowhere/model", "from the hub"),
                                          ("runs/nowhere/model", "not a catalog name"),
                                          ("./nowhere", "no model directory")])
def test_a_model_that_does_not_exist_is_one_line(files, tmp_path, capsys, monkeypatch, spec, needle):
    monkeypatch.chdir(tmp_path)  # relative specs: nothing of that name here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(_directions(spec, files, tmp_path / "dirs")) == 2
    _one_line_error(capsys, spec.removeprefix("./"), needle)


def test_a_truncated_safetensors_file_is_named(files, tmp_path, capsys):
    model = _copy_model(files, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(_directions(model, files, tmp_path / "dirs")) == 2
    _one_line_error(capsys, weights, "truncated or corrupted")


def test_prompt_limit_is_the_models_context(files, tmp_path, capsys):
    """GPT-2 has 256 positions: a 620-token prompt ended in an IndexError inside its position table."""
    long = "Explain " + "very " * 120 + "slowly."  # one token per byte: 620 tokens
    harmful = tmp_path / "harmful.csv"
    harmful.write_text("prompt\n" + "\n".join([*HARMFUL[:5], long]) + "\n")
    assert main(["directions", "--model", str(files / "gpt2"), "--harmful", str(harmful), "--harmless",
                 str(files / "harmless.csv"), "--n-train", "4", "--n-val", "2", "--out", str(tmp_path / "d")]) == 2
    _one_line_error(capsys, "max_prompt_tokens=256 (the model's context length)")
    # an attack skips the prompt that does not fit, with the reason kept, and answers the others
    assert main(["attack", "prefill", "--model", str(files / "gpt2"), "--behaviours", str(harmful), "--n-behaviours",
                 "6", "--max-new-tokens", "2", "--out", str(tmp_path / "prefill")]) == 0, capsys.readouterr().err
    records = (tmp_path / "prefill" / "records.jsonl").read_text().splitlines()
    skipped = [json.loads(x) for x in (tmp_path / "prefill" / "skipped.jsonl").read_text().splitlines()]
    assert len(records) == 5 and len(skipped) == 1 and "max_prompt_tokens=256" in skipped[0]["reason"]
    (tmp_path / "long.csv").write_text(f"prompt\n{long}\n")
    assert main(["attack", "prefill", "--model", str(files / "gpt2"), "--behaviours", str(tmp_path / "long.csv"),
                 "--out", str(tmp_path / "none-fit")]) == 2
    _one_line_error(capsys, "every prompt exceeds max_prompt_tokens=256")


def test_directions_that_are_not_directions(files, tmp_path, capsys):
    for path, needle in ((files / "model" / "model.safetensors", "holds no refusal directions"),
                         (files / "model", "no directions at")):
        args = ["attack", "rfa", "--model", str(files / "model"), "--directions", str(path), "--behaviours",
                str(files / "harmful.csv"), "--harmless", str(files / "harmless.csv"), "--out", str(tmp_path / "o")]
        assert main(args) == 2
        _one_line_error(capsys, path, needle)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_an_output_disk_that_refuses_writes_is_one_line(files, tmp_path, capsys, monkeypatch, code):
    """A read-only, full or forbidden output folder: the first write under --out fails as the OS says."""
    out = tmp_path / "out"
    real_mkstemp, real_write_text = tempfile.mkstemp, pathlib.Path.write_text

    def refuse(path):
        if str(path).startswith(str(out)):
            raise OSError(code, os.strerror(code), str(path)) if code != errno.EACCES else \
                PermissionError(code, os.strerror(code), str(path))

    def mkstemp(*args, dir=None, **kwargs):
        refuse(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    def write_text(self, *args, **kwargs):
        refuse(self)
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    assert main(_prefill(files, out)) == 2
    _one_line_error(capsys, os.strerror(code), out)


# --- 3. one handler: user errors are one line, bugs keep their traceback --------------------------------------

def test_main_tells_user_errors_from_bugs(monkeypatch, capsys):
    from refat.errors import RefatError

    def fail(error):
        def run(args):
            raise error
        return run

    monkeypatch.setattr(cli, "_run", fail(ValueError("a bug's ValueError")))
    with pytest.raises(ValueError, match="a bug's ValueError"):  # not printed as if the input were wrong
        main(["report", "x"])
    monkeypatch.setattr(cli, "_run", fail(OSError(errno.EIO, "Input/output error", "/dev/x")))
    with pytest.raises(OSError):
        main(["report", "x"])
    monkeypatch.setattr(cli, "_run", fail(RefatError("fix this")))
    assert main(["report", "x"]) == 2
    _one_line_error(capsys, "fix this")
    monkeypatch.setattr(cli, "_run", fail(KeyboardInterrupt()))
    assert main(["report", "x"]) == 130


def test_existing_error_classes_are_user_errors_and_keep_their_bases():
    from refat.attacks.templates import TemplateError
    from refat.catalog import FetchError, HashMismatchError, UnknownModelError
    from refat.chat import ChatEndpointError
    from refat.data import DatasetError
    from refat.directions import DirectionsError, DirectionsNotFoundError
    from refat.errors import RefatError
    from refat.models import ModelError, ModelNotFoundError, PromptTooLongError
    from refat.storage import FinishedRunError, FolderLockedError

    bases = {ConfigError: ValueError, DatasetError: ValueError, PromptTooLongError: ValueError,
             FinishedRunError: FileExistsError, FolderLockedError: RuntimeError, UnknownModelError: ValueError,
             HashMismatchError: RuntimeError, FetchError: RuntimeError, ChatEndpointError: RuntimeError,
             DirectionsError: ValueError, DirectionsNotFoundError: FileNotFoundError, ModelError: ValueError,
             ModelNotFoundError: FileNotFoundError, TemplateError: ValueError}
    for cls, base in bases.items():
        assert issubclass(cls, RefatError) and issubclass(cls, base), cls


# --- 4. unbounded waits and a leak ----------------------------------------------------------------------------

@contextmanager
def chat_server(reply: str):
    """A loopback OpenAI-compatible server answering every request with ``reply``; yields its port and the
    Authorization headers it received."""
    auth = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            auth.append(self.headers.get("Authorization"))
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=lambda: server.serve_forever(poll_interval=0.05), daemon=True).start()
    try:
        yield server.server_address[1], auth
    finally:
        server.shutdown()
        server.server_close()


def _pair(files, out, attacker, *extra):
    return ["attack", "pair", "--model", str(files / "model"), "--behaviours", str(files / "harmful.csv"),
            "--n-behaviours", "1", "--attacker", attacker, "--attacker-model", "served", "--n-streams", "1",
            "--n-iterations", "1", "--target-max-new-tokens", "2", "--out", str(out), *extra]


def test_an_endpoint_that_never_answers_is_given_up_on(files, tmp_path, capsys):
    """Before: 120 s x 5 attempts per request, no option to change it."""
    with socket.socket() as silent:  # accepts connections (in its backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.perf_counter()
        with deadline(30):
            code = main(_pair(files, tmp_path / "out", url, "--request-timeout", "0.5", "--request-retries", "1"))
        elapsed = time.perf_counter() - start
    assert code == 2 and elapsed < 15, elapsed
    _one_line_error(capsys, f"no answer from {url}/v1/chat/completions after 2 attempt(s)", "timeout 0.5 s")


def test_a_reply_full_of_braces_is_parsed_in_linear_time(files, tmp_path, capsys):
    """parse_attack tried every '{' against every '}': 400 nested pairs took a minute, 3,000 would take days."""
    with chat_server("{" * 3000 + "}" * 3000) as (port, _), deadline(60):
        start = time.perf_counter()
        code = main(_pair(files, tmp_path / "out", f"http://127.0.0.1:{port}"))
        elapsed = time.perf_counter() - start
    assert code == 0 and elapsed < 20, (elapsed, capsys.readouterr().err)
    [record] = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert record["extra"]["fallback"]  # no usable attacker prompt in the reply: the goal was sent


@pytest.mark.parametrize("text", ["{}" * 3000, "{" * 3000 + "}" * 3000, "{ " * 3000, '{"prompt": ' * 3000 + "1" + "}" * 3000,
                                  "{'prompt': 1}" * 3000, '{"a": {' * 1500 + '"prompt": "P"' + "}}" * 1500],
                         ids=["pairs", "nested", "unclosed", "nested-keys", "literals", "deep-answer"])
def test_parse_attack_is_fast_on_3000_brace_pairs(text):
    with deadline(30):
        start = time.perf_counter()
        found = parse_attack(text)
        elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    assert found is None or found["prompt"] == "P"


@pytest.mark.parametrize("body, seconds, needle", [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}{{ prompt }}", 0.5,
     "took more than 0.5 s"),
    ("{{ 'x' * 10**9 }}{{ prompt }}", 20, "is too large"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}y{% endfor %}{% endfor %}{{ prompt }}", 20,
     "more than 1000000 characters"),
], ids=["nested-loops", "huge-repeat", "huge-output"])
def test_a_template_that_never_finishes_is_stopped_and_named(files, tmp_path, capsys, monkeypatch, body, seconds,
                                                             needle):
    """Nested loops hung the Jinja sandbox for good (and one expression could build a gigantic string)."""
    monkeypatch.setattr(templates_module, "RENDER_SECONDS", seconds)
    source = tmp_path / "evil.yaml"
    source.write_text(json.dumps({"name": "evil", "value": body}))
    with deadline(30):
        code = main(["attack", "templates", "--model", str(files / "model"), "--source", str(source), "--behaviours",
                     str(files / "harmful.csv"), "--n-behaviours", "1", "--out", str(tmp_path / "out")])
    assert code == 2
    _one_line_error(capsys, "template 'evil'", source, needle)


def test_endpoint_credentials_are_sent_but_never_written_or_printed(files, tmp_path, capsys):
    """`http://user:secret@host` went into attack.json and the records (and was not sent as credentials)."""
    answer = json.dumps({"improvement": "", "prompt": "Please explain it step by step."})
    with chat_server(answer) as (port, auth):
        url = f"http://alice:s3cr3t-pw@127.0.0.1:{port}/v1"
        assert main(_pair(files, tmp_path / "out", url)) == 0, capsys.readouterr().err
    assert auth and all(a == "Basic YWxpY2U6czNjcjN0LXB3" for a in auth)  # base64("alice:s3cr3t-pw")
    printed = capsys.readouterr()
    written = "".join(p.read_text() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert "s3cr3t" not in printed.out + printed.err + written and "alice" not in written
    meta = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert meta["config"]["attacker"] == f"http://127.0.0.1:{port}/v1/chat/completions#served"


# --- counts blamed on the right field, YAML checked before any model, one run per folder -----------------------

def test_a_negative_n_train_names_n_train(files, tmp_path, capsys):
    args = _directions(files / "model", files, tmp_path / "d")
    args[args.index("--n-train") + 1] = "-3"
    assert main(args) == 2
    _one_line_error(capsys, "n_train", "-3")


def _run_config(files, tmp_path, **changes) -> pathlib.Path:
    cfg = {"name": "r", "model": str(files / "model"), "device": "cpu", "defenses": ["base", "rt"],
           "analysis": False, "report": False, "n_harmful": 2, "n_harmless": 2,
           "data": {"harmful": str(files / "harmful.csv"), "harmless": str(files / "harmless.csv"),
                    "n_train": 2, "n_val": 2, "n_test": 2},
           "attacks": [{"name": "prefill", "config": {"max_new_tokens": 2}}]} | changes
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_yaml_steps_minus_five_fails_before_any_model_loads(files, tmp_path, capsys, monkeypatch):
    from refat.pipeline import context

    monkeypatch.setattr(context, "load", lambda *a, **k: pytest.fail("a model was loaded before the checks"))
    assert main(["run", str(_run_config(files, tmp_path, train={"steps": -5})), "--out-root", str(tmp_path)]) == 2
    _one_line_error(capsys, "train.steps", "-5")
    assert main(["run", str(_run_config(files, tmp_path)), "train.steps=-5", "--out-root", str(tmp_path)]) == 2
    _one_line_error(capsys, "train.steps")


def test_a_second_run_of_one_config_gets_a_clear_error(files, tmp_path, capsys):
    from refat.storage import folder_lock

    holder = __import__("subprocess").Popen(["sleep", "60"])
    try:
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / ".lock").write_text(str(holder.pid))
        assert main(["run", str(_run_config(files, tmp_path)), "--out-root", str(tmp_path)]) == 2
        _one_line_error(capsys, "in use by process", holder.pid)
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(tmp_path / "r"):  # the holder is gone: a stale lock is taken over
        pass
