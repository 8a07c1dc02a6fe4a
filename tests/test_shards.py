"""Top-k shards: writer against teacher_topk, the lazy loader, resume, and the CLI's loading path."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfuse import teacher_topk
from kdfuse.shards import MANIFEST, TopkShards, shard_name, write_topk_shards

VOCAB, WIDTH, SEQ_LEN, K = 50, 8, 6, 4
NUM_SEQUENCES = 12  # shards of 5, 5, 2
OPTIONS = dict(k=K, seq_len=SEQ_LEN, batch_size=3, sequences_per_shard=5)


class TinyTeacher(torch.nn.Module):
    """Embedding + one linear layer as the trunk, and an lm_head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.layer = torch.nn.Linear(WIDTH, WIDTH)
        self.lm_head = torch.nn.Linear(WIDTH, VOCAB, bias=False)

    def trunk(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layer(self.embed(input_ids)))


class CountingHidden:
    """hidden_fn that counts its calls and can fail on a given call (a simulated crash)."""

    def __init__(self, teacher: TinyTeacher, fail_on_call: int | None = None):
        self.teacher, self.fail_on_call, self.calls = teacher, fail_on_call, 0

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        assert input_ids.dtype == torch.int64 and input_ids.shape[1] == SEQ_LEN
        return self.teacher.trunk(input_ids)


@pytest.fixture
def teacher() -> TinyTeacher:
    return TinyTeacher()


@pytest.fixture
def tokens(tmp_path: Path) -> np.memmap:
    """A uint16 token file of 12 sequences plus a tail that is too short to be one."""
    path = tmp_path / "tokens.bin"
    data = np.random.default_rng(0).integers(0, VOCAB, NUM_SEQUENCES * SEQ_LEN + 4, dtype=np.uint16)
    data.tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


def expected_topk(teacher: TinyTeacher, tokens: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    sequences = np.asarray(tokens[: NUM_SEQUENCES * SEQ_LEN]).reshape(NUM_SEQUENCES, SEQ_LEN)
    with torch.no_grad():
        hidden = teacher.trunk(torch.from_numpy(sequences.astype(np.int64)))
    ids, logprobs = teacher_topk(hidden, teacher.lm_head.weight, K)
    return sequences, ids, logprobs


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("shard-"))


def test_written_values_equal_teacher_topk(teacher, tokens, tmp_path):
    out = tmp_path / "out"
    done = []
    manifest = write_topk_shards(
        CountingHidden(teacher),
        teacher.lm_head.weight,
        tokens,
        out,
        dtype="float32",
        progress=lambda i, n: done.append((i, n)),
        **OPTIONS,
    )
    assert done == [(1, 3), (2, 3), (3, 3)]
    assert shard_files(out) == [shard_name(i) for i in range(3)]
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert manifest["complete"] and manifest["num_sequences"] == NUM_SEQUENCES
    assert [s["sequences"] for s in manifest["shards"]] == [5, 5, 2]
    assert (manifest["k"], manifest["seq_len"], manifest["vocab"], manifest["dtype"]) == (K, SEQ_LEN, VOCAB, "float32")

    sequences, ids, logprobs = expected_topk(teacher, tokens)
    with np.load(out / shard_name(1)) as shard:
        assert shard["tokens"].dtype == np.uint16 and shard["ids"].dtype == np.int32
        np.testing.assert_array_equal(shard["tokens"], sequences[5:10])
        np.testing.assert_array_equal(shard["ids"], ids[5:10].numpy())
        np.testing.assert_allclose(shard["logprobs"], logprobs[5:10].numpy(), rtol=1e-6, atol=1e-6)

    data = TopkShards(out)
    assert len(data) == NUM_SEQUENCES
    for i in [0, 4, 5, 11, -1]:
        item = data[i]
        assert item["input_ids"].dtype == item["topk_ids"].dtype == torch.int64
        assert item["topk_logprobs"].dtype == torch.float32
        torch.testing.assert_close(item["input_ids"], torch.from_numpy(sequences[i].astype(np.int64)))
        torch.testing.assert_close(item["topk_ids"], ids[i])
        torch.testing.assert_close(item["topk_logprobs"], logprobs[i], rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexError):
        data[NUM_SEQUENCES]


