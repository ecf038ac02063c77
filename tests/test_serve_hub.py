"""`tunelab serve` with a hub base: the model id clients list and send back, and `model.revision`
honoured by the plan and by both backends (the vLLM one through a stand-in ``vllm``).

The hub cache is laid out on disk by tests/test_hub_models.py's fixtures, offline, with network
connections refused.
"""

import pytest
import torch
from fastapi.testclient import TestClient

from tunelab.config import save_config
from tunelab.errors import ConfigError
from tunelab.runs import RunDir
from tunelab.serve.app import build_engine, create_app
from tunelab.serve.catalog import plan
from tunelab.serve.vllm_backend import VllmBackend
from tunelab.testing.tiny import save_tiny_model_dir

from test_grpo_vllm import fake_vllm  # noqa: F401  (fixture)
from test_hub_models import IDS, MAIN, REPO, V2, hf_home, logits, offline_hub  # noqa: F401  (fixtures)
from test_serve import QUESTIONS, ask, chat_ids, direct, make_run

CPU = torch.device("cpu")


def hub_run(run_dir, base_dir, seed: int, revision: str | None):
    """A LoRA run on ``base_dir``'s weights whose config names the base as REPO at ``revision``."""
    make_run(run_dir, base_dir, seed)
    cfg = RunDir(run_dir).read_config()
    cfg.model = cfg.model.model_copy(update={"name_or_path": REPO, "revision": revision})
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def test_a_hub_base_is_listed_and_accepted_under_its_whole_hub_id(offline_hub, tiny_model_dir):
    """An OpenAI client sends back the id /v1/models listed: the whole org/name, as vLLM names hub models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with TestClient(create_app(build_engine([REPO], device=CPU))) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [REPO]
        assert client.get(f"/v1/models/{REPO}").json()["id"] == REPO
        answer = ask(client, REPO, QUESTIONS[0])
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == REPO
        unknown = ask(client, REPO.split("/")[1], QUESTIONS[0])  # the last part alone is another id
        assert unknown.status_code == 404 and REPO in unknown.json()["error"]["message"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = {REPO: AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()}  # REPO's main is this model
    expected = direct(reference, tok, REPO, chat_ids(tok, QUESTIONS[0]))[0]
    assert answer.json()["choices"][0]["message"]["content"] == expected


def test_runs_on_a_hub_base_share_it_per_revision(offline_hub, tiny_model_dir, tmp_path):
    seed1 = save_tiny_model_dir(tmp_path / "seed1", seed=1)  # the weights of REPO's v2
    by_tag = hub_run(tmp_path / "by-tag", seed1, 1, "v2")
    by_commit = hub_run(tmp_path / "by-commit", seed1, 2, V2)
    served = plan([str(by_tag), str(by_commit)])
    assert served.base_id == REPO and [run.id for run in served.runs] == ["by-tag", "by-commit"]
    on_main = hub_run(tmp_path / "on-main", tiny_model_dir, 3, None)
    with pytest.raises(ConfigError, match=rf"on-main was trained on '{REPO}' and .*by-tag on '{REPO}' \(revision "
                                          r"'v2'\)\. Start one `tunelab serve` per base model"):
        plan([str(by_tag), str(on_main)])


def test_the_transformers_backend_serves_the_base_at_the_runs_revision(offline_hub, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    seed1 = save_tiny_model_dir(tmp_path / "seed1", seed=1)
    base = build_engine([str(hub_run(tmp_path / "run", seed1, 1, "v2"))], device=CPU).models[REPO]
    with base.activate(), torch.no_grad():
        served = base.run.model(input_ids=IDS).logits
    want, main = (logits(AutoModelForCausalLM.from_pretrained(path).eval()) for path in (seed1, tiny_model_dir))
    assert torch.allclose(served, want, atol=1e-5) and not torch.allclose(served, main, atol=1e-2)


def test_the_vllm_backend_loads_the_snapshot_of_the_runs_revision(offline_hub, tmp_path, fake_vllm):  # noqa: F811
    run = hub_run(tmp_path / "run", save_tiny_model_dir(tmp_path / "seed1", seed=1), 1, "v2")
    backend = VllmBackend.load(plan([str(run)]), max_batch_size=4)
    made = fake_vllm.made[-1]
    assert made["model"] == str(offline_hub / "hub" / "models--tunelab-test--tiny-llama" / "snapshots" / V2)
    assert made["enable_lora"] and made["max_lora_rank"] == 8
    assert set(backend.models) == {"run", REPO} and backend.lora[REPO] is None
    assert backend.lora["run"].lora_path == str(run / "adapter")
    assert MAIN not in made["model"]