def test_loader_caches_one_shard_and_collates(teacher, tokens, tmp_path):
    write_topk_shards(teacher.trunk, teacher.lm_head.weight, tokens, tmp_path, **OPTIONS)
    data = TopkShards(tmp_path)
    data[7]
    assert data._cached is not None and data._cached[0] == 1
    data[10]
    assert data._cached[0] == 2  # the previous shard's arrays are gone
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert batch["topk_ids"].shape == (4, SEQ_LEN, K) and batch["input_ids"].shape == (4, SEQ_LEN)


def test_float16_logprobs(teacher, tokens, tmp_path):
    write_topk_shards(teacher.trunk, teacher.lm_head.weight, tokens, tmp_path, **OPTIONS)  # float16 default
    with np.load(tmp_path / shard_name(0)) as shard:
        assert shard["logprobs"].dtype == np.float16
    _, _, logprobs = expected_topk(teacher, tokens)
    got = torch.stack([TopkShards(tmp_path)[i]["topk_logprobs"] for i in range(NUM_SEQUENCES)])
    torch.testing.assert_close(got, logprobs, rtol=1e-3, atol=1e-3)


def test_resume_skips_complete_shards(teacher, tokens, tmp_path):
    first = CountingHidden(teacher)
    reference = write_topk_shards(first, teacher.lm_head.weight, tokens, tmp_path, **OPTIONS)
    assert first.calls == 2 + 2 + 1  # batches of 3 over shards of 5, 5, 2
    before = (tmp_path / shard_name(0)).stat().st_mtime_ns

    again = CountingHidden(teacher)
    assert write_topk_shards(again, teacher.lm_head.weight, tokens, tmp_path, **OPTIONS) == reference
    assert again.calls == 0
    assert (tmp_path / shard_name(0)).stat().st_mtime_ns == before

    (tmp_path / shard_name(1)).unlink()
    missing = CountingHidden(teacher)
    write_topk_shards(missing, teacher.lm_head.weight, tokens, tmp_path, **OPTIONS)
    assert missing.calls == 2

    redo = CountingHidden(teacher)
    write_topk_shards(redo, teacher.lm_head.weight, tokens, tmp_path, resume=False, **OPTIONS)
    assert redo.calls == 5


def test_resume_with_metadata_that_json_changes(teacher, tokens, tmp_path):
    metadata = {"layers": (1, 2), 3: "x"}  # on disk: a list and a string key
    first = write_topk_shards(teacher.trunk, teacher.lm_head.weight, tokens, tmp_path, metadata=metadata, **OPTIONS)
    again = CountingHidden(teacher)
    resumed = write_topk_shards(again, teacher.lm_head.weight, tokens, tmp_path, metadata=metadata, **OPTIONS)
    assert again.calls == 0
    # Both return the manifest as written.
    assert first == resumed == json.loads((tmp_path / MANIFEST).read_text())
    assert first["metadata"] == {"layers": [1, 2], "3": "x"}


def test_crash_and_leftover_temp_file(teacher, tokens, tmp_path):
    crashing = CountingHidden(teacher, fail_on_call=4)  # the second batch of shard 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_topk_shards(crashing, teacher.lm_head.weight, tokens, tmp_path, dtype="float32", **OPTIONS)
    assert shard_files(tmp_path) == [shard_name(0)]
    with pytest.raises(ValueError, match="incomplete"):
        TopkShards(tmp_path)
    # What a crash inside np.savez would leave behind (autotune.write_atomic's temporary).
    (tmp_path / f".{shard_name(1)}.k3x9.tmp").write_bytes(b"half a shard")

    resumed = CountingHidden(teacher)
    write_topk_shards(resumed, teacher.lm_head.weight, tokens, tmp_path, dtype="float32", **OPTIONS)
    assert resumed.calls == 2 + 1
    assert shard_files(tmp_path) == [shard_name(i) for i in range(3)]
    assert not list(tmp_path.glob(".shard-*"))  # the temporary is gone
    _, ids, logprobs = expected_topk(teacher, tokens)
    data = TopkShards(tmp_path)
    torch.testing.assert_close(torch.stack([data[i]["topk_ids"] for i in range(NUM_SEQUENCES)]), ids)
    torch.testing.assert_close(
        torch.stack([data[i]["topk_logprobs"] for i in range(NUM_SEQUENCES)]), logprobs, rtol=1e-6, atol=1e-6
    )


def test_resume_refuses_another_configuration(teacher, tokens, tmp_path):
    write_topk_shards(teacher.trunk, teacher.lm_head.weight, tokens, tmp_path, **OPTIONS)
    other = {**OPTIONS, "k": K - 1}
    with pytest.raises(ValueError, match=r"different configuration \(k: 4 on disk, 3 now\)"):
        write_topk_shards(teacher.trunk, teacher.lm_head.weight, tokens, tmp_path, **other)
    write_topk_shards(teacher.trunk, teacher.lm_head.weight, tokens, tmp_path, resume=False, **other)
    assert TopkShards(tmp_path)[0]["topk_ids"].shape == (SEQ_LEN, K - 1)


def test_new_configuration_never_keeps_old_shards(teacher, tokens, tmp_path):
    """resume=False removes old shards before writing the new manifest: a crash of the new run
    followed by a resume must recompute them, not reuse the old configuration's files."""
    write_topk_shards(teacher.trunk, teacher.lm_head.weight, tokens, tmp_path, **OPTIONS)
    other = {**OPTIONS, "k": K - 1}
    with pytest.raises(RuntimeError):
        write_topk_shards(CountingHidden(teacher, 1), teacher.lm_head.weight, tokens, tmp_path, resume=False, **other)
    assert shard_files(tmp_path) == []
    resumed = CountingHidden(teacher)
    write_topk_shards(resumed, teacher.lm_head.weight, tokens, tmp_path, **other)
    assert resumed.calls == 5


@pytest.mark.parametrize(
    "tokens_arg,kwargs,match",
    [
        (np.zeros((2, 30), dtype=np.uint16), {}, "tokens must be a 1-D integer array"),
        (np.zeros(30, dtype=np.float32), {}, "tokens must be a 1-D integer array"),
        (np.zeros(5, dtype=np.uint16), {}, "fewer than one sequence"),
        (np.zeros(30, dtype=np.uint16), {"k": VOCAB + 1}, "need 1 <= k <= vocab <= Vt"),
        (np.zeros(30, dtype=np.uint16), {"batch_size": 0}, "batch_size must be an int >= 1"),
        (np.zeros(30, dtype=np.uint16), {"dtype": "bfloat16"}, "dtype must be one of"),
    ],
)
def test_writer_errors(teacher, tmp_path, tokens_arg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_topk_shards(teacher.trunk, teacher.lm_head.weight, tokens_arg, tmp_path, **{**OPTIONS, **kwargs})


def test_loader_rejects_foreign_manifest(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(ValueError, match="is not a kdfuse-topk-shards v1 manifest"):
        TopkShards(tmp_path)


# --- tools/topk_shards.py ----------------------------------------------------------------------


def load_tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "topk_shards.py"
    spec = importlib.util.spec_from_file_location("topk_shards_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeCausalLM(torch.nn.Module):
    """Just the parts of a transformers causal LM that the tool touches."""

    def __init__(self, teacher: TinyTeacher):
        super().__init__()
        self.teacher = teacher
        self.config = types.SimpleNamespace(final_logit_softcapping=None)
        self.base_model = lambda input_ids, use_cache: types.SimpleNamespace(last_hidden_state=teacher.trunk(input_ids))

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.teacher.lm_head


def test_cli_with_a_stand_in_for_transformers(teacher, tokens, tmp_path, monkeypatch):
    loaded = []

    def from_pretrained(name, dtype):
        loaded.append((name, dtype))
        return FakeCausalLM(teacher)

    fake = types.SimpleNamespace(AutoModelForCausalLM=types.SimpleNamespace(from_pretrained=from_pretrained))
    monkeypatch.setitem(sys.modules, "transformers", fake)
    out = tmp_path / "cli"
    argv = [
        "--tokens",
        str(tokens.filename),
        "--token-dtype",
        "uint16",
        "--out",
        str(out),
        "--hf-model",
        "tiny",
        "--k",
        str(K),
        "--seq-len",
        str(SEQ_LEN),
        "--batch-size",
        "3",
        "--sequences-per-shard",
        "5",
        "--logprob-dtype",
        "float32",
        "--model-dtype",
        "float32",
        "--device",
        "cpu",
    ]
    assert load_tool().main(argv) == 0
    assert loaded == [("tiny", torch.float32)]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["metadata"]["teacher"] == "tiny" and manifest["complete"]
    _, ids, _ = expected_topk(teacher, tokens)
    torch.testing.assert_close(TopkShards(out)[3]["topk_ids"], ids[3])


def test_cli_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes the import fail
    with pytest.raises(SystemExit, match="needs transformers"):
        load_tool().load_hf_teacher("tiny", "cpu", torch.float32)
